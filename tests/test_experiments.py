"""The claims lab: every experiment end to end in quick mode (results, figure, report), and its parts -- verdict
rules and metrics against hand computations, the non-i.i.d. sampler, rescaled features, noisy BN, the input-norm
MLP, the variance shift, divergence stopping, spec checks and the ``bnzoo experiment`` command."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from torch import Tensor, nn

from bnzoo import create_model
from bnzoo.cli import main as bnzoo_main
from bnzoo.data import DigitsDataModule
from bnzoo.norms import make_norm
from bnzoo_lab import lab_registrations, main
from bnzoo_lab.data import ClassGroupedBatchSampler, ClassGroupedDataModule, RescaledFeaturesDataModule
from bnzoo_lab.metrics import VERDICTS, Results, SideValues, judge, run_metric, side_values
from bnzoo_lab.recorder import MetricsRecorder
from bnzoo_lab.runner import build_run_config, variance_shift
from bnzoo_lab.spec import deep_merge, list_experiments, load_spec


def quiet(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Every experiment, end to end in quick mode


@pytest.mark.parametrize("name", list_experiments())
def test_experiment_runs_in_quick_mode_and_reports(name: str, tmp_path: Path) -> None:
    spec = load_spec(name)
    results, out = tmp_path / "results", tmp_path / "report"
    code, printed = quiet("run", name, "--quick", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(results))
    assert code == 0, printed
    data = json.loads((results / f"{name}.json").read_text())
    assert data["quick"] and data["seeds"] == spec.quick_seeds
    assert [(r["variant"], r["seed"]) for r in data["runs"]] == [
        (v, s) for v in spec.variants for s in spec.quick_seeds
    ]
    quick_steps = spec.quick["trainer"]["max_steps"]
    for run in data["runs"]:
        assert run["steps"] == quick_steps
        assert run["val"], run["variant"]  # validated at least once
        if "test" in spec.measure:
            assert 0.0 <= run["test_acc"] <= 1.0
        assert Path(run["config"]).is_file()  # the exact config, re-runnable with `bnzoo fit --config`
    code, printed = quiet("report", "--results-dir", str(results), "--out", str(out))
    assert code == 0
    report = (out / "claims.md").read_text()
    assert "quick-mode results" in report
    rows = [line for line in report.splitlines() if line.startswith("| C")]
    assert len(rows) == len(spec.findings)
    for row, finding in zip(rows, spec.findings, strict=True):
        assert finding.statement in row and any(f"**{v}**" in row for v in VERDICTS), row
    figure = out / f"{name}.png"
    assert figure.stat().st_size < 200_000
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bnzoo_experiment_command_lists_and_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert bnzoo_main(["experiment", "list"]) == 0
    listed = capsys.readouterr().out
    for name in list_experiments():
        assert name in listed
    assert main(["run", "c1_icss"]) == 2
    assert "unknown 'c1_icss' (did you mean c1_ics?)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Verdict rules and metrics


def side(values: list[float], label: str = "x") -> SideValues:
    return SideValues(label, values, [False] * len(values))


def test_rules_follow_their_definition() -> None:
    # the rules' statistics are tested in tests/test_lab_stats.py; here: a finding's sides reach them intact
    a, b = side([0.90, 0.92, 0.91]), side([0.85, 0.86, 0.87])
    judged = judge("greater", a, b)
    assert judged.difference == pytest.approx(0.05) and judged.verdict == "reproduced"
    assert judged.p_value is not None and judged.p_value < 0.05 and judged.interval[0] > 0
    assert judge("less", a, b).verdict == "opposite"
    assert judge("close", a, b, tolerance=0.01).verdict == "not reproduced"  # significantly outside +-0.01
    assert judge("close", a, b, tolerance=0.2).verdict == "reproduced"
    noisy = side([0.80, 0.99, 0.70])
    assert judge("greater", noisy, b).verdict == "not reproduced (within noise)"
    assert judge("less", side([math.nan] * 3), b).verdict == "no verdict (non-finite values)"
    assert judge("greater", side([0.9]), b).verdict == "too few seeds"


def results_of(runs: list[dict[str, Any]]) -> Results:
    return Results({"experiment": "t", "seeds": sorted({r["seed"] for r in runs}), "runs": runs})


def test_steps_to_target_uses_the_reference_variants_lowest_best_and_censors() -> None:
    runs = [
        {"variant": "ref", "seed": 0, "steps": 300, "val": [[100, 0.5, 1], [200, 0.7, 1], [300, 0.8, 1]]},
        {"variant": "ref", "seed": 1, "steps": 300, "val": [[100, 0.6, 1], [200, 0.75, 1], [300, 0.74, 1]]},
        {"variant": "fast", "seed": 0, "steps": 300, "val": [[100, 0.76, 1], [200, 0.9, 1], [300, 0.9, 1]]},
        {"variant": "slow", "seed": 0, "steps": 300, "val": [[100, 0.1, 1], [200, 0.2, 1], [300, 0.3, 1]]},
    ]
    results = results_of(runs)
    metric = {"steps_to_target": {"target": {"max_val_acc_of": "ref"}}}  # target = min(0.8, 0.75) = 0.75
    assert [run_metric(metric, r, results) for r in results.runs("ref")] == [(300.0, False), (200.0, False)]
    assert run_metric(metric, runs[2], results) == (100.0, False)
    assert run_metric(metric, runs[3], results) == (400.0, True)  # never: last step + one interval, censored
    assert run_metric({"steps_to_target": {"target": 0.2}}, runs[3], results) == (200.0, False)
    assert run_metric("mean_val_acc", runs[3], results)[0] == pytest.approx(0.2)


def test_percentile_drift_against_a_hand_computation() -> None:
    records = []
    for step, shift in enumerate([0.0, 1.0, 3.0]):
        records.append({"step": step * 10, "module": "m", "unit": 0, "p15": -1 + shift, "p50": shift, "p85": 1 + shift})
        records.append({"step": step * 10, "module": "m", "unit": 1, "p15": -2.0, "p50": 0.0, "p85": 2.0})
    run = {"variant": "v", "seed": 0, "percentiles": records}
    moving = statistics.pstdev([0.0, 1.0, 3.0]) / 2.0  # each percentile moves alike; the width is 2
    expected = (3 * moving + 3 * 0.0) / 6
    assert run_metric("percentile_drift", run, results_of([run]))[0] == pytest.approx(expected)
    after = run_metric({"percentile_drift": {"skip": 0.5}}, run, results_of([run]))[0]  # steps 10 and 20
    assert after == pytest.approx(statistics.pstdev([1.0, 3.0]) / 2.0 / 2)


def test_group_sides_reduce_seed_by_seed_and_constants() -> None:
    runs = [{"variant": v, "seed": s, "test_acc": acc} for v, s, acc in
            [("a", 0, 0.5), ("a", 1, 0.6), ("b", 0, 0.9), ("b", 1, 0.7)]]  # fmt: skip
    results = results_of(runs)
    spread = side_values({"variants": ["a", "b"], "reduce": "range"}, "test_acc", results, {})
    assert spread.values == pytest.approx([0.4, 0.1])
    assert side_values({"variants": ["a", "b"], "reduce": "min"}, "test_acc", results, {}).values == [0.5, 0.6]
    assert side_values(0.0, "test_acc", results, {}).values == [0.0]


def test_statistics_gap_compares_the_inference_statistics_of_one_run() -> None:
    run = {"variant": "a", "seed": 0, "test_acc": 0.80, "recalibrated_test_acc": 0.83, "population_test_acc": 0.825}
    results = results_of([run])
    gap = run_metric({"statistics_gap": {"a": "alg2", "b": "population"}}, run, results)[0]
    assert gap == pytest.approx(0.005)
    assert run_metric({"statistics_gap": {}}, run, results)[0] == pytest.approx(0.03)  # Alg. 2 - moving average
    assert math.isnan(run_metric({"statistics_gap": {"b": "population"}}, {"test_acc": 0.8}, results)[0])
    with pytest.raises(ValueError, match="unknown statistics 'ema'; valid: moving_average, alg2, population"):
        run_metric({"statistics_gap": {"a": "ema"}}, run, results)


def test_recalibration_batches_from_samples_or_batches() -> None:
    from bnzoo_lab.runner import recalibration_batches

    loader = torch.utils.data.DataLoader(torch.arange(100.0), batch_size=8, drop_last=True)  # 12 batches
    assert recalibration_batches({"num_samples": 40}, loader) == 5
    assert recalibration_batches({"num_samples": 41}, loader) == 6  # rounded up: at least that many samples
    assert recalibration_batches({"num_samples": 1000}, loader) == 12  # at most the loader
    assert recalibration_batches({}, loader) == 12 and recalibration_batches({"num_batches": 3}, loader) == 3
    with pytest.raises(ValueError, match="unknown key\\(s\\) batches; valid: num_batches, num_samples"):
        recalibration_batches({"batches": 3}, loader)


# ----------------------------------------------------------------------------------------------------------
# Data, norms, models


def test_class_grouped_batches_hold_k_classes_in_equal_parts() -> None:
    labels = torch.arange(10).repeat_interleave(37)  # 37 samples of each of 10 classes
    sampler = ClassGroupedBatchSampler(labels, batch_size=12, classes_per_batch=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        counts = torch.bincount(labels[batch], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4]
    seen = torch.cat([torch.tensor(b) for b in batches])
    assert len(seen) == len(set(seen.tolist()))  # no sample twice in an epoch
    assert len(seen) >= 10 * (37 // 4 * 4) - 2 * 12  # at most the last rounds' leftovers are dropped
    assert list(sampler) == batches  # the same epoch is the same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ValueError, match="not a multiple of classes_per_batch"):
        ClassGroupedBatchSampler(labels, batch_size=10, classes_per_batch=3)
    with pytest.raises(ValueError, match="only 10 classes"):
        ClassGroupedBatchSampler(labels, batch_size=11, classes_per_batch=11)


def test_class_grouped_datamodule_trains_on_grouped_batches() -> None:
    data = ClassGroupedDataModule("digits", classes_per_batch=2, batch_size=16)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and len(y.unique()) == 2
    assert len(next(iter(data.val_dataloader()))[1].unique()) > 2  # validation stays i.i.d.
    with pytest.raises(ValueError, match="batch_size=16 is not a multiple of classes_per_batch=3"):
        ClassGroupedDataModule("digits", classes_per_batch=3, batch_size=16)


def test_rescaled_features_raw_and_standardized() -> None:
    plain = DigitsDataModule(batch_size=64, val_size=0)
    raw = RescaledFeaturesDataModule("digits", log10_range=2.0, batch_size=64, val_size=0)
    standard = RescaledFeaturesDataModule("digits", log10_range=2.0, standardize=True, batch_size=64, val_size=0)
    for data in (plain, raw, standard):
        data.setup("fit")
    assert raw.scales.min() >= 0.01 and raw.scales.max() <= 100 and raw.scales.max() / raw.scales.min() > 1000
    batch = [plain.train_set[i] for i in range(64)]
    x_plain = plain.collate_fn(False)(batch)[0]
    torch.testing.assert_close(raw.collate_fn(False)(batch)[0], x_plain * raw.scales)
    everything = [standard.train_set[i] for i in range(len(standard.train_set))]
    x = standard.collate_fn(False)(everything)[0].double()
    varying = plain.train_set.images.double().std(0) > 0  # constant pixels (digits' borders) are only centred
    torch.testing.assert_close(x.mean(0), torch.zeros_like(x[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False)[varying], torch.ones_like(x[0])[varying], atol=1e-4, rtol=0)


@pytest.fixture
def lab_kinds():
    with lab_registrations():
        yield


def test_lab_kinds_exist_only_inside_the_lab_scope() -> None:
    import bnzoo

    lab_models = {"input_norm_mlp", "cifar_resnet"}
    assert "noisy_bn" not in bnzoo.list_norms() and not lab_models & set(bnzoo.list_models())
    with lab_registrations():
        assert "noisy_bn" in bnzoo.list_norms() and lab_models <= set(bnzoo.list_models())
    assert "noisy_bn" not in bnzoo.list_norms() and not lab_models & set(bnzoo.list_models())


@pytest.mark.usefixtures("lab_kinds")
def test_noisy_bn_is_bn_plus_a_fresh_per_channel_affine_in_training() -> None:
    noisy, plain = make_norm("noisy_bn", 6, "2d", shift=0.5, scale=1.5), make_norm("bn", 6, "2d")
    assert list(noisy.state_dict()) == list(plain.state_dict())
    x = torch.randn(8, 6, 3, 3) * 2 + 1
    outputs = []
    for _ in range(2):
        reference, y = plain(x), noisy(x)
        for c in range(6):  # y = sigma_c * bn(x) + mu_c with sigma_c in [1, 1.5], mu_c in [-0.5, 0.5]
            slope, intercept = (
                torch.linalg.lstsq(
                    torch.stack([reference[:, c].flatten(), torch.ones(72)], 1), y[:, c].flatten()[:, None]
                )
                .solution.flatten()
                .tolist()
            )
            assert 1.0 <= slope <= 1.5 + 1e-5 and -0.5 - 1e-5 <= intercept <= 0.5 + 1e-5
            torch.testing.assert_close(y[:, c], slope * reference[:, c] + intercept, atol=1e-4, rtol=1e-4)
        outputs.append(y)
    assert not torch.allclose(outputs[0], outputs[1])  # redrawn at every step
    torch.testing.assert_close(noisy.eval()(x), plain.eval()(x))  # inference: plain BN
    with pytest.raises(ValueError, match="scale must be a number >= 1"):
        make_norm("noisy_bn", 6, "2d", scale=0.5)


@pytest.mark.usefixtures("lab_kinds")
def test_input_norm_mlp_normalizes_its_input_features() -> None:
    model = create_model("input_norm_mlp", in_chans=1, image_size=4, input_norm="bn", hidden=[8])
    x = torch.randn(32, 1, 4, 4) * torch.logspace(-2, 2, 16).view(1, 1, 4, 4)
    captured = {}
    model.mlp.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    model(x)
    flat = x.flatten(1).double()
    expected = (flat - flat.mean(0)) / (flat.var(0, unbiased=False) + 1e-5).sqrt()  # BN's eps
    torch.testing.assert_close(captured["x"].double(), expected, atol=1e-4, rtol=1e-4)
    assert isinstance(create_model("input_norm_mlp", in_chans=1, image_size=4, input_norm="none").input_norm,
                      nn.Identity)  # fmt: skip


@pytest.mark.usefixtures("lab_kinds")
def test_cifar_resnet_is_the_zoo_resnet_at_any_depth() -> None:
    from bnzoo.models.layers import SkipInit

    x = torch.randn(2, 1, 12, 12)
    torch.manual_seed(0)
    lab = create_model("cifar_resnet", depth=20, in_chans=1, image_size=12).eval()
    torch.manual_seed(0)
    zoo = create_model("resnet20", in_chans=1, image_size=12).eval()
    assert list(lab.state_dict()) == list(zoo.state_dict())
    torch.testing.assert_close(lab(x), zoo(x), rtol=0, atol=0)  # same init draws, same network
    small = create_model("cifar_resnet", depth=8, in_chans=1, image_size=12)
    assert [len(stage) for stage in small.stages] == [1, 1, 1]
    plain = create_model("cifar_resnet", depth=8, norm="none", skip_init=False, in_chans=1, image_size=12)
    skip = create_model("cifar_resnet", depth=8, norm="none", in_chans=1, image_size=12)
    assert not any(isinstance(m, SkipInit) for m in plain.modules())
    assert sum(isinstance(m, SkipInit) for m in skip.modules()) == 3
    with pytest.raises(ValueError, match="6n \\+ 2"):
        create_model("cifar_resnet", depth=10)


def test_variance_shift_against_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), make_norm("bn", 4, "1d"))
    model[2].running_var.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    data = [torch.randn(10, 3) for _ in range(3)]
    shift = variance_shift(model, data, model)
    with torch.no_grad():
        inputs = torch.cat([model[0](x) for x in data]).double()  # eval mode: dropout off
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / inputs.var(0, unbiased=True)).mean()
    assert shift["2"] == pytest.approx(float(expected), rel=1e-6) and shift["mean"] == shift["2"]
    assert model.training  # modes restored


class NaNAfter(L.LightningModule):
    """A loss that becomes NaN at step 2."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = (self.w * batch[0]).square().mean()
        return loss * math.nan if self.global_step >= 2 else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_recorder_stops_a_diverged_run() -> None:
    recorder = MetricsRecorder(train_loss_every=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 1)), batch_size=2)
    trainer = L.Trainer(max_steps=10, logger=False, callbacks=[recorder], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(NaNAfter(), loader)
    assert recorder.diverged_at == 2 and trainer.global_step == 3
    assert [s for s, _ in recorder.train_loss] == [0, 1, 2] and math.isnan(recorder.train_loss[-1][1])


# ----------------------------------------------------------------------------------------------------------
# Specs and run configs


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3], "e": 2}}) == {"a": {"b": 1, "c": [3], "e": 2}, "d": 1}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified


