"""Construction-time argument checks: each returns the value or raises a ``ValueError`` that names the option,
the bad value and what is valid (never a traceback deep inside torch)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_positive_int"]


def check_choice(option: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming the option, value and choices."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {option} {value!r}; valid choices: {', '.join(choices)}")
    return value


def check_positive_int(option: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (bools excluded), else a ValueError naming the option and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option} must be a positive int, got {value!r}")
    return value


def check_bool(option: str, value: Any) -> bool:
    """``value`` if it is True or False, else a ValueError naming the option and the value."""
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False, got {value!r}")
    return value
