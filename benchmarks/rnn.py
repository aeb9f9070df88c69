"""Speed of the recurrent zoo and of the padding-aware sequence norm (CPU, interleaved rounds).

Run: ``cd /work/main && OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.rnn [--quick]``

1. Training step (forward, cross-entropy, backward, SGD step) of a Deep Speech 2 stack on a padded batch
   with lengths: norm ``bn`` (baseline) vs ``none`` vs ``renorm``, and vs a plain ``nn.GRU``/``nn.LSTM``
   stack of the same size (one multi-layer module, no normalization). Target: renorm within 1.15x of bn.
   Also the ``bn`` model's layers run on the batch packed beforehand ("bn, pre-packed"): the padded batch
   with lengths must cost at most 1.1x that (the model packs once at its input, not per layer).
2. ``make_norm("bn", C, "seq")`` on a padded (B, T, C) batch with lengths vs ``nn.BatchNorm1d`` on the same
   data unpadded (the M valid rows only), forward + backward; and the same seq norm on the valid rows as one
   sequence (1, M, C), which is how the DS2 stack calls it on a packed batch. Targets: padded + lengths
   within 2.5x, the valid rows as one sequence within 1.3x.
3. (Not with ``--quick``.) A prototype of a faster exact DS2 layer: BatchNorm folded into the GRU's input
   weight, ``B(W x) = (s * W) x + c`` with the per-channel ``s = gamma / sigma_B`` and
   ``c = beta - s * mu_B``, so the fused kernel reads ``x`` with the weight ``s * W`` and no identity
   product is needed. Checked against the model's layer (outputs and gradients) before it is timed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from bnzoo import create_model
from bnzoo.models.rnn import SequenceWiseNormRNN
from bnzoo.norms import make_norm

from .timing import compare, format_table, machine_line

BATCH, STEPS, FEATURES, CLASSES = 64, 28, 28, 10


def random_lengths(batch: int, steps: int, generator: torch.Generator) -> Tensor:
    """Lengths uniform in [steps/2, steps], the longest equal to ``steps`` (about 75% of the steps valid)."""
    lengths = torch.randint(steps // 2, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    return lengths


class PlainRNNClassifier(nn.Module):
    """The baseline: one multi-layer ``nn.GRU``/``nn.LSTM`` over the packed batch and a linear classifier."""

    def __init__(self, cell: str, hidden: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        rnn_class = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn_class(FEATURES, hidden, layers, batch_first=True, bidirectional=bidirectional)
        self.directions = 2 if bidirectional else 1
        self.fc = nn.Linear(self.directions * hidden, CLASSES)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        _, hidden = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.fc(h_n[-self.directions :].transpose(0, 1).reshape(x.shape[0], -1))


class PrePacked(nn.Module):
    """A recurrent classifier's layers and linear readout (``pool="last"``) run on a batch packed beforehand:
    what the classifier computes on the padded batch with lengths, less its input handling and packing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: PackedSequence, lengths: Tensor) -> Tensor:
        steps = packed
        for layer in self.model.layers:
            steps, final = layer(steps)
        return self.model.fc(final)


def training_step(model: nn.Module, x: Tensor, lengths: Tensor, targets: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, lengths), targets).backward()
        optimizer.step()

    return step


def bench_ds2(quick: bool, rounds: int) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    configs = [("gru", 128, 3, False)]
    if not quick:
        configs += [("gru", 256, 3, False), ("lstm", 128, 3, False), ("gru", 128, 3, True)]
    rows: list[dict[str, object]] = []
    for cell, hidden, layers, bidirectional in configs:
        x = torch.randn(BATCH, STEPS, FEATURES, generator=generator)
        lengths = random_lengths(BATCH, STEPS, generator)
        targets = torch.randint(0, CLASSES, (BATCH,), generator=generator)
        options = {"hidden_size": hidden, "num_layers": layers, "bidirectional": bidirectional}
        models = {norm: create_model(f"ds2_{cell}", norm=norm, **options) for norm in ("bn", "none", "renorm")}
        plain = f"plain nn.{cell.upper()}"
        models[plain] = PlainRNNClassifier(cell, hidden, layers, bidirectional)
        candidates = {name: training_step(m, x, lengths, targets) for name, m in models.items()}
        pre_packed = create_model(f"ds2_{cell}", norm="bn", **options)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        candidates["bn, pre-packed"] = training_step(PrePacked(pre_packed), packed, lengths, targets)  # type: ignore[arg-type]
        times = compare(candidates, rounds)
        setup = f"{cell} H={hidden} L={layers} {'bi' if bidirectional else 'uni'}"
        for name, seconds in times.items():
            ratios = {
                "vs bn": seconds / times["bn"],
                "vs plain": seconds / times[plain],
                "vs pre-packed": seconds / times["bn, pre-packed"],
            }
            rows.append({"setup": setup, "model": name, "ms/step": seconds * 1e3, **ratios})
    return rows


