"""The classifier every recurrent family of bnzoo shares: a stack of recurrent layers read out by a linear
layer, from the last valid step (``pool="last"``: each direction's final hidden state) or from the mean over
the valid steps (``pool="mean"``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_packed_sequence

from ...checks import check_choice, check_positive_int
from ...norms.sequence import sequence_mask
from .steps import POOLS, Steps, map_steps, pack

__all__ = ["RecurrentClassifier", "stack_layers"]


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
        self.pool = check_choice("pool", pool, POOLS)
        self.fc = nn.Linear(layers[-1].output_size, check_positive_int("num_classes", num_classes))

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
        steps: Steps = x if lengths is None else pack(x, lengths)
        for index, layer in enumerate(self.layers):
            steps, final = layer(map_steps(self.dropout, steps) if index else steps)
        if self.pool == "last":
            return final
        if lengths is None:
            return steps.mean(dim=1)
        padded, _ = pad_packed_sequence(steps, batch_first=True)  # zeros at padded steps
        return padded.sum(dim=1) / lengths.to(device=padded.device, dtype=padded.dtype).unsqueeze(1)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.fc(self.features(x, lengths))


def stack_layers(
    make_layer: Callable[[int], nn.Module],
    input_size: int,
    num_layers: int,
    num_classes: int,
    dropout: float,
    pool: str,
) -> RecurrentClassifier:
    """``num_layers`` layers from ``make_layer(input_size)``, each reading its predecessor's outputs."""
    check_positive_int("num_layers", num_layers)
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        layers.append(make_layer(input_size))
        input_size = layers[-1].output_size
    return RecurrentClassifier(layers, num_classes, dropout=dropout, pool=pool)
