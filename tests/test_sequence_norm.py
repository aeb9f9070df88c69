"""Sequence-wise, padding-aware norms (``make_norm(kind, C, "seq")``) against references on the valid steps.

The reference gathers the valid steps of a padded (B, T, C) batch itself and runs a channel norm on those
rows: ``torch.nn.BatchNorm1d`` for ``bn``, the project's ``BatchRenorm1d`` (``make_norm("renorm", C, "1d")``,
tested against Ioffe 2017 Alg. 1 elsewhere) for ``renorm``, ``nn.LayerNorm``/``nn.GroupNorm`` for ``ln`` and
``gn``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from bnzoo.norms import BUILTIN_NORMS, make_norm

B, T, C = 5, 6, 4
LENGTHS = torch.tensor([6, 2, 4, 1, 5])


def valid_mask(lengths: Tensor, steps: int) -> Tensor:
    """(B, steps) True where step t < lengths[b], written out with a loop as an independent reference."""
    mask = torch.zeros(len(lengths), steps, dtype=torch.bool)
    for b, length in enumerate(lengths.tolist()):
        mask[b, :length] = True
    return mask


def padded_batch(lengths: Tensor = LENGTHS, steps: int = T, pad_value: float = 123.0) -> Tensor:
    """A (B, steps, C) batch whose padded steps hold a large constant (it must not leak into anything)."""
    x = torch.randn(len(lengths), steps, C) * 2 + 0.5
    return x.masked_fill(~valid_mask(lengths, steps).unsqueeze(-1), pad_value)


def pad_to(x: Tensor, steps: int, pad_value: float = -7.0) -> Tensor:
    """The same sequences padded to ``steps`` steps with ``pad_value``."""
    extra = x.new_full((x.shape[0], steps - x.shape[1], x.shape[2]), pad_value)
    return torch.cat([x, extra], dim=1)


def with_random_affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name in ("weight", "bias"):
            param = getattr(norm, name, None)
            if isinstance(param, nn.Parameter):
                param.copy_(torch.randn_like(param))
    return norm


def reference_1d(kind: str, **options: object) -> nn.Module:
    """The channel norm on (M, C) rows that ``kind``'s sequence layer must equal on the valid steps."""
    if kind == "bn":
        return nn.BatchNorm1d(C, **options)
    return make_norm(kind, C, "1d", **options)


def upstream_gradient(steps: int = T, seed: int = 1) -> Tensor:
    """A fixed random gradient of the loss with respect to a (B, steps, C) output; nonzero at padded steps."""
    return torch.randn((B, steps, C), generator=torch.Generator().manual_seed(seed))


def train_step(
    norm: nn.Module, x: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None, seed: int = 1
) -> tuple[Tensor, Tensor]:
    """One forward/backward with a fixed upstream gradient; returns (output, input gradient).

    The upstream gradient of step t does not depend on how many steps ``x`` has (the first ``T`` steps get
    ``upstream_gradient(T, seed)``), so batches that differ only in padding get the same valid gradients.
    """
    x = x.clone().requires_grad_(True)
    out = norm(x, lengths=lengths, mask=mask)
    upstream = upstream_gradient(T, seed)
    if x.shape[1] > T:
        upstream = pad_to(upstream, x.shape[1], pad_value=3.0)
    (out * upstream).sum().backward()
    return out, x.grad


def train_step_rows(reference: nn.Module, x: Tensor, mask: Tensor, seed: int = 1) -> tuple[Tensor, Tensor]:
    """The reference: the channel norm on the gathered valid rows; outputs and gradients scattered back."""
    rows = x[mask].clone().requires_grad_(True)
    out_rows = reference(rows)
    (out_rows * upstream_gradient(T, seed)[mask]).sum().backward()
    out = torch.zeros(*mask.shape, C)
    grad = torch.zeros(*mask.shape, C)
    out[mask] = out_rows.detach()
    grad[mask] = rows.grad
    return out, grad


def assert_same_state(norm: nn.Module, reference: nn.Module) -> None:
    ours, theirs = norm.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], msg=key)


