"""The Batch Renorm schedule (Ioffe 2017, Sec. 4) and its TensorBoard logs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnzoo.callbacks import RenormSchedule, renorm_bounds
from bnzoo.data import DigitsDataModule
from bnzoo.norms.introspect import named_renorm_layers as renorm_layers
from bnzoo.tasks import ImageClassifier


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, (1.0, 0.0)),
        (4999, (1.0, 0.0)),  # plain BN for the first 5k steps
        (5000, (1.0, 0.0)),  # the ramps start here
        (15000, (1.0 + 2.0 * 10000 / 35000, 5.0 * 10000 / 20000)),
        (25000, (1.0 + 2.0 * 20000 / 35000, 5.0)),  # d_max reaches 5 at 25k
        (40000, (3.0, 5.0)),  # r_max reaches 3 at 40k
        (90000, (3.0, 5.0)),
    ],
)
def test_paper_schedule(step: int, expected: tuple[float, float]) -> None:
    got = renorm_bounds(step, warmup_steps=5000, r_max_steps=40000, d_max_steps=25000, r_max=3.0, d_max=5.0)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r_max": 0.5}, "r_max >= 1"),
        ({"d_max": -1.0}, "d_max >= 0"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"r_max_steps": 1.5}, "fraction of the run and must be <= 1"),
    ],
)
def test_bad_schedule_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RenormSchedule(**kwargs)


class RecordBounds(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        layers = list(renorm_layers(pl_module).values())
        assert len({(m.r_max, m.d_max) for m in layers}) == 1  # every layer has the same bounds
        self.seen.append((trainer.global_step, layers[0].r_max, layers[0].d_max))


def test_callback_drives_every_renorm_layer_and_logs_clipping(tmp_path: Path) -> None:
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(model="resnet20", norm="renorm", num_classes=10, in_chans=1, image_size=8, lr=0.05)
    # fractions of the run: 20 steps in all -> warm-up 4, r_max at 16, d_max at 10
    schedule = RenormSchedule(warmup_steps=0.2, r_max_steps=0.8, d_max_steps=0.5, r_max=3.0, d_max=5.0)
    record = RecordBounds()  # runs after the schedule, so it sees the bounds of this step
    logger = TensorBoardLogger(tmp_path, name="schedule", version=0, log_graph=False)
    trainer = L.Trainer(
        max_steps=20,
        limit_val_batches=0,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[schedule, record],
        enable_checkpointing=False,
    )
    trainer.fit(model, data)
    assert [s for s, _, _ in record.seen] == list(range(20))
    for step, r_max, d_max in record.seen:
        want = renorm_bounds(step, 4, 16, 10, 3.0, 5.0)
        assert (r_max, d_max) == pytest.approx(want), step

    events = EventAccumulator(str(tmp_path / "schedule" / "version_0"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"renorm/r_max", "renorm/d_max"} <= scalars
    # the per-layer corrections are NormStatistics's (one definition of "clipped"), not the schedule's
    assert not any(t.endswith("/r_clipped") for t in scalars)
    logged_r_max = {e.step: e.value for e in events.Scalars("renorm/r_max")}
    assert logged_r_max[15] == pytest.approx(renorm_bounds(15, 4, 16, 10, 3.0, 5.0)[0])


def test_schedule_without_renorm_layers_warns(tmp_path: Path) -> None:
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(model="mlp", norm="bn", num_classes=10, in_chans=1, image_size=8)
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RenormSchedule()],
        enable_checkpointing=False,
    )
    with pytest.warns(UserWarning, match="no Batch Renorm layer"):
        trainer.fit(model, data)
    assert torch.isfinite(next(model.parameters())).all()


# -- resuming: a run continues the schedule it was saved with -------------------------------------------------

SCHEDULE = {"warmup_steps": 0.2, "r_max_steps": 0.8, "d_max_steps": 0.5, "r_max": 3.0, "d_max": 5.0}


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _run(max_steps: int, ckpt_path: Path | None = None, stop_at: int | None = None, **schedule: float) -> tuple:
    """Train an MLP with Batch Renorm under the fractional schedule; returns the recorded bounds and trainer."""
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=32)
    model = ImageClassifier(model="mlp", norm="renorm", model_options={"hidden": [16]}, num_classes=10, in_chans=1,
                            image_size=8, lr=0.05)  # fmt: skip
    record = RecordBounds()
    callbacks = [RenormSchedule(**{**SCHEDULE, **schedule}, log_bounds=False), record]
    trainer = L.Trainer(max_steps=max_steps, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=callbacks + ([StopAt(stop_at)] if stop_at else []))  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return record.seen, trainer


@pytest.mark.filterwarnings("ignore:.*(resum|restart).*")
def test_a_resumed_run_continues_the_saved_schedule(tmp_path: Path) -> None:
    """A 20-step run (warm-up 4, r_max at 16, d_max at 10) stopped at step 8 and resumed with max_steps 30: the
    resumed steps keep the 20-step schedule (not warm-up 6, r_max at 24, d_max at 15), and an interrupted run
    resumed with the same max_steps equals the uninterrupted one step for step."""
    uninterrupted, _ = _run(20)
    assert [s for s, _, _ in uninterrupted] == list(range(20))
    first, stopped = _run(20, stop_at=8)
    assert [s for s, _, _ in first] == list(range(8))
    checkpoint = tmp_path / "stopped.ckpt"
    stopped.save_checkpoint(checkpoint)

    resumed_longer, _ = _run(30, ckpt_path=checkpoint)
    assert [s for s, _, _ in resumed_longer] == list(range(8, 30))
    for step, r_max, d_max in resumed_longer:
        assert (r_max, d_max) == pytest.approx(renorm_bounds(step, 4, 16, 10, 3.0, 5.0)), step

    resumed, _ = _run(20, ckpt_path=checkpoint)
    assert first + resumed == uninterrupted


@pytest.mark.filterwarnings("ignore:.*(resum|restart).*")
def test_resuming_with_other_bounds_continues_the_saved_ones_and_says_so(tmp_path: Path) -> None:
    _, stopped = _run(20, stop_at=8)
    checkpoint = tmp_path / "stopped.ckpt"
    stopped.save_checkpoint(checkpoint)
    with pytest.warns(UserWarning, match=r"ignoring r_max_steps=0\.9 \(saved: 0\.8\), r_max=2\.0 \(saved: 3\.0\)"):
        resumed, trainer = _run(20, ckpt_path=checkpoint, r_max_steps=0.9, r_max=2.0)
    for step, r_max, d_max in resumed:
        assert (r_max, d_max) == pytest.approx(renorm_bounds(step, 4, 16, 10, 3.0, 5.0)), step
    saved_again = next(c for c in trainer.callbacks if isinstance(c, RenormSchedule)).state_dict()
    assert saved_again == {"steps": [4, 16, 10], "r_max": 3.0, "d_max": 5.0, "arguments": [0.2, 0.8, 0.5, 3.0, 5.0]}
