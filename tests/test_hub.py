"""The pretrained zoo: every checkpoint of ``checkpoints/index.json`` is there, matches its hash, loads with
``weights_only=True`` and reproduces its stored test accuracy; and every way a load can go wrong -- a tampered
file, a wrong hash, a pickle that would run code, another architecture or norm -- is refused with an error that
says what and where."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

import bnzoo
import bnzoo.data
from bnzoo import create_model, list_pretrained, load_pretrained
from bnzoo.cli import main
from bnzoo.cli.pretrained import export_main, pretrained_main
from bnzoo.resources import CHECKPOINT_DIR_ENV
from bnzoo.tasks import ClassificationTask
from bnzoo.zoo import (
    ChecksumError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
    pretrained_info,
    read_index,
    resolve_ckpt_path,
    zoo_table,
)
from bnzoo.zoo.fetch import CACHE_DIR_ENV
from bnzoo_lab.zoo_build import KEPT_CHECKPOINT_KEYS, strip_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "checkpoints"
ENTRIES = json.loads((ZOO / "index.json").read_text())["checkpoints"]
NAMES = [entry["name"] for entry in ENTRIES]
MAX_ZOO_BYTES = 20 * 2**20
ACCURACY_TOLERANCE = 0.005  # 0.5 points

#: a small, fast checkpoint for the API tests; ResNet-20 for those about architectures and norms
SMALL = "fashion_mnist-mlp-bn"
RESNET_BN = "fashion_mnist-resnet20-bn"


def run_cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def cli_metric(printed: str, name: str) -> float:
    return float(next(line for line in printed.splitlines() if line.startswith(f"{name}:")).split()[-1])


def first_test_images(config: str, count: int) -> list:
    """The first ``count`` test batches' worth of samples, in file order, from the config's data module (built
    directly from the YAML's ``data`` section)."""
    data = yaml.safe_load((ROOT / config).read_text())["data"]
    datamodule = getattr(bnzoo.data, data["class_path"].rsplit(".", 1)[-1])(**data.get("init_args", {}))
    datamodule.setup("test")
    batches, seen = [], 0
    for batch in datamodule.test_dataloader():
        batches.append(batch)
        seen += len(batch[-1])
        if seen >= count:
            break
    return batches


def corrupt_copy(tmp_path: Path, name: str) -> tuple[Path, dict]:
    """A private zoo folder with ``name``'s file and an index holding only its entry."""
    entry = pretrained_info(name)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(ZOO / entry["file"], zoo / entry["file"])
    (zoo / "index.json").write_text(json.dumps({"format": 1, "checkpoints": [entry]}))
    return zoo, entry


# -- the index and its files --------------------------------------------------------------------------------------
def test_index_lists_the_required_zoo_and_the_folder_is_small() -> None:
    required = {
        "fashion_mnist-resnet20-none",
        "fashion_mnist-resnet20-bn",
        "fashion_mnist-resnet20-renorm",
        "fashion_mnist-bn_inception_small-bn",
        "fashion_mnist-mlp-none",
        "fashion_mnist-mlp-bn",
        "fashion_mnist_row-ds2_gru-none",
        "fashion_mnist_row-ds2_gru-bn",
    }
    assert required <= set(NAMES)
    assert len(NAMES) == len(set(NAMES))
    assert sum(f.stat().st_size for f in ZOO.iterdir()) < MAX_ZOO_BYTES
    assert {e["file"] for e in ENTRIES} == {f.name for f in ZOO.glob("*.ckpt")}  # nothing unlisted ships
    assert list_pretrained() == sorted(NAMES)
    assert list_pretrained("*resnet20*") == sorted(n for n in NAMES if "resnet20" in n)


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_entry_file_matches_hash_and_loads_weights_only(entry: dict) -> None:
    path = ZOO / entry["file"]
    data = path.read_bytes()
    assert len(data) == entry["size_bytes"]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    checkpoint = torch.load(io.BytesIO(data), weights_only=True)
    assert not {"optimizer_states", "lr_schedulers", "loops", "callbacks"} & set(checkpoint)
    hparams = checkpoint["hyper_parameters"]
    assert (hparams["model"], hparams["norm"]) == (entry["model"], entry["norm"])
    assert dict(hparams.get("model_options") or {}) == entry["model_options"]
    assert checkpoint["global_step"] == entry["train"]["steps"] > 0
    config = yaml.safe_load((ROOT / entry["config"]).read_text())
    assert config["model"]["init_args"]["model"] == entry["model"]
    assert config["model"]["init_args"]["norm"] == entry["norm"]
    assert any(c["class_path"].endswith("RecalibrateNormStats") for c in config["trainer"]["callbacks"])
    assert 0.5 < entry["test"]["acc"] <= 1.0


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_entry_reproduces_its_accuracy_on_the_first_test_images(entry: dict) -> None:
    task = load_pretrained(entry["name"]).eval()
    count = entry["test"]["fixed_batch_images"]
    correct = seen = 0
    with torch.no_grad():
        for batch in first_test_images(entry["config"], count):
            inputs, target = task.split_batch(batch)
            keep = min(len(target), count - seen)
            logits = task(*inputs)[:keep]
            correct += int((logits.argmax(-1) == target[:keep]).sum())
            seen += keep
    assert seen == count
    assert correct / count == pytest.approx(entry["test"]["fixed_batch_acc"], abs=ACCURACY_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_bnzoo_test_reproduces_the_stored_test_accuracy(
    entry: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    printed = run_cli(
        "test",
        "--config",
        str(ROOT / entry["config"]),
        "--ckpt_path",
        entry["name"],
        "--trainer.enable_progress_bar",
        "false",
    )
    assert cli_metric(printed, "test/acc") == pytest.approx(entry["test"]["acc"], abs=ACCURACY_TOLERANCE)


def test_bnzoo_test_with_a_pretrained_name_reproduces_the_fixed_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = pretrained_info(SMALL)
    monkeypatch.chdir(tmp_path)
    printed = run_cli(
        "test",
        "--config",
        str(ROOT / entry["config"]),
        "--ckpt_path",
        SMALL,
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.batch_size",
        "100",
        "--trainer.limit_test_batches",
        str(entry["test"]["fixed_batch_images"] // 100),
    )
    assert cli_metric(printed, "test/acc") == pytest.approx(entry["test"]["fixed_batch_acc"], abs=ACCURACY_TOLERANCE)


def test_ckpt_path_resolution() -> None:
    assert Path(resolve_ckpt_path(SMALL)).resolve() == (ZOO / pretrained_info(SMALL)["file"]).resolve()
    for passthrough in (None, "last", "best", str(ROOT / "pyproject.toml")):
        assert resolve_ckpt_path(passthrough) == passthrough
    with pytest.raises(ValueError, match="a file of the zoo folder .* that its index does not list"):
        resolve_ckpt_path(str(ZOO / "index.json"))
    with pytest.raises(ValueError, match=f"unknown pretrained checkpoint '{SMALL}n'; closest: {SMALL}"):
        resolve_ckpt_path(f"{SMALL}n")


# -- the Python API -----------------------------------------------------------------------------------------------
def test_load_pretrained_and_create_model_pretrained_give_the_same_network() -> None:
    entry = pretrained_info(RESNET_BN)
    task = load_pretrained(RESNET_BN)
    assert isinstance(task, ClassificationTask) and task.hparams.model == "resnet20"
    network = create_model("resnet20", pretrained=True)  # the default norm "bn"; in_chans etc. from the checkpoint
    by_name = create_model("resnet20", norm="bn", pretrained=RESNET_BN)
    x = torch.randn(4, entry["create_options"]["in_chans"], 28, 28)
    task.eval(), network.eval(), by_name.eval()
    with torch.no_grad():
        # the same weights: bit-identical between the two create_model networks; the task keeps its feature maps
        # channels-last (another convolution kernel), so it agrees to float32 rounding
        torch.testing.assert_close(by_name(x), network(x), rtol=0, atol=0)
        torch.testing.assert_close(network(x), task.model(x), rtol=1e-5, atol=1e-5)
    fresh = create_model("resnet20", **entry["create_options"])
    assert not torch.equal(fresh.state_dict()["fc.weight"], network.state_dict()["fc.weight"])


def test_create_model_pretrained_picks_the_norm_asked_for() -> None:
    network = create_model("resnet20", norm="renorm", pretrained=True)
    stored = torch.load(ZOO / pretrained_info("fashion_mnist-resnet20-renorm")["file"], weights_only=True)
    torch.testing.assert_close(network.state_dict()["fc.weight"], stored["state_dict"]["model.fc.weight"])
    with pytest.raises(ValueError, match="no pretrained checkpoint of resnet20 with norm 'gn'.*resnet20-bn"):
        create_model("resnet20", norm="gn", pretrained=True)


def test_load_from_a_file_url_into_a_cache(tmp_path: Path) -> None:
    entry = pretrained_info(SMALL)
    source = tmp_path / "served" / entry["file"]
    source.parent.mkdir()
    shutil.copy(ZOO / entry["file"], source)
    cache = tmp_path / "cache"
    task = load_pretrained(source.as_uri(), sha256=entry["sha256"], cache_dir=cache)
    (cached,) = cache.rglob("*.ckpt")
    assert cached.read_bytes() == source.read_bytes()
    source.unlink()  # the second load is served from the cache
    again = load_pretrained(source.as_uri(), sha256=entry["sha256"], cache_dir=cache)
    for key, value in task.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_a_download_with_the_wrong_hash_names_the_url_and_is_not_cached(tmp_path: Path) -> None:
    entry = pretrained_info(SMALL)
    source = tmp_path / entry["file"]
    shutil.copy(ZOO / entry["file"], source)
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match=f"{re.escape(source.as_uri())}: sha256 {entry['sha256']} does not match"):
        load_pretrained(source.as_uri(), sha256="0" * 64, cache_dir=cache)
    assert not list(cache.rglob("*.ckpt")) and not list(cache.rglob("*.tmp"))


def test_a_registered_checkpoint_missing_locally_is_downloaded_from_its_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo, entry = corrupt_copy(tmp_path, SMALL)
    hosted = tmp_path / "hosted" / entry["file"]
    hosted.parent.mkdir()
    (zoo / entry["file"]).rename(hosted)
    (zoo / "index.json").write_text(json.dumps({"format": 1, "checkpoints": [{**entry, "url": hosted.as_uri()}]}))
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(zoo))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert isinstance(load_pretrained(SMALL), ClassificationTask)
    assert [p.read_bytes() for p in (tmp_path / "cache").rglob("*.ckpt")] == [hosted.read_bytes()]
    with pytest.raises(FileNotFoundError, match=re.escape(str(zoo / entry["file"]))):
        (zoo / "index.json").write_text(json.dumps({"format": 1, "checkpoints": [entry]}))
        load_pretrained(SMALL)  # no local file and no URL


# -- refusals ---------------------------------------------------------------------------------------------------
def test_a_tampered_file_is_refused_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zoo, entry = corrupt_copy(tmp_path, SMALL)
    path = zoo / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(zoo))
    expected = f"{re.escape(str(path))}: sha256 .* does not match the expected {entry['sha256']}"
    with pytest.raises(ChecksumError, match=expected):
        load_pretrained(SMALL)
    with pytest.raises(ChecksumError, match=re.escape(str(path))):
        create_model(entry["model"], pretrained=SMALL)
    assert pretrained_main(["verify"]) == 1


def test_a_wrong_hash_in_the_index_is_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zoo, entry = corrupt_copy(tmp_path, SMALL)
    wrong = hashlib.sha256(b"another file").hexdigest()
    (zoo / "index.json").write_text(json.dumps({"format": 1, "checkpoints": [{**entry, "sha256": wrong}]}))
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(zoo))
    expected = f"{re.escape(str(zoo / entry['file']))}: sha256 {entry['sha256']} .* expected {wrong}"
    with pytest.raises(ChecksumError, match=expected):
        load_pretrained(SMALL)


