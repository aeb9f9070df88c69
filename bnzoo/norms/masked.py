"""Sequence-wise BatchNorm on a padded (B, T, C) batch, computed in place of the padding with a float mask.

Deep Speech 2 (Amodei et al. 2016, Sec. 3.2) takes the statistics of each feature over the valid steps only.
With ``m_i`` in {0, 1} marking the valid rows i of the (N = B T, C) view and ``M = sum_i m_i``, the training
output is BatchNorm (Ioffe & Szegedy 2015, Alg. 1) over the M valid rows, and zero on the padding::

    mu = sum_i m_i x_i / M          var = sum_i m_i (x_i - mu)^2 / M          xhat_i = (x_i - mu) / sqrt(var + eps)
    y_i = m_i (gamma xhat_i + beta)

and its gradient is BatchNorm's on the valid rows (Ioffe & Szegedy 2015, Sec. 3), zero on the padding::

    dL/dbeta = sum_i m_i g_i        dL/dgamma = sum_i m_i g_i xhat_i
    dL/dx_i = m_i gamma / sqrt(var + eps) (g_i - dL/dbeta / M - xhat_i dL/dgamma / M)

Why: gathering the valid rows, normalizing them and scattering them back into zeros (and the same twice in
the backward pass) costs more memory passes than the normalization; here each sum over the valid rows is one
matrix-vector product with the mask and every other step is one elementwise pass over the padded batch.
Padded entries are multiplied by 0, so they must be finite (an inf or NaN in the padding would reach the
output as NaN). The backward pass is differentiable (double backward): with ``create_graph`` it takes the
gradient of the same formula written in differentiable tensor ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .batchnorm import update_rate

__all__ = ["masked_batch_norm"]


def _reference(rows: Tensor, mask: Tensor, count: int, gamma: Tensor | None, beta: Tensor | None, eps: float) -> Tensor:
    """The module docstring's output in differentiable tensor ops (for double backward)."""
    column = mask.unsqueeze(1)
    mean = (rows * column).sum(0) / count
    centred = rows - mean
    xhat = centred * torch.rsqrt((centred.square() * column).sum(0) / count + eps)
    out = xhat if gamma is None else xhat * gamma
    out = out if beta is None else out + beta
    return out * column


class _MaskedBatchNorm(torch.autograd.Function):
    """The module docstring's training output and hand-written gradient; returns the output and the moments."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, rows: Tensor, gamma: Tensor | None, beta: Tensor | None, mask: Tensor, count: int, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        # two (N, C) buffers and six passes; every new buffer of this size costs page faults on a CPU
        mean = torch.mv(rows.t(), mask).div_(count)
        centred = rows - mean
        out = torch.mul(centred, centred)
        var = torch.mv(out.t(), mask).div_(count)  # the sum of (x - mu)^2 over the valid rows
        invstd = torch.rsqrt(var + eps)
        scale = invstd if gamma is None else invstd * gamma
        if beta is None:
            torch.mul(centred, scale, out=out)
        else:
            torch.addcmul(beta, centred, scale, out=out)
        out.mul_(mask.unsqueeze(1))
        ctx.save_for_backward(rows, gamma, beta, mask, centred, invstd, scale)
        ctx.count, ctx.eps = count, eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rows, gamma, beta, mask, centred, invstd, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiate the formula itself, so the result is too
            inputs = [t for t, n in zip((rows, gamma, beta), needs[:3], strict=True) if n]
            with torch.enable_grad():
                out = _reference(rows, mask, ctx.count, gamma, beta, ctx.eps)
                grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
            return *(next(grads) if n else None for n in needs[:3]), None, None, None
        count = ctx.count
        buffer = grad * centred
        grad_beta = torch.mv(grad.t(), mask)  # sum of g over the valid rows
        grad_gamma = torch.mv(buffer.t(), mask).mul_(invstd)  # sum of g xhat over the valid rows
        grad_rows = None
        if needs[0]:
            # m (scale g - scale dbeta / M - xc scale invstd^2 dgamma / M), xhat = xc invstd: three passes
            shift = scale * grad_beta / -count
            slope = scale * invstd * grad_gamma / -count
            grad_rows = torch.addcmul(shift, grad, scale, out=buffer).addcmul_(centred, slope)
            grad_rows.mul_(mask.unsqueeze(1))
        return (
            grad_rows,
            grad_gamma if needs[1] else None,
            grad_beta if needs[2] else None,
            None,
            None,
            None,
        )


def masked_batch_norm(
    rows: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
) -> Tensor:
    """Training-mode BatchNorm over the valid rows of ``rows`` (N, C), padded rows set to 0 (module docstring).

    ``mask`` (N,) is True on the valid rows. The running statistics, when given, are updated as
    ``nn.BatchNorm1d`` on the valid rows alone updates them: ``num_batches_tracked += 1``, ``mean`` and the
    *unbiased* variance ``var M / (M - 1)`` blended in with ``momentum`` (a cumulative average when None).
    Raises BatchNorm's error when fewer than 2 rows are valid.
    """
    float_mask = mask.to(rows.dtype)
    count = int(mask.sum())
    if count < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count} valid rows")
    out, mean, var = _MaskedBatchNorm.apply(rows, weight, bias, float_mask, count, eps)
    if running_mean is not None and running_var is not None and num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
            rate = update_rate(momentum, num_batches_tracked)
            unbiased = var.mul_(count / (count - 1))
            torch._foreach_lerp_([running_mean, running_var], [mean.to(running_mean.dtype), unbiased], rate)
    return out