# ----------------------------------------------------------------------------------------------------------
# Batch statistics (bn, renorm) on the valid steps only


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_batch_norms_equal_channel_norm_on_valid_steps(kind: str) -> None:
    norm = with_random_affine(make_norm(kind, C, "seq"))
    reference = reference_1d(kind)
    reference.load_state_dict(norm.state_dict())
    mask = valid_mask(LENGTHS, T)
    for step in range(3):  # several steps, so renorm's r and d and the running statistics move
        x = padded_batch()
        out, grad = train_step(norm, x, lengths=LENGTHS, seed=step)
        ref_out, ref_grad = train_step_rows(reference, x, mask, seed=step)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(grad, ref_grad)
        torch.testing.assert_close(norm.weight.grad, reference.weight.grad)
        torch.testing.assert_close(norm.bias.grad, reference.bias.grad)
        assert_same_state(norm, reference)
    norm.eval(), reference.eval()
    x = padded_batch()
    torch.testing.assert_close(norm(x, lengths=LENGTHS)[mask], reference(x[mask]))


def test_bn_without_padding_is_batchnorm1d_over_all_steps() -> None:
    norm = with_random_affine(make_norm("bn", C, "seq"))
    reference = nn.BatchNorm1d(C)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(B, T, C)
    full = torch.full((B,), T)
    for lengths in (None, full):
        torch.testing.assert_close(norm(x, lengths=lengths), reference(x.reshape(B * T, C)).view(B, T, C))
    assert_same_state(norm, reference)


@pytest.mark.parametrize("kind", ["bn", "renorm"])
def test_results_do_not_depend_on_the_amount_of_padding(kind: str) -> None:
    short = with_random_affine(make_norm(kind, C, "seq"))
    long = copy.deepcopy(short)
    mask = valid_mask(LENGTHS, T)
    for step in range(3):
        x = padded_batch()
        out_short, grad_short = train_step(short, x, lengths=LENGTHS, seed=step)
        out_long, grad_long = train_step(long, pad_to(x, T + 7), lengths=LENGTHS, seed=step)
        # The long batch's padded steps get a nonzero upstream gradient: it must not reach the valid steps.
        torch.testing.assert_close(out_long[:, :T][mask], out_short[mask])
        torch.testing.assert_close(grad_long[:, :T][mask], grad_short[mask])
        assert_same_state(long, short)


# ----------------------------------------------------------------------------------------------------------
# Every kind: padding stays zero, mask == lengths, per-row kinds equal their row norm


@pytest.mark.parametrize("kind", BUILTIN_NORMS)
def test_padded_outputs_and_gradients_are_zero(kind: str) -> None:
    norm = with_random_affine(make_norm(kind, C, "seq"))
    out, grad = train_step(norm, padded_batch(), lengths=LENGTHS)
    padded = ~valid_mask(LENGTHS, T)
    assert torch.count_nonzero(out[padded]) == 0
    assert torch.count_nonzero(grad[padded]) == 0
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", BUILTIN_NORMS)
def test_mask_and_lengths_give_the_same_result(kind: str) -> None:
    by_lengths = with_random_affine(make_norm(kind, C, "seq"))
    by_mask = copy.deepcopy(by_lengths)
    x = padded_batch()
    out_l, grad_l = train_step(by_lengths, x, lengths=LENGTHS)
    out_m, grad_m = train_step(by_mask, x, mask=valid_mask(LENGTHS, T))
    torch.testing.assert_close(out_m, out_l)
    torch.testing.assert_close(grad_m, grad_l)
    assert_same_state(by_mask, by_lengths)


def test_a_mask_with_holes_selects_exactly_its_steps() -> None:
    norm = with_random_affine(make_norm("bn", C, "seq"))
    reference = nn.BatchNorm1d(C)
    reference.load_state_dict(norm.state_dict())
    mask = torch.rand(B, T) < 0.5
    mask[0, 0] = mask[1, 3] = True
    x = padded_batch(torch.full((B,), T))
    out, grad = train_step(norm, x, mask=mask)
    ref_out, ref_grad = train_step_rows(reference, x, mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)
    assert_same_state(norm, reference)


