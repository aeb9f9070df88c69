"""The recurrent zoo: Deep Speech 2 stacks (``ds2_gru``, ``ds2_lstm``) and the BN-LSTM (``bn_lstm``).

References are independent of the model's code: PyTorch's own ``nn.GRU``/``nn.LSTM`` run on each sequence
alone (no padding, no packing), and float64 step-by-step implementations of the GRU/LSTM equations and of
Cooijmans et al. 2016, Eq. 6-8, with batch statistics written out as means and biased variances.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from bnzoo import create_model
from bnzoo.norms import BUILTIN_NORMS, freeze_norms

F, H, CLASSES = 5, 6, 3
LENGTHS = torch.tensor([6, 2, 4, 1, 5])
B, T = len(LENGTHS), int(LENGTHS.max())
DS2 = {"gru": "ds2_gru", "lstm": "ds2_lstm"}


def valid_mask(lengths: Tensor, steps: int) -> Tensor:
    return torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)


def padded_batch(lengths: Tensor = LENGTHS, steps: int = T, pad_value: float = 50.0) -> Tensor:
    """A float64 (B, steps, F) batch whose padded steps hold a large constant that must not leak."""
    x = torch.randn(len(lengths), steps, F, dtype=torch.float64) * 1.5 + 0.3
    return x.masked_fill(~valid_mask(lengths, steps).unsqueeze(-1), pad_value)


def randomize_norms(model: nn.Module) -> nn.Module:
    """Random affine parameters of every norm, so that an identity-like norm cannot hide a mistake."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def sigmoid(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def gru_step(z: Tensor, h: Tensor, weight_hh: Tensor, bias_hh: Tensor) -> Tensor:
    """PyTorch's GRU cell with the input term z = W_ih x + b_ih given (nn.GRU's documented equations)."""
    z_r, z_u, z_n = z.chunk(3, -1)
    h_r, h_u, h_n = (h @ weight_hh.T + bias_hh).chunk(3, -1)
    r, u = sigmoid(z_r + h_r), sigmoid(z_u + h_u)
    n = torch.tanh(z_n + r * h_n)
    return (1 - u) * n + u * h


