"""Deep recurrent classifiers with batch normalization: Deep Speech 2 stacks and the BN-LSTM.

Two ways of normalizing a recurrent network, each faithful to its paper:

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

**Recurrent batch normalization** (Cooijmans et al. 2016, Eq. 6-8). Both the input-to-hidden and the
hidden-to-hidden terms are normalized, with statistics per time step::

    (i~, f~, g~, o~) = BN_t(W_h h_{t-1}; gamma_h, 0) + BN_t(W_x x_t; gamma_x, 0) + b      (6)
    c_t = sigmoid(f~) * c_{t-1} + sigmoid(i~) * tanh(g~)                                  (7)
    h_t = sigmoid(o~) * tanh(BN_t(c_t; gamma_c, beta_c))                                  (8)

The cell recurrence (7) itself is never normalized: ``BN_t(c_t)`` appears only where ``h_t`` is read out (8).
Registered as ``bn_lstm``; see :class:`BatchNormLSTMLayer` for the details.

Both families share :class:`RecurrentClassifier`, ``forward(x: (B, T, F), lengths: (B,) | None = None)``
``-> (B, num_classes)``, which classifies from the last valid step (``pool="last"``: each direction's final
hidden state) or from the mean over the valid steps (``pool="mean"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..norms import is_distributed, make_norm, sequence_mask, with_packed_data
from .layers import norm_has_bias
from .registry import register_model

__all__ = [
    "CELLS",
    "POOLS",
    "BatchNormLSTMLayer",
    "FixedInputRecurrence",
    "PerStepNorm",
    "RecurrentClassifier",
    "SequenceWiseNormRNN",
    "bn_lstm",
    "ds2_gru",
    "ds2_lstm",
]

CELLS: dict[str, int] = {"gru": 3, "lstm": 4}  # recurrent cell -> number of gates
POOLS: tuple[str, ...] = ("last", "mean")


# ----------------------------------------------------------------------------------------------------------
# Argument checks (at construction, naming the bad value and the valid choices)


def _check_choice(name: str, value: Any, choices: Any) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _check_norm_options(norm_options: Any) -> dict[str, Any]:
    if norm_options is None:
        return {}
    if not isinstance(norm_options, dict):
        raise TypeError(f"norm_options must be a dict of options for make_norm or None, got {norm_options!r}")
    return dict(norm_options)


Steps = Tensor | PackedSequence  # a batch of sequences: (B, T, C) with every step valid, or packed


def _pack(x: Tensor, lengths: Tensor) -> PackedSequence:
    """The valid steps of a padded (B, T, C) batch, packed (time-major, longest sequences first)."""
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)


def _map_steps(fn: Callable[[Tensor], Tensor], steps: Steps) -> Steps:
    """Apply ``fn``, a map of (B, T, C) sequences without padding, to every valid step of a batch.

    A dense batch goes to ``fn`` as it is; a packed batch as one sequence (1, M, C) of its M valid steps. For
    a sequence-wise norm both give the statistics over the batch's valid steps, and the packed batch needs no
    gathering and scattering of the valid steps around the norm: its data already *are* the valid steps.
    """
    if isinstance(steps, PackedSequence):
        return with_packed_data(steps, fn(steps.data.unsqueeze(0)).squeeze(0))
    return fn(steps)


def _batch_major(h_n: Tensor) -> Tensor:
    """(directions, B, H) final states of a recurrent layer -> (B, directions * H)."""
    return h_n.transpose(0, 1).reshape(h_n.shape[1], -1)


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
        self.cell = _check_choice("cell", cell, CELLS)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
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

    ``B`` is ``make_norm(norm, directions * gates * hidden, "seq")``: one norm over both directions' input
    terms, statistics over the batch and its valid steps. With ``norm="none"`` the layer is a plain
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
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.cell = _check_choice("cell", cell, CELLS)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
        directions = 2 if bidirectional else 1
        input_channels = directions * CELLS[cell] * hidden_size
        self.input_proj: nn.Linear | None
        self.norm: nn.Module | None
        self.rnn: nn.Module
        # Built for every kind, so that "none" with options fails like any other kind.
        norm_layer = make_norm(norm, input_channels, "seq", **_check_norm_options(norm_options))
        if norm == "none":
            self.input_proj = self.norm = None
            rnn_class = nn.LSTM if cell == "lstm" else nn.GRU
            self.rnn = rnn_class(input_size, hidden_size, batch_first=True, bidirectional=self.bidirectional)
        else:
            self.input_proj = nn.Linear(input_size, input_channels, bias=not norm_has_bias(norm_layer))
            self.norm = norm_layer
            self.rnn = FixedInputRecurrence(cell, hidden_size, self.bidirectional)

    @property
    def output_size(self) -> int:
        return (2 if self.bidirectional else 1) * self.hidden_size

    def input_term(self, x: Tensor) -> Tensor:
        """``B(W x)`` of (B, T, F) steps that are all valid: (B, T, directions * gates * H)."""
        if self.input_proj is None or self.norm is None:
            raise RuntimeError("a layer without a norm (norm='none') has no separate input term")
        return self.norm(self.input_proj(x))

    def forward(self, x: Steps) -> tuple[Steps, Tensor]:
        inputs = x if self.norm is None else _map_steps(self.input_term, x)
        out, hidden = self.rnn(inputs)
        return out, _batch_major(hidden[0] if self.cell == "lstm" else hidden)


# ----------------------------------------------------------------------------------------------------------
# BN-LSTM: per-time-step statistics on both terms (Cooijmans et al. 2016)


class PerStepNorm(nn.Module):
    """A norm with separate statistics for each time step and one set of affine parameters shared over time.

    Cooijmans et al. 2016, Sec. 3: ``steps[t] = make_norm(kind, C, "1d")`` keeps the statistics of step ``t``
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
        kind: str,
        num_features: int,
        max_steps: int,
        *,
        options: dict[str, Any] | None = None,
        gamma_init: float = 0.1,
        learn_shift: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("max_steps", max_steps)
        options = _check_norm_options(options)
        self.steps = nn.ModuleList(make_norm(kind, num_features, "1d", **options) for _ in range(max_steps))
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
        norm: str = "bn",
        norm_options: dict[str, Any] | None = None,
        max_steps: int = 784,
        gamma_init: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.max_steps = _check_positive_int("max_steps", max_steps)
        if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
            raise ValueError(f"gamma_init must be a float, got {gamma_init!r}")
        gates = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias = nn.Parameter(torch.empty(gates))
        per_step = {"options": norm_options, "gamma_init": float(gamma_init)}
        self.norm_ih = PerStepNorm(norm, gates, max_steps, learn_shift=False, **per_step)
        self.norm_hh = PerStepNorm(norm, gates, max_steps, learn_shift=False, **per_step)
        self.norm_cell = PerStepNorm(norm, hidden_size, max_steps, learn_shift=True, **per_step)
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
        packed = _pack(x, torch.full((x.shape[0],), x.shape[1])) if dense else x
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


