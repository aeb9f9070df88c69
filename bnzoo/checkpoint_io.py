"""Lightning's checkpoint IO, made safe: :class:`AtomicCheckpointIO` (atomic saves; every load the trainer makes --
``fit``/``validate``/``test``/``predict`` with ``ckpt_path``, a resumed run -- is :func:`bnzoo.io.safe_torch_load`)
and :class:`SafeLoadFromCheckpoint` (``load_from_checkpoint`` of bnzoo's tasks and data modules, the same way)."""

from __future__ import annotations

import io
import os
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .io import UnsafeCheckpointError, atomic_torch_save, safe_torch_load
from .models.timm_models import without_initial_weights
from .zoo.fetch import read_checkpoint_bytes
from .zoo.trust import check_checkpoint_hyperparameters

__all__ = [
    "AtomicCheckpointIO",
    "SafeLoadFromCheckpoint",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "read_checkpoint_bytes",
    "safe_torch_load",
]


def _refuse_weights_only_false(path: Any) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused to load with weights_only=False (--weights_only false): bnzoo loads every checkpoint with "
        "weights_only=True (tensors and plain types), so no checkpoint can run code"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO whose local saves are atomic (remote paths fall back to Lightning's save) and whose
    every load is :func:`safe_torch_load`.

    Lightning's own load passes ``weights_only=False`` for ``http(s)`` paths and leaves the default to torch (and
    so to ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) otherwise; this one refuses ``weights_only=False``, downloads
    URLs with :func:`bnzoo.zoo.download` (cached by the hash of the URL, not by file name) and loads every file
    with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        fs = get_filesystem(path)
        fs.makedirs(os.path.dirname(str(path)), exist_ok=True)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise _refuse_weights_only_false(path)
        if "://" in str(path):
            return safe_torch_load(io.BytesIO(read_checkpoint_bytes(path)), map_location, label=path)
        return safe_torch_load(path, map_location)


class SafeLoadFromCheckpoint:
    """Mixin (before ``L.LightningModule`` / ``L.LightningDataModule`` in the bases) whose ``load_from_checkpoint``
    loads the way every bnzoo load does.

    Lightning's ``load_from_checkpoint`` leaves ``weights_only`` to torch's default (which
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns off) and passes ``weights_only=False`` for an ``http(s)`` URL.
    Here the file's bytes are read once (:func:`read_checkpoint_bytes`), loaded with :func:`safe_torch_load`, its
    hyperparameters checked (:func:`bnzoo.zoo.trust.check_checkpoint_hyperparameters`: no class outside
    bnzoo, Lightning and torch, no ``model_options.pretrained``), and only then the same bytes go to Lightning's
    ``load_from_checkpoint`` with ``weights_only=True``. ``weights_only=False`` is refused."""

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        if weights_only is False:
            raise _refuse_weights_only_false(checkpoint_path)
        label = checkpoint_path if isinstance(checkpoint_path, (str, os.PathLike)) else "<file object>"
        data = read_checkpoint_bytes(checkpoint_path)
        checkpoint = safe_torch_load(io.BytesIO(data), label=label)
        check_checkpoint_hyperparameters(checkpoint, str(label))
        stored = checkpoint.get("hyper_parameters")
        if isinstance(stored, dict) and "model_options" in stored and "model_options" not in kwargs:
            kwargs["model_options"] = without_initial_weights(stored)["model_options"]  # its weights are its own
        return super().load_from_checkpoint(  # type: ignore[misc]
            io.BytesIO(data), map_location, hparams_file, strict, weights_only=True, **kwargs
        )
