"""Recompute the running statistics of every norm layer from training data ("precise BN").

The callback that runs this after training is :class:`bnzoo.callbacks.RecalibrateNormStats`.

Ioffe & Szegedy 2015, Algorithm 2 (steps 8-11): after training, the inference statistics are
``E[x] = E_B[mu_B]`` and ``Var[x] = m/(m-1) * E_B[sigma_B^2]`` over mini-batches B of size m -- not the
exponential moving averages kept during training, which lag behind the weights that produced them. With
``population=True`` the exact mean and (unbiased) variance over every sample seen are used instead, as
fvcore's precise BN does. A layer's "batch" is what it normalizes in one training-mode call: its (N, C, *)
input, or a sequence norm's valid steps.

Under DDP a batch B of Alg. 2 is what a layer normalizes with one set of batch statistics:

* **Without synchronized norms** each process normalizes its own batch with that batch's statistics, so every
  process's batch is a batch of Alg. 2. Each process sums its batches' moments (per channel: batch means,
  unbiased batch variances, batch counts, sample counts, sums of x and of x^2) and the sums are all-reduced: the
  result is that of one process that ran all the processes' batches one after another (the union of the
  batches, each normalized by its own statistics); ``population=True`` gives the exact moments over the union.
* **With synchronized norms** (:class:`bnzoo.plugins.NormSync`, ``convert_sync_norms``, ``nn.SyncBatchNorm``)
  a layer normalizes the *global* batch -- the concatenation of the processes' batches at that step -- so that
  is the batch of Alg. 2: its moments are the global ones (:func:`bnzoo.norms.sync.global_batch_moments`, with
  m the global batch size in ``m/(m-1)``), equal on every process and added once. The result is that of one
  process on the concatenated batches; ``population=True`` gives the exact moments over all their samples.

Both use the one cross-process reduction of :mod:`bnzoo.norms.sync` (``all_reduce_sum``).

A layer that gets no rows -- never reached by the forward passes (timm Inception-v3's auxiliary head runs only
in training mode, recalibration runs the model in eval mode but for its norms), or reached only in eval mode
(a BN-LSTM step that a single sequence reaches, normalized with its running statistics) -- keeps its
statistics exactly and is named in :attr:`RecalibrationResult.skipped` and in a warning. Under DDP that is
decided on the all-reduced counts: a layer reached on one process only is recalibrated from that process's
rows.

Each norm is recalibrated on the rows it normalizes at inference, since the model runs in eval mode: the
BN-LSTM's step ``t`` uses the norms of step ``min(t, trained_steps - 1)`` (Cooijmans et al. 2016, Sec. 3), so
the last trained step's norms see the rows of every later step, and ``trained_steps`` itself is left alone.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .introspect import batch_moments, is_renorm, named_stat_norm_layers, normalized_rows, row_count, synchronization
from .sync import all_reduce_sum

__all__ = ["MomentSums", "RecalibrationResult", "recalibrate_norm_stats"]

log = logging.getLogger(__name__)


class MomentSums:
    """Per-channel sums over batches, in float64, for Alg. 2 and for the population estimate.

    Rows of ``sums`` (6, C): sum of batch means; sum of unbiased batch variances; number of batches; number of
    samples; sum of x; sum of x^2 (the last two from count-weighted batch moments). Sums, so that processes can
    add theirs.
    """

    ROWS = 6

    def __init__(self, layer: _BatchNorm) -> None:
        self.sums = torch.zeros(self.ROWS, layer.num_features, dtype=torch.float64, device=layer.running_mean.device)

    def add(self, rows: Tensor) -> None:
        """Add the batch of (N, C, *) ``rows``, measuring its moments."""
        self.add_moments(*batch_moments(rows))

    def add_moments(self, mean: Tensor, biased_var: Tensor, count: int | Tensor) -> None:
        """Add batches given their per-channel means and biased variances: (C,) and a count for one batch, or
        (B, C) and B counts for B batches."""
        mean, var = mean.double().reshape(-1, mean.shape[-1]), biased_var.double().reshape(-1, mean.shape[-1])
        n = torch.as_tensor(count, dtype=torch.float64, device=self.sums.device).reshape(-1, 1)
        rows = (
            mean,
            var * (n / (n - 1).clamp_min(1.0)),
            torch.ones_like(mean),
            n.expand_as(mean),
            n * mean,
            n * (var + mean.square()),
        )
        self.sums += torch.stack(rows).sum(1)

    @staticmethod
    def estimate(sums: Tensor, population: bool) -> tuple[Tensor, Tensor]:
        """(mean, variance) from (possibly all-reduced) sums: Alg. 2, or the exact population moments."""
        if population:
            count = sums[3]
            mean = sums[4] / count
            biased = (sums[5] / count - mean.square()).clamp_min(0.0)
            return mean, biased * (count / (count - 1).clamp_min(1.0))
        return sums[0] / sums[2], sums[1] / sums[2]


class _LayerMoments:
    """One layer's batch moments, read from the layer's own training forward instead of a second pass.

    With ``momentum = 1`` a norm layer's update leaves the batch's moments in its running buffers (BatchNorm:
    the mean and the unbiased variance; Batch Renorm: the mean and ``sigma_B^2 - eps``, the biased variance).
    Before each call the layer gets copies of its trained buffers -- so a layer whose training output depends on
    them normalizes as in training -- and after it the copies, now holding the batch's moments, are
    kept and the trained buffers put back. On the first call the moments are also measured directly, which tells
    which variance the buffer holds; a layer whose buffers match neither (a custom update rule) is measured on
    every call instead. A synchronized layer is measured on every call, over the global batch (see the module
    docstring). A call made in eval mode normalizes with the running statistics, not a batch's: it is not
    recorded.
    """

    def __init__(self, layer: _BatchNorm, name: str) -> None:
        self.layer, self.name = layer, name
        self.synchronized, self.group = synchronization(layer)
        # "unbiased" | "biased" | "measured", decided on the first call (None until then)
        self.reading: str | None = "measured" if self.synchronized else None
        self._trained = (layer.running_mean, layer.running_var)
        self._recording = False
        self._measured: tuple[Tensor, Tensor] | None = None
        self._means: list[Tensor] = []
        self._variances: list[Tensor] = []
        self._counts: list[int | Tensor] = []

    def before(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._recording = layer.training
        if not self._recording:
            return
        layer.running_mean, layer.running_var = self._trained[0].clone(), self._trained[1].clone()
        if self.reading in (None, "measured"):
            rows = normalized_rows(layer, args, kwargs)
            mean, biased_var, count = batch_moments(rows, self.synchronized, self.group, self._trained[0])
            self._measured = (mean, biased_var)
            self._counts.append(count)
        else:
            self._counts.append(row_count(layer, args, kwargs))

    def after(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self._recording:
            return
        self._recording = False
        mean, var = layer.running_mean, layer.running_var
        self.restore()
        if self.reading is None:
            self.reading = self._identify(mean, var)
        if self.reading == "measured":
            assert self._measured is not None
            mean, var = self._measured
        self._means.append(mean)
        self._variances.append(var)
        self._measured = None

    def restore(self) -> None:
        """Put the trained buffers (the same tensors) back."""
        self.layer.running_mean, self.layer.running_var = self._trained

    def sums(self) -> Tensor:
        """The :class:`MomentSums` rows of every call so far."""
        sums = MomentSums(self.layer)
        if self._means:
            mean, var = torch.stack(self._means).double(), torch.stack(self._variances).double()
            count = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=mean.device) for c in self._counts])
            if self.reading == "unbiased":
                var = var * ((count - 1).clamp_min(1.0) / count).unsqueeze(1)
            sums.add_moments(mean, var, count)
        return sums.sums

    def _identify(self, mean: Tensor, var: Tensor) -> str:
        assert self._measured is not None
        true_mean, biased = self._measured
        n = self._counts[-1]
        unbiased = biased * (n / max(n - 1, 1))
        scale = float(biased.abs().max()) + self.layer.eps
        if not torch.allclose(mean.float(), true_mean.float(), rtol=1e-4, atol=1e-4 * scale**0.5):
            return "measured"
        errors = {
            k: float((var.float() - v.float()).abs().max()) for k, v in (("unbiased", unbiased), ("biased", biased))
        }
        best = min(errors, key=errors.__getitem__)
        return best if errors[best] <= 1e-4 * scale else "measured"


@contextmanager
def _norm_layers_in_training_mode(model: nn.Module, layers: list[_BatchNorm]):
    """Everything in eval mode (dropout off) except the norm layers; modes and counters restored after."""
    modes = {m: m.training for m in model.modules()}
    counters = {m: m.num_batches_tracked.clone() for m in layers if m.num_batches_tracked is not None}
    model.eval()
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)
        with torch.no_grad():
            for layer, count in counters.items():
                layer.num_batches_tracked.copy_(count)


@dataclass(frozen=True)
class RecalibrationResult:
    """What :func:`recalibrate_norm_stats` did.

    Attributes:
        batches: the batches this process ran.
        recalibrated: the module names of the norm layers whose statistics were recomputed.
        skipped: those that got no rows in training mode on any process and kept their statistics.
    """

    batches: int
    recalibrated: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def skipped_summary(self, limit: int = 8) -> str:
        """The skipped layers' names, the first ``limit`` of them and how many more."""
        names = ", ".join(self.skipped[:limit])
        more = len(self.skipped) - limit
        return f"{names}, ... ({more} more)" if more > 0 else names


