"""``compile=True`` on the tasks: the compiled training step equals the eager one, checkpoints move both ways.

* Every norm kind (``NORM_KINDS``), ResNet-20 (image) and DS2 (sequences), float64, ``aot_eager``: two
  training steps of the task compiled through ``configure_model`` against an uncompiled copy -- the loss, the
  gradient of every parameter at each step, the running statistics after them, then the eval outputs. The
  second batch has another size, so the second step runs the dynamic-shape recompilation, where Batch Renorm's
  moments used to break the graph (and the per-layer frames then hit dynamo's recompile limit); ResNet-20 runs
  with ``fullgraph=True`` and a hard failure at the recompile limit, so a graph break or a recompile storm fails.
* A compiled task's checkpoint has the plain keys and loads into an uncompiled task (and back), TensorBoard's
  ``log_graph`` traces it, ``bnzoo fit --model.init_args.compile true`` trains, and bad options are named.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor

from bnzoo.cli import main
from bnzoo.io import safe_torch_load
from bnzoo.norms.factory import NORM_KINDS
from bnzoo.tasks import ImageClassifier, SequenceClassifier
from bnzoo.tasks.compiling import is_compiled
from tests.test_norm_paths import assert_close

ROOT = Path(__file__).resolve().parents[1]
KINDS = NORM_KINDS.names()
AOT = {"backend": "aot_eager"}
LENGTHS = (torch.tensor([5, 2, 4, 1, 3, 5]), torch.tensor([4, 4, 1, 2, 3]))


def make_task(family: str, kind: str, compile: bool = False) -> L.LightningModule:
    torch.manual_seed(0)
    if family == "image":
        options = {**AOT, "fullgraph": True}  # a graph break fails instead of compiling one frame per layer
        task = ImageClassifier(model="resnet20", norm=kind, num_classes=3, in_chans=1, image_size=6,
                               channels_last=False, compile=compile, compile_options=options)  # fmt: skip
    else:
        task = SequenceClassifier(model="ds2_gru", norm=kind, num_classes=3, input_size=3, max_length=5,
                                  model_options={"hidden_size": 4, "num_layers": 2, "bidirectional": True},
                                  compile=compile, compile_options=AOT)  # fmt: skip
    with torch.no_grad():  # every affine parameter away from its initial value: a zero gain hides a gradient
        for name, tensor in task.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "gain")):
                tensor.add_(0.3 * torch.randn_like(tensor) + 0.5)
    return task.double()


def batch(family: str, step: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(step)
    lengths = LENGTHS[step]
    labels = torch.arange(len(lengths)) % 3
    if family == "image":
        return torch.randn(len(lengths), 1, 6, 6, generator=g, dtype=torch.float64) * 2 + 1, labels
    x = torch.randn(len(lengths), 5, 3, generator=g, dtype=torch.float64) * 2 + 1
    return x * (torch.arange(5) < lengths[:, None]).unsqueeze(-1), lengths, labels


def train_step(task: L.LightningModule, family: str, step: int) -> dict[str, Tensor]:
    task.zero_grad(set_to_none=True)
    loss = task.training_step(batch(family, step), step)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}
    assert list(grads) == [name for name, p in task.named_parameters() if p.requires_grad], "a gradient is missing"
    return {"loss": loss.detach(), **grads}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["image", "sequence"])
def test_compiled_task_trains_as_eager(family: str, kind: str) -> None:
    eager = make_task(family, kind).train()
    compiled = make_task(family, kind, compile=True).train()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled.configure_model()
    assert is_compiled(compiled.model) and not is_compiled(eager.model)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for step in range(2):
            got, want = train_step(compiled, family, step), train_step(eager, family, step)
            for key in want:
                assert_close(got[key], want[key], "float64", f"{family}/{kind} step {step}: {key}")
        buffers = dict(compiled.named_buffers())
        for key, value in eager.named_buffers():
            assert_close(buffers[key], value, "float64", f"{family}/{kind} buffer {key}")
        with torch.no_grad():
            inputs = batch(family, 0)[:-1]
            assert_close(compiled.eval()(*inputs), eager.eval()(*inputs), "float64", f"{family}/{kind} eval")
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert frames >= 1, "torch.compile compiled nothing"


def test_bad_compile_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown compile option\(s\) 'backnd'; valid compile options: backend, "):
        ImageClassifier(compile=True, compile_options={"backnd": "aot_eager"})
    with pytest.raises(ValueError, match=r"compile_options.backend must be one of .*aot_eager.*inductor.*'inductr'"):
        ImageClassifier(compile=True, compile_options={"backend": "inductr"})
    with pytest.raises(ValueError, match=r"compile_options.mode must be null or one of default, reduce-overhead"):
        ImageClassifier(compile=True, compile_options={"mode": "fast"})
    with pytest.raises(ValueError, match=r"compile_options.dynamic must be null, true or false, got 'yes'"):
        ImageClassifier(compile=True, compile_options={"dynamic": "yes"})
    with pytest.raises(ValueError, match=r"mode='max-autotune' and compile_options.options=.* exclude each other"):
        ImageClassifier(compile=True, compile_options={"mode": "max-autotune", "options": {"trace.enabled": True}})
    with pytest.raises(ValueError, match=r"compile must be true or false, got 'yes'"):
        ImageClassifier(compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"compile_options.backend"):  # checked also while compile is off
        ImageClassifier(compile=False, compile_options={"backend": 3})


def eval_output(task: L.LightningModule, x: Tensor) -> Tensor:
    with torch.no_grad():
        return task.eval()(x)


def test_checkpoints_move_between_compiled_and_uncompiled_tasks_and_log_graph_traces(tmp_path: Path) -> None:
    from bnzoo.data import DigitsDataModule

    torch._dynamo.reset()
    task = ImageClassifier(model="resnet20", norm="renorm", num_classes=10, in_chans=1, image_size=8, compile=True,
                           compile_options=AOT)  # fmt: skip
    logger = TensorBoardLogger(str(tmp_path), name="tb", log_graph=True)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=logger,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, DigitsDataModule(batch_size=16))
    assert is_compiled(task.model)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Graph() is not None  # the example input traced, through the uncompiled call
    (path,) = (tmp_path / "tb").glob("version_*/checkpoints/*.ckpt")
    checkpoint = safe_torch_load(path)
    keys = list(checkpoint["state_dict"])
    assert keys == list(task.state_dict()) and not [k for k in keys if "_orig_mod" in k]
    assert checkpoint["hyper_parameters"]["compile"] is True
    x = torch.randn(5, 1, 8, 8)
    trained = eval_output(task, x)
    plain = ImageClassifier(model="resnet20", norm="renorm", num_classes=10, in_chans=1, image_size=8)
    assert not torch.allclose(eval_output(plain, x), trained), "the test could not fail"
    plain.load_state_dict(checkpoint["state_dict"])  # strictly
    torch.testing.assert_close(eval_output(plain, x), trained)
    loaded = ImageClassifier.load_from_checkpoint(path, compile=False)
    assert not loaded.hparams.compile
    torch.testing.assert_close(eval_output(loaded, x), trained)
    back = ImageClassifier(model="resnet20", norm="renorm", num_classes=10, in_chans=1, image_size=8, compile=True,
                           compile_options=AOT)  # fmt: skip
    back.load_state_dict(plain.state_dict())  # an uncompiled task's weights into a compiled one
    back.configure_model()
    torch.testing.assert_close(eval_output(back, x), trained)
    torch._dynamo.reset()


def test_bnzoo_fit_with_compile_true(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    args = ["fit", "--config", str(ROOT / "configs/digits/resnet.yaml"), "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks.init_args.num_batches", "1", "--model.init_args.compile", "true",
            "--model.init_args.compile_options", '{"backend": "aot_eager"}']  # fmt: skip
    assert main(args) == 0
    last = next(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt"))
    checkpoint = safe_torch_load(last)
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["compile"] is True
    assert checkpoint["hyper_parameters"]["compile_options"] == {"backend": "aot_eager"}
    assert not [key for key in checkpoint["state_dict"] if "_orig_mod" in key]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    torch._dynamo.reset()


HAS_CXX = shutil.which("g++") is not None or shutil.which("clang++") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler (g++ or clang++) on the CPU")
def test_inductor_compiled_task_trains_as_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One smoke step through inductor (the default backend), float32: loss and every gradient."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = make_task("image", "renorm").float().train()
    compiled = copy.deepcopy(eager)
    compiled.hparams.compile_options = {"backend": "inductor"}
    compiled.hparams.compile = True
    torch._dynamo.reset()
    compiled.configure_model()
    images, labels = batch("image", 0)
    results: list[dict[str, Any]] = []
    for task in (compiled, eager):
        task.zero_grad(set_to_none=True)
        loss = task.training_step((images.float(), labels), 0)
        loss.backward()
        results.append({"loss": loss.detach(), **{n: p.grad.clone() for n, p in task.named_parameters()}})
    for key in results[1]:
        assert_close(results[0][key], results[1][key], "float32", f"inductor: {key}")
    torch._dynamo.reset()
    assert os.listdir(tmp_path / "inductor"), "inductor compiled nothing"
