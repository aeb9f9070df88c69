"""Every zoo model (``BUILTIN_MODELS``, small sizes): compiled training equals eager training, and weights move
between the kinds that share BatchNorm's state dict (bn, renorm, frozen) and to plain PyTorch / timm modules.

* ``torch.compile(backend="aot_eager")`` against eager for two training steps of every model with ``bn`` and
  ``renorm`` (the kinds with batch statistics; renorm has its own training code), and of one cheap model of
  each family with every other kind: outputs, the gradient of every trainable parameter at each step, and
  every buffer (running statistics, ``num_batches_tracked``, the BN-LSTM's ``trained_steps``) after them.
* For every ordered pair of bn, renorm and frozen: the first's state dict loads into the second (strictly,
  except ``num_batches_tracked``, which frozen has none of), and both give the same eval outputs (inference
  is Ioffe & Szegedy 2015, Alg. 2 on the same statistics in all three).
* Image models and the BN-LSTM: the same weights in a copy of the network with every bnzoo BatchNorm /
  Batch Renorm layer replaced by torch's ``nn.BatchNorm*d`` (timm's ``BatchNormAct2d`` where bnzoo's is a
  norm + activation layer) give the same eval outputs; the timm models' state dicts load strictly into
  ``timm.create_model`` of their variant. (DS2's sequence-wise norms have no PyTorch counterpart.)

Each comparison first checks that the two models differ before the weights move, so that it can fail.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.modules.batchnorm import _BatchNorm

from bnzoo import create_model
from bnzoo.models import BUILTIN_MODELS, model_options
from bnzoo.norms import (
    BUILTIN_NORMS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm,
    NormAct,
)
from tests.test_models_image import unblock_zero_inits
from tests.test_norm_paths import assert_close

SMALL: dict[str, dict[str, Any]] = {
    "bn_lstm": {"input_size": 3, "hidden_size": 4, "max_steps": 6},
    "ds2_gru": {"input_size": 3, "hidden_size": 4, "num_layers": 2, "bidirectional": True},
    "ds2_lstm": {"input_size": 3, "hidden_size": 4, "num_layers": 2},
    "mlp": {"image_size": 8, "hidden": (8, 8)},
    "bn_inception_small": {"image_size": 16, "width": 0.25},
    "timm_inception_v3": {"image_size": 75},
}
LENGTHS = torch.tensor([6, 3, 2, 5])
NUM_CLASSES = 3
SHARED_KEYS = ("bn", "renorm", "frozen")
# bn and renorm (the kinds with batch statistics, renorm with its own training code) on every model; the other
# kinds (plain tensor ops, compiled layer by layer in tests/test_norm_paths.py) on the cheap models of each family
CHEAP_MODELS = ("resnet20", "mlp", "ds2_gru", "bn_lstm")
COMPILED_CASES = [(name, norm) for name in BUILTIN_MODELS for norm in ("bn", "renorm")] + [
    (name, norm) for name in CHEAP_MODELS for norm in BUILTIN_NORMS if norm not in ("bn", "renorm")
]
IMAGE_MODELS = [name for name in BUILTIN_MODELS if "image_size" in model_options(name)]
# the BN-LSTM's per-step norms are BatchNorm1d layers; DS2's sequence-wise norms have no PyTorch counterpart
PLAIN_PYTORCH_MODELS = [*IMAGE_MODELS, "bn_lstm"]
TIMM_VARIANTS = {"timm_resnet18": "resnet18", "timm_resnet34": "resnet34", "timm_resnet50": "resnet50"}
TIMM_VARIANTS["timm_inception_v3"] = "inception_v3"


def options_of(name: str) -> dict[str, Any]:
    return SMALL.get(name, {"image_size": 16} if "image_size" in model_options(name) else {})


def build(name: str, norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, norm=norm, num_classes=NUM_CLASSES, **options_of(name))


def inputs(name: str, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    opts = options_of(name)
    if "input_size" in opts:
        return (torch.randn(len(LENGTHS), int(LENGTHS.max()), opts["input_size"], generator=g) * 2 + 1, LENGTHS)
    size = opts["image_size"]
    return (torch.randn(2 if name == "timm_inception_v3" else 4, 3, size, size, generator=g) * 2 + 1,)


def loss_of(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    outputs = output if isinstance(output, tuple) else (output,)
    target = torch.arange(outputs[0].shape[0]) % NUM_CLASSES
    return sum(F.cross_entropy(o, target) for o in outputs)  # type: ignore[return-value]


def train_steps(run: Any, model: nn.Module, name: str, steps: int = 2) -> list[dict[str, Tensor]]:
    record = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        output = run(*inputs(name, step))
        loss_of(output).backward()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert list(grads) == trainable, f"no gradient for {sorted(set(trainable) - set(grads))}"
        record.append({"output": output.detach() if isinstance(output, Tensor) else output[0].detach(), **grads})
    return record


# ----------------------------------------------------------------------------------------------------------
# Compiled training step == eager


@pytest.mark.slow
@pytest.mark.parametrize(("name", "norm"), COMPILED_CASES)
def test_compiled_training_equals_eager(name: str, norm: str) -> None:
    """Two steps, so that the second one reads running statistics the first updated (where Batch Renorm's
    compiled backward went wrong: it recomputed r and d from the already-updated buffers)."""
    eager = build(name, norm).train()
    unblock_zero_inits(eager)  # a zero gain stops the gradient of its branch by design, hiding a mistake
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    want = train_steps(eager, eager, name)
    counter = CompileCounterWithBackend("aot_eager")
    got = train_steps(torch.compile(compiled_model, backend=counter), compiled_model, name)
    torch._dynamo.reset()
    assert counter.frame_count >= 1, "torch.compile compiled nothing"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for key in w:
            assert_close(g[key], w[key], "float32", f"{name}/{norm} step {step}: {key}")
    buffers = dict(compiled_model.named_buffers())
    for key, value in eager.named_buffers():
        assert_close(buffers[key], value, "float32", f"{name}/{norm} buffer {key}")


# ----------------------------------------------------------------------------------------------------------
# State dicts between bn, renorm and frozen, and to plain PyTorch / timm


def trained(name: str, norm: str) -> nn.Module:
    """A model whose every parameter and statistic is away from its initial value; in eval mode."""
    model = build(name, norm)
    with torch.no_grad():
        if norm != "frozen":
            for step in range(2):
                model.train()(*inputs(name, step))
        for tensor in model.state_dict().values():  # parameters, frozen buffers, running statistics
            if tensor.is_floating_point():
                tensor.mul_(1 + 0.2 * torch.rand_like(tensor)).add_(0.05 * torch.randn_like(tensor))
    return model.eval()


def eval_output(model: nn.Module, name: str) -> Tensor:
    with torch.no_grad():
        return model.eval()(*inputs(name, 7))


@pytest.mark.slow
@pytest.mark.parametrize("target", SHARED_KEYS)
@pytest.mark.parametrize("source", SHARED_KEYS)
@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_state_dicts_move_between_batchnorm_kinds(name: str, source: str, target: str) -> None:
    model = trained(name, source)
    other = build(name, target, seed=1)
    assert not torch.allclose(eval_output(other, name), eval_output(model, name)), "the test could not fail"
    missing, unexpected = other.load_state_dict(model.state_dict(), strict=False)
    # frozen has no num_batches_tracked (nothing is tracked); everything else must match exactly
    assert all(key.endswith("num_batches_tracked") for key in missing) and unexpected == [], (missing, unexpected)
    if source != "frozen":
        other.load_state_dict(model.state_dict())  # strictly
    torch.testing.assert_close(eval_output(other, name), eval_output(model, name))


_TORCH_BATCHNORM: dict[type[nn.Module], type[nn.Module]] = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
    BatchRenorm1d: nn.BatchNorm1d,
    BatchRenorm2d: nn.BatchNorm2d,
    BatchRenorm3d: nn.BatchNorm3d,
}


def plain_batchnorm(layer: nn.Module) -> nn.Module:
    """torch's nn.BatchNorm*d (timm's BatchNormAct2d for a norm + activation layer) in place of ``layer``."""
    from timm.layers import BatchNormAct2d

    norm_class = layer._norm_class if isinstance(layer, NormAct) else type(layer)
    plain_class = _TORCH_BATCHNORM[norm_class]
    if isinstance(layer, NormAct):
        plain = BatchNormAct2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
        plain.act, plain.drop = layer.act, layer.drop
    else:
        plain = plain_class(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    plain.load_state_dict(layer.state_dict())
    return plain


def to_plain_pytorch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every bnzoo BatchNorm / Batch Renorm layer replaced by :func:`plain_batchnorm`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, _BatchNorm):
                setattr(parent, child_name, plain_batchnorm(child))
    assert not any(type(m).__module__.startswith("bnzoo") for m in model.modules() if isinstance(m, _BatchNorm))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("kind", SHARED_KEYS)
@pytest.mark.parametrize("name", PLAIN_PYTORCH_MODELS)
def test_weights_load_into_plain_pytorch_batchnorm(name: str, kind: str) -> None:
    model = trained(name, kind)
    plain = to_plain_pytorch(build(name, "bn", seed=1))
    assert not torch.allclose(eval_output(plain, name), eval_output(model, name)), "the test could not fail"
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=kind != "frozen")
    assert all(key.endswith("num_batches_tracked") for key in missing) and unexpected == []
    torch.testing.assert_close(eval_output(plain, name), eval_output(model, name))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM_VARIANTS))
def test_timm_models_load_into_timms_own(name: str) -> None:
    model = trained(name, "renorm")
    theirs = timm.create_model(TIMM_VARIANTS[name], num_classes=NUM_CLASSES)
    theirs.load_state_dict(model.state_dict())  # strictly: the same keys (Inception-v3's used to be bn.norm.*)
    torch.testing.assert_close(eval_output(theirs, name), eval_output(model, name))


def test_freezing_a_float64_model_keeps_it_float64() -> None:
    from bnzoo.norms import freeze_norms

    model = trained("resnet20", "bn").double()
    x = inputs("resnet20", 3)[0].double()
    with torch.no_grad():
        expected = model(x)
        frozen = freeze_norms(model)
        assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
        assert any(isinstance(m, FrozenBatchNorm) for m in frozen.modules())
        torch.testing.assert_close(frozen(x), expected)
