"""No checkpoint runs code, steers an import or a download, or loads unverified from the zoo -- through every
loading entry point.

* Crafted pickles (zip and legacy formats, the payload in the hyperparameters or in the state dict, reached
  through a symlink) go through the Python API (``safe_torch_load``, ``load_pretrained``, ``create_model``,
  ``export_safetensors``, Lightning's ``AtomicCheckpointIO``, the tasks' and data modules'
  ``load_from_checkpoint``) and every command (``fit --ckpt_path`` with a file,
  with ``last`` and with a URL served on 127.0.0.1; ``validate``, ``test``, ``predict``, ``recalibrate``,
  ``export``, ``pretrained verify``), with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set: the payload's marker file is
  never created, and the command fails with one line naming the file.
* Hostile hyperparameters: a ``_class_path`` or nested ``class_path`` outside bnzoo/Lightning/torch (a module that
  would create a marker when imported), a foreign ``_instantiator``, a ``model_options.pretrained`` pointing at a
  URL (the server must see no request) or at the checkpoint itself.
* Hostile index entries (``../``, absolute, nested file names) and tampered zoo files loaded by name, by path, by
  symlink and by ``file://`` URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bnzoo import create_model, load_pretrained
from bnzoo.checkpoint_io import AtomicCheckpointIO
from bnzoo.data import DigitsDataModule
from bnzoo.io import UnreadableCheckpointError, UnsafeCheckpointError, safe_torch_load
from bnzoo.resources import CHECKPOINT_DIR_ENV
from bnzoo.tasks import ImageClassifier
from bnzoo.zoo import ChecksumError, export_safetensors, pretrained_info
from bnzoo.zoo.fetch import CACHE_DIR_ENV
from bnzoo.zoo.trust import UntrustedHyperparametersError
from tests.cli_forkserver import run_forked

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "checkpoints"
SMALL = "digits-mlp-bn"  # the zoo's smallest checkpoint; its config is configs/pretrained/digits-mlp-bn.yaml
CONFIG = ["--config", str(ROOT / "configs/pretrained/digits-mlp-bn.yaml")]
QUICK = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
         "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip
NO_WEIGHTS_ONLY = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


class RunsCode:
    """Unpickling this runs ``touch <marker>`` -- what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def zoo_checkpoint() -> dict:
    return torch.load(ZOO / pretrained_info(SMALL)["file"], weights_only=True)


