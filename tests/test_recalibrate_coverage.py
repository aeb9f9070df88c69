"""Recalibration reaches exactly the layers the data reaches: every zoo model ends with finite statistics, a
layer that gets no rows (never run, or run only in eval mode) keeps its exact buffers and is named, and the
BN-LSTM's per-step statistics equal a float64 reference of Cooijmans et al. 2016, Eq. 6-8, recalibrated with
Ioffe & Szegedy 2015, Alg. 2."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from bnzoo import create_model
from bnzoo.callbacks import RecalibrateNormStats
from bnzoo.cli import main as bnzoo_main
from bnzoo.models import BUILTIN_MODELS, model_options
from bnzoo.norms import make_norm, recalibrate_norm_stats

ROOT = Path(__file__).resolve().parents[1]
SEQUENCE_MODELS = sorted(name for name in BUILTIN_MODELS if "input_size" in model_options(name))
SMALL = {
    "timm_inception_v3": {"image_size": 75},
    "bn_lstm": {"hidden_size": 8},  # max_steps stays 784: the batches below are 28 steps long
    "ds2_gru": {"hidden_size": 8, "num_layers": 2},
    "ds2_lstm": {"hidden_size": 8, "num_layers": 2},
}


def zoo_batches(name: str, count: int = 2) -> list[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    if name in SEQUENCE_MODELS:  # rows of a 28x28 image, with padding
        lengths = torch.tensor([28, 28, 20, 9])
        return [(torch.randn(4, 28, 28, generator=g), lengths) for _ in range(count)]
    size = SMALL.get(name, {}).get("image_size", 32)
    return [(torch.randn(2 if name == "timm_inception_v3" else 4, 3, size, size, generator=g),) for _ in range(count)]


def stat_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def check_recalibration(model: nn.Module, data: list, expected_skipped: set[str]) -> None:
    """Recalibrate; every buffer finite, exactly the expected layers skipped (named, buffers untouched), every
    other layer's statistics recomputed, and the eval outputs finite."""
    with torch.no_grad():  # statistics unlike what the data gives, so that a layer left alone is visible
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(2.0, 3.0)
    before = stat_buffers(model)
    with contextlib.ExitStack() as stack:
        if expected_skipped:
            stack.enter_context(pytest.warns(UserWarning, match=f"{len(expected_skipped)} of .* kept their"))
        result = recalibrate_norm_stats(model, data, lambda b: model(*b), num_batches=len(data))
    assert set(result.skipped) == expected_skipped
    assert result.batches == len(data)
    after = model.state_dict()
    bad = [k for k, v in after.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, bad[:5]
    for key, value in before.items():
        layer = key.rsplit(".", 1)[0]
        if layer in expected_skipped:
            assert torch.equal(after[key], value), key
        elif key.endswith("running_var"):
            assert not torch.equal(after[key], value), key
    model.eval()
    with torch.no_grad():
        output = model(*data[0])
    assert all(torch.isfinite(o).all() for o in (output if isinstance(output, tuple) else (output,)))


@pytest.mark.parametrize("norm", ["bn", "renorm"])
@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_every_zoo_model_recalibrates_to_finite_statistics(name: str, norm: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, norm=norm, num_classes=5, **SMALL.get(name, {}))
    expected: set[str] = set()
    if name == "bn_lstm":  # steps 28..783 of its three per-step norms never run on 28-step rows
        expected = {f"layers.0.{n}.steps.{t}" for n in ("norm_ih", "norm_hh", "norm_cell") for t in range(28, 784)}
    check_recalibration(model, zoo_batches(name), expected)


def test_inception_v3_auxiliary_head_keeps_its_statistics() -> None:
    """The auxiliary head runs only in training mode; recalibration runs the model in eval mode but for its
    norms, so the head's norms get no rows."""
    torch.manual_seed(0)
    model = create_model("timm_inception_v3", norm="bn", num_classes=5, image_size=299, aux_logits=True)
    aux = {n for n, m in model.named_modules() if n.startswith("AuxLogits.") and isinstance(m, nn.BatchNorm2d)}
    assert len(aux) == 2
    g = torch.Generator().manual_seed(0)
    check_recalibration(model, [(torch.randn(2, 3, 299, 299, generator=g),)], aux)


# -- the BN-LSTM against a float64 reference ------------------------------------------------------------------


def bn_lstm_recorded_rows(layer: nn.Module, x: Tensor, lengths: list[int]) -> dict[tuple[str, int], list[Tensor]]:
    """The rows each per-step norm normalizes with batch statistics when ``layer`` (in eval mode, its norms in
    training mode: as recalibration runs it) reads ``x`` (B, T, F) with ``lengths`` (sorted, longest first).

    Cooijmans et al. 2016, Eq. 6-8, by hand in float64. Step ``t`` uses the norms of ``k = min(t, T_max - 1)``
    (T_max = ``trained_steps``: inference's choice); a step that one sequence reaches is normalized with the
    running statistics of step k and records nothing.
    """
    last = int(layer.trained_steps) - 1
    hidden = layer.hidden_size
    shared = {n: getattr(layer, n).steps[0] for n in ("norm_ih", "norm_hh", "norm_cell")}
    recorded: dict[tuple[str, int], list[Tensor]] = {}

    def normalize(name: str, k: int, v: Tensor) -> Tensor:
        norm = getattr(layer, name).steps[k]
        if v.shape[0] > 1:
            recorded.setdefault((name, k), []).append(v)
            mean, var = v.mean(0), v.var(0, unbiased=False)
        else:
            mean, var = norm.running_mean.double(), norm.running_var.double()
        gamma, beta = shared[name].weight.double(), shared[name].bias.double()
        return (v - mean) / (var + norm.eps).sqrt() * gamma + beta

    x = x.double()
    h = c = torch.zeros(x.shape[0], hidden, dtype=torch.float64)
    for t in range(max(lengths)):
        n = sum(1 for length in lengths if length > t)
        h, c = h[:n], c[:n]
        k = min(t, last)
        terms = normalize("norm_ih", k, x[:n, t] @ layer.weight_ih.double().T)
        terms = terms + normalize("norm_hh", k, h @ layer.weight_hh.double().T) + layer.bias.double()
        i, f, g, o = terms.chunk(4, dim=1)  # Eq. 6
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # Eq. 7
        h = torch.sigmoid(o) * torch.tanh(normalize("norm_cell", k, c))  # Eq. 8
    return recorded


@pytest.mark.parametrize("population", [False, True])
def test_bn_lstm_per_step_statistics_against_a_float64_reference(population: bool) -> None:
    """trained_steps = 4 (T_max): steps 0-2 recalibrate their own norms, steps 3-5 (three sequences each) the
    norms of step 3 that they use at inference, step 6 (one sequence) runs in eval mode and records nothing, and
    the norms of steps 4 and 5 -- used by no step at inference -- get no rows: kept and named."""
    torch.manual_seed(0)
    model = create_model("bn_lstm", norm="bn", num_classes=2, input_size=2, hidden_size=3, max_steps=6).double()
    layer = model.layers[0]
    layer.trained_steps.fill_(4)
    with torch.no_grad():
        for name in ("norm_ih", "norm_hh", "norm_cell"):
            per_step = getattr(layer, name)
            per_step.steps[0].weight.uniform_(0.5, 1.5)
            per_step.steps[0].bias.uniform_(-0.5, 0.5)
            for norm in per_step.steps:
                norm.running_mean.uniform_(-1.0, 1.0)
                norm.running_var.uniform_(0.5, 2.0)
    before = stat_buffers(model)
    counters = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    lengths = [7, 6, 6, 3]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 7, 2, generator=g, dtype=torch.float64) * 2 + 0.5, torch.tensor(lengths))]
    data.append((torch.randn(4, 7, 2, generator=g, dtype=torch.float64) - 1.0, torch.tensor(lengths)))
    recorded: dict[tuple[str, int], list[Tensor]] = {}
    for x, _ in data:
        for key, rows in bn_lstm_recorded_rows(layer, x, lengths).items():
            recorded.setdefault(key, []).extend(rows)
    assert sorted({k for _, k in recorded}) == [0, 1, 2, 3] and len(recorded["norm_ih", 3]) == 6

    with pytest.warns(UserWarning, match="6 of 18 norm layers got no rows"):
        result = recalibrate_norm_stats(model, data, lambda b: model(*b), num_batches=2, population=population)
    skipped = {f"layers.0.{n}.steps.{k}" for n in ("norm_ih", "norm_hh", "norm_cell") for k in (4, 5)}
    assert set(result.skipped) == skipped
    state = model.state_dict()
    for (name, k), calls in recorded.items():
        if population:
            every = torch.cat(calls)
            mean, var = every.mean(0), every.var(0, unbiased=True)
        else:  # Alg. 2: the mean of the batch means, the mean of the unbiased batch variances
            mean = torch.stack([rows.mean(0) for rows in calls]).mean(0)
            var = torch.stack([rows.var(0, unbiased=True) for rows in calls]).mean(0)
        prefix = f"layers.0.{name}.steps.{k}"
        torch.testing.assert_close(state[f"{prefix}.running_mean"], mean, rtol=1e-10, atol=1e-12, msg=prefix)
        torch.testing.assert_close(state[f"{prefix}.running_var"], var, rtol=1e-10, atol=1e-12, msg=prefix)
    for prefix in skipped:
        for buffer in ("running_mean", "running_var"):
            assert torch.equal(state[f"{prefix}.{buffer}"], before[f"{prefix}.{buffer}"])
    assert int(layer.trained_steps) == 4
    for key, value in counters.items():
        assert torch.equal(state[key], value), key