def _norm_step(norm: nn.Module, x: Tensor, grad: Tensor, **kwargs: Tensor) -> Callable[[], None]:
    def step() -> None:
        norm(x, **kwargs).backward(grad)

    return step


def bench_sequence_norm(quick: bool, rounds: int) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(1)
    shapes = [(64, 28, 384)]
    if not quick:
        shapes += [(32, 100, 256), (16, 200, 1024), (128, 50, 64)]
    rows: list[dict[str, object]] = []
    for batch, steps, channels in shapes:
        lengths = random_lengths(batch, steps, generator)
        x = torch.randn(batch, steps, channels, generator=generator).requires_grad_(True)
        mask = torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)
        valid_rows = x.detach()[mask].clone().requires_grad_(True)
        seq_norm, reference = make_norm("bn", channels, "seq"), nn.BatchNorm1d(channels)
        grad_padded, grad_rows = torch.randn_like(x), torch.randn_like(valid_rows)
        candidates = {
            "BatchNorm1d (M valid rows)": _norm_step(reference, valid_rows, grad_rows),
            "seq bn (B, T, C) + lengths": _norm_step(seq_norm, x, grad_padded, lengths=lengths),
            "seq bn (1, M, C) valid rows": _norm_step(seq_norm, valid_rows[None], grad_rows[None]),
        }
        times = compare(candidates, rounds)
        base = times["BatchNorm1d (M valid rows)"]
        shape = f"{batch}x{steps}x{channels} ({int(lengths.sum()) / (batch * steps):.0%} valid)"
        for name, seconds in times.items():
            rows.append({"B x T x C": shape, "layer": name, "ms": seconds * 1e3, "vs BatchNorm1d": seconds / base})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Prototype: BatchNorm folded into the fused kernel's input weight


class FoldedBatchNormGRU(nn.Module):
    """A DS2 ``bn`` GRU layer (training mode) computed without the identity product: a prototype.

    It shares the parameters of ``layer`` (a :class:`SequenceWiseNormRNN` with a BatchNorm) and computes the
    same outputs and gradients: with the batch moments ``mu_B``, ``sigma_B`` of ``z = W x`` (differentiable),
    ``B(z) = s * z + c`` for ``s = gamma / sigma_B``, ``c = beta - s * mu_B``, so the kernel gets ``x``, the
    input weight ``s * W`` and the input bias ``c``. ``z`` is still computed, for the moments only. It does
    not update the running statistics (a real version would ask the norm for ``s`` and ``c``).
    """

    def __init__(self, layer: SequenceWiseNormRNN) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: PackedSequence) -> tuple[PackedSequence, Tensor]:
        layer, norm = self.layer, self.layer.norm
        z = F.linear(x.data, layer.input_proj.weight)
        var, mean = torch.var_mean(z, dim=0, correction=0)
        scale = norm.weight * torch.rsqrt(var + norm.eps)
        shift = norm.bias - mean * scale
        weight = layer.input_proj.weight * scale.unsqueeze(1)
        directions = 2 if layer.bidirectional else 1
        weights: list[Tensor] = []
        for d, suffix in enumerate(["", "_reverse"][:directions]):
            rows = slice(d * weight.shape[0] // directions, (d + 1) * weight.shape[0] // directions)
            weights += [weight[rows], getattr(layer.rnn, f"weight_hh_l0{suffix}"), shift[rows]]
            weights.append(getattr(layer.rnn, f"bias_hh_l0{suffix}"))
        h0 = x.data.new_zeros(directions, int(x.batch_sizes[0]), layer.hidden_size)
        out, h_n = _VF.gru(x.data, x.batch_sizes, h0, weights, True, 1, 0.0, True, layer.bidirectional)
        return PackedSequence(out, *x[1:]), h_n.index_select(1, x.unsorted_indices)


def _layer_step(layer: Callable[[PackedSequence], tuple], packed: PackedSequence, grad: Tensor) -> Callable[[], None]:
    def step() -> None:
        out, _ = layer(packed)
        out.data.backward(grad)

    return step


def _check_fold(layer: SequenceWiseNormRNN, folded: FoldedBatchNormGRU, packed: PackedSequence, grad: Tensor) -> None:
    """The prototype must give the model layer's outputs and gradients (float64, running stats aside)."""
    layer64, folded64 = layer.double(), folded.double()
    packed64 = PackedSequence(packed.data.double().requires_grad_(True), *packed[1:])
    results = []
    for run in (layer64, folded64):
        layer64.zero_grad(set_to_none=True)
        packed64.data.grad = None
        out, _ = run(packed64)
        out.data.backward(grad.double())
        results.append([out.data, packed64.data.grad, *(p.grad for p in layer64.parameters())])
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected)
    layer.float()


