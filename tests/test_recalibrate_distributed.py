"""Recalibration on 2 gloo processes with unequal shards, against float64 references computed by hand.

The semantics (bnzoo/callbacks/recalibrate.py): without synchronized norms every process's batch is a batch of
Ioffe & Szegedy 2015, Alg. 2 -- the result is one process over the union of the batches; with NormSync a
layer normalizes the global batch (the processes' batches concatenated) and that is the batch of Alg. 2 -- the
result is one process on the concatenated batches. The model has three norm layers in sequence (a sequence
BatchNorm over valid steps, Batch Renorm, BatchNorm), so how the upstream layers normalize matters.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bnzoo.norms import make_norm, recalibrate_norm_stats
from bnzoo.plugins import convert_sync_norms
from tests.distributed import run_in_processes

Batch = tuple[Tensor, Tensor]  # (x: (B, T, 3), lengths: (B,))
STEPS = 5
BATCH_SIZES = (6, 3)  # rank 0's and rank 1's batch sizes: unequal shards
NORMS = ("seq", "renorm", "bn")


class NormStack(nn.Module):
    """Linear -> sequence BatchNorm (valid steps only) -> ReLU -> mean over valid steps -> Linear -> Batch Renorm
    -> ReLU -> Linear -> BatchNorm; affine parameters and renorm's (stale) running statistics random."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(3, 5)
        self.seq = make_norm("bn", 5, "seq")
        self.fc1 = nn.Linear(5, 4)
        self.renorm = make_norm("renorm", 4, "1d")
        self.fc2 = nn.Linear(4, 3)
        self.bn = make_norm("bn", 3, "1d")
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=g))
            self.renorm.running_mean.copy_(torch.randn(4, generator=g) * 3)
            self.renorm.running_var.uniform_(0.1, 10.0, generator=g)
        self.double()

    def forward(self, batch: Batch) -> Tensor:
        x, lengths = batch
        h = torch.relu(self.seq(self.proj(x), lengths=lengths))
        pooled = h.sum(1) / lengths.to(h.dtype).unsqueeze(1)
        return self.bn(self.fc2(torch.relu(self.renorm(self.fc1(pooled)))))


def make_batch(size: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, STEPS, 3, generator=g, dtype=torch.float64) * 2 + 1
    return x, torch.randint(1, STEPS + 1, (size,), generator=g)


def shard(rank: int, synchronized: bool) -> list[Batch]:
    """Rank 0: batches of 6 sequences, rank 1: of 3. Without NormSync rank 0 also has one batch more (the
    processes need not run equally many); with it every process runs the same steps, as under DDP."""
    count = 3 + (rank == 0 and not synchronized)
    return [make_batch(BATCH_SIZES[rank], seed=10 * rank + i) for i in range(count)]


def concatenated(batches: list[Batch]) -> Batch:
    return torch.cat([x for x, _ in batches]), torch.cat([lengths for _, lengths in batches])


def reference_rows(net: NormStack, batch: Batch) -> list[Tensor]:
    """The rows that each of the three norms normalizes for ``batch``, each with the batch's own statistics (renorm
    as BatchNorm), by hand in float64: Ioffe & Szegedy 2015, Alg. 1, over the valid steps for the sequence norm."""

    def normalize(v: Tensor, norm: nn.Module) -> Tensor:
        mean, var = v.mean(0), v.var(0, unbiased=False)
        return (v - mean) / (var + norm.eps).sqrt() * norm.weight + norm.bias

    with torch.no_grad():
        x, lengths = batch
        valid = torch.arange(STEPS)[None] < lengths[:, None]
        z = x @ net.proj.weight.T + net.proj.bias
        mean, var = z[valid].mean(0), z[valid].var(0, unbiased=False)
        h = torch.relu((z - mean) / (var + net.seq.eps).sqrt() * net.seq.weight + net.seq.bias) * valid[..., None]
        pooled = h.sum(1) / lengths.double().unsqueeze(1)
        a = pooled @ net.fc1.weight.T + net.fc1.bias
        c = torch.relu(normalize(a, net.renorm)) @ net.fc2.weight.T + net.fc2.bias
        return [z[valid], a, c]


