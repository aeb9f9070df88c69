"""The LightningModules and their optimizer defaults, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnzoo.data import DigitsDataModule, SequenceDataModule
from bnzoo.optim import WarmupSchedule, parameter_groups
from bnzoo.tasks import ImageClassifier, SequenceClassifier


def test_evaluate_equals_a_hand_computed_loss_and_accuracy() -> None:
    data = DigitsDataModule(batch_size=50)
    data.setup("fit")
    task = ImageClassifier(model="mlp", norm="bn", num_classes=10, in_chans=1, image_size=8)
    task.train()
    got = task.evaluate(data.val_dataloader())
    assert task.training  # modes restored
    task.eval()
    with torch.no_grad():
        images = torch.cat([x for x, _ in data.val_dataloader()])
        labels = torch.cat([y for _, y in data.val_dataloader()])
        logits = task.model(images)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert got["acc"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_channels_last_changes_memory_order_not_results() -> None:
    torch.manual_seed(0)
    a = ImageClassifier(model="resnet20", num_classes=10, in_chans=1, image_size=8, channels_last=True)
    b = ImageClassifier(model="resnet20", num_classes=10, in_chans=1, image_size=8, channels_last=False)
    b.load_state_dict(a.state_dict())
    conv = next(m for m in a.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 8, 8)
    a.eval()
    b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_auxiliary_logits_add_a_weighted_loss() -> None:
    task = ImageClassifier(model="timm_inception_v3", num_classes=3, in_chans=3, image_size=299,
                           model_options={"aux_logits": True}, aux_loss_weight=0.4, channels_last=False)
    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, 299, 299), torch.tensor([0, 2])
    task.train()
    torch.manual_seed(1)
    loss = task.training_step((images, labels), 0)
    torch.manual_seed(1)
    logits, aux = task.model(images)
    expected = F.cross_entropy(logits, labels) + 0.4 * F.cross_entropy(aux, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)


def test_sequence_task_feeds_lengths_to_the_model() -> None:
    data = SequenceDataModule("digits", mode="row", variable_length=True, batch_size=16)
    data.setup("fit")
    task = SequenceClassifier(model="ds2_gru", num_classes=10, input_size=data.input_size,
                              max_length=data.max_length, model_options={"hidden_size": 8, "num_layers": 1})
    x, lengths, labels = next(iter(data.train_dataloader()))
    task.eval()
    with torch.no_grad():
        full = task(x, lengths)
        alone = torch.cat([task(x[i : i + 1, : lengths[i]], lengths[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-5)  # padding is ignored


def test_weight_decay_skips_norm_parameters_and_biases() -> None:
    task = ImageClassifier(model="resnet20", norm="bn", num_classes=10, in_chans=1, image_size=8)
    decay, no_decay = parameter_groups(task.model, 1e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4
    n_params = sum(1 for _ in task.model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    (everything,) = parameter_groups(task.model, 1e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == n_params


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        ("cosine", 0, 0.1),  # warm-up: (t + 1) / 10
        ("cosine", 9, 1.0),
        ("cosine", 10, 1.0),
        ("cosine", 55, 0.5 * (1 + math.cos(math.pi * 45 / 90))),
        ("cosine", 100, 0.0),
        ("step", 10, 1.0),
        ("step", 50, 0.1),  # x0.1 at 50% of 100 steps
        ("step", 75, 0.01),  # and at 75%
        ("constant", 80, 1.0),
    ],
)
def test_learning_rate_schedule(kind: str, step: int, expected: float) -> None:
    assert WarmupSchedule(kind, total_steps=100, warmup_steps=10)(step) == pytest.approx(expected, abs=1e-12)


def test_unknown_schedule_is_named() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'linear'; valid schedules: cosine, step, constant"):
        ImageClassifier(schedule="linear")


def test_training_accuracy_counts_agree_with_torchmetrics() -> None:
    """Training accuracy is counted with one topk per step (no torchmetrics update per step): the epoch's
    counts must equal torchmetrics' top-1 and top-5 accuracy over the same outputs."""
    from torchmetrics.classification import MulticlassAccuracy

    torch.manual_seed(0)
    task = ImageClassifier(model="mlp", num_classes=10, in_chans=1, image_size=8, channels_last=False)
    task.eval()  # fixed outputs: the counts are compared on the same logits
    top1, top5 = MulticlassAccuracy(10, top_k=1, average="micro"), MulticlassAccuracy(10, top_k=5, average="micro")
    for _ in range(4):
        images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        with torch.no_grad():
            task.training_step((images, labels), 0)
            logits = task(images)
        top1.update(logits, labels)
        top5.update(logits, labels)
    hits1, hits5, seen = task._train_hits.tolist()
    assert seen == 64
    assert hits1 / seen == pytest.approx(float(top1.compute())) and hits5 / seen == pytest.approx(float(top5.compute()))
    assert hits5 >= hits1
