"""Which convolution or linear layer feeds which norm layer: the data flow that :mod:`bnzoo.norms.fusion` folds.

A norm can be folded into the layer before it only when that layer's output goes to the norm and nowhere else,
and each of the two runs once per forward. Module order says nothing about this (an MLP block may apply its norm
after the activation; a block may add the convolution's output to a shortcut as well), so the forward is traced
with ``torch.fx``, with convolutions, linear layers and norms as leaves (:class:`NormTracer`).

A module whose forward cannot be traced symbolically (data-dependent Python, e.g. a check of the input's shape)
is not traced itself: each of its children is traced on its own, so the pairs inside a child are still found;
a norm whose input crosses the untraced forward is reported with that module's name and the tracing error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn

from .introspect import NORM_TYPES

__all__ = ["FOLDABLE_LAYERS", "NormTracer", "TracedPairs", "trace_norm_inputs"]

#: the producers a norm folds into: exactly these classes (a subclass may transform its weight in its forward,
#: as weight-standardized convolutions do, so a folded weight would not be what it computes with)
FOLDABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class NormTracer(fx.Tracer):
    """``torch.fx`` tracer keeping convolutions, linear layers and every norm layer as single call nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in FOLDABLE_LAYERS or isinstance(m, NORM_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class TracedPairs:
    """What tracing found: ``pairs`` ``{norm name: producer name}`` for norms fed only by a conv/linear layer,
    ``skipped`` ``{norm name: why not}`` for every other norm layer of the model."""

    pairs: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(node: object, root: nn.Module) -> str:
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "placeholder":
        return "the module's input"
    if node.op == "call_module":
        return f"the output of {node.target} ({type(root.get_submodule(str(node.target))).__name__})"
    return f"the operation {getattr(node.target, '__name__', node.target)}"


def _why_not(node: fx.Node, root: nn.Module, calls: Counter) -> tuple[str | None, str | None]:
    """``(producer, None)`` when the norm ``node`` folds into its producer, else ``(None, reason)``."""
    if calls[node.target] > 1:
        return None, f"it is called {calls[node.target]} times in one forward (a shared layer)"
    if len(node.args) != 1 or node.kwargs:
        return None, "it is called with more than its input"
    source = node.args[0]
    if not (isinstance(source, fx.Node) and source.op == "call_module"):
        return None, f"its input is {_describe(source, root)}, not a convolution or linear layer"
    producer = root.get_submodule(str(source.target))
    if type(producer) not in FOLDABLE_LAYERS:
        return None, f"its input is {_describe(source, root)}, not a convolution or linear layer"
    if calls[source.target] > 1:
        return None, f"its producer {source.target} is called {calls[source.target]} times in one forward"
    others = [user for user in source.users if user is not node]
    if others:
        also = ", ".join(_describe(user, root).removeprefix("the output of ") for user in others)
        return None, f"the output of {source.target} also goes to {also}"
    return str(source.target), None


def _visit(module: nn.Module, prefix: str, found: TracedPairs, untraced: dict[str, str]) -> None:
    try:
        graph = NormTracer().trace(module)
    except Exception as err:  # any failure of symbolic tracing: trace the children on their own
        message = str(err).splitlines()[0].split(". ")[0] if str(err) else ""
        untraced[prefix] = f"{type(err).__name__}: {message}"
        for name, child in module.named_children():
            if not isinstance(child, NORM_TYPES) and type(child) not in FOLDABLE_LAYERS:
                _visit(child, _join(prefix, name), found, untraced)
        return
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(str(node.target)), NORM_TYPES):
            continue
        name = _join(prefix, str(node.target))
        producer, reason = _why_not(node, module, calls)
        if producer is not None:
            found.pairs[name] = _join(prefix, producer)
        else:
            found.skipped[name] = str(reason)


def trace_norm_inputs(model: nn.Module) -> TracedPairs:
    """Trace ``model`` (see the module docstring): every norm layer of it ends in ``pairs`` or in ``skipped``."""
    found, untraced = TracedPairs(), {}
    _visit(model, "", found, untraced)
    for name, layer in model.named_modules():
        if isinstance(layer, NORM_TYPES) and name not in found.pairs and name not in found.skipped:
            owners = [p for p in untraced if not p or name.startswith(p + ".")]
            if not owners:
                found.skipped[name] = "the model's forward does not call it (traced in eval mode)"
                continue
            owner = max(owners, key=len)
            found.skipped[name] = (
                f"its input comes from the forward of {owner or type(model).__name__}, which torch.fx cannot "
                f"trace ({untraced[owner]})"
            )
    return found