@torch.no_grad()
def recalibrate_norm_stats(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any], Any],
    num_batches: int = 100,
    population: bool = False,
    process_group: Any = None,
) -> RecalibrationResult:
    """Recompute the running statistics of ``model``'s norm layers from ``batches`` (Ioffe & Szegedy 2015,
    Alg. 2, steps 8-11; or the exact population moments).

    Args:
        model: the network (its norm layers are found by type; parameters are never touched).
        batches: an iterable of batches (a training data loader, already sharded under DDP).
        forward: runs the model on one batch (moving it to the device first if needed).
        num_batches: how many batches to use; fewer available gives a warning with the count.
        population: exact mean/variance over all samples instead of Alg. 2's mean of batch moments.
        process_group: all-reduce the sums of the layers that are not synchronized over this group (None: the
            world, when distributed). A synchronized layer's moments are global over its own group already.

    Returns:
        a :class:`RecalibrationResult`: the batches used, the layers recalibrated and the layers skipped (no
        rows on any process: their statistics are kept exactly, and a warning names them).

    The model runs in eval mode (dropout off) except its norm layers, which run in training mode with their
    batch statistics; a norm call made in eval mode (a model may switch a layer itself, as the BN-LSTM does for
    a step that one sequence reaches) is not recorded. Under DDP see the module docstring: without synchronized
    norms each process's batch is a batch of Alg. 2; with them the global batch is. Every process must call
    this (the sums are all-reduced), also one whose loader is empty.

    Batch Renorm layers run as BatchNorm (``r = 1, d = 0``) while statistics are collected, as Alg. 2 runs the
    training network of BN: each layer then normalizes with its batch's own statistics -- close to the
    recalibrated ones it will use at inference -- so the layers after it are measured on inputs like those they
    will see. With renorm's ``r`` and ``d`` they would be measured as normalized by the *old* running statistics,
    which recalibration replaces.
    """
    named = named_stat_norm_layers(model)
    if not named:
        log.info("recalibrate_norm_stats: the model has no norm layer with running statistics; nothing to do.")
        return RecalibrationResult(0)
    layers = [layer for _, layer in named]
    readers: list[_LayerMoments] = []
    handles = []
    momenta = {layer: layer.momentum for layer in layers}
    bounds = {layer: (layer.r_max, layer.d_max) for layer in layers if is_renorm(layer)}
    used = 0
    try:
        with _norm_layers_in_training_mode(model, layers):
            readers = [_LayerMoments(layer, name) for name, layer in named]  # in training mode: sync decided
            for reader in readers:
                handles.append(reader.layer.register_forward_pre_hook(reader.before, with_kwargs=True))
                handles.append(reader.layer.register_forward_hook(reader.after, with_kwargs=True))
            for layer in layers:
                layer.momentum = 1.0  # the update then leaves the batch's moments in the buffers
            for layer in bounds:  # renorm as BatchNorm (r = 1, d = 0): see the docstring
                layer.r_max, layer.d_max = 1.0, 0.0
            for batch in batches:
                if used >= num_batches:
                    break
                forward(batch)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        for reader in readers:
            reader.restore()
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for layer, (r_max, d_max) in bounds.items():
            layer.r_max, layer.d_max = r_max, d_max
    if used < num_batches:
        warnings.warn(
            f"RecalibrateNormStats asked for {num_batches} batches but the data loader yielded only {used}",
            stacklevel=3,  # the caller of the no_grad wrapper
        )
    result = _write_estimates(readers, population, process_group, used)
    if result.skipped:
        warnings.warn(
            f"RecalibrateNormStats: {len(result.skipped)} of {len(readers)} norm layers got no rows in training "
            f"mode from the {used} batches (not reached by the forward pass, or only in eval mode) and kept "
            f"their statistics: {result.skipped_summary()}",
            stacklevel=3,  # the caller of the no_grad wrapper
        )
    return result


def _write_estimates(
    readers: list[_LayerMoments], population: bool, process_group: Any, used: int
) -> RecalibrationResult:
    """Reduce the readers' sums (one all-reduce for every unsynchronized layer; a synchronized layer's sums are
    global already) and write each layer's estimate; a layer with no batch on any process keeps its buffers."""
    sums = {reader: reader.sums() for reader in readers}
    local = [reader for reader in readers if not reader.synchronized]
    if local:
        packed = all_reduce_sum(torch.cat([sums[reader] for reader in local], dim=1), process_group)
        sums |= dict(zip(local, packed.split([r.layer.num_features for r in local], dim=1), strict=True))
    recalibrated, skipped = [], []
    for reader in readers:
        layer_sums = sums[reader]
        if not bool(layer_sums[2, 0] > 0):  # no batch on any process: 0/0, keep the statistics
            skipped.append(reader.name)
            continue
        mean, var = MomentSums.estimate(layer_sums, population)
        reader.layer.running_mean.copy_(mean.to(reader.layer.running_mean.dtype))
        reader.layer.running_var.copy_(var.to(reader.layer.running_var.dtype))
        recalibrated.append(reader.name)
    return RecalibrationResult(used, tuple(recalibrated), tuple(skipped))
