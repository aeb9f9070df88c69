"""The BN-LSTM.

**Recurrent batch normalization** (Cooijmans et al. 2016, Eq. 6-8). Both the input-to-hidden and the
hidden-to-hidden terms are normalized, with statistics per time step::

    (i~, f~, g~, o~) = BN_t(W_h h_{t-1}; gamma_h, 0) + BN_t(W_x x_t; gamma_x, 0) + b      (6)
    c_t = sigmoid(f~) * c_{t-1} + sigmoid(i~) * tanh(g~)                                  (7)
    h_t = sigmoid(o~) * tanh(BN_t(c_t; gamma_c, beta_c))                                  (8)

The cell recurrence (7) itself is never normalized: ``BN_t(c_t)`` appears only where ``h_t`` is read out (8).
Registered as ``bn_lstm``; see :class:`BatchNormLSTMLayer` for the details.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ...checks import check_positive_int
from ...norms.factory import NormFactory, norm_factory
from ...norms.sync import is_distributed
from ..registry import register_model
from .classifier import RecurrentClassifier, stack_layers
from .steps import Steps, pack

__all__ = ["BatchNormLSTMLayer", "PerStepNorm", "bn_lstm"]


class PerStepNorm(nn.Module):
    """A norm with separate statistics for each time step and one set of affine parameters shared over time.

    Cooijmans et al. 2016, Sec. 3: ``steps[t] = norm_layer(C, "1d")`` keeps the statistics of step ``t``
    (batch statistics in training, population statistics for inference); its ``weight`` (gamma) and ``bias``
    (beta) are the *same* tensors for every step, initialized to ``gamma_init`` and 0. With
    ``learn_shift=False`` beta stays fixed at 0 (Eq. 6 sets beta_x = beta_h = 0 since the LSTM bias b already
    shifts the gates).

    ``forward(x: (N, C), step)`` normalizes ``x`` with ``steps[step]``. A single row in training has no batch
    statistics (the variance of one value is 0), so it is normalized with the running statistics, which it
    leaves unchanged.

    Per-step statistics cannot be synchronized across processes (``NormSync``, ``convert_sync_norms``): every
    step would be one collective call, and processes whose batches have different maximum lengths, or a step
    that one process reaches with a single row (normalized without batch statistics, so without a
    collective), make different numbers of them and deadlock. A training forward pass with synchronized
    step norms on more than one process raises a RuntimeError instead, on every process, before any
    collective call (:meth:`check_not_synchronized`).
    """

    def __init__(
        self,
        norm_layer: NormFactory,
        num_features: int,
        max_steps: int,
        *,
        gamma_init: float = 0.1,
        learn_shift: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("max_steps", max_steps)
        self.steps = nn.ModuleList(norm_layer(num_features, "1d") for _ in range(max_steps))
        first = self.steps[0]
        with torch.no_grad():
            for name, value in (("weight", gamma_init), ("bias", 0.0)):
                shared = getattr(first, name, None)
                if not isinstance(shared, Tensor):
                    continue
                shared.fill_(value)
                if isinstance(shared, nn.Parameter) and name == "bias":
                    shared.requires_grad_(learn_shift)
                for step_norm in self.steps[1:]:
                    setattr(step_norm, name, shared)

    def check_not_synchronized(self, norm: nn.Module) -> None:
        """Raise a RuntimeError if ``norm`` (one of the steps) would synchronize its statistics across processes."""
        if getattr(norm, "synchronized", False) and norm.training and is_distributed(norm.process_group):
            raise RuntimeError(
                f"{type(self).__name__} (the BN-LSTM's per-step norms, {type(norm).__name__}) cannot be synchronized "
                "across processes (NormSync / convert_sync_norms): each time step would be a separate collective "
                "call, and processes with different sequence lengths would make different numbers of them and "
                "deadlock. Train it without NormSync (each process normalizes its own batch), or undo the "
                "conversion with bnzoo.plugins.revert_sync_norms"
            )

    def forward(self, x: Tensor, step: int) -> Tensor:
        norm = self.steps[step]
        self.check_not_synchronized(norm)
        if not (norm.training and x.shape[0] < 2):
            return norm(x)
        norm.train(False)
        try:
            return norm(x)
        finally:
            norm.train(True)

    def extra_repr(self) -> str:
        return f"max_steps={len(self.steps)}, shared affine parameters"


class BatchNormLSTMLayer(nn.Module):
    """One BN-LSTM layer (Cooijmans et al. 2016, Eq. 6-8), run as a Python loop over the valid steps.

    Parameters: ``weight_ih`` (W_x, 4H x F), ``weight_hh`` (W_h, 4H x H), ``bias`` (b, 4H), gates in PyTorch's
    order (i, f, g, o) so weights move to and from ``nn.LSTM`` (b = b_ih + b_hh there); norms ``norm_ih``,
    ``norm_hh`` (4H features, beta fixed at 0) and ``norm_cell`` (H features, learned beta), each a
    :class:`PerStepNorm` with gamma initialized to ``gamma_init`` (0.1, the paper's recommendation, Sec. 4).

    Time steps ``t >= max_steps`` use the norms of step ``max_steps - 1``. The buffer ``trained_steps``
    records the longest run of steps that trained with batch statistics; at inference steps beyond it use the
    statistics of its last step ("for t > T_max we use the population statistics of T_max", Sec. 3). In
    training, a step that only one sequence of the batch reaches has no batch statistics (the variance of one
    value is 0); it is normalized as at inference, with population statistics, and updates none.
    With ``norm="none"`` every norm is the identity and the layer is a plain LSTM, equal to ``nn.LSTM``.

    Padding: sequences are processed longest first (as packed), so at step ``t`` only the sequences still
    running enter the step-``t`` statistics and the others keep their final state.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        norm: str | NormFactory = "bn",
        norm_options: dict[str, Any] | None = None,
        max_steps: int = 784,
        gamma_init: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.max_steps = check_positive_int("max_steps", max_steps)
        if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
            raise ValueError(f"gamma_init must be a float, got {gamma_init!r}")
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias = nn.Parameter(torch.empty(gates))
        norm_layer = norm_factory(norm, norm_options)
        per_step = {"gamma_init": float(gamma_init)}
        self.norm_ih = PerStepNorm(norm_layer, gates, max_steps, learn_shift=False, **per_step)
        self.norm_hh = PerStepNorm(norm_layer, gates, max_steps, learn_shift=False, **per_step)
        self.norm_cell = PerStepNorm(norm_layer, hidden_size, max_steps, learn_shift=True, **per_step)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.LSTM``'s initialization: U(-1/sqrt(H), 1/sqrt(H)) for W_x, W_h and b."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for param in (self.weight_ih, self.weight_hh, self.bias):
            nn.init.uniform_(param, -bound, bound)

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def _statistics_steps(self, batch_sizes: list[int]) -> list[int]:
        """The index of the norms of every time step of this batch.

        Inference: step ``t`` uses the statistics of ``min(t, trained_steps - 1)``. Training: a step with at
        least two running sequences uses its own batch statistics and the running statistics of
        ``min(t, max_steps - 1)``, and extends ``trained_steps``; a step with a single running sequence is
        normalized as at inference.
        """
        if self.training:
            with_batch_statistics = sum(1 for size in batch_sizes if size > 1)
            if with_batch_statistics > int(self.trained_steps):
                self.trained_steps.fill_(min(with_batch_statistics, self.max_steps))
        last_trained = (int(self.trained_steps) or self.max_steps) - 1
        last = self.max_steps - 1
        return [min(t, last if self.training and size > 1 else last_trained) for t, size in enumerate(batch_sizes)]

    def forward(self, x: Steps) -> tuple[Steps, Tensor]:
        """Outputs in the form of ``x`` ((B, T, F) without padding, or packed) and final states (B, H)."""
        dense = not isinstance(x, PackedSequence)
        packed = pack(x, torch.full((x.shape[0],), x.shape[1])) if dense else x
        batch_sizes = packed.batch_sizes.tolist()
        input_terms = F.linear(packed.data, self.weight_ih)  # W_x x_t of every valid step, in one product
        h = c = packed.data.new_zeros(batch_sizes[0], self.hidden_size)
        outputs: list[Tensor] = []
        finished: list[Tensor] = []  # final states of the sequences that ended, shortest first
        start = 0
        for size, k in zip(batch_sizes, self._statistics_steps(batch_sizes), strict=True):
            if size < h.shape[0]:  # the sequences at positions size.. have ended
                finished.append(h[size:])
                h, c = h[:size], c[:size]
            terms = self.norm_ih(input_terms[start : start + size], k) + self.norm_hh(h @ self.weight_hh.T, k)
            i, f, g, o = (terms + self.bias).chunk(4, dim=1)  # Eq. 6
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # Eq. 7
            h = torch.sigmoid(o) * torch.tanh(self.norm_cell(c, k))  # Eq. 8
            outputs.append(h)
            start += size
        finished.append(h)
        final = torch.cat(finished[::-1])
        if packed.unsorted_indices is not None:
            final = final.index_select(0, packed.unsorted_indices)
        out = PackedSequence(torch.cat(outputs), *packed[1:])
        return (pad_packed_sequence(out, batch_first=True)[0] if dense else out), final

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, max_steps={self.max_steps}"


@register_model
def bn_lstm(
    *,
    norm: str = "bn",
    norm_options: dict[str, Any] | None = None,
    num_classes: int = 10,
    input_size: int = 28,
    hidden_size: int = 100,
    num_layers: int = 1,
    max_steps: int = 784,
    gamma_init: float = 0.1,
    dropout: float = 0.0,
    pool: str = "last",
) -> RecurrentClassifier:
    """BN-LSTM (Cooijmans et al. 2016, Eq. 6-8): per-time-step statistics on the input and recurrent terms and
    on the cell state's read-out, gamma initialized to 0.1; ``max_steps`` steps of statistics (784 = a
    pixel-by-pixel MNIST sequence), later steps reuse the last."""

    def make_layer(size: int) -> nn.Module:
        options = {"max_steps": max_steps, "gamma_init": gamma_init}
        return BatchNormLSTMLayer(size, hidden_size, norm=norm, norm_options=norm_options, **options)

    return stack_layers(make_layer, input_size, num_layers, num_classes, dropout, pool)
