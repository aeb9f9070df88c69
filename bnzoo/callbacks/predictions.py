"""Predictions to a file: a Lightning ``BasePredictionWriter`` that writes one CSV per ``trainer.predict`` run --
one row per sample: its index in the prediction set, its ``file`` (for image files, :mod:`bnzoo.data.files`),
its ``target`` (where the set has labels), the predicted class and every class's probability -- and prints where.
``bnzoo predict`` adds one (into the run's folder) unless the config has its own."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from ..io import atomic_write_bytes

__all__ = ["PREDICTIONS_FILE", "PredictionWriter"]

PREDICTIONS_FILE = "predictions.csv"


class PredictionWriter(BasePredictionWriter):
    """Writes the outputs of the task's ``predict_step`` (``{"pred", "prob", "target"}``: see
    :meth:`bnzoo.tasks.ClassificationTask.predict_step`) to ``output_dir/predictions.csv``, atomically, when the
    prediction ends (under several processes each writes ``predictions-rank<r>.csv`` with the samples it saw).

    Columns: ``index`` (the sample's position in the prediction set), ``file`` (when the set has ``paths``),
    ``target`` (when it has labels; image files have none), ``pred``, ``prob_0`` ... ``prob_<K-1>``.

    Args:
        output_dir: the folder (default: the trainer's ``log_dir``, else its ``default_root_dir``).
        float_format: how probabilities are written (``%`` format; the default keeps 6 significant digits).
    """

    def __init__(self, output_dir: str | None = None, float_format: str = "%.6g") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.float_format = float_format
        self.path: Path | None = None  #: the file the last run wrote
        self._rows: list[tuple[int, int, int, list[float]]] = []
        self._seen = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._seen = [], 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict) or "pred" not in prediction or "prob" not in prediction:
            raise TypeError(
                f"{type(self).__name__}: predict_step must return a dict with 'pred' and 'prob' (bnzoo's tasks do), "
                f"got {type(prediction).__name__}"
            )
        preds = prediction["pred"].tolist()
        probs = prediction["prob"].double().tolist()
        targets = prediction["target"].tolist() if prediction.get("target") is not None else [-1] * len(preds)
        indices = list(batch_indices) if batch_indices else range(self._seen, self._seen + len(preds))
        self._seen += len(preds)
        self._rows += [(int(i), int(t), int(p), q) for i, t, p, q in zip(indices, targets, preds, probs, strict=True)]

    def _dataset(self, trainer: L.Trainer) -> Any:
        loaders = trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        return getattr(loader, "dataset", None)

    def _output_path(self, trainer: L.Trainer) -> Path:
        folder = self.output_dir or trainer.log_dir or trainer.default_root_dir
        name = PREDICTIONS_FILE if trainer.world_size == 1 else f"predictions-rank{trainer.global_rank}.csv"
        return Path(folder) / name

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = sorted(self._rows, key=lambda row: row[0])
        paths = getattr(self._dataset(trainer), "paths", None)
        labelled = any(target >= 0 for _, target, _, _ in rows)
        classes = len(rows[0][3]) if rows else 0
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        header = ["index"] + (["file"] if paths is not None else []) + (["target"] if labelled else [])
        writer.writerow(header + ["pred"] + [f"prob_{k}" for k in range(classes)])
        for index, target, pred, probs in rows:
            row: list[Any] = [index] + ([paths[index]] if paths is not None else [])
            row += [target] if labelled else []
            writer.writerow(row + [pred] + [self.float_format % p for p in probs])
        self.path = self._output_path(trainer)
        os.makedirs(self.path.parent, exist_ok=True)
        atomic_write_bytes(self.path, text.getvalue().encode())
        print(f"predictions: {self.path} ({len(rows)} samples)")
