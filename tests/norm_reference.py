"""Float64 references for every built-in norm kind, transcribed from the papers in plain autograd ops.

Each works on a canonical (N, C, *) float64 tensor (the rows (M, C) of a sequence's valid steps included) and
is differentiable twice, so the same code is the reference for outputs, gradients and double backward. None
calls bnzoo: they are what bnzoo's layers must equal.

* :class:`ReferenceBatchNorm` -- Ioffe & Szegedy 2015, Alg. 1 (batch mean and biased variance) with torch's
  running statistics (``mu <- (1 - a) mu + a mu_B``, the variance from the unbiased ``m / (m - 1) var_B``; a is
  ``momentum``, or ``1 / t`` at step t when momentum is None).
* :class:`ReferenceRenorm` -- Ioffe 2017, Alg. 1: r and d with stop-gradient, the running mean and the running
  *standard deviation* ``sigma <- sigma + a (sigma_B - sigma)`` (bnzoo stores ``sigma^2 - eps``).
* :class:`ReferenceGroupNorm` -- Wu & He 2018, Eq. 1 over the sets of Eq. 7 (C/G channels and all positions
  of one sample).
* :class:`ReferenceLayerNorm` -- Ba et al. 2016 over the C channels of each position of each sample.
* :class:`ReferenceFrozen` -- Ioffe & Szegedy 2015, Alg. 2 (inference): an affine map of fixed statistics.
* :class:`ReferenceIdentity` -- ``none``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(t: Tensor, x: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class _Reference:
    """What every reference offers; the defaults are those of a norm without batch statistics."""

    has_running_stats = False

    def train_step(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        return self.infer(x, gamma, beta)

    def infer(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """The expected buffers in bnzoo's (= nn.BatchNorm's) convention."""
        return {}


def _affine(x_hat: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
    if gamma is None or beta is None:
        return x_hat
    return _view(gamma, x_hat) * x_hat + _view(beta, x_hat)


class ReferenceBatchNorm(_Reference):
    has_running_stats = True

    def __init__(self, channels: int, eps: float, momentum: float | None) -> None:
        self.eps, self.momentum = eps, momentum
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.var = torch.ones(channels, dtype=torch.float64)
        self.steps = 0

    def _rate(self) -> float:
        return 1.0 / self.steps if self.momentum is None else self.momentum

    def train_step(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        mu_b = x.mean(_dims(x))
        var_b = ((x - _view(mu_b, x)) ** 2).mean(_dims(x))
        y = _affine((x - _view(mu_b, x)) / _view((var_b + self.eps).sqrt(), x), gamma, beta)
        m = x.numel() // x.shape[1]
        self.steps += 1
        a = self._rate()
        self.mean = (1 - a) * self.mean + a * mu_b.detach()
        self.var = (1 - a) * self.var + a * var_b.detach() * m / (m - 1)
        return y

    def infer(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        return _affine((x - _view(self.mean, x)) / _view((self.var + self.eps).sqrt(), x), gamma, beta)

    def state(self) -> dict[str, Tensor]:
        return {
            "running_mean": self.mean,
            "running_var": self.var,
            "num_batches_tracked": torch.tensor(self.steps),
        }


class ReferenceRenorm(_Reference):
    """Ioffe 2017, Alg. 1 in float64 with autograd; keeps the running *standard deviation* sigma itself."""

    has_running_stats = True

    def __init__(self, channels: int, eps: float, momentum: float | None, r_max: float, d_max: float) -> None:
        self.mu = torch.zeros(channels, dtype=torch.float64)
        self.sigma = torch.full((channels,), (1.0 + eps) ** 0.5, dtype=torch.float64)  # running_var = 1 at init
        self.eps, self.momentum, self.r_max, self.d_max = eps, momentum, r_max, d_max
        self.r = self.d = None
        self.steps = 0

    def train_step(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        mu_b = x.mean(_dims(x))
        sigma_b = (((x - _view(mu_b, x)) ** 2).mean(_dims(x)) + self.eps).sqrt()
        r = (sigma_b.detach() / self.sigma).clamp(1 / self.r_max, self.r_max)
        d = ((mu_b.detach() - self.mu) / self.sigma).clamp(-self.d_max, self.d_max)
        x_hat = (x - _view(mu_b, x)) / _view(sigma_b, x) * _view(r, x) + _view(d, x)
        self.steps += 1
        a = 1.0 / self.steps if self.momentum is None else self.momentum
        self.mu = self.mu + a * (mu_b.detach() - self.mu)
        self.sigma = self.sigma + a * (sigma_b.detach() - self.sigma)
        self.r, self.d = r, d
        return _affine(x_hat, gamma, beta)

    def infer(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        return _affine((x - _view(self.mu, x)) / _view(self.sigma, x), gamma, beta)

    def state(self) -> dict[str, Tensor]:
        return {
            "running_mean": self.mu,
            "running_var": self.sigma**2 - self.eps,
            "num_batches_tracked": torch.tensor(self.steps),
        }


class ReferenceGroupNorm(_Reference):
    def __init__(self, groups: int, eps: float) -> None:
        self.groups, self.eps = groups, eps

    def infer(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        grouped = x.reshape(x.shape[0], self.groups, -1)
        mu = grouped.mean(-1, keepdim=True)
        var = ((grouped - mu) ** 2).mean(-1, keepdim=True)
        return _affine(((grouped - mu) / (var + self.eps).sqrt()).view_as(x), gamma, beta)


class ReferenceLayerNorm(_Reference):
    def __init__(self, eps: float) -> None:
        self.eps = eps

    def infer(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        mu = x.mean(1, keepdim=True)
        var = ((x - mu) ** 2).mean(1, keepdim=True)
        return _affine((x - mu) / (var + self.eps).sqrt(), gamma, beta)


class ReferenceFrozen(_Reference):
    def __init__(self, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> None:
        self.weight, self.bias, self.mean, self.var, self.eps = weight, bias, mean, var, eps

    def infer(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        x_hat = (x - _view(self.mean, x)) / _view((self.var + self.eps).sqrt(), x)
        return _view(self.weight, x) * x_hat + _view(self.bias, x)


class ReferenceIdentity(_Reference):
    def infer(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
        return x