def reference_statistics(batches: list[Batch], population: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """Alg. 2 (mean of batch means, mean of ``m/(m-1)``-corrected batch variances) or the exact population
    moments of every norm, over ``batches`` -- each a batch of Alg. 2."""
    net = NormStack()
    rows = [reference_rows(net, batch) for batch in batches]
    statistics = {}
    for index, name in enumerate(NORMS):
        per_batch = [r[index] for r in rows]
        if population:
            every = torch.cat(per_batch)
            statistics[name] = (every.mean(0), every.var(0, unbiased=True))
        else:
            mean = torch.stack([r.mean(0) for r in per_batch]).mean(0)
            var = torch.stack([r.var(0, unbiased=True) for r in per_batch]).mean(0)
            statistics[name] = (mean, var)
    return statistics


def running_statistics(net: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    return {name: (getattr(net, name).running_mean.clone(), getattr(net, name).running_var.clone()) for name in NORMS}


class Branches(nn.Module):
    """``a`` normalizes every batch, ``b`` only batches flagged True, ``c`` none."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (make_norm("bn", 3, "1d") for _ in range(3))
        with torch.no_grad():
            self.c.running_var.fill_(7.0)

    def forward(self, batch: tuple[Tensor, bool]) -> Tensor:
        x, use_b = batch
        h = self.a(x)
        return self.b(h * 2 + 1) if use_b else h


def branch_batches(rank: int) -> list[tuple[Tensor, bool]]:
    """Rank 0: batches that reach ``b``; rank 1: batches that do not."""
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(BATCH_SIZES[rank], 3, generator=g, dtype=torch.float64) * 3 + 2, rank == 0) for _ in range(2)]


def _recalibrate_on_each_rank(rank: int, world_size: int) -> dict[str, object]:
    results: dict[str, object] = {}
    for synchronized in (False, True):
        for population in (False, True):
            net = NormStack()
            if synchronized:
                convert_sync_norms(net)
            batches = shard(rank, synchronized)
            result = recalibrate_norm_stats(net, batches, net, num_batches=len(batches), population=population)
            results[f"sync={synchronized} population={population}"] = running_statistics(net)
            assert result.skipped == () and len(result.recalibrated) == 3
    branches = Branches().double()
    result = recalibrate_norm_stats(branches, branch_batches(rank), branches, num_batches=2)
    results["branches"] = {n: (getattr(branches, n).running_mean, getattr(branches, n).running_var) for n in "abc"}
    results["branches skipped"] = list(result.skipped)
    return results


def max_relative_error(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor]) -> float:
    return max(float(((g - w).abs() / w.abs().clamp_min(1e-3)).max()) for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """Every case, recalibrated once on 2 gloo processes."""
    return run_in_processes(_recalibrate_on_each_rank, 2, tmp_path_factory.mktemp("ranks"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_two_processes_with_unequal_shards_against_one_process(per_rank: list[dict]) -> None:
    for synchronized in (False, True):
        if synchronized:  # the batch of Alg. 2 is the global batch: the ranks' batches at a step, concatenated
            batches = [concatenated(list(step)) for step in zip(shard(0, True), shard(1, True), strict=True)]
        else:  # every rank's batch is a batch: the union
            batches = shard(0, False) + shard(1, False)
        for population in (False, True):
            key = f"sync={synchronized} population={population}"
            reference = reference_statistics(batches, population)
            one_process = NormStack()
            recalibrate_norm_stats(one_process, batches, one_process, num_batches=len(batches), population=population)
            for name in NORMS:
                for rank in (0, 1):
                    got = per_rank[rank][key][name]
                    error = max_relative_error(got, reference[name])
                    assert error < 1e-10, f"{key}, {name}, rank {rank}: max relative error {error:.3g}"
                    for g, w in zip(got, running_statistics(one_process)[name], strict=True):
                        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"{key}, {name}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_a_layer_reached_on_one_process_only_is_recalibrated_from_its_rows(per_rank: list[dict]) -> None:
    """Whether a layer got rows is decided on the all-reduced counts: ``b``, reached on rank 0 only, gets rank
    0's statistics on both ranks; ``c``, reached nowhere, keeps its statistics on both and is named."""
    ours, theirs = branch_batches(0), branch_batches(1)
    a_rows = [x for x, _ in ours + theirs]
    b_rows = [(x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt() * 2 + 1 for x, _ in ours]
    for rank in (0, 1):
        got = per_rank[rank]["branches"]
        for name, rows in (("a", a_rows), ("b", b_rows)):
            want = (torch.stack([r.mean(0) for r in rows]).mean(0), torch.stack([r.var(0) for r in rows]).mean(0))
            assert max_relative_error(got[name], want) < 1e-10, (rank, name)
        assert torch.equal(got["c"][0], torch.zeros(3, dtype=torch.float64))
        assert torch.equal(got["c"][1], torch.full((3,), 7.0, dtype=torch.float64))
        assert per_rank[rank]["branches skipped"] == ["c"]
