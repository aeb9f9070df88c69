"""Training steps per second of the tasks eager vs ``compile: true`` (inductor), for every norm kind.

What ``--model.init_args.compile true`` gives: each workload is the task itself (``ImageClassifier`` /
``SequenceClassifier``, channels-last images as by default), its network compiled in place by the task's own
``configure_model`` (:mod:`bnzoo.tasks.compiling`), against an uncompiled copy with the same weights. A step is
the task's forward + loss (cross-entropy) + backward + SGD (momentum 0.9, the optimizer is not compiled) on one
fixed batch in training mode. Eager and compiled are timed in interleaved rounds of one run
(:func:`benchmarks.timing.compare`) and the ratio is compiled / eager time per step (< 1: compiled is faster).

The warm-up is reported separately: the wall time of the first two compiled steps (dynamo + AOTAutograd +
inductor for the forward and the backward graph; the C++ compiler included) minus two steady compiled steps,
and the CPU time of those two steps (this process and its compiler children: the figure that a loaded
machine does not inflate).
Inductor's caches are pointed at a fresh temporary directory, so every warm-up is a cold compile, as in a
first run; a later run of the same model hits the on-disk cache and warms up faster. Usage::

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.compiled                       # every model x norm kind
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.compiled --models resnet20 --norms bn renorm
    OMP_NUM_THREADS=2 python -m benchmarks.compiled --models resnet20 --norms renorm --precisions 32 bf16-mixed
    .venv/bin/python -m benchmarks.compiled --quick                                  # smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.timing import compare, format_table, machine_line
from bnzoo.norms.factory import NORM_KINDS
from bnzoo.tasks import ImageClassifier, SequenceClassifier


@dataclass(frozen=True)
class Workload:
    """A task and its batch: ``image_size`` x ``image_size`` images, or ``length`` steps of ``features``."""

    model: str
    batch: int
    image_size: int = 28
    length: int = 28
    features: int = 28


WORKLOADS: dict[str, Workload] = {
    "resnet20": Workload("resnet20", 128),  # the main job's shape: Fashion-MNIST, batch 128
    "bn_inception_small": Workload("bn_inception_small", 64),
    "ds2_gru": Workload("ds2_gru", 64),  # configs/fashion_mnist/ds2.yaml: image rows as steps, batch 64
    "mlp": Workload("mlp", 60),  # Ioffe & Szegedy 2015, Sec. 4.1: MNIST, batch 60 (the quick mode's)
}
DS2_OPTIONS = {"hidden_size": 128, "num_layers": 3}  # configs/fashion_mnist/ds2.yaml


def make_task(workload: Workload, norm: str, backend: str | None) -> torch.nn.Module:
    """The task, compiled with ``backend`` (None: eager)."""
    torch.manual_seed(0)  # the same weights eager and compiled
    compile, options = backend is not None, {"backend": backend or "inductor"}
    if workload.model.startswith("ds2"):
        return SequenceClassifier(model=workload.model, norm=norm, num_classes=10, input_size=workload.features,
                                  max_length=workload.length, model_options=DS2_OPTIONS, compile=compile,
                                  compile_options=options)  # fmt: skip
    return ImageClassifier(model=workload.model, norm=norm, num_classes=10, in_chans=1,
                           image_size=workload.image_size, compile=compile, compile_options=options)  # fmt: skip


def make_batch(workload: Workload, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (batch,), generator=g)
    if workload.model.startswith("ds2"):
        x = torch.randn(batch, workload.length, workload.features, generator=g)
        return x, torch.full((batch,), workload.length), labels
    return torch.randn(batch, 1, workload.image_size, workload.image_size, generator=g), labels


PRECISIONS = ("32", "bf16-mixed")  # Lightning's names: float32, and bf16 autocast of the forward and loss


def train_step(task: torch.nn.Module, batch: tuple[torch.Tensor, ...], precision: str) -> Callable[[], None]:
    """One SGD step of ``task`` (its forward and loss, under bf16 autocast for ``bf16-mixed`` as Lightning's
    ``precision="bf16-mixed"`` runs them; backward and optimizer outside) on a fixed batch."""
    task.train()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9)
    inputs, target = task.split_batch(batch)
    autocast = precision == "bf16-mixed"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = task.loss(task(*inputs), target)
        loss.backward()
        optimizer.step()

    return step


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the C++ compiler runs as children)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(
    workload: Workload, norm: str, batch: int, rounds: int, round_s: float, backend: str, precisions: list[str]
) -> list[dict[str, object]]:
    """One row per precision; every (eager | compiled, precision) step is timed in the same interleaved rounds,
    and ``/ eager 32`` is each one's time over the eager float32 step's."""
    data = make_batch(workload, batch)
    steps, warm_up = {}, {}
    torch._dynamo.reset()
    for precision in precisions:  # a task per precision: each compiled one warms up (and is timed) cold
        eager, compiled = make_task(workload, norm, None), make_task(workload, norm, backend)
        compiled.configure_model()  # compiles the network in place, as the trainer's call does
        steps[("eager", precision)] = train_step(eager, data, precision)
        steps[("compiled", precision)] = compiled_step = train_step(compiled, data, precision)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        compiled_step()
        compiled_step()
        warm_up[precision] = (time.perf_counter() - start, cpu_seconds() - start_cpu)
    times = compare(steps, rounds=rounds, round_s=round_s)
    base = times.get(("eager", "32"), times[("eager", precisions[0])])
    rows = []
    for precision in precisions:
        eager_t, compiled_t = times[("eager", precision)], times[("compiled", precision)]
        rows.append({
            "model": workload.model, "norm": norm, "batch": batch, "precision": precision,
            "eager steps/s": 1.0 / eager_t, "compiled steps/s": 1.0 / compiled_t,
            "compiled / eager": compiled_t / eager_t,
            "eager / eager 32": eager_t / base, "compiled / eager 32": compiled_t / base,
            "warm-up s": warm_up[precision][0] - 2 * compiled_t, "warm-up CPU s": warm_up[precision][1],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "bn_inception_small", "ds2_gru"],
                        choices=list(WORKLOADS))  # fmt: skip
    parser.add_argument("--norms", nargs="+", default=NORM_KINDS.names(), choices=NORM_KINDS.names())
    parser.add_argument("--batch", type=int, default=None, help="override every workload's batch size")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round_s", type=float, default=1.0, help="seconds per timing round")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--precisions", nargs="+", default=["32"], choices=PRECISIONS)
    parser.add_argument("--quick", action="store_true", help="smoke run: the MLP, renorm, aot_eager, few rounds")
    args = parser.parse_args()
    if args.quick:
        args.models, args.norms, args.batch, args.rounds, args.round_s = ["mlp"], ["renorm"], 8, 2, 0.05
        args.backend, args.precisions = "aot_eager", list(PRECISIONS)
    with tempfile.TemporaryDirectory(prefix="bnzoo-inductor-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold compiles: see the module docstring
        rows = [
            row
            for m in args.models
            for norm in args.norms
            for row in measure(
                WORKLOADS[m],
                norm,
                args.batch or WORKLOADS[m].batch,
                args.rounds,
                args.round_s,
                args.backend,
                args.precisions,
            )  # fmt: skip
        ]
    print(f"Training step, eager vs torch.compile ({args.backend}), {args.rounds} rounds: {machine_line()}")
    columns = ["model", "norm", "batch", "precision", "eager steps/s", "compiled steps/s", "compiled / eager",
               "warm-up s", "warm-up CPU s"]  # fmt: skip
    if len(args.precisions) > 1:
        columns[-2:-2] = ["eager / eager 32", "compiled / eager 32"]
    print(format_table(rows, columns))


if __name__ == "__main__":
    main()
