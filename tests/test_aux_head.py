"""The compact BN-Inception's auxiliary classifier (``aux_head``: none / plain / bn; Szegedy et al. 2015, Sec. 5
and 2016, Table 3): its layout, that it runs only in training, that only the task's training loss adds it (with
``aux_loss_weight``, against a float64 hand computation), and that checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnzoo import create_model
from bnzoo.data import DigitsDataModule
from bnzoo.io import safe_torch_load
from bnzoo.models.inception import AUX_HEADS, AuxiliaryHead
from bnzoo.tasks import ImageClassifier

SMALL = {"num_classes": 10, "in_chans": 1, "image_size": 8, "width": 0.25}
INPUTS = {"num_classes": 10, "in_chans": 1, "image_size": 8}  # the task's


def model_with(aux_head: str, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("bn_inception_small", aux_head=aux_head, **(SMALL | options))


def hand_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 cross-entropy, mean over the batch."""
    return -logits.double().log_softmax(dim=1)[torch.arange(len(labels)), labels].mean()


@pytest.mark.parametrize("aux_head", ["plain", "bn"])
def test_aux_head_layout_and_outputs(aux_head: str) -> None:
    model = model_with(aux_head)
    head = model.aux_head
    assert isinstance(head, AuxiliaryHead) and model.aux_after == 3  # the last module before the 2nd reduction
    assert model.features[model.aux_after + 1].__class__.__name__ == "ReductionModule"
    fc = head.fc[0]
    assert isinstance(fc, nn.Linear) and fc.out_features == 64 and fc.in_features == 8 * 16  # width 0.25
    norms = [m for m in head.fc if type(m).__module__.startswith("bnzoo.norms")]
    if aux_head == "bn":  # BN-auxiliary: Linear (no bias) -> norm -> ReLU
        assert fc.bias is None and len(norms) == 1 and norms[0].num_features == 64
    else:
        assert fc.bias is not None and not norms
    assert type(head.conv.norm).__module__.startswith("bnzoo.norms")  # the conv is normalized in both
    x = torch.randn(6, 1, 8, 8)
    logits, aux = model.train()(x)
    assert logits.shape == aux.shape == (6, 10)
    out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (6, 10)


def test_aux_head_does_not_change_the_main_path_and_is_not_run_at_eval() -> None:
    """The trunk's weights are drawn before the head's, so the same seed gives the same trunk: the main logits
    are those of the model without a head, in training and at eval, and the head sees no input at eval."""
    x = torch.randn(6, 1, 8, 8)
    plain, bare = model_with("bn"), model_with("none")
    assert set(bare.state_dict()) < set(plain.state_dict())
    for key, value in bare.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    trained = bare.train()(x)
    assert isinstance(trained, torch.Tensor)
    torch.testing.assert_close(plain.train()(x)[0], trained, rtol=0, atol=0)  # one update of the statistics each
    calls = []
    plain.aux_head.register_forward_hook(lambda *args: calls.append(1))
    torch.testing.assert_close(plain.eval()(x), bare.eval()(x), rtol=0, atol=0)
    assert not calls
    plain.train()(x)
    assert calls == [1]


def test_aux_loss_trains_the_trunk_below_the_head_only() -> None:
    model = model_with("bn").train()
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    _, aux = model(x)
    F.cross_entropy(aux, y).backward()
    below = [p.grad for p in [*model.stem.parameters(), *model.features[: model.aux_after + 1].parameters()]]
    above = [p.grad for p in [*model.features[model.aux_after + 1 :].parameters(), *model.fc.parameters()]]
    assert all(g is not None for g in below) and sum(g.abs().sum() for g in below) > 0
    assert all(g is None for g in above)


@pytest.mark.parametrize("weight", [0.3, 0.0])
def test_task_adds_the_weighted_aux_loss_in_training_only(weight: float) -> None:
    data = DigitsDataModule(batch_size=40)
    data.setup("fit")
    torch.manual_seed(0)
    task = ImageClassifier(model="bn_inception_small", norm="bn", model_options={"aux_head": "bn", "width": 0.25},
                           aux_loss_weight=weight, **INPUTS)  # fmt: skip
    images, labels = next(iter(data.train_dataloader()))
    task.train()
    loss = task.batch_loss((images, labels))  # the training loss (what training_step returns)
    with torch.no_grad():
        logits, aux = task.model(images.contiguous(memory_format=torch.channels_last))
    expected = hand_cross_entropy(logits, labels) + weight * hand_cross_entropy(aux, labels)
    assert hand_cross_entropy(aux, labels) > 0.1  # the aux term is not negligible: the test can fail
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # evaluation: the main classifier alone, whatever the weight
    got = task.evaluate(data.val_dataloader())
    assert task.training  # modes restored
    task.eval()
    with torch.no_grad():
        val = list(data.val_dataloader())
        logits = task(torch.cat([x for x, _ in val]))
    val_labels = torch.cat([y for _, y in val])
    assert got["loss"] == pytest.approx(hand_cross_entropy(logits, val_labels).item(), rel=1e-5)
    assert got["acc"] == pytest.approx((logits.argmax(-1) == val_labels).double().mean().item())


def test_aux_head_checkpoints_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = ImageClassifier(model="bn_inception_small", model_options={"aux_head": "bn", "width": 0.25},
                           aux_loss_weight=0.3, **INPUTS)  # fmt: skip
    trainer = L.Trainer(max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(task, DigitsDataModule(batch_size=16))
    path = tmp_path / "aux.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = safe_torch_load(path)
    assert checkpoint["hyper_parameters"]["model_options"] == {"aux_head": "bn", "width": 0.25}
    assert any(k.startswith("model.aux_head.fc.1.running_var") for k in checkpoint["state_dict"])
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams.aux_loss_weight == 0.3 and loaded.model.aux_head is not None
    for key, value in task.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(5, 1, 8, 8)
    task.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), task(x), rtol=0, atol=0)
    task.train(), loaded.train()
    for got, want in zip(loaded(x), task(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aux_head": "batchnorm"}, "aux_head.*'batchnorm'.*none, plain, bn"),
        ({"aux_head": "bn", "norm": "none"}, "aux_head='bn'.*norm='none'"),
    ],
)
def test_bad_aux_head_options_are_named(options: dict, message: str) -> None:
    assert AUX_HEADS == ("none", "plain", "bn")
    with pytest.raises(ValueError, match=message):
        create_model("bn_inception_small", **options)
