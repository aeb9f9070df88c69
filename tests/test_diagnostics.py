"""Diagnostics callbacks against independent references: percentiles vs numpy on activations hooked by the
test itself, Batch Renorm corrections vs a float64 hand computation, the landscape probe vs closed forms on
quadratic and least-squares losses, and the tags read back from the TensorBoard event files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from bnzoo.callbacks import ActivationPercentiles, LandscapeProbe, NormStatistics
from bnzoo.callbacks.activations import unit_percentiles
from bnzoo.callbacks.landscape import probe_along_gradient
from bnzoo.tasks import ImageClassifier


def image_loader(n: int = 48, batch_size: int = 8, size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * 2 + 0.5
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def mlp_task(norm: str = "bn", dropout: float = 0.0, **norm_options: Any) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="mlp", norm=norm, norm_options=norm_options, num_classes=3, in_chans=1, image_size=4,
        model_options={"hidden": [6, 5], "activation": "sigmoid", "dropout": dropout}, lr=0.1, weight_decay=0.0,
        schedule="constant",
    )  # fmt: skip


def trainer(tmp_path: Path | None, callbacks: list[Callback], steps: int = 6) -> L.Trainer:
    logger = TensorBoardLogger(str(tmp_path), name="diag", version=0) if tmp_path is not None else False
    return L.Trainer(
        max_steps=steps, logger=logger, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", log_every_n_steps=1,
    )  # fmt: skip


def events(tmp_path: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(tmp_path / "diag" / "version_0"), size_guidance={"histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


class RecordInputs(Callback):
    """Records, independently of the callback under test, the input of ``module`` at every training forward."""

    def __init__(self, module: str) -> None:
        self.module, self.inputs = module, {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if module.training:
                self.inputs.setdefault(self.step, args[0].detach().clone())

        dict(pl_module.named_modules())[self.module].register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.step = trainer.global_step


# ----------------------------------------------------------------------------------------------------------
# ActivationPercentiles


@pytest.mark.parametrize(("shape", "dim"), [((37, 5), 1), ((6, 3, 4, 5), 1), ((4, 7, 3), -1)])
def test_unit_percentiles_equal_numpy(shape: tuple[int, ...], dim: int) -> None:
    x = torch.randn(shape) * 3 + 1
    got = unit_percentiles(x, [0, 2], [15, 50, 85], dim)
    for row, unit in enumerate([0, 2]):
        values = np.moveaxis(x.numpy(), dim, 0)[unit].ravel()
        np.testing.assert_allclose(got[row].numpy(), np.percentile(values.astype(np.float64), [15, 50, 85]), rtol=1e-6)


def test_activation_percentiles_match_the_hooked_inputs_and_reach_tensorboard(tmp_path: Path) -> None:
    module = "model.blocks.1.act"  # the input of the last sigmoid: Fig. 1 of Ioffe & Szegedy 2015
    callback = ActivationPercentiles(module, units=[0, 3], every_n_steps=2)
    reference = RecordInputs(module)
    trainer(tmp_path, [reference, callback], steps=6).fit(mlp_task(), image_loader())
    assert sorted({r["step"] for r in callback.history}) == [0, 2, 4]
    for record in callback.history:
        values = reference.inputs[record["step"]][:, record["unit"]].double().numpy()
        expected = np.percentile(values, [15, 50, 85])
        np.testing.assert_allclose([record["p15"], record["p50"], record["p85"]], expected, rtol=1e-6)
    accumulator = events(tmp_path)
    scalars = accumulator.Tags()["scalars"]
    for unit in (0, 3):
        for p in ("p15", "p50", "p85"):
            tag = f"activations/blocks.1.act/unit{unit}/{p}"
            assert tag in scalars
            assert [e.step for e in accumulator.Scalars(tag)] == [0, 2, 4]
        assert f"activations/blocks.1.act/unit{unit}" in accumulator.Tags()["histograms"]
    last = accumulator.Scalars("activations/blocks.1.act/unit3/p50")[-1].value
    assert last == pytest.approx(np.percentile(reference.inputs[4][:, 3].numpy(), 50), rel=1e-5)


class CopyModels(Callback):
    """A deep copy of the network after the optimizer step of every training step, by step index."""

    def __init__(self) -> None:
        self.models: dict[int, nn.Module] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.models[trainer.global_step - 1] = copy.deepcopy(pl_module.model)


def test_activation_percentiles_probe_is_a_fixed_validation_batch_in_eval_mode(tmp_path: Path) -> None:
    module, probe = "model.blocks.1.act", 12  # 12 validation samples: one batch of 8 and 4 of the next
    g = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.randn(48, 1, 4, 4, generator=g) * 2 + 0.5, torch.randint(0, 3, (48,), generator=g))
    val_x = torch.randn(20, 1, 4, 4, generator=g) * 3 - 1
    val = TensorDataset(val_x, torch.randint(0, 3, (20,), generator=g))
    data = L.LightningDataModule.from_datasets(train_dataset=train, val_dataset=val, batch_size=8)
    callback, models = ActivationPercentiles(module, units=[0, 4], every_n_steps=2, probe=probe), CopyModels()
    training = ActivationPercentiles(module, units=[0, 4], every_n_steps=2)  # the training-batch default
    task = mlp_task(dropout=0.3)  # dropout on in training: the probe must run with it off (eval mode)
    trainer(tmp_path, [models, callback, training], steps=6).fit(task, datamodule=data)
    assert task.training  # the model is back in training mode after each probe
    assert sorted({r["step"] for r in callback.history}) == [0, 2, 4]
    for record in callback.history:
        # reference: that step's network in eval mode on the first 12 validation samples, numpy's percentiles
        net, seen = models.models[record["step"]].eval(), []
        handle = dict(net.named_modules())[module.removeprefix("model.")].register_forward_pre_hook(
            lambda m, args, seen=seen: seen.append(args[0].detach())
        )
        with torch.no_grad():
            net(val_x[:probe])
        handle.remove()
        expected = np.percentile(seen[0][:, record["unit"]].double().numpy(), [15, 50, 85])
        np.testing.assert_allclose([record["p15"], record["p50"], record["p85"]], expected, rtol=1e-6)
    # and not the training batch's values in training mode
    assert all(abs(a["p50"] - b["p50"]) > 1e-6 for a, b in zip(callback.history, training.history, strict=True))
    scalars = events(tmp_path).Tags()["scalars"]
    assert "activations/blocks.1.act/unit4/p85" in scalars


def test_activation_percentiles_probe_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="probe must be a positive int"):
        ActivationPercentiles("model.blocks.0.act", probe=0)
    with pytest.raises(ValueError, match="has no datamodule"):
        trainer(None, [ActivationPercentiles("model.blocks.0.act", probe=4)], steps=1).fit(mlp_task(), image_loader())
    small = TensorDataset(torch.randn(5, 1, 4, 4), torch.zeros(5, dtype=torch.long))
    data = L.LightningDataModule.from_datasets(train_dataset=small, val_dataset=small, batch_size=4)
    with pytest.raises(ValueError, match="probe=8 but the validation set has only 5 samples"):
        trainer(None, [ActivationPercentiles("model.blocks.0.act", probe=8)], steps=1).fit(mlp_task(), datamodule=data)


def test_activation_percentiles_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="percentiles must be numbers in"):
        ActivationPercentiles("model.blocks.0.act", percentiles=[15, 150])
    with pytest.raises(ValueError, match="units must be"):
        ActivationPercentiles("model.blocks.0.act", units=0)
    with pytest.raises(ValueError, match="on must be"):
        ActivationPercentiles("model.blocks.0.act", on="pre")
    callback = ActivationPercentiles("model.block.0.act")
    with pytest.raises(ValueError, match=r"no module 'model.block.0.act'; closest: model.blocks.0.act"):
        trainer(None, [callback], steps=1).fit(mlp_task(), image_loader())


# ----------------------------------------------------------------------------------------------------------
# NormStatistics


class RecordRenormState(Callback):
    """The first renorm layer's input and running statistics just before its forward, at every training step."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        layer = pl_module.model.blocks[0].norm

        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if module.training and self.step not in self.seen:
                self.seen[self.step] = (args[0].detach().double(), module.running_mean.double(),
                                        module.running_var.double())  # fmt: skip

        layer.register_forward_pre_hook(hook)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.step = trainer.global_step


