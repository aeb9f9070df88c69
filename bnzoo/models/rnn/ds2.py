"""Deep Speech 2 recurrent stacks.

**Sequence-wise normalization** (Amodei et al. 2016, "Deep Speech 2", Sec. 3.2, Eq. 2). Only the
input-to-hidden term is normalized, with one set of statistics per feature taken over the mini-batch *and*
every valid time step::

    h_t = f(B(W x_t) + U h_{t-1})

``B`` is ``make_norm(norm, gates * hidden, "seq")``. A padded batch is packed once at the input, so padded
steps are never computed: ``B`` sees exactly the valid steps, the statistics of the padded batch with its
lengths. The recurrence runs in PyTorch's fused GRU/LSTM kernel: it receives ``z = B(W x)`` through a fixed
identity input weight (a buffer) with a zero input bias, so its gates are exactly ``z + U h_{t-1} + b_hh`` --
no Python loop over time. As in Eq. 2 the input term has no bias but the norm's learned shift beta (for
``bn`` a bias of ``W`` would be cancelled by the batch mean); ``W`` gets a bias only when the norm has no
learned shift (``frozen``, ``affine=False``). With ``norm="none"`` each layer *is* ``nn.GRU``/``nn.LSTM``
with its own input weight: the same stack without the norm. Registered as ``ds2_gru`` and ``ds2_lstm``.

The stack is a :class:`~bnzoo.models.rnn.classifier.RecurrentClassifier`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ...checks import check_bool, check_choice, check_positive_int
from ...norms.factory import NormFactory, norm_factory
from ..layers import norm_has_bias
from ..registry import register_model
from .classifier import RecurrentClassifier, stack_layers
from .steps import CELLS, Steps, batch_major, map_steps

__all__ = ["FixedInputRecurrence", "SequenceWiseNormRNN", "ds2_gru", "ds2_lstm"]


# ----------------------------------------------------------------------------------------------------------
# Deep Speech 2: sequence-wise normalization of the input term, fused recurrence


class FixedInputRecurrence(nn.Module):
    """The recurrent part of a GRU/LSTM layer, fed its input term ready-made: gates = z_t + U h_{t-1} + b_hh.

    Runs PyTorch's fused kernel (``_VF.gru``/``_VF.lstm``, what ``nn.GRU``/``nn.LSTM`` call) with the input
    weight fixed to a selection of ``z``'s channels (a non-persistent buffer) and the input bias fixed to
    zero. ``z`` has ``directions * gates * hidden`` channels: direction ``d`` reads block ``d``. The trainable
    parameters keep ``nn.GRU``'s names and initialization: ``weight_hh_l0``, ``bias_hh_l0`` (+ ``_reverse``).
    """

    def __init__(self, cell: str, hidden_size: int, bidirectional: bool = False) -> None:
        super().__init__()
        self.cell = check_choice("cell", cell, CELLS)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        gate_channels = CELLS[cell] * hidden_size
        directions = 2 if bidirectional else 1
        self._flat_names: list[str] = []
        for d, suffix in enumerate(["", "_reverse"][:directions]):
            select = torch.zeros(gate_channels, directions * gate_channels)
            select[:, d * gate_channels : (d + 1) * gate_channels] = torch.eye(gate_channels)
            self.register_buffer(f"weight_ih_l0{suffix}", select, persistent=False)
            weight_hh = nn.Parameter(torch.empty(gate_channels, hidden_size))
            self.register_parameter(f"weight_hh_l0{suffix}", weight_hh)
            self.register_buffer(f"bias_ih_l0{suffix}", torch.zeros(gate_channels), persistent=False)
            self.register_parameter(f"bias_hh_l0{suffix}", nn.Parameter(torch.empty(gate_channels)))
            self._flat_names += [f"weight_ih_l0{suffix}", f"weight_hh_l0{suffix}", f"bias_ih_l0{suffix}"]
            self._flat_names += [f"bias_hh_l0{suffix}"]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.GRU``'s initialization of the recurrent weights and biases: U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def forward(self, z: Tensor | PackedSequence) -> tuple[Tensor | PackedSequence, Any]:
        """Run the recurrence on ``z`` ((B, T, C) batch-first, or packed) from zero initial states.

        Returns what ``nn.GRU``/``nn.LSTM`` return: the outputs in the form of ``z`` and ``h_n``
        (``(h_n, c_n)`` for the LSTM), each (directions, B, H) in the batch's own order.
        """
        weights = [getattr(self, name) for name in self._flat_names]
        packed = isinstance(z, PackedSequence)
        data = z.data if packed else z
        batch = int(z.batch_sizes[0]) if packed else z.shape[0]
        h0 = data.new_zeros(2 if self.bidirectional else 1, batch, self.hidden_size)
        hx: Any = (h0, h0) if self.cell == "lstm" else h0
        fused = _VF.lstm if self.cell == "lstm" else _VF.gru
        # has_biases, num_layers, dropout, train, bidirectional
        flags = (True, 1, 0.0, self.training, self.bidirectional)
        if packed:
            result = fused(data, z.batch_sizes, hx, weights, *flags)
            restore = z.unsorted_indices
            states = [state if restore is None else state.index_select(1, restore) for state in result[1:]]
            out: Tensor | PackedSequence = PackedSequence(result[0], z.batch_sizes, z.sorted_indices, restore)
        else:
            result = fused(data, hx, weights, *flags, True)  # batch_first
            out, states = result[0], list(result[1:])
        return out, (tuple(states) if self.cell == "lstm" else states[0])

    def extra_repr(self) -> str:
        return f"{self.cell}, hidden_size={self.hidden_size}, bidirectional={self.bidirectional}"


class SequenceWiseNormRNN(nn.Module):
    """One Deep Speech 2 recurrent layer: ``h_t = f(B(W x_t) + U h_{t-1})`` (Amodei et al. 2016, Eq. 2).

    ``B`` is ``norm_factory(norm, norm_options)(directions * gates * hidden, "seq")``: one norm over both
    directions' input terms, statistics over the batch and its valid steps. With an identity norm (``none``) the
    layer is a plain
    ``nn.GRU``/``nn.LSTM`` (``self.rnn``) with its own input weight: the same layer without the norm.

    ``forward(x)`` takes a batch without padding (B, T, F) or a packed batch and returns the outputs in the
    same form (directions * H features) and the final hidden state of each direction (B, directions * H). On a
    packed batch the norm sees the M valid steps as one sequence (1, M, C): exactly the statistics of the
    padded batch with its lengths, without gathering and scattering the valid steps around the norm.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        cell: str = "gru",
        bidirectional: bool = False,
        norm: str | NormFactory = "bn",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_factory(norm, norm_options)
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.cell = check_choice("cell", cell, CELLS)
        self.bidirectional = check_bool("bidirectional", bidirectional)
        directions = 2 if bidirectional else 1
        input_channels = directions * CELLS[cell] * hidden_size
        self.input_proj: nn.Linear | None
        self.norm: nn.Module | None
        self.rnn: nn.Module
        if norm_layer.is_identity:
            self.input_proj = self.norm = None
            rnn_class = nn.LSTM if cell == "lstm" else nn.GRU
            self.rnn = rnn_class(input_size, hidden_size, batch_first=True, bidirectional=self.bidirectional)
        else:
            normalization = norm_layer(input_channels, "seq")
            self.input_proj = nn.Linear(input_size, input_channels, bias=not norm_has_bias(normalization))
            self.norm = normalization
            self.rnn = FixedInputRecurrence(cell, hidden_size, self.bidirectional)

    @property
    def output_size(self) -> int:
        return (2 if self.bidirectional else 1) * self.hidden_size

    def input_term(self, x: Tensor) -> Tensor:
        """``B(W x)`` of (B, T, F) steps that are all valid: (B, T, directions * gates * H)."""
        if self.input_proj is None or self.norm is None:
            raise RuntimeError("a layer without a norm (an identity norm kind) has no separate input term")
        return self.norm(self.input_proj(x))

    def forward(self, x: Steps) -> tuple[Steps, Tensor]:
        inputs = x if self.norm is None else map_steps(self.input_term, x)
        out, hidden = self.rnn(inputs)
        return out, batch_major(hidden[0] if self.cell == "lstm" else hidden)


