"""Recalibration of norm statistics: Alg. 2 and population estimates against independent computations,
DDP equal to one process over the union of batches, and the Lightning callback's checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from bnzoo.callbacks import LastCheckpoint, RecalibrateNormStats
from bnzoo.data import DigitsDataModule
from bnzoo.norms import RecalibrationResult, make_norm, recalibrate_norm_stats
from bnzoo.tasks import ImageClassifier
from tests.distributed import run_in_processes


def small_net(kind: str = "bn") -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6),
        make_norm(kind, 6, "1d", momentum=0.1),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(6, 4),
        make_norm(kind, 4, "1d", momentum=0.1),
    )


def batches(count: int = 5, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 5, generator=g) * 3 + 1 for _ in range(count)]


def layer_inputs(net: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of both norm layers for one batch, computed by hand in float64: the first norm normalizes
    with the batch's own statistics (training mode); dropout is off."""
    x = x.double()
    w1, b1 = net[0].weight.double(), net[0].bias.double()
    h1 = x @ w1.T + b1
    normalized = (h1 - h1.mean(0)) / (h1.var(0, unbiased=False) + net[1].eps).sqrt()
    if net[1].weight is not None:
        normalized = normalized * net[1].weight.double() + net[1].bias.double()
    h2 = normalized.clamp_min(0) @ net[4].weight.double().T + net[4].bias.double()
    return h1, h2


def forward(net: nn.Module):
    return lambda batch: net(batch)


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_algorithm_2_against_an_independent_computation(kind: str) -> None:
    net = small_net(kind)
    data = batches(5)
    result = recalibrate_norm_stats(net, data, forward(net), num_batches=5)
    assert result == RecalibrationResult(batches=5, recalibrated=("1", "5"), skipped=())
    m = data[0].shape[0]
    for index, layer in ((0, net[1]), (1, net[5])):
        inputs = [layer_inputs(net, x)[index] for x in data]
        mean = torch.stack([h.mean(0) for h in inputs]).mean(0)
        var = m / (m - 1) * torch.stack([h.var(0, unbiased=False) for h in inputs]).mean(0)
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_population_option_against_float64_statistics() -> None:
    net = small_net()
    data = [x for x in batches(4, 8)] + [torch.randn(3, 5) * 3 + 1]  # a smaller last batch
    recalibrate_norm_stats(net, data, forward(net), num_batches=5, population=True)
    for index, layer in ((0, net[1]), (1, net[5])):
        every = torch.cat([layer_inputs(net, x)[index] for x in data])
        torch.testing.assert_close(layer.running_mean.double(), every.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), every.var(0, unbiased=True), rtol=1e-5, atol=1e-5)


def test_renorm_inference_uses_the_recalibrated_variance() -> None:
    layer = make_norm("renorm", 3, "1d")
    data = [torch.randn(16, 3) * 4 + 2 for _ in range(3)]
    recalibrate_norm_stats(layer, data, layer, num_batches=3, population=True)
    every = torch.cat(data).double()
    layer.eval()
    x = torch.randn(5, 3)
    expected = (x.double() - every.mean(0)) / (every.var(0) + layer.eps).sqrt() * layer.weight.double()
    torch.testing.assert_close(
        layer(x).double(), expected.detach() + layer.bias.double().detach(), rtol=1e-5, atol=1e-5
    )


def test_sequence_norm_statistics_use_valid_steps_only() -> None:
    layer = make_norm("bn", 3, "seq")
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 6, 3, generator=g) * 2 + 1, torch.tensor([6, 4, 2, 1])) for _ in range(3)]
    for x, lengths in data:  # padding holds large values: leaking them would be visible
        mask = torch.arange(6)[None] < lengths[:, None]
        x[~mask] = 1000.0
    recalibrate_norm_stats(layer, data, lambda b: layer(b[0], lengths=b[1]), num_batches=3, population=True)
    valid = torch.cat([x[torch.arange(6)[None] < lengths[:, None]] for x, lengths in data]).double()
    torch.testing.assert_close(layer.running_mean.double(), valid.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var.double(), valid.var(0), rtol=1e-5, atol=1e-5)


def test_renorm_is_recalibrated_as_batchnorm_whatever_its_running_statistics() -> None:
    """Renorm's r and d refer to the running statistics that recalibration replaces: it runs as BatchNorm (r = 1,
    d = 0), so stale statistics do not leak into the next layer's estimate; its bounds are restored after."""
    net, reference = small_net("renorm"), small_net("bn")
    with torch.no_grad():
        net[1].running_mean.copy_(torch.linspace(-2, 2, 6))  # far from the truth: would move r and d
        net[1].running_var.copy_(torch.linspace(0.5, 30, 6))
    data = batches(4)
    recalibrate_norm_stats(net, data, forward(net), num_batches=4)
    recalibrate_norm_stats(reference, data, forward(reference), num_batches=4)
    assert (net[1].r_max, net[1].d_max, net[5].r_max, net[5].d_max) == (3.0, 5.0, 3.0, 5.0)
    for layer, expected in ((net[1], reference[1]), (net[5], reference[5])):
        torch.testing.assert_close(layer.running_mean, expected.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, expected.running_var, rtol=1e-5, atol=1e-5)