def crafted(folder: Path, kind: str) -> tuple[Path, Path]:
    """(a crafted checkpoint of the zoo's digits MLP, the marker its payload would create). ``kind``: ``zip``
    (payload in the hyperparameters), ``legacy`` (torch's pre-zip format), ``state_dict`` (payload among the
    weights) or ``symlink`` (a symlink to a zip one)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"ran-{kind}"
    checkpoint = zoo_checkpoint()
    if kind == "state_dict":
        checkpoint["state_dict"]["model.payload"] = RunsCode(marker)
    else:
        checkpoint["hyper_parameters"]["norm_options"] = RunsCode(marker)
    path = folder / f"crafted-{kind}.ckpt"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=kind != "legacy")
    if kind == "symlink":
        link = folder / "link-to-crafted.ckpt"
        link.symlink_to(path)
        path = link
    return path, marker


KINDS = ("zip", "legacy", "state_dict", "symlink")


def test_the_crafted_files_do_run_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: each crafted file runs its payload under ``weights_only=False`` -- so a marker that stays
    absent below means the load refused it, not that the payload is broken."""
    for kind in KINDS:
        path, marker = crafted(tmp_path, kind)
        torch.load(path, weights_only=False)
        assert marker.exists(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_every_python_loading_entry_point_refuses_a_crafted_pickle(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default off: bnzoo passes True itself
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    path, marker = crafted(tmp_path, kind)
    loads = [
        lambda: safe_torch_load(path),
        lambda: load_pretrained(str(path)),
        lambda: load_pretrained(path.as_uri()),
        lambda: create_model("mlp", pretrained=str(path)),
        lambda: export_safetensors(str(path), tmp_path / "out.safetensors"),
        lambda: AtomicCheckpointIO().load_checkpoint(path),
        lambda: AtomicCheckpointIO().load_checkpoint(path.as_uri()),
        lambda: ImageClassifier.load_from_checkpoint(path),
        lambda: ImageClassifier.load_from_checkpoint(path.as_uri()),
        lambda: DigitsDataModule.load_from_checkpoint(path),
    ]
    for load in loads:
        with pytest.raises(UnsafeCheckpointError, match="refused to load: torch.load\\(weights_only=True\\)"):
            load()
    assert not marker.exists()
    for refuse in (AtomicCheckpointIO().load_checkpoint, ImageClassifier.load_from_checkpoint):
        with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
            refuse(zoo_checkpoint_path(), weights_only=False)


def test_load_from_checkpoint_still_loads_a_good_checkpoint_by_path_and_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safe ``load_from_checkpoint`` is Lightning's, fed the verified bytes: every weight and buffer as
    ``torch.load`` reads them, the hyperparameters, and keyword overrides."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    expected = zoo_checkpoint()
    (tmp_path / "served").mkdir()
    shutil.copy(zoo_checkpoint_path(), tmp_path / "served" / "good.ckpt")
    with serving(tmp_path / "served") as server:
        loaded = [ImageClassifier.load_from_checkpoint(zoo_checkpoint_path()),
                  ImageClassifier.load_from_checkpoint(f"{server.url}/good.ckpt", lr=0.5)]  # fmt: skip
    for task in loaded:
        state = task.state_dict()
        assert state.keys() == expected["state_dict"].keys()
        for key, value in expected["state_dict"].items():
            assert torch.equal(state[key], value), key
        assert task.hparams.model == expected["hyper_parameters"]["model"]
    assert (loaded[0].hparams.lr, loaded[1].hparams.lr) == (expected["hyper_parameters"]["lr"], 0.5)


def zoo_checkpoint_path() -> Path:
    return ZOO / pretrained_info(SMALL)["file"]


# -- a local HTTP server ----------------------------------------------------------------------------------------
class _Server:
    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[arg-type]

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.stopper = threading.Timer(600, self.httpd.shutdown)  # stops by itself, whatever the test does


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[_Server]:
    server = _Server(folder)
    server.thread.start()
    server.stopper.start()
    try:
        yield server
    finally:
        server.stopper.cancel()
        server.httpd.shutdown()
        server.httpd.server_close()


def test_two_urls_with_one_file_name_are_two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's URL load caches by file name (a second URL named x.ckpt returns the first download);
    AtomicCheckpointIO's downloads are keyed by the whole URL."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for sub, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / "served" / sub).mkdir(parents=True)
        torch.save({"w": torch.full((2,), value)}, tmp_path / "served" / sub / "x.ckpt")
    with serving(tmp_path / "served") as server:
        first = AtomicCheckpointIO().load_checkpoint(f"{server.url}/a/x.ckpt")
        second = AtomicCheckpointIO().load_checkpoint(f"{server.url}/b/x.ckpt")
    assert (float(first["w"][0]), float(second["w"][0])) == (1.0, 2.0)


# -- the commands -----------------------------------------------------------------------------------------------
def _fresh(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    environment.pop("BNZOO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "bnzoo.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=environment)  # fmt: skip


def _refused(rc: int, stderr: str, *names: str) -> None:
    lines = stderr.splitlines()
    assert rc != 0 and 1 <= len(lines) <= 3, stderr[-3000:]
    assert all(name in lines[0] for name in names), stderr[-3000:]
    assert "Traceback" not in stderr


def test_fit_with_a_url_and_with_last_never_runs_a_crafted_pickle(tmp_path: Path) -> None:
    """The two holes of issue 12: Lightning loads an http(s) ``--ckpt_path`` with ``weights_only=False``, and
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off torch's default for a planted ``last.ckpt``. Both run as fresh
    processes, with the environment variable set."""
    env = {**NO_WEIGHTS_ONLY, CACHE_DIR_ENV: str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "torch-home")}
    path, marker = crafted(tmp_path / "served", "zip")
    with serving(tmp_path / "served") as server:
        url = f"{server.url}/{path.name}"
        by_url = _fresh(["fit", *CONFIG, *QUICK, "--ckpt_path", url], tmp_path, env)
        assert server.requests == [f"/{path.name}"]  # it was downloaded (and then refused)
    _refused(by_url.returncode, by_url.stderr, "refused to load")
    assert not marker.exists()

    planted, planted_marker = crafted(tmp_path / "planted", "legacy")
    for folder in ("runs/digits-mlp-bn/version_0/checkpoints", "runs/digits-mlp-bn/checkpoints"):  # new and old layout
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(planted, tmp_path / folder / "last.ckpt")
    by_last = _fresh(["fit", *CONFIG, *QUICK, "--ckpt_path", "last"], tmp_path, env)
    _refused(by_last.returncode, by_last.stderr, "version_0/checkpoints/last.ckpt", "refused to load")
    assert not planted_marker.exists()


def test_every_command_refuses_crafted_pickles_with_one_line(tmp_path: Path) -> None:
    files = {kind: crafted(tmp_path / "fx", kind) for kind in KINDS}
    cases, expected = [], []
    for kind, (path, _) in files.items():
        for argv in (
            ["fit", *CONFIG, *QUICK, "--ckpt_path", str(path)],
            ["validate", *CONFIG, *QUICK, "--ckpt_path", str(path)],
            ["test", *CONFIG, *QUICK, "--ckpt_path", str(path)],
            ["predict", *CONFIG, *QUICK, "--ckpt_path", str(path)],
            ["recalibrate", *CONFIG, "--ckpt_path", str(path), "--num_batches", "1"],
            ["export", str(path), "-o", str(tmp_path / f"{kind}.safetensors")],
        ):
            (tmp_path / "cwd" / str(len(cases))).mkdir(parents=True)
            cases.append({"argv": argv, "cwd": str(tmp_path / "cwd" / str(len(cases))), "env": NO_WEIGHTS_ONLY})
            expected.append((kind, argv[0], path.name))
    # bnzoo pretrained verify on a zoo whose index vouches for the crafted file (its sha256 matches)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    path, _ = files["zip"]
    shutil.copy(path, zoo / "crafted.ckpt")
    entry = {**pretrained_info(SMALL), "name": "crafted", "file": "crafted.ckpt",
             "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
    (zoo / "index.json").write_text(json.dumps({"format": 1, "checkpoints": [entry]}))
    cases.append(
        {
            "argv": ["pretrained", "verify"],
            "cwd": str(tmp_path),
            "env": {**NO_WEIGHTS_ONLY, CHECKPOINT_DIR_ENV: str(zoo)},
        }
    )
    results = run_forked(cases)
    for (kind, command, name), result in zip(expected, results, strict=False):
        assert result["rc"] == 2, (kind, command, result["stderr"][-3000:])
        _refused(result["rc"], result["stderr"], name, "refused to load")
    verify = results[-1]
    assert verify["rc"] == 1 and "FAILED  crafted: " in verify["stdout"] and "refused to load" in verify["stdout"]
    assert not any(marker.exists() for _, marker in files.values())


# -- hostile hyperparameters ------------------------------------------------------------------------------------
def _with_hparams(path: Path, **changes: object) -> Path:
    checkpoint = zoo_checkpoint()
    checkpoint["hyper_parameters"].update(changes)
    torch.save(checkpoint, path)
    return path


def test_hostile_hyperparameters_are_refused_before_any_import_or_download(tmp_path: Path) -> None:
    """A module on the path that creates a marker when imported, named by a checkpoint's class paths; a
    ``pretrained`` URL on a local server that must see no request."""
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "evilmod.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'imported')!r}).touch()\nclass Task: pass\ndef make(*a): pass\n"
    )
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(zoo_checkpoint_path(), served / "other.ckpt")
    fx = tmp_path / "fx"
    fx.mkdir()
    with serving(served) as server:
        hostile = {
            "class-path": (_with_hparams(fx / "class.ckpt", _class_path="evilmod.Task"), "refused class path 'evilmod"),
            "nested-class-path": (
                _with_hparams(fx / "nested.ckpt", norm_options={"class_path": "evilmod.Task"}),
                "refused class path 'evilmod.Task'",
            ),
            "instantiator": (_with_hparams(fx / "inst.ckpt", _instantiator="evilmod.make"), "refused _instantiator"),
            "pretrained-url": (
                _with_hparams(fx / "url.ckpt", model_options={"pretrained": f"{server.url}/other.ckpt"}),
                "refused model_options.pretrained",
            ),
        }
        selfish = fx / "self.ckpt"
        hostile["pretrained-self"] = (_with_hparams(selfish, model_options={"pretrained": str(selfish)}),
                                      "refused model_options.pretrained")  # fmt: skip
        for name, (path, message) in hostile.items():  # the Python API
            with pytest.raises(UntrustedHyperparametersError, match=message):
                load_pretrained(str(path))
            with pytest.raises(UntrustedHyperparametersError, match=message):
                create_model("mlp", pretrained=str(path))
            with pytest.raises(UntrustedHyperparametersError, match=message):
                ImageClassifier.load_from_checkpoint(path)
            assert name and not (tmp_path / "imported").exists()
        cases = [
            {"argv": [command, *CONFIG, *QUICK, "--ckpt_path", str(path)], "cwd": str(tmp_path)}
            for path, _ in hostile.values()
            for command in ("fit", "test")
        ]
        results = run_forked(cases, pythonpath=str(tmp_path / "evil"))
        assert server.requests == []  # no download was attempted
    messages = [message for _, message in hostile.values() for _ in range(2)]
    for result, message in zip(results, messages, strict=True):
        _refused(result["rc"], result["stderr"], message)
    assert not (tmp_path / "imported").exists()  # nothing imported the module


# -- the zoo's integrity ----------------------------------------------------------------------------------------
def _private_zoo(tmp_path: Path, **entry_changes: object) -> tuple[Path, dict]:
    entry = {**pretrained_info(SMALL), **entry_changes}
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(zoo_checkpoint_path(), zoo / pretrained_info(SMALL)["file"])
    (zoo / "index.json").write_text(json.dumps({"format": 1, "checkpoints": [entry]}))
    return zoo, entry


@pytest.mark.parametrize("file", ["../outside.ckpt", "/ABSOLUTE/outside.ckpt", "sub/outside.ckpt", ".."])
def test_an_index_entry_never_points_outside_the_zoo(
    file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside.ckpt"  # a valid checkpoint with the entry's sha256: only the name is wrong
    shutil.copy(zoo_checkpoint_path(), outside)
    (tmp_path / "zoo" / "sub").mkdir(parents=True)
    shutil.copy(zoo_checkpoint_path(), tmp_path / "zoo" / "sub" / "outside.ckpt")
    file = file.replace("/ABSOLUTE", str(tmp_path))
    entry = {**pretrained_info(SMALL), "file": file}
    (tmp_path / "zoo" / "index.json").write_text(json.dumps({"format": 1, "checkpoints": [entry]}))
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path / "zoo"))
    with pytest.raises(ValueError, match=f"entry '{SMALL}' has file .*must be a plain file name"):
        load_pretrained(SMALL)
    with pytest.raises(ValueError, match="must be a plain file name"):
        create_model("mlp", pretrained=SMALL)


def test_a_tampered_zoo_file_is_refused_by_name_path_symlink_and_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo, entry = _private_zoo(tmp_path)
    path = zoo / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    (tmp_path / "link.ckpt").symlink_to(path)
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(zoo))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    for source in (SMALL, str(path), str(tmp_path / "link.ckpt"), path.as_uri(), str(zoo / ".." / "zoo" / path.name)):
        with pytest.raises(ChecksumError, match=f"does not match the expected {entry['sha256']}"):
            load_pretrained(source)
        with pytest.raises(ChecksumError):
            create_model("mlp", pretrained=source)
    (result,) = run_forked([{"argv": ["test", *CONFIG, *QUICK, "--ckpt_path", str(path)], "cwd": str(tmp_path),
                             "env": {CHECKPOINT_DIR_ENV: str(zoo)}}])  # fmt: skip
    _refused(result["rc"], result["stderr"], str(path), "does not match the expected")


