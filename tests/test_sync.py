"""Synchronized norms on 2 gloo processes equal one process on the concatenated batch (tolerance 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from bnzoo.norms import make_norm
from bnzoo.norms.introspect import synchronized_norms
from bnzoo.plugins import NormSync, convert_sync_norms, revert_sync_norms
from tests.distributed import run_in_processes

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("distributed")]

# (kind, layout, per-rank batch sizes): unequal shards prove that sums and counts are reduced, not averages
CASES = [
    ("renorm", "2d", (3, 5)),
    ("bn", "2d", (3, 5)),
    ("torch_bn", "2d", (4, 4)),
    ("renorm", "seq", (3, 5)),
    ("bn", "seq", (2, 4)),
]
STEPS = 3
CHANNELS = 4


def _layer(kind: str, layout: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "torch_bn":
        layer = nn.BatchNorm2d(CHANNELS)
    else:
        options = {"r_max": 1.5, "d_max": 0.5, "momentum": 0.3} if kind == "renorm" else {"momentum": 0.3}
        layer = make_norm(kind, CHANNELS, layout, **options)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, CHANNELS))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, CHANNELS))
    return layer


def _data(layout: str, sizes: tuple[int, ...], step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The full (concatenated) batch of one step, lengths for sequences, and an upstream gradient."""
    g = torch.Generator().manual_seed(100 + step)
    total = sum(sizes)
    shape = (total, 6, CHANNELS) if layout == "seq" else (total, CHANNELS, 3, 3)
    view = (1, 1, -1) if layout == "seq" else (1, -1, 1, 1)
    drift = torch.linspace(-2, 2, CHANNELS).view(view) * (step + 1)
    scale = torch.linspace(0.5, 3, CHANNELS).view(view) * (step + 1)
    x = torch.randn(shape, generator=g) * scale + drift
    lengths = torch.randint(1, 7, (total,), generator=g) if layout == "seq" else None
    upstream = torch.randn(shape, generator=g)
    return x, lengths, upstream


def _run_steps(layer: nn.Module, layout: str, sizes: tuple[int, ...], rank: int | None) -> dict[str, list]:
    """Train steps on the whole batch (rank None) or on one rank's shard of it."""
    out: dict[str, list] = {"y": [], "x_grad": [], "w_grad": [], "b_grad": []}
    for step in range(STEPS):
        x, lengths, upstream = _data(layout, sizes, step)
        if rank is not None:
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            x, upstream = x[rows], upstream[rows]
            lengths = lengths[rows] if lengths is not None else None
        x = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(x, lengths=lengths) if layout == "seq" else layer(x)
        y.backward(upstream)
        out["y"].append(y.detach())
        out["x_grad"].append(x.grad)
        out["w_grad"].append(layer.weight.grad.clone())
        out["b_grad"].append(layer.bias.grad.clone())
    out["running"] = [layer.running_mean.clone(), layer.running_var.clone()]
    return out


def _sharded_worker(rank: int, world_size: int, cases: list) -> list[dict[str, list]]:
    results = []
    for kind, layout, sizes in cases:
        layer = convert_sync_norms(_layer(kind, layout))
        assert synchronized_norms(layer), "conversion must switch the layer to synchronized mode"
        results.append(_run_steps(layer, layout, sizes, rank))
    return results


def test_synchronized_norms_equal_one_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    per_rank = run_in_processes(_sharded_worker, 2, tmp_path, CASES)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for index, (kind, layout, sizes) in enumerate(CASES):
        ref = _run_steps(_layer(kind, layout), layout, sizes, rank=None)
        shards = [per_rank[r][index] for r in range(2)]
        for step in range(STEPS):
            msg = f"{kind}/{layout} step {step}"
            torch.testing.assert_close(torch.cat([s["y"][step] for s in shards]), ref["y"][step], **tol, msg=msg)
            torch.testing.assert_close(
                torch.cat([s["x_grad"][step] for s in shards]), ref["x_grad"][step], **tol, msg=msg
            )
            # each process holds the gradient of its own loss term; DDP sums (averages) them
            for key in ("w_grad", "b_grad"):
                torch.testing.assert_close(sum(s[key][step] for s in shards), ref[key][step], **tol, msg=msg)
        for s in shards:
            for got, want in zip(s["running"], ref["running"], strict=True):
                torch.testing.assert_close(got, want, **tol, msg=f"{kind}/{layout} running statistics")


def test_conversion_keeps_semantics_state_and_reverts() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), make_norm("renorm", 4), make_norm("bn", 4), make_norm("renorm", 4, "seq")
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_norms(model)
    assert type(converted[1]).__module__.startswith("bnzoo")  # torch BN -> bnzoo's synchronizable BN
    assert converted[2].synchronized and converted[3].synchronized and converted[4].synchronized
    assert converted[2] is model[2]  # bnzoo layers are switched in place, not rebuilt
    assert set(converted.state_dict()) == set(before)
    x = torch.randn(4, 3, 5, 5)
    model_eval = converted.eval()
    y1 = model_eval[:4](x)  # in one process a synchronized layer is the plain one
    reverted = revert_sync_norms(converted)
    assert type(reverted[1]) is nn.BatchNorm2d
    assert not reverted[2].synchronized
    torch.testing.assert_close(reverted[:4](x), y1)
    for k, v in reverted.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_torch_sync_batchnorm_only_replaces_plain_batchnorm() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4), make_norm("bn", 4), make_norm("renorm", 4), make_norm("bn", 4, "seq"))
    converted = convert_sync_norms(model, torch_sync_batchnorm=True)
    assert isinstance(converted[0], nn.SyncBatchNorm) and isinstance(converted[1], nn.SyncBatchNorm)
    assert not isinstance(converted[2], nn.SyncBatchNorm) and converted[2].synchronized
    assert not isinstance(converted[3], nn.SyncBatchNorm) and converted[3].synchronized
    reverted = revert_sync_norms(converted)
    assert type(reverted[0]) is nn.BatchNorm2d and type(reverted[1]).__module__.startswith("bnzoo")


def test_sync_batchnorm_flag_is_replaced_for_renorm_models() -> None:
    import lightning as L

    from bnzoo.plugins import check_layer_sync

    trainer = L.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, sync_batchnorm=True, logger=False)
    assert isinstance(trainer.strategy._layer_sync, TorchSyncBatchNorm)
    with pytest.warns(UserWarning, match="NormSync"):
        check_layer_sync(trainer, nn.Sequential(make_norm("renorm", 4)))
    assert isinstance(trainer.strategy._layer_sync, NormSync)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, sync_batchnorm=True, logger=False)
    check_layer_sync(trainer, nn.Sequential(nn.BatchNorm2d(4)))  # plain BN: torch's conversion is right
    assert isinstance(trainer.strategy._layer_sync, TorchSyncBatchNorm)