# ----------------------------------------------------------------------------------------------------------
# The classifier around a stack of recurrent layers, and the registered entry points


class RecurrentClassifier(nn.Module):
    """A stack of recurrent layers and a linear classifier: ``forward(x: (B, T, F), lengths=None) -> (B, C)``.

    A padded batch (with ``lengths``) is packed once, at the input, and stays packed through every layer:
    padded steps are never computed, normalized or read. Each layer maps a batch of steps (dense without
    padding, or packed) to its outputs in the same form and its final states (B, D). Dropout (if any) sits
    between layers, as in ``nn.GRU``. The classifier reads the last layer's final states (``pool="last"``: for
    a bidirectional layer the forward direction at the last valid step and the backward direction after
    reading back to step 0) or its outputs averaged over the valid steps (``pool="mean"``).
    """

    def __init__(self, layers: list[nn.Module], num_classes: int, *, dropout: float = 0.0, pool: str = "last") -> None:
        super().__init__()
        if not layers:
            raise ValueError("a recurrent classifier needs at least one layer")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        self.input_size: int = layers[0].input_size
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)
        self.pool = _check_choice("pool", pool, POOLS)
        self.fc = nn.Linear(layers[-1].output_size, _check_positive_int("num_classes", num_classes))

    def _check_inputs(self, x: Tensor, lengths: Tensor | None) -> Tensor | None:
        """Validate ``x`` and ``lengths``; return the lengths as CPU int64, or None when no step is padded."""
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (batch, time, {self.input_size}), got {tuple(x.shape)}"
            )
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths)
        if sequence_mask(x.shape[0], x.shape[1], lengths=lengths) is None:  # validates dtype, shape and range
            return None
        return lengths.to(device="cpu", dtype=torch.long)

    def features(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The pooled features (B, D) that the classifier reads."""
        lengths = self._check_inputs(x, lengths)
        steps: Steps = x if lengths is None else _pack(x, lengths)
        for index, layer in enumerate(self.layers):
            steps, final = layer(_map_steps(self.dropout, steps) if index else steps)
        if self.pool == "last":
            return final
        if lengths is None:
            return steps.mean(dim=1)
        padded, _ = pad_packed_sequence(steps, batch_first=True)  # zeros at padded steps
        return padded.sum(dim=1) / lengths.to(device=padded.device, dtype=padded.dtype).unsqueeze(1)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.fc(self.features(x, lengths))


def _stack(
    make_layer: Callable[[int], nn.Module],
    input_size: int,
    num_layers: int,
    num_classes: int,
    dropout: float,
    pool: str,
) -> RecurrentClassifier:
    """``num_layers`` layers from ``make_layer(input_size)``, each reading its predecessor's outputs."""
    _check_positive_int("num_layers", num_layers)
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers.append(make_layer(input_size))
        input_size = layers[-1].output_size
    return RecurrentClassifier(layers, num_classes, dropout=dropout, pool=pool)


def _deep_speech2(
    cell: str, input_size: int, num_layers: int, num_classes: int, dropout: float, pool: str, **layer: Any
) -> RecurrentClassifier:
    def make_layer(size: int) -> nn.Module:
        return SequenceWiseNormRNN(size, cell=cell, **layer)

    return _stack(make_layer, input_size, num_layers, num_classes, dropout, pool)


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
            norm=norm,
            norm_options=norm_options,
        )

    entry.__name__ = entry.__qualname__ = f"ds2_{cell}"
    entry.__doc__ = (
        f"Deep Speech 2 style stack of {cell.upper()} layers, sequence-wise normalization of the input term only "
        "(Amodei et al. 2016, Sec. 3.2): ``h_t = f(B(W x_t) + U h_{t-1})``, statistics over batch and valid steps."
    )
    return entry


ds2_gru = register_model(_deep_speech2_entry("gru"))
ds2_lstm = register_model(_deep_speech2_entry("lstm"))


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

    return _stack(make_layer, input_size, num_layers, num_classes, dropout, pool)