def test_run_config_is_base_plus_variant_plus_quick_plus_seed(tmp_path: Path) -> None:
    spec = load_spec("c5_init")
    config = build_run_config(spec, spec.variants["bn_s10"], seed=3, quick=True, runs_dir=tmp_path)
    init = config["model"]["init_args"]
    assert init["norm"] == "bn" and init["model_options"] == {"hidden": [100] * 6, "activation": "relu",
                                                              "init_scale": 10.0}  # fmt: skip
    assert config["trainer"]["max_steps"] == spec.quick["trainer"]["max_steps"]
    assert config["seed_everything"] == 3 and config["data"]["init_args"]["seed"] == 3
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "c5_init")
    assert config["trainer"]["callbacks"][-1]["class_path"] == "bnzoo_lab.recorder.MetricsRecorder"


def write_spec(tmp_path: Path, **changes: Any) -> Path:
    folder = tmp_path / "c99_test"
    folder.mkdir(exist_ok=True)
    (folder / "base.yaml").write_text("model: {}\n")
    spec = {"claim": "C99", "title": "t", "config": "base.yaml", "variants": {"a": {}, "b": {}},
            "seeds": [0, 1, 2, 3, 4],
            "findings": [{"claim": "C99", "statement": "s", "metric": "test_acc", "rule": "greater", "a": "a",
                          "b": "b"}]}  # fmt: skip
    (folder / "experiment.yaml").write_text(yaml.safe_dump(deep_merge(spec, changes)))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": [1]}, "unknown key(s) seed; valid keys: claim"),
        ({"findings": [{"claim": "C99", "statement": "s", "metric": "test_acc", "rule": "bigger", "a": "a", "b": "b"}]},
         "unknown 'bigger'"),
        ({"findings": [{"claim": "C99", "statement": "s", "metric": "test_acc", "rule": "less", "a": "aa", "b": "b"}]},
         "unknown 'aa' (did you mean a?)"),
        ({"measure": ["tests"]}, "unknown 'tests' (did you mean test?)"),
        ({"variants": {"a": {"lable": "x"}}}, "variant 'a' has unknown key(s) lable"),
        ({"seeds": [0, 1]}, "2 seed(s) [0, 1], needs at least 5"),
        ({"seeds": [0, 1, 1, 2, 3]}, "repeat a seed"),
        ({"findings": [{"claim": "C99", "statement": "s", "metric": "test_acc", "rule": "close", "a": "a", "b": "b"}]},
         "rule close needs a positive tolerance"),
        ({"findings": [{"claim": "C99", "statement": "s", "metric": "failed", "rule": "close", "a": "a", "b": "b",
                        "tolerance": 0.1}]}, "failed is 0/1 per run; rule close is not defined"),
        ({"findings": [{"claim": "C99", "statement": "s", "metric": "diverged", "rule": "less", "a": "a", "b": 0}]},
         "compare two variants, not a variant and a constant"),
    ],
)  # fmt: skip
def test_bad_specs_fail_with_the_valid_choices(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_spec(write_spec(tmp_path, **changes))
    assert load_spec(write_spec(tmp_path)).name == "c99_test"
    slow = load_spec(write_spec(tmp_path, seeds=[0, 1, 2], expected_minutes=30))  # 5 min a run: 3 seeds suffice
    assert slow.seeds == [0, 1, 2]
    with pytest.raises(ValueError, match=re.escape("3 seed(s) [0, 1, 2], needs at least 5")):
        load_spec(write_spec(tmp_path, seeds=[0, 1, 2], expected_minutes=5))  # 50 s a run
