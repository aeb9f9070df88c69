"""A task's compiled network: ``torch.compile`` options checked at construction, applied in ``configure_model``.

The task compiles its *inner* network in place (``nn.Module.compile``, which compiles the module's call and
keeps the module itself): the task's state dict keeps its plain keys (``model.<...>``, never
``model._orig_mod.<...>``), so a checkpoint of a compiled task loads into an uncompiled one and back.
Lightning calls ``configure_model`` once per ``fit``/``validate``/``test``/``predict``, before TensorBoard's
``log_graph``; compiling an already compiled network again is a no-op, and a trace (``log_graph``) runs the
network's uncompiled call (:func:`uncompiled_call`): ``torch.jit.trace`` cannot trace a compiled frame.

The options are the plain-typed keywords of :func:`torch.compile` (:data:`COMPILE_OPTIONS`), so configs round-trip
through ``--print_config`` and checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "COMPILE_MODES",
    "COMPILE_OPTIONS",
    "check_compile_options",
    "compile_network",
    "is_compiled",
    "uncompiled_call",
]

#: the modes of ``torch.compile`` (``torch._inductor.list_mode_options()``)
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _backends() -> list[str]:
    """Every in-tree and registered ``torch.compile`` backend, debug ones (``aot_eager``) included."""
    return torch._dynamo.list_backends(exclude_tags=())


def _check_backend(value: Any) -> str | None:
    valid = _backends()
    return None if isinstance(value, str) and value in valid else f"one of {', '.join(valid)}"


def _check_mode(value: Any) -> str | None:
    return None if value is None or value in COMPILE_MODES else f"null or one of {', '.join(COMPILE_MODES)}"


def _check_optional_bool(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "null, true or false"


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _check_backend_options(value: Any) -> str | None:
    plain = (str, int, float, bool)
    valid = isinstance(value, Mapping) and all(
        isinstance(k, str) and (isinstance(v, plain) or v is None) for k, v in value.items()
    )
    return None if valid else "a mapping of option names to plain values (str, int, float, bool, null)"


def _check_recompile_limit(value: Any) -> str | None:
    valid = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    return None if valid else "null or an int >= 1"


#: the options a task passes to ``torch.compile``: name -> check (None when valid, else what is valid)
COMPILE_OPTIONS = {
    "backend": _check_backend,
    "mode": _check_mode,
    "dynamic": _check_optional_bool,
    "fullgraph": _check_bool,
    "options": _check_backend_options,
    "recompile_limit": _check_recompile_limit,
}


def check_compile_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` as a plain dict, or a ValueError naming the bad option or value and what is valid.

    ``mode`` and ``options`` exclude each other (``torch.compile`` raises otherwise, but only when called).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"compile_options must be a mapping (or null), got {options!r}")
    unknown = sorted(set(options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown compile option(s) {', '.join(map(repr, unknown))}; valid compile options: "
            + ", ".join(COMPILE_OPTIONS)
        )
    for name, value in options.items():
        rule = COMPILE_OPTIONS[name](value)
        if rule is not None:
            raise ValueError(f"compile_options.{name} must be {rule}, got {value!r}")
    if options.get("mode") is not None and options.get("options"):
        raise ValueError(
            f"compile_options.mode={options['mode']!r} and compile_options.options={options['options']!r} exclude "
            "each other (torch.compile takes one of them); give mode or options"
        )
    return dict(options)


def is_compiled(network: nn.Module) -> bool:
    """Whether ``network``'s call is compiled (``nn.Module.compile``)."""
    return getattr(network, "_compiled_call_impl", None) is not None


def compile_network(network: nn.Module, options: Mapping[str, Any]) -> None:
    """Compile ``network``'s call in place with ``torch.compile(**options)``, unless it is compiled already.

    In place, so that parameters, buffers and state-dict keys stay those of the plain network."""
    if not is_compiled(network):
        network.compile(**check_compile_options(options))


def uncompiled_call(network: nn.Module, *inputs: Any) -> Any:
    """``network(*inputs)`` through its plain call (hooks included), also when it is compiled: for a trace."""
    return network._call_impl(*inputs) if is_compiled(network) else network(*inputs)
