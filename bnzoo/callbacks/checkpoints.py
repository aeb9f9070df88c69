"""A checkpoint of the latest training state, written after every validation.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when a top-k checkpoint was saved at
the same step, so after an epoch without a new best score ``last.ckpt`` lags behind the run -- and a resumed run
would repeat epochs. :class:`LastCheckpoint` writes ``last.ckpt`` every time, which ``--ckpt_path last`` finds.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


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