def test_a_file_of_the_zoo_folder_the_index_does_not_list_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo, _ = _private_zoo(tmp_path)
    shutil.copy(zoo_checkpoint_path(), zoo / "unlisted.ckpt")
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(zoo))
    with pytest.raises(ValueError, match="unlisted.ckpt is a file of the zoo folder .* that its index does not list"):
        load_pretrained(str(zoo / "unlisted.ckpt"))


def test_pretrained_verify_checks_every_entry_and_prints_a_line_each(tmp_path: Path) -> None:
    zoo, good = _private_zoo(tmp_path)
    entries = [good]
    for name, content in (
        ("empty", b""),
        ("garbage", b"\x80\x02garbage"),
        ("truncated", zoo_checkpoint_path().read_bytes()[:999]),
    ):
        (zoo / f"{name}.ckpt").write_bytes(content)
        entries.append({**good, "name": name, "file": f"{name}.ckpt", "sha256": hashlib.sha256(content).hexdigest()})
    entries.append({**good, "name": "tampered", "file": good["file"], "sha256": "0" * 64})
    entries.append({**good, "name": "escapes", "file": "../outside.ckpt"})
    entries.append({**good, "name": "missing", "file": "missing.ckpt"})
    entries.append({**good, "name": "no-hash", "sha256": None})
    (zoo / "index.json").write_text(json.dumps({"format": 1, "checkpoints": entries}))
    (result,) = run_forked([{"argv": ["pretrained", "verify"], "cwd": str(tmp_path),
                             "env": {CHECKPOINT_DIR_ENV: str(zoo)}}])  # fmt: skip
    lines = result["stdout"].splitlines()
    assert result["rc"] == 1 and result["stderr"] == "", result["stderr"][-3000:]
    assert lines[0] == f"ok      {SMALL}"
    reasons = {
        "empty": "not a readable torch checkpoint",
        "garbage": "refused to load",
        "truncated": "not a readable torch checkpoint",
        "tampered": "does not match the expected",
        "escapes": "must be a plain file name",
        "missing": "is missing",
        "no-hash": "expected 64 hex digits",
    }
    for line, (name, reason) in zip(lines[1:], reasons.items(), strict=False):
        assert line.startswith(f"FAILED  {name}: ") and reason in line, line
    assert lines[-1] == f"1 of {len(entries)} checkpoints verified"


def test_safe_load_turns_every_garbage_into_one_error(tmp_path: Path) -> None:
    good = io.BytesIO()
    torch.save({"w": torch.ones(2)}, good)
    for name, data in (("empty", b""), ("text", b"hello"), ("truncated", good.getvalue()[:100]),
                       ("pickle", b"\x80\x04K\x01.")):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises((UnreadableCheckpointError, UnsafeCheckpointError), match=name):
            safe_torch_load(tmp_path / name)