def test_norm_statistics_renorm_corrections_equal_a_float64_computation(tmp_path: Path) -> None:
    r_max, d_max, eps = 1.1, 0.05, 1e-5
    task = mlp_task("renorm", r_max=r_max, d_max=d_max, momentum=0.3)
    reference, callback = RecordRenormState(), NormStatistics(every_n_steps=3)
    trainer(tmp_path, [reference, callback], steps=7).fit(task, image_loader())
    assert [h["step"] for h in callback.history] == [0, 3, 6]
    some_clipped = False
    for record in callback.history:
        x, mu, var = reference.seen[record["step"]]
        sigma_b = (x.var(0, unbiased=False) + eps).sqrt()
        sigma = (var + eps).sqrt()
        raw_r, raw_d = sigma_b / sigma, (x.mean(0) - mu) / sigma
        assert record["blocks.0.norm/r_mean"] == pytest.approx(float(raw_r.clamp(1 / r_max, r_max).mean()), rel=1e-5)
        assert record["blocks.0.norm/d_mean"] == pytest.approx(float(raw_d.clamp(-d_max, d_max).mean()), abs=1e-6)
        r_clipped = float(((raw_r > r_max) | (raw_r < 1 / r_max)).double().mean())
        assert record["blocks.0.norm/r_clipped"] == pytest.approx(r_clipped)
        assert record["blocks.0.norm/d_clipped"] == pytest.approx(float((raw_d.abs() > d_max).double().mean()))
        some_clipped |= 0 < r_clipped < 1
    assert some_clipped  # the test exercises partial clipping, not only all-or-nothing
    accumulator = events(tmp_path)
    histograms = set(accumulator.Tags()["histograms"])
    for layer in ("blocks.0.norm", "blocks.1.norm"):
        for attribute in ("weight", "bias", "running_mean", "running_var"):
            assert f"norm/{layer}/{attribute}" in histograms
        assert [e.step for e in accumulator.Scalars(f"norm/{layer}/r_clipped")] == [0, 3, 6]
    stored = accumulator.Histograms("norm/blocks.1.norm/running_var")[-1]
    assert stored.step == 6


