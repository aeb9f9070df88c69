"""LightningModules: image and sequence classification over any model of the zoo with any norm kind.

Both tasks build their network with :func:`bnzoo.create_model` from plain hyperparameters (model name, norm
kind, options), train it with cross-entropy, and report accuracy (top-1, and top-5 when there are more than 5
classes): torchmetrics' for validation and test; in training, hit counts from one ``topk`` per step, logged on
the steps the logger writes and summed over processes for the epoch -- a torchmetrics update and a
``self.log`` per metric per step cost about 0.5 ms each on a CPU, as much as a small model's whole step.

The optimizer defaults to SGD with momentum 0.9 and weight decay 1e-4, with warm-up and a cosine (or step)
schedule stepped every optimizer step; under ``bnzoo fit`` LightningCLI's ``--optimizer`` and ``--lr_scheduler``
arguments replace these defaults when given.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..checkpoint_io import SafeLoadFromCheckpoint
from ..models.registry import build_model
from ..norms.sync import all_reduce_sum
from ..optim import WarmupSchedule, build_sgd
from ..plugins import check_layer_sync
from ..zoo.checkpoint import TASK_CLASS_KEY
from .compiling import compile_network, uncompiled_call
from .hparams import check_model_config, check_task_hparams
from .run_hparams import flatten, task_run_hparams

__all__ = ["ClassificationTask", "ImageClassifier", "SequenceClassifier", "check_model_config", "check_task_hparams"]


def _acc_name(k: int) -> str:
    return "acc" if k == 1 else f"acc_top{k}"


class ClassificationTask(SafeLoadFromCheckpoint, L.LightningModule):
    """The shared classification task; use :class:`ImageClassifier` or :class:`SequenceClassifier`.

    Args:
        model: a registered model name (``bnzoo.list_models()``).
        norm: the norm kind of every norm layer (``bnzoo.list_norms()``).
        norm_options: options for the norm layers (``eps``, ``momentum``, ``r_max``, ...).
        model_options: the model's own options (``bnzoo.model_options(model)``).
        num_classes: number of classes (linked from the data module by ``bnzoo fit``).
        lr, momentum, weight_decay, nesterov: SGD. ``weight_decay`` skips 1-D parameters (norm scales and
            shifts, biases) unless ``decay_norm_and_bias``.
        schedule: ``cosine`` | ``step`` | ``constant``, after ``warmup_steps`` of linear warm-up;
            ``milestones`` (fractions of training) and ``gamma`` for ``step``.
        label_smoothing: of the cross-entropy loss.
        aux_loss_weight: weight of an auxiliary classifier's loss (Inception-v3 with ``aux_logits``; 0.4 as in
            Szegedy et al. 2016), for models that return ``(logits, aux_logits)`` in training.
        compile: compile the network with ``torch.compile(**compile_options)`` in ``configure_model``, in place:
            the state dict keeps the uncompiled keys (:mod:`bnzoo.tasks.compiling`); ``compile_options``: the
            plain-typed keywords of ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ``fullgraph``, ...).
    """

    def __init__(
        self,
        *,
        model: str = "resnet20",
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
        model_options: dict[str, Any] | None = None,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        decay_norm_and_bias: bool = False,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        milestones: list[float] | None = None,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.4,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_task_hparams(
            {
                "model": model, "norm": norm, "norm_options": norm_options, "model_options": model_options,
                "num_classes": num_classes, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                "schedule": schedule, "warmup_steps": warmup_steps, "milestones": milestones, "gamma": gamma,
                "label_smoothing": label_smoothing, "aux_loss_weight": aux_loss_weight, "compile": compile,
                "compile_options": compile_options,
            }
        )  # fmt: skip
        self.save_hyperparameters(logger=False)  # the loggers get logged_hparams(): what the run used, flat
        self.run_hparams: dict[str, Any] | None = None  # set by `bnzoo fit|test|...` (bnzoo.cli.hparams)
        self.model = build_model(
            model,
            norm=norm,
            norm_options=dict(norm_options or {}),
            num_classes=num_classes,
            **self._input_options(),
            **dict(model_options or {}),
        )
        self.top_k = (1, 5) if num_classes > 5 else (1,)  # top-5 only where it is not trivially 100%
        self.metrics = nn.ModuleDict(
            {stage: self._accuracy_metrics(num_classes, self.top_k) for stage in ("val_", "test_")}
        )
        self._train_hits = torch.zeros(len(self.top_k) + 1, dtype=torch.float64)  # hits at each k, samples

    # -- what subclasses define ---------------------------------------------------------------------------
    def _input_options(self) -> dict[str, Any]:
        """Model options that describe the input (channels, size, features per step)."""
        return {}

    def split_batch(self, batch: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        """(model inputs, targets) of a batch."""
        raise NotImplementedError

    # -- the training logic ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        check_layer_sync(self.trainer, self)
        if stage in ("fit", "validate", "test"):
            for logger in self.loggers:  # hparams.yaml; TensorBoard's hparams come with the final metrics
                logger.log_hyperparams(self.logged_hparams())

    def configure_model(self) -> None:
        """Compile the network (``compile=True``) before the trainer runs it; once, whatever the stages."""
        if self.hparams.compile:
            compile_network(self.model, self.hparams.compile_options or {})

    @staticmethod
    def _accuracy_metrics(num_classes: int, top_k: tuple[int, ...]) -> nn.ModuleDict:
        return nn.ModuleDict({_acc_name(k): MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in top_k})

    def forward(self, *inputs: Tensor) -> Any:
        """The network's output. Traced (TensorBoard's ``log_graph`` traces one forward of
        ``example_input_array``), the network runs in eval mode -- a training-mode trace would update every norm
        layer's running statistics with a batch of zeros before training starts -- and uncompiled."""
        if torch.jit.is_tracing():
            mode = self.model.training
            self.model.eval()
            try:
                return uncompiled_call(self.model, *inputs)
            finally:
                self.model.train(mode)
        return self.model(*inputs)

    def loss(self, output: Tensor | tuple[Tensor, Tensor], target: Tensor, reduction: str = "mean") -> Tensor:
        """The task's one loss: cross-entropy (with ``label_smoothing``) of the logits, plus ``aux_loss_weight``
        times that of an auxiliary classifier's logits when the model returns ``(logits, aux_logits)`` (Szegedy
        et al. 2016). Training, validation, :meth:`evaluate` and the diagnostics all use it."""
        smoothing = self.hparams.label_smoothing
        if isinstance(output, (tuple, list)):
            logits, aux = output
            main = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction=reduction)
            return main + self.hparams.aux_loss_weight * F.cross_entropy(
                aux, target, label_smoothing=smoothing, reduction=reduction
            )
        return F.cross_entropy(output, target, label_smoothing=smoothing, reduction=reduction)

    def batch_loss(self, batch: Any) -> Tensor:
        """The loss of one batch, without logging (what :class:`bnzoo.callbacks.LandscapeProbe` probes)."""
        inputs, target = self.split_batch(batch)
        return self.loss(self(*inputs), target)

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        inputs, target = self.split_batch(batch)
        full_output = self(*inputs)
        loss = self.loss(full_output, target)
        output = full_output[0] if isinstance(full_output, (tuple, list)) else full_output
        batch_size = target.shape[0]
        if stage == "train":
            self._log_training_step(output.detach(), target, loss)
            return loss
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
        for name, metric in self.metrics[f"{stage}_"].items():
            metric.update(output.detach(), target)
            self.log(f"{stage}/{name}", metric, on_epoch=True, prog_bar=name == "acc", batch_size=batch_size)
        return loss

    def _log_training_step(self, output: Tensor, target: Tensor, loss: Tensor) -> None:
        """Loss every step (step and epoch means); accuracy as hit counts, logged where the logger writes."""
        batch_size = target.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        ranked = output.topk(max(self.top_k), dim=1).indices == target.unsqueeze(1)
        hits = torch.stack([ranked[:, :k].any(dim=1).sum() for k in self.top_k])
        self._train_hits = self._train_hits.to(hits.device)
        self._train_hits[:-1] += hits
        self._train_hits[-1] += batch_size
        trainer = self._trainer
        if trainer is not None and getattr(trainer._logger_connector, "should_update_logs", True):
            for k, count in zip(self.top_k, hits, strict=True):
                self.log(f"train/{_acc_name(k)}_step", count / batch_size, on_step=True, prog_bar=k == 1)

    def on_train_epoch_end(self) -> None:
        totals = all_reduce_sum(self._train_hits.clone())  # exact over processes: sums, not mean of ratios
        self._train_hits.zero_()
        if totals[-1] > 0:
            for k, count in zip(self.top_k, totals[:-1], strict=True):
                self.log(f"train/{_acc_name(k)}_epoch", float(count / totals[-1]), on_epoch=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    @torch.no_grad()
    def evaluate(
        self, dataloaders: Any, max_batches: int | float | list[int | float] | None = None
    ) -> dict[str, float]:
        """Loss and top-1 accuracy over ``dataloaders`` (a loader or a list of them) in eval mode, summed over
        processes under DDP; the training/eval modes are restored afterwards. Used by callbacks that compare the
        model before and after a change outside the validation loop (e.g. recalibration). ``max_batches`` (one
        per loader, or one for all) limits the batches, like the trainer's ``num_val_batches``."""
        loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        limits = max_batches if isinstance(max_batches, (list, tuple)) else [max_batches] * len(loaders)
        modes = {m: m.training for m in self.modules()}
        self.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        try:
            for loader, limit in zip(loaders, limits, strict=True):
                for index, batch in enumerate(loader):
                    if limit is not None and index >= limit:
                        break
                    batch = self.transfer_batch_to_device(batch, self.device, 0)
                    inputs, target = self.split_batch(batch)
                    logits = self(*inputs)
                    totals[0] += self.loss(logits, target, reduction="sum").double()
                    totals[1] += (logits.argmax(-1) == target).sum()
                    totals[2] += target.numel()
        finally:
            for module, mode in modes.items():
                module.train(mode)
        totals = all_reduce_sum(totals)
        count = max(float(totals[2]), 1.0)
        return {"acc": float(totals[1]) / count, "loss": float(totals[0]) / count}

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        inputs, target = self.split_batch(batch)
        probs = torch.softmax(self(*inputs), dim=-1)
        return {"pred": probs.argmax(-1), "prob": probs, "target": target}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = build_sgd(self.model, hp.lr, hp.momentum, hp.weight_decay, hp.nesterov, hp.decay_norm_and_bias)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        schedule = WarmupSchedule(hp.schedule, total, hp.warmup_steps, hp.milestones or (0.5, 0.75), hp.gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TASK_CLASS_KEY] = f"bnzoo.tasks.{type(self).__name__}"  # what load_pretrained builds

    # -- TensorBoard hparams with the final metrics ----------------------------------------------------------
    def on_fit_end(self) -> None:
        self._log_hparams_with_metrics(("val/loss", "val/acc", "val/acc_top5"))

    def on_test_end(self) -> None:
        self._log_hparams_with_metrics(("test/loss", "test/acc", "test/acc_top5"))

    def logged_hparams(self) -> dict[str, Any]:
        """The flat, plain hyperparameters the loggers get (:mod:`bnzoo.tasks.run_hparams`): the CLI's
        :attr:`run_hparams` (the parsed config: ``--optimizer``, seed, trainer, data, callbacks), or else this
        task's, with its SGD and schedule, the data module's and the trainer's limits."""
        if self.run_hparams is not None:
            return dict(self.run_hparams)
        logged = task_run_hparams(dict(self.hparams))
        trainer = self._trainer
        if trainer is not None:
            datamodule = trainer.datamodule
            if datamodule is not None:
                logged["data"] = type(datamodule).__name__
                logged.update(flatten(dict(datamodule.hparams), "data/"))
            logged.update({"trainer/max_epochs": trainer.max_epochs, "trainer/max_steps": trainer.max_steps})
            seed = os.environ.get("PL_GLOBAL_SEED")
            logged["seed"] = int(seed) if seed is not None else None
        return logged

    def _log_hparams_with_metrics(self, names: tuple[str, ...]) -> None:
        if self._trainer is None or self.logger is None or self.trainer.sanity_checking:
            return
        final = {f"hp/{n.replace('/', '_')}": float(v) for n, v in self.trainer.callback_metrics.items() if n in names}
        if final:
            self.logger.log_hyperparams(self.logged_hparams(), final)


class ImageClassifier(ClassificationTask):
    """Image classification: batches of ``(images (B, C, H, W), labels (B,))``.

    Args:
        in_chans: input channels, and
        image_size: input height and width; both linked from the data module by ``bnzoo fit``.
        channels_last: keep feature maps in NHWC memory order, which the CPU (oneDNN) and GPU convolution and
            pooling kernels run faster on (measured 1.15x for ResNet-20 and 1.9x for the compact BN-Inception
            per training step on a 2-core CPU); results are the same up to float rounding.
        **kwargs: the arguments of :class:`ClassificationTask` (model, norm, optimizer, schedule, ...).
    """

    def __init__(self, *, in_chans: int = 3, image_size: int = 32, channels_last: bool = True, **kwargs: Any) -> None:
        self._inputs = {"in_chans": in_chans, "image_size": image_size}
        super().__init__(**kwargs)
        self.example_input_array = torch.zeros(2, in_chans, image_size, image_size)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _input_options(self) -> dict[str, Any]:
        return dict(self._inputs)

    def forward(self, images: Tensor) -> Any:
        if self.hparams.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return super().forward(images)

    def split_batch(self, batch: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        images, labels = batch
        return (images,), labels


class SequenceClassifier(ClassificationTask):
    """Sequence classification: batches of ``(x (B, T, F) zero-padded, lengths (B,), labels (B,))``.

    Args:
        model: a registered sequence model (default: the Deep Speech 2 style GRU stack).
        input_size: features per step, and
        max_length: the longest sequence (for the example input); both linked from the data module.
        **kwargs: the arguments of :class:`ClassificationTask`.
    """

    def __init__(self, *, model: str = "ds2_gru", input_size: int = 28, max_length: int = 28, **kwargs: Any) -> None:
        self._inputs = {"input_size": input_size}
        super().__init__(model=model, **kwargs)
        self.example_input_array = (torch.zeros(2, max_length, input_size), torch.full((2,), max_length))

    def _input_options(self) -> dict[str, Any]:
        return dict(self._inputs)

    def split_batch(self, batch: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        x, lengths, labels = batch
        return (x, lengths), labels
