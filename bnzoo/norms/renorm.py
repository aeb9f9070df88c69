"""Batch Renormalization (Ioffe 2017), folded onto the native ``batch_norm`` kernel.

Ioffe 2017, Algorithm 1, for a mini-batch B with per-channel mean ``mu_B`` and biased variance ``var_B``::

    sigma_B = sqrt(var_B + eps)               sigma = sqrt(running_var + eps)
    r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
    mu    <- mu    + momentum * (mu_B    - mu)
    sigma <- sigma + momentum * (sigma_B - sigma)

and at inference ``y = gamma * (x - mu) / sigma + beta``. The running standard deviation is stored as
``running_var = sigma^2 - eps``, so inference is torch's BatchNorm on the running statistics and the state dict
has exactly ``nn.BatchNorm``'s keys. With ``r_max = 1`` and ``d_max = 0`` training equals BatchNorm.

Speed: ``r`` and ``d`` are per-channel constants, so ``y`` is BatchNorm with weight ``gamma * r`` and bias
``beta + gamma * d``. The batch moments are computed once with the native ``batch_norm_update_stats`` kernel;
for feature maps the output comes from the native kernel given those moments, and the backward pass is the
native training-mode BatchNorm backward with the same saved moments -- the layer does the work of one BatchNorm
plus a handful of per-channel operations, with one autograd node as BatchNorm has. For flat (N, C) inputs,
where recomputing the moments is cheap, the folded weight and bias go to BatchNorm's own training kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import check_channels, check_norm_args, update_rate
from .opaque import batch_moments, call_opaque
from .sync import SyncableNorm, global_batch_moments, normalize_with_moments

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "batch_renorm_corrections"]


def batch_renorm_corrections(
    batch_mean: Tensor,
    batch_std: Tensor,
    running_mean: Tensor,
    running_std: Tensor,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor]:
    """The correction factors of Ioffe 2017, Alg. 1: ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
    ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, both without gradient."""
    with torch.no_grad():
        # both divided by sigma: one (2, *) division and one unbind instead of two of each (launch cost)
        rd = torch.stack((batch_std, batch_mean - running_mean)).div_(running_std)
        r, d = rd.unbind()
        r.clamp_(1.0 / r_max, r_max)
        d.clamp_(-d_max, d_max)
    return r, d


def _renorm_step(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    momentum: float | None,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One training step of Batch Renorm's statistics (Ioffe 2017, Alg. 1), given the batch moments.

    Returns ``(r, d, 1 / sigma_B)`` and updates, in place, ``num_batches_tracked`` and the running statistics:
    ``mu <- mu + alpha (mu_B - mu)`` and ``sigma <- sigma + alpha (sigma_B - sigma)``, stored as
    ``running_var = sigma^2 - eps``. r and d are computed from the running statistics *before* the update.

    This is the only place that reads the running buffers in training mode. Under ``torch.compile`` it runs as
    the opaque operator ``torch.ops.bnzoo.renorm_step`` (see :mod:`bnzoo.norms.opaque`): otherwise the backward
    graph may recompute r or d from the running buffers after this step updated them, which gave gamma a wrong
    gradient.
    """
    # sigma_B and sigma as one (2, C) tensor, r and d from one division, and the running updates as one foreach
    # op: the per-channel work is a handful of tiny kernels whose launch cost, not their arithmetic, is what shows
    batch_std, running_std = torch.stack((batch_var, running_var)).add_(eps).sqrt_().unbind()
    r, d = batch_renorm_corrections(batch_mean, batch_std, running_mean, running_std, r_max, d_max)
    invstd = batch_std.reciprocal()
    num_batches_tracked.add_(1)
    rate = update_rate(momentum, num_batches_tracked)
    torch._foreach_lerp_([running_mean, running_std], [batch_mean, batch_std], rate)
    torch.mul(running_std, running_std, out=running_var).sub_(eps)
    return r, d, invstd


