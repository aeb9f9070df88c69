"""The ``timm/<name>`` model entry: any timm model by name with a bnzoo norm, against timm's own model.

With the same seed, ``timm/<name>`` with ``norm="bn"`` must be timm's own network (parameters, statistics,
outputs); with another kind the same network with that kind in every BatchNorm-like layer -- through timm's
``norm_layer`` where the builder takes it, by conversion where it does not (timm's MobileNetV3 builder) -- and
the same activations. Pretrained weights come from the local Hugging Face cache only.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import bnzoo
from bnzoo.cli import main
from bnzoo.models.registry import build_model, check_model_options, model_options
from bnzoo.norms import BatchRenorm2d, ChannelGroupNorm
from bnzoo.norms.introspect import named_batchnorm_like

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def timm_own(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, in_chans=1, **kwargs).eval()


def entry(name: str, **options: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(f"timm/{name}", num_classes=7, in_chans=1, **options).eval()


def acts(model: nn.Module) -> dict[str, type[nn.Module]]:
    return {n: type(m.act) for n, m in model.named_modules() if isinstance(getattr(m, "act", None), nn.Module)}


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "regnetx_002", "mobilenetv3_small_050"])
def test_bn_is_timms_own_model_and_renorm_its_tree_with_renorm(name: str) -> None:
    reference = timm_own(name)
    own = entry(name, norm="bn")
    reference_state, state = reference.state_dict(), own.state_dict()
    assert state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        expected = reference(X)
        torch.testing.assert_close(own(X), expected, rtol=0, atol=0)
    renormed = entry(name, norm="renorm", norm_options={"r_max": 2.0})
    layers = named_batchnorm_like(renormed)
    assert layers.keys() == named_batchnorm_like(reference).keys()
    assert all(isinstance(m, BatchRenorm2d) and m.r_max == 2.0 for m in layers.values())
    assert acts(renormed) == acts(reference)
    assert renormed.state_dict().keys() == reference_state.keys()
    if name == "mobilenetv3_small_050":  # built by conversion: timm's own weights and statistics, renorm's eval
        with torch.no_grad():
            torch.testing.assert_close(renormed(X), expected, rtol=1e-5, atol=1e-6)


def test_gn_replaces_every_batchnorm_and_timm_options_pass_through() -> None:
    model = entry("efficientnet_b0", norm="gn", timm_options={"drop_path_rate": 0.1})
    assert not named_batchnorm_like(model)
    assert sum(isinstance(m, ChannelGroupNorm) for m in model.modules()) == 49
    assert any(type(m).__name__ == "DropPath" for m in model.modules())
    assert model(X).shape == (2, 7)
    with pytest.raises(ValueError, match=r"timm_options may not set num_classes, pretrained"):
        build_model("timm/resnet18", timm_options={"num_classes": 3, "pretrained": True})


def test_convnext_keeps_its_layernorms_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"ConvNeXt has no BatchNorm-like layer .*nothing converted to 'renorm'"):
        model = entry("convnext_atto", norm="renorm")
    assert any(type(m).__name__ == "LayerNorm2d" for m in model.modules())
    assert model(X).shape == (2, 7)


def test_unknown_names_and_options_fail_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet19' \(model 'timm/resnet19'\); closest: resnet18"):
        build_model("timm/resnet19")
    with pytest.raises(ValueError, match=r"unknown model 'tim_resnet18'; closest: timm_resnet18"):
        build_model("tim_resnet18")
    with pytest.raises(ValueError, match=r"got unknown option\(s\) depth; valid options for 'timm/resnet18': norm, "):
        check_model_options("timm/resnet18", {"depth": 3})
    with pytest.raises(ValueError, match=r"unknown norm kind 'renrom'"):
        build_model("timm/resnet18", norm="renrom")
    assert set(model_options("timm/resnet18")) == {
        "norm", "norm_options", "num_classes", "in_chans", "image_size", "timm_pretrained", "timm_options"
    }  # fmt: skip
    model = bnzoo.create_model("timm/resnet18", norm="frozen", num_classes=3)
    assert all(type(m).__name__ == "FrozenBatchNorm" for m in named_batchnorm_like(model).values())


def fake_hub_cache(root: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """The layout huggingface_hub keeps a downloaded file in: refs/main -> snapshots/<commit>/<file>."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / ("0" * 40) / "model.safetensors")