def test_a_norm_call_in_eval_mode_is_not_recorded() -> None:
    """A model may run one of its norms in eval mode itself (the BN-LSTM does, for a step one sequence
    reaches): that call normalizes with the running statistics and must not count as a batch."""
    norm = make_norm("bn", 3, "1d")

    def forward(batch: Tensor) -> Tensor:
        if batch.shape[0] > 1:
            return norm(batch)
        norm.eval()
        try:
            return norm(batch)
        finally:
            norm.train()

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(5, 3, generator=g) + 2, torch.randn(1, 3, generator=g) * 10, torch.randn(4, 3, generator=g)]
    recalibrate_norm_stats(norm, data, forward, num_batches=3)
    torch.testing.assert_close(norm.running_mean, (data[0].mean(0) + data[2].mean(0)) / 2)
    torch.testing.assert_close(norm.running_var, (data[0].var(0) + data[2].var(0)) / 2)


# -- the callback and the command name the skipped layers -----------------------------------------------------


class AuxHeadModule(L.LightningModule):
    """A body and an auxiliary head that runs only in training mode, as Inception-v3's does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), make_norm("bn", 6, "1d"), nn.ReLU(), nn.Linear(6, 3))
        self.aux = nn.Sequential(nn.Linear(4, 5), make_norm("bn", 5, "1d"), nn.Linear(5, 3))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return (self.body(x), self.aux(x)) if self.training else self.body(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out, aux = self(x)
        return nn.functional.cross_entropy(out, y) + 0.4 * nn.functional.cross_entropy(aux, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordStatistics(Callback):
    """The running statistics at the end of every training batch (before the recalibration that follows it)."""

    def __init__(self) -> None:
        self.last: dict[str, Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.last = stat_buffers(pl_module)


def test_callback_names_and_keeps_the_layers_it_skips(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4) * 3 + 1, torch.arange(40) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module, record, recalibrate = AuxHeadModule(), RecordStatistics(), RecalibrateNormStats(num_batches=5)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[record, recalibrate], default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=re.escape("1 of 2 norm layers got no rows") + ".*: aux.1$"):
        trainer.fit(module, loader)
    assert recalibrate.last_result is not None and recalibrate.last_result.skipped == ("aux.1",)
    assert recalibrate.last_result.recalibrated == ("body.1",)
    state = module.state_dict()
    for buffer in ("running_mean", "running_var"):
        assert torch.equal(state[f"aux.1.{buffer}"], record.last[f"aux.1.{buffer}"])
        assert not torch.equal(state[f"body.1.{buffer}"], record.last[f"body.1.{buffer}"])


def run_cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bnzoo_main(list(args)) == 0
    return out.getvalue()


def test_recalibrate_command_prints_the_skipped_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BN-LSTM with 12 steps of statistics trained on 8-step rows: recalibration on 8-step rows leaves the
    norms of steps 8-11 alone and the command says so."""
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs/digits/ds2.yaml"), "--model.init_args.model", "bn_lstm"]
    config += ["--model.init_args.model_options", "{hidden_size: 8, max_steps: 12}"]
    quick = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    run_cli("fit", *config, *quick, "--trainer.callbacks", "[]", "--trainer.enable_model_summary", "false")
    last = next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt"))  # bnzoo.cli.runs: a folder per run
    with pytest.warns(UserWarning, match="12 of 36 norm layers got no rows"):
        printed = run_cli("recalibrate", *config, "--ckpt_path", str(last), "--num_batches", "2")
    assert "recalibrated 24 norm layers from 2 batches" in printed
    assert "kept the statistics of 12 norm layers that got no rows: model.layers.0.norm_ih.steps.8," in printed