# ----------------------------------------------------------------------------------------------------------
# The registered entry points


def _deep_speech2(
    cell: str, input_size: int, num_layers: int, num_classes: int, dropout: float, pool: str, **layer: Any
) -> RecurrentClassifier:
    def make_layer(size: int) -> nn.Module:
        return SequenceWiseNormRNN(size, cell=cell, **layer)

    return stack_layers(make_layer, input_size, num_layers, num_classes, dropout, pool)


def _deep_speech2_entry(cell: str) -> Callable[..., RecurrentClassifier]:
    """The registered entry point of the Deep Speech 2 stack with ``cell`` ("gru" or "lstm")."""

    def entry(
        *,
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
        num_classes: int = 10,
        input_size: int = 28,
        hidden_size: int = 128,
        num_layers: int = 3,
        bidirectional: bool = False,
        dropout: float = 0.0,
        pool: str = "last",
    ) -> RecurrentClassifier:
        return _deep_speech2(
            cell,
            input_size,
            num_layers,
            num_classes,
            dropout,
            pool,
            hidden_size=hidden_size,
            bidirectional=bidirectional,
            norm=norm_factory(norm, norm_options),
        )

    entry.__name__ = entry.__qualname__ = f"ds2_{cell}"
    entry.__doc__ = (
        f"Deep Speech 2 style stack of {cell.upper()} layers, sequence-wise normalization of the input term only "
        "(Amodei et al. 2016, Sec. 3.2): ``h_t = f(B(W x_t) + U h_{t-1})``, statistics over batch and valid steps."
    )
    return entry


ds2_gru = register_model(_deep_speech2_entry("gru"))
ds2_lstm = register_model(_deep_speech2_entry("lstm"))
