"""Folding norms into the convolution or linear layer before them, for inference (as torch's
``nn.utils.fusion.fuse_conv_bn_eval``, for every bnzoo kind with running statistics and any model).

In inference a BatchNorm is a per-channel affine map of its input (Ioffe & Szegedy 2015, Alg. 2, step 11)::

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma E[x] / sqrt(Var[x] + eps))

with the running statistics for E[x] and Var[x]. Batch Renorm's inference is the same map on its running
statistics (Ioffe 2017, Sec. 3: "at inference ... the same as batch normalization"; bnzoo stores
``running_var = sigma^2 - eps``), and frozen BN is that map in training mode too. When the input is
``x = W u + b`` of a convolution or linear layer, the two compose into one layer (s = gamma / sqrt(var + eps),
per output channel)::

    W' = s W        b' = s (b - mu) + beta

:func:`fold_norms` finds each norm that only a conv/linear layer feeds (:mod:`bnzoo.norms.fusion_trace`),
writes ``W'`` and ``b'`` into that layer (computed in float64, stored in the layer's dtype) and replaces the
norm by ``nn.Identity`` -- keeping the activation and dropout of a norm + activation layer (timm's
``BatchNormAct2d``, :func:`~bnzoo.norms.norm_act.with_activation`). Every other norm stays, with the reason
in the report: group/layer norms (per-sample statistics), norms without running statistics, sequence norms,
norms after an activation, a shared layer, a producer whose output goes elsewhere too.

The zoo's own models (``ConvNormAct`` units, the MLP) give their convolutions a bias exactly when the norm is
``none``, so a fused model loads into ``create_model(name, norm="none")`` (for the ResNets with
``skip_init=False``, as the normalized network had no SkipInit gains); timm's architectures never give their
convolutions a bias, :func:`add_conv_biases_` adds the zero biases such a build needs.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

from .frozen import FrozenBatchNorm
from .fusion_trace import FOLDABLE_LAYERS, trace_norm_inputs
from .norm_act import activation_of, with_activation
from .sequence import SequenceNorm

__all__ = ["FoldReport", "add_conv_biases_", "fold_into", "fold_norms", "foldable", "fuse_norms"]

#: the largest relative change of the output on ``example_input`` that folding may cause
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class FoldReport:
    """What :func:`fold_norms` did: the fused ``model``, ``fused`` ``{norm: conv/linear it went into}``,
    ``skipped`` ``{norm: why it stays}``, and ``max_error`` (the largest change of the output on the example
    input, relative to its largest magnitude; None without one)."""

    model: nn.Module
    fused: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    max_error: float | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.fused)} of {len(self.fused) + len(self.skipped)} norm layers"]
        lines += [f"  fused   {norm} -> {layer}" for norm, layer in self.fused.items()]
        lines += [f"  skipped {norm}: {reason}" for norm, reason in self.skipped.items()]
        if self.max_error is not None:
            lines.append(f"  largest relative change of the example output: {self.max_error:.3g}")
        return "\n".join(lines)


def foldable(norm: nn.Module) -> str | None:
    """None when ``norm``'s inference is a per-channel affine map that can be folded, else why not."""
    if isinstance(norm, SequenceNorm):
        return "a sequence norm ((batch, time, features) inputs, lengths): not folded"
    if isinstance(norm, FrozenBatchNorm):
        return None
    if not isinstance(norm, _BatchNorm):
        return f"{type(norm).__name__} normalizes with each sample's own statistics, which no weight can hold"
    if norm.running_mean is None or norm.running_var is None:
        return "it has no running statistics (track_running_stats=False): inference uses batch statistics"
    return None


def _affine(norm: nn.Module, channels: int) -> tuple[Tensor, Tensor]:
    """``(s, shift)`` in float64 with ``norm(x) = s x + shift``: Ioffe & Szegedy 2015, Alg. 2, step 11."""
    options = {"dtype": torch.float64, "device": norm.running_mean.device}
    gamma = norm.weight.detach().double() if norm.weight is not None else torch.ones(channels, **options)
    beta = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else torch.zeros(channels, **options)
    scale = gamma / (norm.running_var.detach().double() + norm.eps).sqrt()
    return scale, beta - scale * norm.running_mean.detach().double()