class _RunsCode:
    """Unpickling this calls ``os.system`` -- what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    crafted = torch.load(ZOO / pretrained_info(SMALL)["file"], weights_only=True)
    crafted["hyper_parameters"]["norm_options"] = _RunsCode(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(crafted, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UnsafeCheckpointError, match=rf"{re.escape(str(path))}: refused to load: .*posix\.system"):
        load_pretrained(str(path), sha256=digest)  # a matching hash is not enough
    with pytest.raises(UnsafeCheckpointError):
        create_model("mlp", pretrained=str(path))
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(path.as_uri(), cache_dir=tmp_path / "cache")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load of the same file does run its code
    assert marker.exists()


def test_another_architecture_or_norm_is_refused_naming_both() -> None:
    with pytest.raises(
        IncompatibleCheckpointError,
        match=f"checkpoint {RESNET_BN} holds resnet20 with norm 'bn'.*, not resnet20 with norm "
        "'renorm'.*norm: checkpoint 'bn', asked for 'renorm'",
    ):
        create_model("resnet20", norm="renorm", pretrained=RESNET_BN)
    with pytest.raises(IncompatibleCheckpointError, match="model: checkpoint 'resnet20', asked for 'mlp'"):
        create_model("mlp", pretrained=RESNET_BN)
    with pytest.raises(IncompatibleCheckpointError, match="in_chans: checkpoint 1, asked for 3"):
        create_model("resnet20", in_chans=3, pretrained=RESNET_BN)
    # why the check is needed: Batch Renorm keeps BatchNorm's keys, so the weights alone would load silently
    stored = torch.load(ZOO / pretrained_info(RESNET_BN)["file"], weights_only=True)["state_dict"]
    renorm = create_model("resnet20", **{**pretrained_info(RESNET_BN)["create_options"], "norm": "renorm"})
    renorm.load_state_dict({k.removeprefix("model."): v for k, v in stored.items()})


# -- export -------------------------------------------------------------------------------------------------------
def test_export_to_safetensors_loads_into_the_bare_network(tmp_path: Path) -> None:
    entry = pretrained_info("fashion_mnist_row-ds2_gru-bn")
    output = tmp_path / "ds2.safetensors"
    assert export_main([entry["name"], "-o", str(output)]) == 0
    network = create_model(entry["model"], **entry["create_options"])
    network.load_state_dict(safetensors.torch.load_file(output), strict=True)
    reference = load_pretrained(entry["name"]).model
    from_metadata = create_model(entry["model"], pretrained=str(output))
    x, lengths = torch.randn(5, 28, 28), torch.tensor([28, 28, 20, 9, 1])
    for net in (network, reference, from_metadata):
        net.eval()
    with torch.no_grad():
        torch.testing.assert_close(network(x, lengths), reference(x, lengths), rtol=0, atol=0)
        torch.testing.assert_close(from_metadata(x, lengths), reference(x, lengths), rtol=0, atol=0)
    assert isinstance(load_pretrained(str(output)), ClassificationTask)


def test_export_of_an_unknown_name_fails_readably(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "fashion_mnist-resnet21-bn"]) == 2
    assert "unknown pretrained checkpoint 'fashion_mnist-resnet21-bn'" in capsys.readouterr().err


# -- building and listing ---------------------------------------------------------------------------------------
def test_strip_checkpoint_keeps_only_what_loading_needs() -> None:
    full = {key: object() for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch")}
    full |= {"state_dict": {"model.w": torch.ones(2)}, "hyper_parameters": {"model": "mlp"}}
    stripped = strip_checkpoint(full, "x", "digits")
    assert set(stripped) == {"epoch", "state_dict", "hyper_parameters", "bnzoo_pretrained"}
    assert set(stripped) - {"bnzoo_pretrained"} <= set(KEPT_CHECKPOINT_KEYS)
    with pytest.raises(ValueError, match="no hyper_parameters"):
        strip_checkpoint({"state_dict": {}}, "x", "digits")


def test_zoo_table_and_pretrained_command(capsys: pytest.CaptureFixture[str]) -> None:
    table = zoo_table().splitlines()
    assert len(table) == 2 + len(ENTRIES)
    for row, entry in zip(table[2:], read_index(), strict=True):
        assert f"`{entry['name']}`" in row and f"{100 * entry['test']['acc']:.2f}%" in row
    assert pretrained_main(["table"]) == 0 and capsys.readouterr().out.splitlines() == table
    assert pretrained_main(["list", "*mlp*"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list_pretrained("*mlp*")
    assert pretrained_main(["verify", SMALL]) == 0
    assert main(["pretrained", "info", "nope"]) == 2
