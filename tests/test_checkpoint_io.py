"""Atomic checkpoint writes: a failed write leaves the previous file intact, a finished one is complete."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from bnzoo.checkpoint_io import AtomicCheckpointIO
from bnzoo.io import atomic_torch_save, atomic_write_bytes, safe_torch_load


def test_write_replaces_the_file_whole_with_usual_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.ckpt"
    atomic_torch_save({"a": torch.ones(3)}, target)
    atomic_torch_save({"a": torch.zeros(3)}, target)
    assert torch.equal(safe_torch_load(target)["a"], torch.zeros(3))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["x.ckpt"]  # no temporary file left


class Exploding:
    """Fails half-way through being pickled, as a run killed while saving would."""

    def __reduce__(self):  # noqa: ANN204
        raise RuntimeError("killed while saving")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, target)
    with pytest.raises(RuntimeError, match="killed while saving"):
        atomic_torch_save({"step": torch.tensor(2), "bad": Exploding()}, target)
    assert int(safe_torch_load(target)["step"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_write_removes_its_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.ckpt"
    atomic_write_bytes(target, b"old")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_lightning_checkpoint_io_saves_atomically(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "a" / "b.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "a" / "b.ckpt")["state_dict"]["w"], torch.ones(2))