@torch.no_grad()
def fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Write ``norm`` (eval mode) into conv/linear ``layer``: ``W' = s W``, ``b' = s b + shift`` (in place)."""
    channels = layer.weight.shape[0]
    if norm.num_features != channels:
        raise ValueError(f"cannot fold {type(norm).__name__}({norm.num_features}) into a layer of {channels} outputs")
    scale, shift = _affine(norm, channels)
    weight = layer.weight.double() * scale.view(-1, *[1] * (layer.weight.dim() - 1))
    bias = shift if layer.bias is None else scale * layer.bias.double() + shift
    layer.weight.copy_(weight.to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def _replace(model: nn.Module, name: str, norm: nn.Module) -> None:
    """Put the identity (with ``norm``'s dropout and activation, if it has them) where ``norm`` was."""
    parent_name, _, child = name.rpartition(".")
    extras = activation_of(norm)
    replacement = nn.Identity() if extras is None else with_activation(nn.Identity(), act=extras[1], drop=extras[0])
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _check_eval(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        raise ValueError(
            f"fold_norms folds a model in eval mode (inference on running statistics), but "
            f"{type(model).__name__} is in training mode ({shown}): call model.eval() first"
        )


def _relative_error(reference: Any, output: Any) -> float:
    worst = 0.0
    for ref, out in zip(tree_leaves(reference), tree_leaves(output), strict=True):
        if isinstance(ref, Tensor):
            scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
            worst = max(worst, float((out - ref).abs().max() / scale))
    return worst


def fold_norms(model: nn.Module, example_input: Any = None, inplace: bool = False) -> FoldReport:
    """Fold every eval-mode norm that directly follows a conv or linear layer into it (module docstring).

    ``model`` must be in eval mode (a training-mode model is refused). ``inplace=False`` folds a deep copy.
    ``example_input`` (a tensor, or a tuple of positional arguments): both models run on it and the report
    carries the largest relative change of the output; a change beyond 1e-4 (1e-9 in float64) is an error.
    Returns a :class:`FoldReport` naming every norm layer fused or skipped, and why.
    """
    _check_eval(model)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    reference = None
    if example_input is not None:
        with torch.no_grad():
            reference = model(*args)
    target = model if inplace else copy.deepcopy(model)
    traced = trace_norm_inputs(target)
    report = FoldReport(target)
    for name, why in traced.skipped.items():  # a kind that never folds says so, whatever feeds it
        report.skipped[name] = foldable(target.get_submodule(name)) or why
    for norm_name, layer_name in traced.pairs.items():
        norm, layer = target.get_submodule(norm_name), target.get_submodule(layer_name)
        reason = foldable(norm)
        if reason is None and norm.num_features != layer.weight.shape[0]:
            reason = f"it has {norm.num_features} channels, {layer_name} {layer.weight.shape[0]} outputs"
        if reason is not None:
            report.skipped[norm_name] = reason
            continue
        fold_into(layer, norm)
        _replace(target, norm_name, norm)
        report.fused[norm_name] = layer_name
    if reference is not None:
        with torch.no_grad():
            report.max_error = _relative_error(reference, target(*args))
        dtype = next((t.dtype for t in tree_leaves(reference) if isinstance(t, Tensor)), torch.float32)
        limit = TOLERANCE.get(dtype, 1e-2)
        if not report.max_error <= limit:
            raise RuntimeError(
                f"folding the norms changed the output of {type(model).__name__} on the example input by "
                f"{report.max_error:.3g} (relative; limit {limit:g}); folded: {', '.join(report.fused)}"
            )
    return report


def fuse_norms(model: nn.Module, example_input: Any = None, inplace: bool = False) -> nn.Module:
    """:func:`fold_norms` returning the fused model; a warning names the norm layers left as they were."""
    report = fold_norms(model, example_input, inplace)
    if report.skipped:
        names = ", ".join(f"{name} ({why})" for name, why in report.skipped.items())
        warnings.warn(f"fuse_norms left {len(report.skipped)} norm layers unfolded: {names}", stacklevel=2)
    return report.model


def add_conv_biases_(model: nn.Module) -> list[str]:
    """Give every conv/linear layer of ``model`` without a bias a zero one (in place); returns their names.

    For loading a fused model into an architecture whose ``norm="none"`` build has bias-free convolutions
    (timm's): ``add_conv_biases_(create_model("timm_resnet18", norm="none", skip_init=False))``.
    """
    added = []
    for name, layer in model.named_modules():
        if type(layer) in FOLDABLE_LAYERS and layer.bias is None:
            weight = layer.weight
            layer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
            added.append(name)
    return added