@pytest.mark.parametrize(
    ("kind", "reference"),
    [("ln", lambda: nn.LayerNorm(C)), ("gn", lambda: nn.GroupNorm(2, C)), ("none", nn.Identity)],
)
def test_per_row_kinds_equal_their_row_norm_on_valid_steps(kind: str, reference: type[nn.Module]) -> None:
    options = {"num_groups": 2} if kind == "gn" else {}
    norm = with_random_affine(make_norm(kind, C, "seq", **options))
    ref = reference()
    ref.load_state_dict(norm.state_dict())
    x = padded_batch()
    mask = valid_mask(LENGTHS, T)
    out, grad = train_step(norm, x, lengths=LENGTHS)
    ref_out, ref_grad = train_step_rows(ref, x, mask)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)


def test_frozen_uses_its_fixed_statistics_on_valid_steps() -> None:
    norm = make_norm("frozen", C, "seq")
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(norm, name).copy_(torch.randn(C))
        norm.running_var.copy_(torch.rand(C) + 0.5)
    x = padded_batch()
    mask = valid_mask(LENGTHS, T)
    expected = (x[mask] - norm.running_mean) / torch.sqrt(norm.running_var + 1e-5) * norm.weight + norm.bias
    out = norm.train()(x, lengths=LENGTHS)
    torch.testing.assert_close(out[mask], expected)
    assert torch.count_nonzero(out[~mask]) == 0


# ----------------------------------------------------------------------------------------------------------
# Bad inputs fail with a message that names the problem


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lengths": torch.tensor([3, 2])}, r"lengths must have shape \(5,\)"),
        ({"lengths": torch.tensor([[3, 2, 1, 1, 1]])}, r"lengths must have shape \(5,\)"),
        ({"lengths": torch.tensor([6, 2, 0, 1, 5])}, r"lengths must lie in \[1, 6\]"),
        ({"lengths": torch.tensor([7, 2, 4, 1, 5])}, r"lengths must lie in \[1, 6\]"),
        ({"mask": torch.ones(5, 7, dtype=torch.bool)}, r"mask must have shape \(5, 6\)"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, r"mask must have shape \(5, 6\)"),
        ({"lengths": LENGTHS, "mask": torch.ones(5, 6, dtype=torch.bool)}, "either lengths or mask"),
    ],
)
def test_bad_lengths_or_mask_raise_a_clear_error(kwargs: dict[str, Tensor], message: str) -> None:
    norm = make_norm("bn", C, "seq")
    with pytest.raises(ValueError, match=message):
        norm(torch.randn(B, T, C), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lengths": torch.tensor([6.0, 2.5, 4.0, 1.0, 5.0])}, "lengths must be an integer tensor.*float32"),
        ({"lengths": [6.0, 2.0, 4.0, 1.0, 5.0]}, "lengths must be an integer tensor.*float32"),
        ({"lengths": torch.ones(B, dtype=torch.bool)}, "lengths must be an integer tensor.*bool"),
        ({"mask": torch.full((B, T), 0.5)}, "mask must be bool.*float32"),
        ({"mask": torch.full((B, T), 2)}, "mask must be bool.*int64"),
    ],
)
def test_lengths_and_masks_that_are_not_integers_are_refused(kwargs: dict[str, Tensor], message: str) -> None:
    # a length of 2.5 used to mark 3 steps valid, a mask of 0.5 every step: silently
    with pytest.raises(TypeError, match=message):
        make_norm("bn", C, "seq")(torch.randn(B, T, C), **kwargs)


def test_an_integer_mask_of_zeros_and_ones_is_a_mask() -> None:
    x = torch.randn(B, T, C)
    mask = valid_mask(LENGTHS, T)
    norm = make_norm("bn", C, "seq")
    torch.testing.assert_close(norm(x, mask=mask.long()), copy.deepcopy(norm)(x, mask=mask))


@pytest.mark.parametrize("shape", [(B, T, C + 1), (B * T, C), (B, T, C, 1)])
def test_bad_input_shape_raises_a_clear_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"expects \(batch, time, {C}\) inputs"):
        make_norm("bn", C, "seq")(torch.randn(shape))