class _NoUpdateBatchNorm(nn.BatchNorm1d):
    """A BatchNorm whose training forward never touches its running statistics (a custom update rule)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


@pytest.mark.parametrize(
    "layer",
    [make_norm("bn", 3, "1d"), make_norm("renorm", 3, "1d"), make_norm("bn", 3, "seq"), _NoUpdateBatchNorm(3)],
    ids=["bn", "renorm", "sequence bn", "custom update rule"],
)
def test_every_kind_of_update_rule_gives_algorithm_2(layer: nn.Module) -> None:
    """The moments are read from the layer's own update where it keeps the batch's moments (BatchNorm: unbiased
    variance; renorm: biased) and measured where it does not -- the result is Alg. 2 either way."""
    g = torch.Generator().manual_seed(1)
    sizes = [9, 9, 9, 9]
    if isinstance(layer, nn.BatchNorm1d) and "Sequence" in type(layer).__name__:
        data = [(torch.randn(3, 5, 3, generator=g) * 2 + 1, torch.tensor([5, 3, 1])) for _ in sizes]
        run = lambda b: layer(b[0], lengths=b[1])  # noqa: E731
        rows = [x[torch.arange(5)[None] < lengths[:, None]].double() for x, lengths in data]
    else:
        data = [torch.randn(n, 3, generator=g) * 2 + 1 for n in sizes]
        run, rows = layer, [x.double() for x in data]
    recalibrate_norm_stats(layer, data, run, num_batches=len(data))
    mean = torch.stack([r.mean(0) for r in rows]).mean(0)
    var = torch.stack([r.var(0, unbiased=True) for r in rows]).mean(0)  # m/(m-1) * biased, m per batch
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_packed_sequences_are_recalibrated_over_their_data() -> None:
    layer = make_norm("bn", 3, "seq")
    g = torch.Generator().manual_seed(2)
    padded = [torch.randn(3, 5, 3, generator=g) * 2 + 1 for _ in range(3)]
    lengths = torch.tensor([5, 3, 2])
    packed = [nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True) for x in padded]
    recalibrate_norm_stats(layer, packed, layer, num_batches=3, population=True)
    every = torch.cat([p.data for p in packed]).double()
    torch.testing.assert_close(layer.running_mean.double(), every.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.running_var.double(), every.var(0), rtol=1e-5, atol=1e-5)


def test_parameters_modes_and_counters_are_left_alone() -> None:
    net = small_net()
    net.train()
    net[3].eval()  # a mixed state, to be restored exactly
    params = {k: v.clone() for k, v in net.named_parameters()}
    counters = [net[1].num_batches_tracked.clone(), net[5].num_batches_tracked.clone()]
    modes = [m.training for m in net.modules()]
    recalibrate_norm_stats(net, batches(), forward(net), num_batches=5)
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(net[1].num_batches_tracked, counters[0])


def test_fewer_batches_than_asked_warns_with_the_count() -> None:
    net = small_net()
    with pytest.warns(UserWarning, match="asked for 10 batches but the data loader yielded only 3"):
        assert recalibrate_norm_stats(net, batches(3), forward(net), num_batches=10).batches == 3


def test_a_model_without_statistics_is_a_no_op() -> None:
    net = nn.Sequential(nn.Linear(5, 4), make_norm("ln", 4, "1d"))
    before = copy.deepcopy(net.state_dict())
    assert recalibrate_norm_stats(net, batches(), forward(net), num_batches=5) == RecalibrationResult(0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def _recalibrate_shard(rank: int, world_size: int, population: bool) -> dict[str, torch.Tensor]:
    net = small_net()
    shard = batches(6)[rank::world_size]
    recalibrate_norm_stats(net, shard, forward(net), num_batches=10, population=population)
    return {k: v for k, v in net.state_dict().items() if "running" in k}


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
@pytest.mark.filterwarnings("ignore:RecalibrateNormStats asked")
def test_two_processes_equal_one_process_over_both_shards(tmp_path: Path) -> None:
    for population in (False, True):
        per_rank = run_in_processes(_recalibrate_shard, 2, tmp_path, population)
        net = small_net()
        recalibrate_norm_stats(net, batches(6), forward(net), num_batches=6, population=population)
        for key, value in per_rank[0].items():
            torch.testing.assert_close(value, net.state_dict()[key], rtol=1e-6, atol=1e-6, msg=key)
            torch.testing.assert_close(per_rank[1][key], value)


def test_stale_statistics_are_fixed_by_recalibration() -> None:
    """An MLP trained with BN momentum 0.001 keeps running statistics near their initial values (mean 0,
    variance 1) while its inputs (digits shifted by 10) are far from them; its inference
    accuracy is poor until recalibration."""
    data = DigitsDataModule(batch_size=64, seed=0)
    data.setup("fit")
    torch.manual_seed(0)
    net = nn.Sequential(
        Affine(1.0, 10.0),
        nn.Flatten(),
        nn.Linear(64, 64),
        make_norm("bn", 64, "1d", momentum=0.001),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()

    def accuracy() -> float:
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(x).argmax(-1) == y).sum()) for x, y in data.val_dataloader())
        return correct / len(data.val_dataloader().dataset)

    stale = accuracy()
    recalibrate_norm_stats(net, data.train_dataloader(), lambda b: net(b[0]), num_batches=20)
    fixed = accuracy()
    assert fixed > stale + 0.1, (stale, fixed)
    assert fixed > 0.85


class Affine(nn.Module):
    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


# -- the Lightning callback ---------------------------------------------------------------------------------


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


# 1293 training digits = 3 batches of 431: no sample is dropped by drop_last, so one pass sees them all
BATCH = 431


def _fit(tmp_path: Path, callbacks: list[Callback], max_epochs: int = 4) -> tuple[ImageClassifier, LastCheckpoint]:
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=BATCH, seed=0)
    model = ImageClassifier(
        model="mlp", norm="bn", model_options={"hidden": [16]}, num_classes=10, in_chans=1, image_size=8, lr=0.05
    )
    checkpoint = LastCheckpoint(dirpath=str(tmp_path))
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, best, checkpoint],
    )
    trainer.fit(model, data)
    return model, checkpoint


def _population_of_first_layer(model: ImageClassifier, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """float64 mean and variance of the first linear layer's output over the whole training split."""
    data = DigitsDataModule(batch_size=BATCH, seed=0)
    data.setup("fit")
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    first_linear = [k for k in weights if k.endswith(".weight") and weights[k].dim() == 2][0]
    w = weights[first_linear].double()
    b = weights.get(first_linear.replace("weight", "bias"), torch.zeros(w.shape[0])).double()
    outputs = torch.cat([x.flatten(1).double() @ w.T + b for x, _ in data.train_dataloader()])
    return outputs.mean(0), outputs.var(0)


