"""The CLI's two checkpoint callbacks: the best checkpoints by a metric, and the latest training state.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when a top-k checkpoint was saved at
the same step, so after an epoch without a new best score ``last.ckpt`` lags behind the run -- and a resumed run
would repeat epochs. :class:`LastCheckpoint` writes ``last.ckpt`` every time, which ``--ckpt_path last`` finds.

:class:`BestCheckpoint` is ``ModelCheckpoint`` whose top-k bookkeeping agrees with the files after a resume. A run
killed (``kill -9``) between writing a new ``best-*.ckpt`` and the ``last.ckpt`` that records it resumes from a
``last.ckpt`` whose list of best files (``best_k_models``) is older than the folder: the new file is an orphan no
later save would delete, and the previous best may be listed though already deleted. On resuming, files of the
callback's name pattern that the restored list does not hold are removed, and listed files that are gone are
dropped from it (the best and k-th best recomputed), so the folder holds exactly the files the bookkeeping lists.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["BestCheckpoint", "LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` after every validation (or training epoch without validation), overwritten."""

    def __init__(self, dirpath: str | None = None, every_n_epochs: int = 1, **kwargs: Any) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            every_n_epochs=every_n_epochs,
            enable_version_counter=False,
            **kwargs,
        )


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) that, on resuming, makes its top-k list and its folder agree (see the
    module doc). The restored state counts when it was saved for this same folder (compared after resolving the
    paths, so ``runs/x`` and ``./runs/x`` agree); otherwise nothing is removed."""

    _restored_here = False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("dirpath")
        self._restored_here = (
            stored is not None and self.dirpath is not None and Path(stored).resolve() == Path(self.dirpath).resolve()
        )
        if self._restored_here:
            state_dict = {**state_dict, "dirpath": self.dirpath}
        super().load_state_dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._restored_here:
            self._drop_missing()
            if trainer.is_global_zero:
                self._remove_orphans()

    def _drop_missing(self) -> None:
        """Forget listed best files that no longer exist, and recompute the best and the k-th best."""
        for path in [p for p in self.best_k_models if not Path(p).is_file()]:
            del self.best_k_models[path]
        if not self.best_k_models:
            self.best_model_path, self.best_model_score, self.kth_best_model_path = "", None, ""
            return
        best, worst = (min, max) if self.mode == "min" else (max, min)
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
        self.best_model_score = self.best_k_models[self.best_model_path]
        if len(self.best_k_models) >= self.save_top_k > 0:
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        else:
            self.kth_best_model_path = ""

    def _remove_orphans(self) -> None:
        """Remove files of this callback's name pattern (its ``filename`` up to the first ``{``) in its folder that
        the restored list does not hold."""
        prefix = (self.filename or "").split("{", 1)[0]
        if not prefix or self.dirpath is None or prefix.startswith(self.CHECKPOINT_NAME_LAST):
            return
        kept = {Path(p).resolve() for p in self.best_k_models}
        pattern = str(Path(self.dirpath) / f"{glob.escape(prefix)}*{self.FILE_EXTENSION}")
        for path in map(Path, glob.glob(pattern)):
            if path.resolve() not in kept and path.is_file():
                path.unlink()
