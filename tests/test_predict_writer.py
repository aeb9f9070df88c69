"""``bnzoo predict`` writes its predictions (a CSV per run, said where) and classifies the user's own image files
(``--data.path``) with the checkpoint's normalization. References: the network run by hand on the images
normalized by hand in float64 (the stored statistics recomputed from the raw training pixels)."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnzoo.cli import main
from bnzoo.data import DigitsDataModule
from bnzoo.data.files import image_files, load_image
from bnzoo.tasks import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
MLP = ["--config", str(ROOT / "configs/digits/mlp.yaml")]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", *QUIET]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def run_cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return list(rows[0]), rows


def _printed_path(printed: str) -> Path:
    (line,) = [line for line in printed.splitlines() if line.startswith("predictions: ")]
    return Path(line.split()[1])


def _reference_probs(ckpt: Path, images: torch.Tensor, mean: float, std: float, pixel_max: float) -> torch.Tensor:
    """The checkpoint's network on ``(images / pixel_max - mean) / std``, in float64, eval mode."""
    checkpoint = torch.load(ckpt, weights_only=True)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    task = ImageClassifier(**hparams)
    task.load_state_dict(checkpoint["state_dict"])
    net = task.model.double().eval()
    x = (images.double() / pixel_max - mean) / std
    with torch.no_grad():
        return torch.softmax(net(x), dim=-1)


def test_predict_writes_one_csv_per_run_with_probabilities_of_every_test_sample(tmp_path: Path) -> None:
    run_cli("fit", *MLP, *QUICK)
    ckpt = next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt"))
    printed = run_cli("predict", *MLP, *QUIET, "--ckpt_path", str(ckpt))
    path = _printed_path(printed)
    assert path.is_file() and path.resolve().parent.parent == ckpt.parent.parent.parent  # a fresh version
    assert path.parent.name == "version_1"
    header, rows = read_csv(path)
    assert header == ["index", "target", "pred"] + [f"prob_{k}" for k in range(10)]
    data = DigitsDataModule()
    data.setup("test")
    assert data.test_set is not None and len(rows) == len(data.test_set)
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert [int(r["target"]) for r in rows] == data.test_set.labels.tolist()
    probs = torch.tensor([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows], dtype=torch.float64)
    reference = _reference_probs(ckpt, data.test_set.images, data.mean[0], data.std[0], data.pixel_max)
    torch.testing.assert_close(probs, reference, atol=2e-6, rtol=1e-5)
    assert [int(r["pred"]) for r in rows] == reference.argmax(-1).tolist()
    second = _printed_path(run_cli("predict", *MLP, *QUIET, "--ckpt_path", str(ckpt)))
    assert second != path and second.is_file()  # a file per run, the first one kept


def test_predict_classifies_the_users_image_files_with_the_stored_train_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_norm = ["--data.init_args.normalization", "train"]
    run_cli("fit", *MLP, *QUICK, *train_norm)
    ckpt = next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt"))
    # the statistics the checkpoint must hold: the training split's raw pixels, by hand in float64
    data = DigitsDataModule(normalization="train")
    data.setup("fit")
    assert data.train_set is not None
    pixels = data.train_set.images.double() / 16.0
    mean, std = pixels.mean().item(), pixels.std(unbiased=False).item()
    stored = torch.load(ckpt, weights_only=True)["DigitsDataModule"]
    assert stored["normalization"] == "train"
    assert stored["mean"] == pytest.approx([mean], rel=1e-12) and stored["std"] == pytest.approx([std], rel=1e-12)

    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    Image.fromarray(gray[0]).save(folder / "a_gray.png")
    Image.fromarray(np.repeat(gray[1][:, :, None], 3, axis=2)).save(folder / "b_rgb.png")  # R=G=B: L is exact
    Image.fromarray(gray[2]).save(folder / "c.bmp")
    (folder / "notes.txt").write_text("not an image: skipped in a folder")
    monkeypatch.setattr(  # predicting files reads no training data: the statistics come from the checkpoint
        DigitsDataModule, "load_split", lambda self, train: pytest.fail("predict read a data split")
    )
    printed = run_cli("predict", *MLP, *QUIET, *train_norm, "--ckpt_path", str(ckpt), "--data.path", str(folder))
    header, rows = read_csv(_printed_path(printed))
    assert header == ["index", "file", "pred"] + [f"prob_{k}" for k in range(10)]  # no labels: no target
    assert [Path(r["file"]).name for r in rows] == ["a_gray.png", "b_rgb.png", "c.bmp"]
    probs = torch.tensor([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows], dtype=torch.float64)
    reference = _reference_probs(ckpt, torch.from_numpy(gray).unsqueeze(1), mean, std, 255.0)  # 8-bit files
    torch.testing.assert_close(probs, reference, atol=2e-6, rtol=1e-5)
    assert [int(r["pred"]) for r in rows] == reference.argmax(-1).tolist()


def test_load_image_converts_and_resizes_to_the_models_input(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    gray = load_image(tmp_path / "x.png", 1, 28)
    expected = np.asarray(Image.fromarray(rgb).convert("L").resize((28, 28), Image.Resampling.BILINEAR))
    assert gray.dtype == torch.uint8 and gray.shape == (1, 28, 28)
    assert torch.equal(gray[0], torch.from_numpy(expected.copy()))
    color = load_image(tmp_path / "x.png", 3, 40)
    expected = np.asarray(Image.fromarray(rgb).resize((40, 40), Image.Resampling.BILINEAR))
    assert torch.equal(color, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    Image.fromarray(rgb[:8, :8]).save(tmp_path / "small.png")
    assert torch.equal(load_image(tmp_path / "small.png", 3, 8), torch.from_numpy(rgb[:8, :8].copy()).permute(2, 0, 1))


def test_bad_paths_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.png").write_text("no image")
    with pytest.raises(ValueError, match="no such file or folder"):
        image_files(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="empty: the folder holds no image file"):
        image_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="bad.png: not an image PIL can read"):
        load_image(tmp_path / "bad.png", 1, 8)
    with pytest.raises(ValueError, match="1 or 3 input channels, not in_chans=2"):
        load_image(tmp_path / "bad.png", 2, 8)


def test_predict_with_a_missing_path_fails_in_three_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli("fit", *MLP, *QUICK)
    ckpt = str(next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt")))
    capsys.readouterr()
    assert main(["predict", *MLP, *QUIET, "--ckpt_path", ckpt, "--data.path", "nowhere.png"]) == 2
    error = capsys.readouterr().err
    assert "--data.path nowhere.png: no such file or folder" in error and len(error.strip().splitlines()) <= 3


def test_a_configured_prediction_writer_replaces_the_default(tmp_path: Path) -> None:
    run_cli("fit", *MLP, *QUICK)
    ckpt = str(next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt")))
    out = tmp_path / "elsewhere"
    printed = run_cli(
        "predict", *MLP, *QUIET, "--ckpt_path", ckpt, "--trainer.logger", "false",
        "--trainer.callbacks+=bnzoo.callbacks.PredictionWriter", "--trainer.callbacks.output_dir", str(out),
    )  # fmt: skip
    assert _printed_path(printed) == out / "predictions.csv"
    assert printed.count("predictions: ") == 1 and (out / "predictions.csv").is_file()
    assert not list(tmp_path.glob("runs/**/predictions.csv"))