def _running_stats(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mean = [v for k, v in state.items() if k.endswith("running_mean")]
    var = [v for k, v in state.items() if k.endswith("running_var")]
    assert len(mean) == 1 and len(var) == 1
    return mean[0], var[0]


@pytest.mark.parametrize("stop_early", [False, True])
def test_callback_puts_recalibrated_statistics_in_the_last_checkpoint(tmp_path: Path, stop_early: bool) -> None:
    callbacks: list[Callback] = [RecalibrateNormStats(num_batches=1000, population=True)]
    if stop_early:  # training ends before max_epochs: recalibration in on_train_end rewrites last.ckpt
        callbacks.append(_StopAt(7))
    model, checkpoint = _fit(tmp_path, callbacks)
    state = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    mean, var = _running_stats(state)
    want_mean, want_var = _population_of_first_layer(model, state)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=1e-5)


def test_recalibration_without_a_validation_split(tmp_path: Path) -> None:
    """``val_size=0`` (train on every sample): the final recalibration runs -- with nothing to compare it against
    -- and gives the population statistics of the training split, as with a validation split (a bug crashed it:
    Lightning's ``val_dataloaders`` is ``[]`` there while ``num_val_batches`` is ``[0]``)."""
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=BATCH, seed=0, val_size=0)
    model = ImageClassifier(
        model="mlp", norm="renorm", model_options={"hidden": [16]}, num_classes=10, in_chans=1, image_size=8, lr=0.05
    )
    recalibrate = RecalibrateNormStats(num_batches=100, population=True)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[recalibrate],
    )  # fmt: skip
    trainer.fit(model, data)
    assert recalibrate.last_result is not None and recalibrate.last_result.recalibrated
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    w = linear.weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=w.dtype) if linear.bias is None else linear.bias.detach().double()
    outputs = torch.cat([x.flatten(1).double() @ w.T + b for x, _ in data.train_dataloader()])  # float64 reference
    mean, var = outputs.mean(0), outputs.var(0)
    norm = next(m for m in model.modules() if hasattr(m, "running_var"))
    torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var.double(), var, rtol=1e-4, atol=1e-5)