def test_pretrained_weights_only_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"weights of timm model 'resnet18' are not local.*timm/resnet18\.a1_in1k"):
        build_model("timm/resnet18", timm_pretrained=True)
    torch.manual_seed(5)
    pretrained = timm.create_model("resnet18")  # 1000 classes, 3 channels: what the hub holds
    with torch.no_grad():
        for layer in named_batchnorm_like(pretrained).values():
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    fake_hub_cache(tmp_path, "timm/resnet18.a1_in1k", pretrained.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped, nothing downloaded
        model = build_model("timm/resnet18", norm="renorm", num_classes=4, timm_pretrained=True)
    assert all(isinstance(m, BatchRenorm2d) for m in named_batchnorm_like(model).values())
    state = model.state_dict()
    for key, value in pretrained.state_dict().items():
        if key.startswith("fc."):
            assert state[key].shape[0] == 4  # timm's new classifier for 4 classes
        else:
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    one_channel = build_model("timm/resnet18", num_classes=4, in_chans=1, timm_pretrained=True)
    torch.testing.assert_close(one_channel.conv1.weight, pretrained.conv1.weight.sum(1, keepdim=True))  # timm's


def run_cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def test_a_two_batch_fit_through_the_cli_and_the_checkpoint_loads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_cli(
        "fit",
        "--config",
        str(ROOT / "configs/digits/resnet.yaml"),
        "--model.init_args.model",
        "timm/resnet18",
        "--model.init_args.norm",
        "renorm",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.callbacks.init_args.num_batches",
        "1",
    )
    last = tmp_path / "runs/digits-timm-resnet18-renorm/version_0/checkpoints/last.ckpt"  # one folder, no "/"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["model"] == "timm/resnet18"
    task = bnzoo.load_pretrained(last)
    layers = named_batchnorm_like(task.model)
    assert len(layers) == 20 and all(isinstance(m, BatchRenorm2d) for m in layers.values())
    for key, value in task.model.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"][f"model.{key}"], rtol=0, atol=0)


def test_the_cli_names_an_unknown_timm_model_and_the_closest_ones() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable, "-m", "bnzoo.cli", "fit", "--config", str(ROOT / "configs/digits/resnet.yaml"),
            "--model.init_args.model", "timm/resnet19", "--trainer.fast_dev_run", "true",
        ],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode != 0
    assert "unknown timm model 'resnet19'" in result.stderr and "closest: resnet18" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_a_checkpoint_of_timm_pretrained_loads_where_timms_weights_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm_pretrained only chooses the initial weights: loading the checkpoint needs no Hugging Face cache."""
    import huggingface_hub.constants
    import lightning

    from bnzoo.tasks import ImageClassifier

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", timm.create_model("resnet18").state_dict())
    options = {"timm_pretrained": True}
    task = ImageClassifier(model="timm/resnet18", norm="renorm", num_classes=4, in_chans=1, model_options=options)
    with torch.no_grad():
        task.model.fc.bias.fill_(0.25)  # "trained": differs from anything a fresh build gives
    path = tmp_path / "task.ckpt"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": dict(task.hparams),
            "bnzoo_task": "bnzoo.tasks.ImageClassifier",
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="are not local"):  # building it anew would need them
        ImageClassifier(model="timm/resnet18", num_classes=4, in_chans=1, model_options=options)
    for loaded in (bnzoo.load_pretrained(path), ImageClassifier.load_from_checkpoint(path)):
        state = loaded.model.state_dict()
        for key, value in task.model.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    network = bnzoo.create_model("timm/resnet18", pretrained=str(path))
    torch.testing.assert_close(network.fc.bias, torch.full((4,), 0.25))