def test_norm_statistics_for_bn_logs_histograms_and_no_renorm_scalars(tmp_path: Path) -> None:
    callback = NormStatistics(every_n_steps=2)
    trainer(tmp_path, [callback], steps=3).fit(mlp_task("bn"), image_loader())
    accumulator = events(tmp_path)
    assert "norm/blocks.0.norm/running_mean" in accumulator.Tags()["histograms"]
    assert not any(tag.startswith("norm/") for tag in accumulator.Tags()["scalars"])
    assert callback.history == []


# ----------------------------------------------------------------------------------------------------------
# LandscapeProbe


def test_probe_on_a_quadratic_equals_the_closed_form() -> None:
    torch.manual_seed(1)
    a = torch.randn(4, 4, dtype=torch.float64)
    hessian = a @ a.T + torch.eye(4, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def loss_at(v: Tensor) -> Tensor:
        return 0.5 * v @ hessian @ v - b @ v

    g = (hessian @ w - b).detach()
    start = w.detach().clone()
    etas = [0.05, 0.1, 0.2]
    result = probe_along_gradient([w], [g], lambda: loss_at(w), etas)
    expected_losses = [float(loss_at(start - eta * g)) for eta in etas]
    np.testing.assert_allclose(result["losses"], expected_losses, rtol=1e-10)
    assert result["loss_range"] == pytest.approx(max(expected_losses) - min(expected_losses), rel=1e-10)
    # grad L(w - eta g) - grad L(w) = -eta H g, so the change is eta ||H g|| and beta = ||H g|| / ||g||
    hg = float((hessian @ g).norm())
    np.testing.assert_allclose(result["grad_changes"], [eta * hg for eta in etas], rtol=1e-10)
    assert result["beta_smoothness"] == pytest.approx(hg / float(g.norm()), rel=1e-10)
    assert result["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    torch.testing.assert_close(w.detach(), start, rtol=0, atol=0)  # parameters restored


class LeastSquares(L.LightningModule):
    """L(w) = mean((X w - y)^2) / 2 over a batch: every probe quantity has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def batch_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (x @ self.w - y).square().mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.batch_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class RecordWeights(Callback):
    def __init__(self) -> None:
        self.weights: dict[int, Tensor] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.weights[trainer.global_step] = pl_module.w.detach().double().clone()


def test_landscape_probe_in_training_equals_least_squares_closed_form(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    weights, probe = RecordWeights(), LandscapeProbe(every_n_steps=2, step_sizes=[0.1, 0.3])
    trainer(tmp_path, [weights, probe], steps=4).fit(LeastSquares(), loader)
    assert [h["step"] for h in probe.history] == [0, 2]
    for record in probe.history:
        step = record["step"]
        xb, yb = x[step * 10 : step * 10 + 10].double(), y[step * 10 : step * 10 + 10].double()
        w = weights.weights[step]
        hessian = xb.T @ xb / len(yb)
        grad = hessian @ w - xb.T @ yb / len(yb)
        losses = [float(0.5 * (xb @ (w - eta * grad) - yb).square().mean()) for eta in (0.1, 0.3)]
        np.testing.assert_allclose(record["losses"], losses, rtol=1e-5)
        np.testing.assert_allclose(record["grad_changes"], [eta * float((hessian @ grad).norm()) for eta in (0.1, 0.3)],
                                   rtol=1e-5)  # fmt: skip
        assert record["beta_smoothness"] == pytest.approx(float((hessian @ grad).norm() / grad.norm()), rel=1e-5)
    scalars = events(tmp_path).Tags()["scalars"]
    for key in ("loss_min", "loss_max", "loss_range", "grad_change_min", "grad_change_max", "beta_smoothness",
                "grad_norm"):  # fmt: skip
        assert f"landscape/{key}" in scalars


@pytest.mark.parametrize("norm", ["bn", "renorm"])
def test_training_with_the_probe_equals_training_without_it(norm: str) -> None:
    """Parameters, running statistics and the random stream (dropout) are untouched by the probe passes."""
    options = {"r_max": 1.5, "d_max": 0.5} if norm == "renorm" else {}
    plain, probed = mlp_task(norm, dropout=0.3, **options), mlp_task(norm, dropout=0.3, **options)
    probed.load_state_dict(copy.deepcopy(plain.state_dict()))
    torch.manual_seed(7)
    trainer(None, [], steps=5).fit(plain, image_loader())
    torch.manual_seed(7)
    probe = LandscapeProbe(every_n_steps=2)
    trainer(None, [probe], steps=5).fit(probed, image_loader())
    assert len(probe.history) == 3 and all(h["loss_range"] > 0 for h in probe.history)
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_landscape_probe_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="step_sizes must be"):
        LandscapeProbe(step_sizes=[0.1, -0.2])
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        LandscapeProbe(every_n_steps=0)
    run = L.Trainer(max_steps=1, logger=False, callbacks=[LandscapeProbe()], accumulate_grad_batches=2,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="accumulate_grad_batches must be 1"):
        run.fit(mlp_task(), image_loader())
