"""Reads of running statistics that ``torch.compile`` cannot move past the statistics' update.

In a compiled training step, AOTAutograd's partitioner may *recompute* a cheap value in the backward graph
instead of saving it -- also when that value was computed from a buffer that the forward pass (or later code)
updates in place. The backward pass then sees the updated buffer and returns a wrong gradient, without any
error (pytorch/pytorch PR 197039, open for torch 2.14). Batch Renorm's ``r`` and ``d`` and the shift of
:func:`bnzoo.norms.global_batch_moments` are computed from running statistics; both were hit (gamma's
gradient 1-10% off; the input gradient of synchronized norms up to 0.2 off).

The partitioner never recomputes a custom operator. So every read of running statistics that feeds the
differentiable part of a training step goes through one here: :func:`call_opaque` runs a function as its
registered operator under ``torch.compile`` and as a plain call in eager mode (where nothing is recomputed and
the operator's dispatch would cost about 8 microseconds a call on a CPU); :func:`snapshot` is the smallest
such operator, a copy.

:func:`batch_moments` is the native one-pass batch-moments kernel (``torch.batch_norm_update_stats``) as an
operator: the aten kernel has no fake implementation for symbolic shapes, so under ``torch.compile`` with
dynamic shapes (``dynamic=True``, or automatically after a batch of another size) it broke the graph inside
every Batch Renorm layer, and the frames dynamo then compiled one per layer (``ConvNormAct.forward`` for each
channel width) hit its recompile limit and ran eagerly from there on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_moments", "call_opaque", "snapshot"]


def call_opaque(operator: Callable[..., Any], function: Callable[..., Any], *args: Any) -> Any:
    """``operator(*args)`` while ``torch.compile`` traces, else ``function(*args)``.

    ``operator`` must be ``function`` registered with ``torch.library.custom_op``: the two compute the same.
    """
    if torch.compiler.is_compiling():
        return operator(*args)
    return function(*args)


@torch.library.custom_op("bnzoo::snapshot", mutates_args=())
def _snapshot_op(tensor: Tensor) -> Tensor:
    return tensor.clone()


@_snapshot_op.register_fake
def _snapshot_fake(tensor: Tensor) -> Tensor:
    return torch.empty_like(tensor)


def _read(tensor: Tensor) -> Tensor:
    return tensor


def snapshot(tensor: Tensor) -> Tensor:
    """``tensor`` as it is now, also for a compiled backward pass that runs after ``tensor`` was updated.

    Eager mode: ``tensor`` itself. Under ``torch.compile``: a copy made by an operator the partitioner cannot
    recompute, so the backward graph reads the copy, never ``tensor``. Not differentiable (for buffers).
    """
    return call_opaque(_snapshot_op, _read, tensor.detach())


def _batch_moments(input: Tensor, running_mean: Tensor, running_var: Tensor) -> tuple[Tensor, Tensor]:
    # momentum 0: the buffers are left as they are (and say the moments' dtype: float32 for bf16 inputs)
    return torch.batch_norm_update_stats(input, running_mean, running_var, 0.0)


@torch.library.custom_op("bnzoo::batch_moments", mutates_args=())
def _batch_moments_op(input: Tensor, running_mean: Tensor, running_var: Tensor) -> tuple[Tensor, Tensor]:
    return _batch_moments(input, running_mean.clone(), running_var.clone())  # an operator writes no input


@_batch_moments_op.register_fake
def _batch_moments_fake(input: Tensor, running_mean: Tensor, running_var: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(running_mean), torch.empty_like(running_mean)


def batch_moments(input: Tensor, running_mean: Tensor, running_var: Tensor) -> tuple[Tensor, Tensor]:
    """The per-channel mean and biased variance of ``input`` (N, C, ...) over every dimension but channel 1
    (Ioffe & Szegedy 2015, Alg. 1), in the dtype of ``running_mean`` / ``running_var``, which only say the
    dtype and are left unchanged. One pass of the native kernel, eagerly and under ``torch.compile`` (as an
    operator, also with dynamic shapes). Not differentiable."""
    return call_opaque(_batch_moments_op, _batch_moments, input.detach(), running_mean, running_var)
