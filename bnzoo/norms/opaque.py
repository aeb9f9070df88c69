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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["call_opaque", "snapshot"]


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