def bench_fold_prototype(rounds: int) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(2)
    rows: list[dict[str, object]] = []
    for features, hidden, bidirectional in [
        (28, 128, False),
        (128, 128, False),
        (256, 256, False),
        (128, 128, True),
    ]:
        x = torch.randn(BATCH, STEPS, features, generator=generator)
        packed = pack_padded_sequence(
            x, random_lengths(BATCH, STEPS, generator), batch_first=True, enforce_sorted=False
        )
        layer = SequenceWiseNormRNN(features, hidden, cell="gru", bidirectional=bidirectional, norm="bn")
        plain = SequenceWiseNormRNN(features, hidden, cell="gru", bidirectional=bidirectional, norm="none")
        folded = FoldedBatchNormGRU(layer)
        grad = torch.randn(packed.data.shape[0], layer.output_size, generator=generator)
        _check_fold(layer, folded, packed, grad)
        candidates = {
            "bn, identity input weight (model)": _layer_step(layer, packed, grad),
            "bn, folded into W_ih (prototype)": _layer_step(folded, packed, grad),
            "none (nn.GRU)": _layer_step(plain, packed, grad),
        }
        times = compare(candidates, rounds)
        base = times["none (nn.GRU)"]
        setup = f"F={features} H={hidden} {'bi' if bidirectional else 'uni'}"
        for name, seconds in times.items():
            rows.append({"layer": setup, "variant": name, "ms": seconds * 1e3, "vs nn.GRU": seconds / base})
    return rows


TABLES = ("ds2", "seq", "fold")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one setup per table, fewer rounds, no prototype")
    parser.add_argument(
        "--tables", nargs="+", choices=TABLES, default=list(TABLES), help="which tables to run (default: all)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, --quick 5)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    torch.manual_seed(0)
    print(machine_line())
    if "ds2" in args.tables:
        print(f"\n## DS2 training step (batch {BATCH}, {STEPS} steps, {FEATURES} features, lengths 14..28)\n")
        columns = ["setup", "model", "ms/step", "vs bn", "vs plain", "vs pre-packed"]
        print(format_table(bench_ds2(args.quick, rounds), columns))
    if "seq" in args.tables:
        print("\n## Sequence-wise BatchNorm vs BatchNorm1d on the valid rows (forward + backward)\n")
        table = bench_sequence_norm(args.quick, rounds)
        print(format_table(table, ["B x T x C", "layer", "ms", "vs BatchNorm1d"]))
    if "fold" in args.tables and not args.quick:
        print("\n## One DS2 GRU layer, training step on a packed batch (prototype: fold the norm into W_ih)\n")
        print(format_table(bench_fold_prototype(rounds), ["layer", "variant", "ms", "vs nn.GRU"]))


if __name__ == "__main__":
    main()