def lstm_step(z: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor, bias_hh: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's LSTM cell with the input term z given; gates in the order (i, f, g, o)."""
    i, f, g, o = (z + h @ weight_hh.T + bias_hh).chunk(4, -1)
    c = sigmoid(f) * c + sigmoid(i) * torch.tanh(g)
    return sigmoid(o) * torch.tanh(c), c


def reference_recurrence(z: Tensor, length: int, weights: list[tuple[Tensor, Tensor]], cell: str) -> Tensor:
    """One sequence's outputs (length, directions * H) given its input terms z (T, directions * gates * H).

    ``weights`` holds (U, b_hh) per direction; direction d reads block d of z and the reverse direction runs
    from the last valid step back to step 0.
    """
    outputs = []
    for d, (weight_hh, bias_hh) in enumerate(weights):
        block = z[:length].chunk(len(weights), -1)[d]
        steps = range(length) if d == 0 else range(length - 1, -1, -1)
        h = c = torch.zeros(weight_hh.shape[1], dtype=z.dtype)
        out = torch.zeros(length, weight_hh.shape[1], dtype=z.dtype)
        for t in steps:
            if cell == "gru":
                h = gru_step(block[t], h, weight_hh, bias_hh)
            else:
                h, c = lstm_step(block[t], h, c, weight_hh, bias_hh)
            out[t] = h
        outputs.append(out)
    return torch.cat(outputs, -1)


def capture(module: nn.Module, store: dict[str, object]) -> None:
    """Record a module's positional input, keyword arguments and output on every call."""

    def hook(_: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        store["input"], store["kwargs"], store["output"] = args[0], kwargs, output

    module.register_forward_hook(hook, with_kwargs=True)


def check_trains(model: nn.Module, x: Tensor, lengths: Tensor | None) -> None:
    """Forward shape, finite outputs, and a gradient for every trainable parameter."""
    logits = model(x, lengths)
    assert logits.shape == (x.shape[0], CLASSES)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"no gradient reaches {name}"
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------------------
# Deep Speech 2: the stack without the norm is PyTorch's GRU/LSTM stack


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pool", ["last", "mean"])
def test_ds2_without_norm_equals_a_plain_rnn_stack(cell: str, bidirectional: bool, pool: str) -> None:
    options = {"hidden_size": H, "num_layers": 2, "bidirectional": bidirectional, "pool": pool}
    model = create_model(DS2[cell], norm="none", input_size=F, num_classes=CLASSES, **options).double()
    rnn_class = nn.GRU if cell == "gru" else nn.LSTM
    reference = rnn_class(F, H, num_layers=2, bidirectional=bidirectional, batch_first=True).double()
    with torch.no_grad():
        for layer_index, layer in enumerate(model.layers):
            for name, param in layer.rnn.named_parameters():  # weight_ih_l0, ..., bias_hh_l0_reverse
                getattr(reference, name.replace("_l0", f"_l{layer_index}")).copy_(param)
    x = padded_batch()
    logits = model(x, LENGTHS)
    directions = 2 if bidirectional else 1
    for b, length in enumerate(LENGTHS.tolist()):
        out, hidden = reference(x[b : b + 1, :length])
        h_n = hidden[0] if cell == "lstm" else hidden
        features = out[0].mean(0) if pool == "mean" else h_n[-directions:, 0].reshape(-1)
        torch.testing.assert_close(logits[b], model.fc(features))


# ----------------------------------------------------------------------------------------------------------
# Deep Speech 2 with a norm: h_t = f(B(W x_t) + U h_{t-1})


def padded(steps: Tensor | PackedSequence) -> Tensor:
    """A layer's outputs as a (B, T, D) tensor (packed outputs are unpacked, zero at padded steps)."""
    if isinstance(steps, PackedSequence):
        return pad_packed_sequence(steps, batch_first=True, total_length=T)[0]
    return steps


def same_rows(actual: Tensor, expected: Tensor) -> None:
    """The same (M, C) rows, in any order (the layer may order the valid steps as it likes)."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual[actual[:, 0].argsort()], expected[expected[:, 0].argsort()])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_ds2_normalizes_exactly_the_input_term(bidirectional: bool) -> None:
    model = create_model(
        "ds2_gru", norm="bn", input_size=F, hidden_size=H, num_layers=2, bidirectional=bidirectional
    ).double()
    calls: list[dict[str, object]] = [{}, {}]
    first_layer: dict[str, object] = {}
    for layer, store in zip(model.layers, calls, strict=True):
        capture(layer.norm, store)
    capture(model.layers[0], first_layer)
    x = padded_batch()
    model(x, LENGTHS)
    valid = valid_mask(LENGTHS, T)
    layer_inputs = [x, padded(first_layer["output"][0])]
    for store, layer, layer_input in zip(calls, model.layers, layer_inputs, strict=True):
        assert layer.input_proj.bias is None  # the norm's beta replaces it
        # The norm sees W x_t of the valid steps and nothing else, as one sequence without padding ...
        expected = layer_input[valid] @ layer.input_proj.weight.T
        assert store["input"].dim() == 3 and store["input"].shape[0] == 1 and not store["kwargs"]
        same_rows(store["input"][0], expected)
        # ... and its output is BatchNorm over exactly those rows (Amodei et al. 2016, Sec. 3.2).
        mean, var = expected.mean(0), expected.var(0, unbiased=False)
        normalized = (expected - mean) / torch.sqrt(var + 1e-5) * layer.norm.weight + layer.norm.bias
        same_rows(store["output"][0], normalized)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_ds2_recurrence_receives_exactly_the_normalized_term(cell: str, bidirectional: bool) -> None:
    model = create_model(DS2[cell], norm="bn", input_size=F, hidden_size=H, num_layers=1, bidirectional=bidirectional)
    model = randomize_norms(model).double()
    layer = model.layers[0]
    norm_call: dict[str, object] = {}
    layer_call: dict[str, object] = {}
    capture(layer.norm, norm_call)
    capture(layer, layer_call)
    model(padded_batch(), LENGTHS)
    packing = layer_call["input"]  # the layer's packed input: which row is which step
    z = padded(PackedSequence(norm_call["output"][0], *packing[1:])).detach()
    outputs, final = padded(layer_call["output"][0]), layer_call["output"][1]
    suffixes = ["", "_reverse"] if bidirectional else [""]
    rnn = layer.rnn
    weights = [(getattr(rnn, f"weight_hh_l0{d}"), getattr(rnn, f"bias_hh_l0{d}")) for d in suffixes]
    for b, length in enumerate(LENGTHS.tolist()):
        expected = reference_recurrence(z[b], length, weights, cell)
        torch.testing.assert_close(outputs[b, :length], expected)
        last = expected[length - 1, :H]
        torch.testing.assert_close(final[b], torch.cat([last, expected[0, H:]]) if bidirectional else last)


@pytest.mark.parametrize("name", ["ds2_gru", "ds2_lstm", "bn_lstm"])
@pytest.mark.parametrize("norm", ["bn", "renorm", "none"])
def test_padding_does_not_change_the_valid_sequences(name: str, norm: str) -> None:
    options = {"bidirectional": True} if name != "bn_lstm" else {"max_steps": T + 4}
    build = {"norm": norm, "input_size": F, "hidden_size": H, "num_layers": 2, "num_classes": CLASSES}
    short = randomize_norms(create_model(name, **build, **options)).double()
    long = create_model(name, **build, **options).double()
    long.load_state_dict(short.state_dict())
    for _ in range(2):  # training mode: statistics over the valid steps only
        x = padded_batch()
        x_long = torch.cat([x, torch.full((B, 4, F), -30.0, dtype=x.dtype)], dim=1)
        torch.testing.assert_close(long(x_long, LENGTHS), short(x, LENGTHS))
    for key, value in short.state_dict().items():
        torch.testing.assert_close(long.state_dict()[key], value, msg=key)
    # Inference: every sequence's logits are its own, whatever it is batched and padded with.
    short.eval()
    x = padded_batch()
    batched = short(x, LENGTHS)
    for b, length in enumerate(LENGTHS.tolist()):
        torch.testing.assert_close(batched[b], short(x[b : b + 1, :length])[0])


# ----------------------------------------------------------------------------------------------------------
# BN-LSTM (Cooijmans et al. 2016)


def test_bn_lstm_without_norm_equals_nn_lstm() -> None:
    model = create_model(
        "bn_lstm", norm="none", input_size=F, hidden_size=H, num_layers=2, num_classes=CLASSES, max_steps=3
    ).double()
    reference = nn.LSTM(F, H, num_layers=2, batch_first=True).double()
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            getattr(reference, f"weight_ih_l{index}").copy_(layer.weight_ih)
            getattr(reference, f"weight_hh_l{index}").copy_(layer.weight_hh)
            getattr(reference, f"bias_ih_l{index}").copy_(layer.bias)
            getattr(reference, f"bias_hh_l{index}").zero_()
    x = padded_batch()
    logits = model(x, LENGTHS)
    for b, length in enumerate(LENGTHS.tolist()):
        _, (h_n, _) = reference(x[b : b + 1, :length])
        torch.testing.assert_close(logits[b], model.fc(h_n[-1, 0]))


def reference_bn_lstm(
    layer: nn.Module, x: Tensor, lengths: Tensor, eps: float = 1e-5
) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """Cooijmans et al. 2016, Eq. 6-8 in float64 with per-step batch statistics over the running sequences.

    Returns the final hidden states (B, H) and, per step, the batch means of W_x x_t, W_h h_{t-1} and c_t.
    """

    def bn(v: Tensor, gamma: Tensor, beta: Tensor | float) -> Tensor:
        return gamma * (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + eps) + beta

    gamma_x, gamma_h = layer.norm_ih.steps[0].weight, layer.norm_hh.steps[0].weight
    gamma_c, beta_c = layer.norm_cell.steps[0].weight, layer.norm_cell.steps[0].bias
    h = torch.zeros(x.shape[0], layer.hidden_size, dtype=x.dtype)
    c = torch.zeros_like(h)
    means = []
    for t in range(x.shape[1]):
        running = lengths > t
        wx, wh = x[running, t] @ layer.weight_ih.T, h[running] @ layer.weight_hh.T
        i, f, g, o = (bn(wx, gamma_x, 0.0) + bn(wh, gamma_h, 0.0) + layer.bias).chunk(4, -1)  # Eq. 6
        c_t = sigmoid(f) * c[running] + sigmoid(i) * torch.tanh(g)  # Eq. 7
        h[running] = sigmoid(o) * torch.tanh(bn(c_t, gamma_c, beta_c))  # Eq. 8
        c[running] = c_t
        means.append((wx.mean(0), wh.mean(0), c_t.mean(0)))
    return h, means


def test_bn_lstm_follows_equations_6_to_8_with_per_step_statistics() -> None:
    lengths = torch.tensor([5, 3, 5, 2, 4, 3])  # every step has >= 2 running sequences
    model = create_model("bn_lstm", norm="bn", input_size=F, hidden_size=H, num_classes=CLASSES, max_steps=8)
    model = randomize_norms(model).double()
    layer = model.layers[0]
    x = padded_batch(lengths, 5)
    final, means = reference_bn_lstm(layer, x, lengths)
    torch.testing.assert_close(model(x, lengths), model.fc(final))
    for t, (mean_x, mean_h, mean_c) in enumerate(means):  # momentum 0.1 from a zero running mean
        torch.testing.assert_close(layer.norm_ih.steps[t].running_mean, 0.1 * mean_x)
        torch.testing.assert_close(layer.norm_hh.steps[t].running_mean, 0.1 * mean_h)
        torch.testing.assert_close(layer.norm_cell.steps[t].running_mean, 0.1 * mean_c)
    for t in range(5, 8):
        assert layer.norm_ih.steps[t].num_batches_tracked == 0


def record_calls(module: nn.Module) -> list[tuple[Tensor, Tensor, bool]]:
    """Every call of ``module``: (input, output, whether it was in training mode)."""
    calls: list[tuple[Tensor, Tensor, bool]] = []
    module.register_forward_hook(lambda m, args, out: calls.append((args[0], out, m.training)))
    return calls


def test_bn_lstm_step_norm_sees_exactly_the_running_sequences_input_terms() -> None:
    lengths = torch.tensor([6, 2, 4, 6, 5])  # every step has >= 2 running sequences
    model = create_model("bn_lstm", input_size=F, hidden_size=H, max_steps=T).double()
    layer = model.layers[0]
    calls = [record_calls(step_norm) for step_norm in layer.norm_ih.steps]
    x = padded_batch(lengths)
    model(x, lengths)
    for t, step_calls in enumerate(calls):
        assert len(step_calls) == 1
        expected = x[lengths > t, t] @ layer.weight_ih.T  # the sequences still running, nothing else
        same_rows(step_calls[0][0], expected)


def test_bn_lstm_inference_beyond_the_trained_length_reuses_the_last_step() -> None:
    model = create_model("bn_lstm", input_size=F, hidden_size=H, max_steps=10)
    layer = model.layers[0]
    model(torch.randn(4, 4, F))  # trains steps 0..3
    assert int(layer.trained_steps) == 4
    calls = [0] * 10
    for t, step_norm in enumerate(layer.norm_ih.steps):
        step_norm.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    model.eval()(torch.randn(3, 7, F))
    assert calls == [1, 1, 1, 4, 0, 0, 0, 0, 0, 0]
    # Training on sequences longer than max_steps: the steps beyond share the last step's norm.
    short_memory = create_model("bn_lstm", input_size=F, hidden_size=H, max_steps=3)
    short_memory(torch.randn(4, 6, F))
    assert int(short_memory.layers[0].trained_steps) == 3
    assert int(short_memory.layers[0].norm_cell.steps[2].num_batches_tracked) == 4


def test_bn_lstm_a_step_with_one_running_sequence_is_normalized_as_at_inference() -> None:
    model = create_model("bn_lstm", input_size=F, hidden_size=H, max_steps=5)
    layer = model.layers[0]
    calls = [record_calls(step_norm) for step_norm in layer.norm_cell.steps]
    model(torch.randn(3, 4, F), torch.tensor([4, 2, 2]))  # steps 2 and 3 have a single running sequence
    assert int(layer.trained_steps) == 2
    assert [int(n.num_batches_tracked) for n in layer.norm_cell.steps] == [1, 1, 0, 0, 0]
    # Steps 2 and 3 use the population statistics of step 1, the last one trained, as inference would.
    assert [len(c) for c in calls] == [1, 3, 0, 0, 0]
    norm = layer.norm_cell.steps[1]
    assert norm.training and [training for _, _, training in calls[1]] == [True, False, False]
    for row, out, _ in calls[1][1:]:
        expected = (row - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
        torch.testing.assert_close(out, expected)


def test_bn_lstm_initialization_and_shared_affine_parameters() -> None:
    layer = create_model("bn_lstm", input_size=F, hidden_size=H, max_steps=4).layers[0]
    for per_step in (layer.norm_ih, layer.norm_hh, layer.norm_cell):
        first = per_step.steps[0]
        torch.testing.assert_close(first.weight, torch.full_like(first.weight, 0.1))  # gamma = 0.1 (Sec. 4)
        assert torch.count_nonzero(first.bias) == 0
        assert all(step.weight is first.weight and step.bias is first.bias for step in per_step.steps)
    # beta_x = beta_h = 0 stay fixed (Eq. 6, b carries the shift); beta_c is learned (Eq. 8).
    assert not layer.norm_ih.steps[0].bias.requires_grad and not layer.norm_hh.steps[0].bias.requires_grad
    assert layer.norm_cell.steps[0].bias.requires_grad
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {
        "weight_ih",
        "weight_hh",
        "bias",
        "norm_ih.steps.0.weight",
        "norm_hh.steps.0.weight",
        "norm_cell.steps.0.weight",
        "norm_cell.steps.0.bias",
    }
    custom = create_model("bn_lstm", input_size=F, hidden_size=H, max_steps=2, gamma_init=1.0).layers[0]
    assert bool((custom.norm_hh.steps[1].weight == 1.0).all())


# ----------------------------------------------------------------------------------------------------------
# Every norm kind x cell x direction: trains, evaluates, round-trips through a state dict


MATRIX = [(DS2[cell], {"bidirectional": bi}) for cell in ("gru", "lstm") for bi in (False, True)]
MATRIX.append(("bn_lstm", {"max_steps": 4}))


@pytest.mark.parametrize("norm", BUILTIN_NORMS)
@pytest.mark.parametrize(("name", "options"), MATRIX, ids=[f"{n}-{o}" for n, o in MATRIX])
def test_every_norm_kind_trains_evaluates_and_round_trips(name: str, options: dict, norm: str) -> None:
    build = {"norm": norm, "input_size": F, "hidden_size": 4, "num_layers": 2, "num_classes": CLASSES}
    model = create_model(name, **build, **options)
    x = torch.randn(B, T, F)
    check_trains(model, x, LENGTHS)
    model.eval()
    with torch.no_grad():
        logits = model(x, LENGTHS)
    assert torch.isfinite(logits).all()
    restored = create_model(name, **build, **options).eval()
    restored.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(x, LENGTHS), logits)


# ----------------------------------------------------------------------------------------------------------
# Options and inputs fail clearly


@pytest.mark.parametrize(
    ("name", "options", "error", "message"),
    [
        ("ds2_gru", {"norm": "bm"}, ValueError, "unknown norm kind 'bm'.*valid kinds"),
        ("ds2_gru", {"norm_options": {"r_max": 2.0}}, ValueError, "unknown option.*r_max"),
        ("ds2_lstm", {"norm_options": "eps=1"}, TypeError, "norm_options must be a dict"),
        ("ds2_gru", {"norm": "none", "norm_options": {"eps": 1e-3}}, ValueError, "unknown option.*eps"),
        ("ds2_gru", {"hidden_size": 0}, ValueError, "hidden_size must be a positive int"),
        ("ds2_lstm", {"num_layers": 0}, ValueError, "num_layers must be a positive int"),
        ("ds2_lstm", {"bidirectional": "yes"}, ValueError, "bidirectional must be True or False"),
        ("ds2_gru", {"input_size": 2.5}, ValueError, "input_size must be a positive int"),
        ("ds2_gru", {"pool": "max"}, ValueError, "unknown pool 'max'; valid choices: last, mean"),
        ("ds2_gru", {"dropout": 1.0}, ValueError, r"dropout must be a float in \[0, 1\)"),
        ("bn_lstm", {"max_steps": 0}, ValueError, "max_steps must be a positive int"),
        ("bn_lstm", {"gamma_init": "0.1"}, ValueError, "gamma_init must be a float"),
        ("bn_lstm", {"cell": "gru"}, ValueError, "unknown option.*cell"),
    ],
)
def test_bad_options_fail_at_construction(name: str, options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        create_model(name, **options)


@pytest.mark.parametrize("name", ["ds2_gru", "bn_lstm"])
@pytest.mark.parametrize(
    ("x_shape", "lengths", "error", "message"),
    [
        ((B, T, F + 1), None, ValueError, rf"expects inputs of shape \(batch, time, {F}\)"),
        ((B, F), None, ValueError, "expects inputs of shape"),
        ((B, T, F), torch.tensor([1, 2]), ValueError, r"lengths must have shape \(5,\)"),
        ((B, T, F), torch.tensor([7, 1, 1, 1, 1]), ValueError, r"lengths must lie in \[1, 6\]"),
        ((B, T, F), torch.tensor([0, 1, 1, 1, 1]), ValueError, r"lengths must lie in \[1, 6\]"),
        ((B, T, F), torch.full((B,), 2.0), TypeError, "lengths must be an integer tensor.*float32"),
    ],
)
def test_bad_inputs_fail_clearly(name: str, x_shape: tuple, lengths: Tensor | None, error: type, message: str) -> None:
    model = create_model(name, input_size=F, hidden_size=4, **({"max_steps": T} if name == "bn_lstm" else {}))
    with pytest.raises(error, match=message):
        model(torch.randn(x_shape), lengths)


def test_dropout_acts_between_layers_in_training_only() -> None:
    torch.manual_seed(1)
    model = create_model("ds2_gru", input_size=F, hidden_size=H, num_layers=2, dropout=0.5)
    plain = create_model("ds2_gru", input_size=F, hidden_size=H, num_layers=2)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(B, T, F)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))
    model.train(), plain.train()
    assert not torch.allclose(model(x), plain(x))


@pytest.mark.parametrize("name", ["ds2_gru", "ds2_lstm", "bn_lstm"])
def test_weights_move_between_batch_norm_kinds(name: str) -> None:
    """bn and renorm layers keep nn.BatchNorm's state-dict keys; the identity input weights are not state."""
    options = {"input_size": F, "hidden_size": 4, "num_layers": 2}
    options.update({"max_steps": 3} if name == "bn_lstm" else {"bidirectional": True})
    bn, renorm = create_model(name, norm="bn", **options), create_model(name, norm="renorm", **options)
    assert not any("weight_ih_l0" in key or "bias_ih_l0" in key for key in bn.state_dict())
    renorm.load_state_dict(bn.state_dict())
    bn.eval(), renorm.eval()
    x = torch.randn(B, T, F)
    torch.testing.assert_close(renorm(x, LENGTHS), bn(x, LENGTHS))  # same inference with the same statistics


@pytest.mark.parametrize("name", ["ds2_gru", "bn_lstm"])
def test_freezing_the_norms_keeps_inference(name: str) -> None:
    model = create_model(name, input_size=F, hidden_size=4, **({"max_steps": T} if name == "bn_lstm" else {}))
    x = torch.randn(B, T, F)
    for _ in range(3):
        model(x, LENGTHS)
    expected = model.eval()(x, LENGTHS)
    frozen = freeze_norms(model)
    assert not any(isinstance(m, _BatchNorm) for m in frozen.modules())
    torch.testing.assert_close(frozen.train()(x, LENGTHS), expected)


# ----------------------------------------------------------------------------------------------------------
# BN-LSTM under NormSync: refused by name (per-step collectives would deadlock)

SYNC_REFUSAL = r"PerStepNorm \(the BN-LSTM's per-step norms, Batch\w+\) cannot be synchronized across processes"


def _bn_lstm(norm: str = "bn") -> nn.Module:
    torch.manual_seed(0)
    return create_model("bn_lstm", norm=norm, input_size=F, hidden_size=4, max_steps=T)


def tracked(model: nn.Module) -> dict[str, int]:
    return {key: int(value) for key, value in model.state_dict().items() if key.endswith("num_batches_tracked")}


@pytest.mark.parametrize("norm", ["bn", "renorm"])
def test_synchronized_bn_lstm_is_refused_on_several_processes(norm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    rnn = importlib.import_module("bnzoo.models.rnn.bn_lstm")
    from bnzoo.plugins import convert_sync_norms

    model = convert_sync_norms(_bn_lstm(norm))
    x = torch.randn(B, T, F)
    model(x, LENGTHS)  # one process: synchronizing is a no-op, nothing to refuse
    counts = tracked(model)
    monkeypatch.setattr(rnn, "is_distributed", lambda group=None: True)  # as if 2 processes were synchronized
    with pytest.raises(RuntimeError, match=SYNC_REFUSAL):
        model(x, LENGTHS)
    assert tracked(model) == counts  # refused at the first step norm, before it counted anything
    model.eval()(x, LENGTHS)  # inference synchronizes nothing: allowed


def _shard(rank: int) -> tuple[Tensor, Tensor]:
    """Each process's batch: unequal maximum lengths, so unequal numbers of per-step collectives."""
    lengths = [torch.tensor([6, 3, 2]), torch.tensor([4, 1])][rank]
    return torch.randn(len(lengths), T, F, generator=torch.Generator().manual_seed(rank)), lengths


def _synchronized_bn_lstm_worker(rank: int, world_size: int) -> dict:
    from bnzoo.plugins import convert_sync_norms

    model = convert_sync_norms(_bn_lstm())
    x, lengths = _shard(rank)
    try:
        model(x, lengths)
        error = ""
    except RuntimeError as raised:
        error = str(raised)
    with torch.no_grad():
        return {"error": error, "eval": model.eval()(x, lengths)}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_synchronized_bn_lstm_is_refused_on_two_gloo_processes(tmp_path: Path) -> None:
    """Each process raises instead of deadlocking (rank 1's batch is shorter: it would make fewer per-step
    all-reduces); inference, which synchronizes nothing, still runs and equals one process's."""
    from tests.distributed import run_in_processes

    for rank, result in enumerate(run_in_processes(_synchronized_bn_lstm_worker, 2, tmp_path)):
        assert re.match(SYNC_REFUSAL, result["error"]), f"rank {rank}: {result['error']!r}"
        x, lengths = _shard(rank)
        with torch.no_grad():
            torch.testing.assert_close(result["eval"], _bn_lstm().eval()(x, lengths))