def _renorm_step_unaliased(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    momentum: float | None,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_renorm_step` with r and d in tensors of their own (an operator's outputs may not alias)."""
    r, d, invstd = _renorm_step(
        batch_mean, batch_var, running_mean, running_var, num_batches_tracked, momentum, eps, r_max, d_max
    )
    return r.clone(), d.clone(), invstd


_renorm_step_op = torch.library.custom_op(
    "bnzoo::renorm_step",
    _renorm_step_unaliased,
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)


@_renorm_step_op.register_fake
def _renorm_step_fake(batch_mean: Tensor, *args: Any) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(batch_mean), torch.empty_like(batch_mean), torch.empty_like(batch_mean)


class _BatchRenormFunction(torch.autograd.Function):
    """Batch Renorm's training output and gradients, given the batch moments and the corrections r and d.

    ``y = (x - mean) * invstd * (gamma * r) + (beta + gamma * d)`` is BatchNorm with weight ``gamma * r`` and bias
    ``beta + gamma * d``. Forward: the native kernel in inference mode with the precomputed moments (they are
    not computed a second time). Backward: the native *training-mode* BatchNorm backward with ``mean`` and
    ``invstd = 1/sqrt(var + eps)`` as the saved batch statistics, so gradients flow through the batch moments
    exactly as in BatchNorm (Ioffe & Szegedy 2015, Sec. 3) while r and d are constants (Ioffe 2017, Alg. 1);
    then ``dL/dgamma = dL/dw' * r + dL/db' * d`` and ``dL/dbeta = dL/db'``. Folding gamma and beta inside
    keeps the autograd graph to one node, as BatchNorm's.

    The backward is itself differentiable (double backward, e.g. gradient penalties): ``w' = gamma * r`` is
    formed from the saved gamma inside it, and ``native_batch_norm_backward`` has torch's BatchNorm double
    backward as its derivative, so second derivatives reach x, gamma and the incoming gradient as for
    BatchNorm with weight ``w'``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        gamma: Tensor | None,
        beta: Tensor | None,
        r: Tensor,
        d: Tensor,
        mean: Tensor,
        var: Tensor,
        invstd: Tensor,
        eps: float,
    ) -> Tensor:
        weight, bias = _folded_affine(gamma, beta, r, d)
        ctx.save_for_backward(x, gamma, weight, mean, invstd, r, d)
        ctx.eps = eps
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, gamma, weight, mean, invstd, r, d = ctx.saved_tensors
        if gamma is not None and torch.is_grad_enabled():
            weight = gamma * r  # double backward: w' must be a function of gamma in the graph
        needs = ctx.needs_input_grad
        affine = needs[1] or needs[2]
        if not (grad_out.is_contiguous() and x.is_contiguous()):
            grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [needs[0], affine, affine]
        )
        grad_gamma = torch.addcmul(grad_w * r, grad_b, d) if needs[1] else None
        return grad_x, grad_gamma, grad_b if needs[2] else None, None, None, None, None, None, None


def _folded_affine(gamma: Tensor | None, beta: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """BatchNorm's weight and bias that give Batch Renorm's output: ``gamma * r`` and ``beta + gamma * d``."""
    if gamma is None or beta is None:
        return r, d
    return gamma * r, torch.addcmul(beta, gamma, d)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class _BatchRenorm(SyncableNorm, _BatchNorm):
    """Batch Renormalization; see the module docstring for the equations (Ioffe 2017, Alg. 1).

    Args:
        num_features: number of channels C of an (N, C, *) input.
        eps: added to the variance, as in BatchNorm.
        momentum: update rate of the running mean and standard deviation (the paper's alpha; 0.01 in its
            experiments), in (0, 1]; None for a cumulative average as in torch's BatchNorm.
        r_max: bound of the scale correction r, >= 1. A plain attribute: a schedule may change it between
            steps (see :class:`bnzoo.callbacks.RenormSchedule`).
        d_max: bound of the shift correction d, >= 0. Also a plain attribute.
        affine: learn gamma and beta.

    Set ``record_corrections = True`` to keep the last step's ``r`` and ``d`` in ``last_r`` and ``last_d``
    (diagnostics: the fraction of clipped channels).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        r_max: float = 3.0,
        d_max: float = 5.0,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        check_norm_args(num_features, eps, momentum)
        _check_bounds(r_max, d_max)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.record_corrections = False
        self.last_r: Tensor | None = None
        self.last_d: Tensor | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        check_channels(self, input)
        if not self.training:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        _check_bounds(self.r_max, self.d_max)
        synced = self._sync_active()
        if synced:
            mean, var, _ = global_batch_moments(input, self.running_mean, self.process_group)
        else:
            F._verify_batch_size(input.size())
            # Passing the float32 running buffers with momentum 0 leaves them unchanged and makes the kernel
            # return float32 moments for bf16/fp16 inputs; the input is detached, so no graph is recorded.
            mean, var = batch_moments(input, self.running_mean, self.running_var)
        r, d, invstd = call_opaque(
            _renorm_step_op,
            _renorm_step,
            mean.detach() if synced else mean,
            var.detach() if synced else var,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            self.momentum,
            self.eps,
            self.r_max,
            self.d_max,
        )
        if self.record_corrections:
            self.last_r, self.last_d = r, d
        if synced:
            return normalize_with_moments(input, mean, var, self.weight, self.bias, self.eps, r, d)
        if input.dim() == 2:
            # (N, C): the moments are cheap to recompute here, and BatchNorm's own training kernel and C++
            # autograd node beat the Python-level Function (measured in benchmarks/norms.py)
            weight, bias = _folded_affine(self.weight, self.bias, r, d)
            return F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)
        return _BatchRenormFunction.apply(input, self.weight, self.bias, r, d, mean, var, invstd, self.eps)


def _check_bounds(r_max: Any, d_max: Any) -> None:
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not r_max >= 1.0:
        raise ValueError(f"r_max must be a float >= 1 (1 disables the scale correction), got {r_max!r}")
    if isinstance(d_max, bool) or not isinstance(d_max, (int, float)) or not d_max >= 0.0:
        raise ValueError(f"d_max must be a float >= 0 (0 disables the shift correction), got {d_max!r}")


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization for (N, C) or (N, C, L) inputs."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization for (N, C, H, W) inputs."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization for (N, C, D, H, W) inputs."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim
