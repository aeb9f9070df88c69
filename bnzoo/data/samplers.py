"""SortaGrad (Amodei et al. 2016, "Deep Speech 2", Sec. 3.1): a length curriculum for the first epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

__all__ = ["SortaGradSampler"]


class SortaGradSampler(DistributedSampler):
    """Indices in increasing order of length for the first ``sorted_epochs`` epochs, in random order after.

    Deep Speech 2, Sec. 3.1: "in the first training epoch, we iterate through the training set in
    increasing order of the length of the longest utterance in the minibatch. After the first epoch,
    training reverts back to a random order over minibatches." Chunked into consecutive mini-batches by the
    DataLoader, the sorted order gives mini-batches of non-decreasing length; ties keep a seeded random order.

    It is a :class:`~torch.utils.data.DistributedSampler` (``num_replicas=1, rank=0`` in one process) so that
    it shards itself under DDP and Lightning keeps it instead of replacing it with its own sampler. Each
    replica takes every ``num_replicas``-th index of the ordered list, so the replicas' batches at a step have
    similar lengths. As with any DistributedSampler, call :meth:`set_epoch` at the start of every epoch
    (Lightning does; in a plain loop, call it yourself) -- the epoch decides between sorted and random order.

    Args:
        lengths: the length of every sample of the dataset (its ``len`` is the dataset size).
        num_replicas, rank: the process's share, as in DistributedSampler.
        seed: the random order of later epochs is ``randperm`` seeded with ``seed + epoch``.
        sorted_epochs: how many epochs, from epoch 0, are in sorted order (Deep Speech 2: 1).
        drop_last: drop the tail that does not divide among the replicas (else pad by repeating samples).
    """

    def __init__(
        self,
        lengths: Sequence[int] | Tensor,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        sorted_epochs: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        if self.lengths.dim() != 1:
            raise ValueError(f"lengths must be one length per sample, got shape {tuple(self.lengths.shape)}")
        if sorted_epochs < 0:
            raise ValueError(f"sorted_epochs must be >= 0, got {sorted_epochs}")
        super().__init__(
            self.lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        self.sorted_epochs = sorted_epochs

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.drop_last:
            order = order[: self.total_size]
        elif len(order) < self.total_size:
            order = order.repeat(-(-self.total_size // len(order)))[: self.total_size]
        if self.epoch < self.sorted_epochs:
            order = order[torch.argsort(self.lengths[order], stable=True)]
        return iter(order[self.rank : self.total_size : self.num_replicas].tolist())
