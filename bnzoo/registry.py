"""One name -> entry registry, shared by the norm kinds and the models (as timm's ``_registry`` serves its models).

A :class:`Registry` maps plain strings (what a user writes in a config) to entries. Unknown names fail with the
closest registered names and the full list; :meth:`Registry.scoped` registers entries for the duration of a
``with`` block only, so an application (bnzoo's claims lab) can add its kinds without changing what a plain
``import bnzoo`` offers.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "check_options", "closest"]

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Named entries of one sort (``what``: "norm kind", "model"), in registration order.

    ``get`` raises ``ValueError("unknown <what> 'x'; closest: y, z; valid <plural>: ...")`` for a name that is
    not registered, the message every user-facing lookup of bnzoo gives.
    """

    def __init__(self, what: str, plural: str | None = None) -> None:
        self.what = what
        self.plural = plural or f"{what}s"
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, entry: Entry) -> Entry:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what}'s name must be a non-empty string, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: Any) -> Entry:
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        raise ValueError(self.unknown_message(name))

    def unknown_message(self, name: Any) -> str:
        hint = closest(name, self._entries)
        return f"unknown {self.what} {name!r}{hint}; valid {self.plural}: {', '.join(self.names())}"

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching the shell-style ``pattern``, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @contextmanager
    def scoped(self) -> Iterator[Registry[Entry]]:
        """Entries registered inside the block are removed when it ends (even on an error)."""
        before = dict(self._entries)
        try:
            yield self
        finally:
            self._entries.clear()
            self._entries.update(before)


def closest(name: Any, choices: Iterable[str], n: int = 3) -> str:
    """``"; closest: a, b"`` for the registered names nearest to a misspelled ``name`` (empty when none is)."""
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f"; closest: {', '.join(close)}" if close else ""


def check_options(sort: str, name: str, given: Mapping[str, Any], valid: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every option in ``given`` that entry ``name`` (a ``sort``: "model", "norm kind")
    does not take, and the ones it does."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"{sort} {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options for {name!r}: {', '.join(valid) or 'none'}"
        )
