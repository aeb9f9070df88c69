"""A batch of sequences as the recurrent layers pass it on: (B, T, C) with every step valid, or packed (a
padded batch is packed once, at the classifier's input), and the maps over its valid steps."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ...norms.sequence import with_packed_data

__all__ = ["CELLS", "POOLS", "Steps", "batch_major", "map_steps", "pack"]

CELLS: dict[str, int] = {"gru": 3, "lstm": 4}  # recurrent cell -> number of gates


POOLS: tuple[str, ...] = ("last", "mean")


Steps = Tensor | PackedSequence  # a batch of sequences: (B, T, C) with every step valid, or packed


def pack(x: Tensor, lengths: Tensor) -> PackedSequence:
    """The valid steps of a padded (B, T, C) batch, packed (time-major, longest sequences first)."""
    return pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)


def map_steps(fn: Callable[[Tensor], Tensor], steps: Steps) -> Steps:
    """Apply ``fn``, a map of (B, T, C) sequences without padding, to every valid step of a batch.

    A dense batch goes to ``fn`` as it is; a packed batch as one sequence (1, M, C) of its M valid steps. For
    a sequence-wise norm both give the statistics over the batch's valid steps, and the packed batch needs no
    gathering and scattering of the valid steps around the norm: its data already *are* the valid steps.
    """
    if isinstance(steps, PackedSequence):
        return with_packed_data(steps, fn(steps.data.unsqueeze(0)).squeeze(0))
    return fn(steps)


def batch_major(h_n: Tensor) -> Tensor:
    """(directions, B, H) final states of a recurrent layer -> (B, directions * H)."""
    return h_n.transpose(0, 1).reshape(h_n.shape[1], -1)
