"""How every ``bnzoo`` command fails: one short message on stderr, no traceback (``BNZOO_DEBUG=1`` shows it).

:func:`run_command` is the one place: each subcommand (``fit``, ``test``, ..., ``recalibrate``, ``export``,
``pretrained``, ``experiment``) runs inside it, and an exception that escapes -- a bad option found by the
parser (:class:`UsageError`), a bad value refused by bnzoo's or Lightning's checks, a missing or unreadable file
-- ends the command with exit status 2 and at most :data:`MAX_ERROR_LINES` lines on stderr, the first
``bnzoo <command>: error: <what>`` naming the option or file. Usage is for ``--help``, never dumped with an error.

While a command sets up (parsing, building the model, data and trainer, preparing data, up to its first batch),
what Lightning, torch and the warnings module write to stderr is *held* (:class:`HeldStderr`): when the run
reaches its first batch (:func:`release_held_output`, called by the CLI's callback) or the command ends normally,
it is written out unchanged; when setup fails, it is dropped and only the error is shown. With
``BNZOO_DEBUG=1`` nothing is held and the full traceback is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TextIO

__all__ = [
    "DEBUG_ENV",
    "MAX_ERROR_LINES",
    "HeldStderr",
    "TerseArgumentParser",
    "UsageError",
    "debug_enabled",
    "error_lines",
    "release_held_output",
    "run_command",
    "summarize_parser_message",
]

DEBUG_ENV = "BNZOO_DEBUG"
MAX_ERROR_LINES = 3


def debug_enabled() -> bool:
    """Whether ``BNZOO_DEBUG`` asks for tracebacks (any value but empty and ``0``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class UsageError(Exception):
    """A bad command line or config: the message names the option and what is valid."""


class TerseArgumentParser(argparse.ArgumentParser):
    """argparse for bnzoo's own commands: a bad command line raises :class:`UsageError` (shown as one line by
    :func:`run_command`) instead of printing the usage; ``--help`` still prints it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


# -- summarizing messages ---------------------------------------------------------------------------------------
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?\s*(.*)$')
_STRUCTURE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Problem with given class_path",
    "Not a valid subclass",
)
_EXPECTED = re.compile(r"^Expected a (.+?)\.?$")
_GIVEN = re.compile(r"^(?:Given value|Got value): (.+)$")


def _expected_values(typename: str) -> str:
    """``typing.Literal[64, 32]`` -> ``64, 32``; ``<class 'NoneType'>`` -> ``null``; ``<class 'int'>`` -> ``int``."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", typename)
    if literal:
        return literal.group(1)
    cls = re.fullmatch(r"<class '(?:builtins\.)?([\w.]+)'>", typename)
    if cls:
        return "null" if cls.group(1) == "NoneType" else cls.group(1)
    return typename


def summarize_parser_message(message: str) -> str:
    """jsonargparse's nested error (``Parser key "model": Does not validate ... - Problem with given class_path
    ...: Parser key "lr": Expected a <class 'float'>. Got value: fast``) as one line: ``--model.init_args.lr:
    expected float, got fast``. Messages of another shape come back with their first lines only."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys: list[str] = []
    details: list[str] = []
    expected: list[str] = []
    given = None
    nested_class = False
    for line in lines:
        line = line.removeprefix("- ").strip()
        key = _PARSER_KEY.match(line)
        if key:
            keys.append(("init_args." if nested_class else "") + key.group(1))
            nested_class = False
            line = key.group(2).strip()
            if not line:
                continue
        if line.startswith("Problem with given class_path"):
            nested_class = True
            continue
        given_match = _GIVEN.search(line)
        if line.startswith(_STRUCTURE):
            continue
        if given_match and not line.startswith("Expected"):
            given = given.strip() if given else given_match.group(1)
            continue
        expect = _EXPECTED.match(line.split(". Got value:")[0])
        if expect:
            if ". Got value:" in line:
                given = line.split(". Got value:", 1)[1].strip()
            if expect.group(1) != "<class 'NoneType'>" or not details:
                expected.append(_expected_values(expect.group(1)))
            continue
        details.append(line)
    option = f"--{'.'.join(keys)}: " if keys else ""
    if details:
        return option + details[0] + ("\n" + details[1] if len(details) > 1 and not keys else "")
    if expected:
        valid = [e for e in expected if e != "null"] or expected
        got = f"got {given}; " if given is not None else ""
        return f"{option}{got}expected {' or '.join(dict.fromkeys(valid))}"
    return option.rstrip(": ") or "\n".join(lines[:MAX_ERROR_LINES])


def _message(err: BaseException) -> str:
    text = str(err)
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    if 'Parser key "' in text or "Does not validate against" in text or isinstance(err, UsageError):
        return summarize_parser_message(text)
    return text


_SELF_EXPLAINING = (ValueError, TypeError, OSError, UsageError, KeyError)


def error_lines(err: BaseException, prog: str) -> list[str]:
    """At most :data:`MAX_ERROR_LINES` lines describing ``err``, the first ``<prog>: error: ...``."""
    lines = [line.rstrip() for line in _message(err).splitlines() if line.strip()]
    if not lines:
        lines = [type(err).__name__]
    unexpected = not isinstance(err, _SELF_EXPLAINING) and type(err).__name__ != "MisconfigurationException"
    if unexpected:
        lines[0] = f"{type(err).__name__}: {lines[0]}"
    lines[0] = f"{prog}: error: {lines[0]}"
    lines = lines[: MAX_ERROR_LINES - 1 if unexpected else MAX_ERROR_LINES]
    if unexpected:
        lines.append(f"(an unexpected error: {DEBUG_ENV}=1 shows its traceback)")
    return lines


# -- holding setup output ---------------------------------------------------------------------------------------
class HeldStderr(io.TextIOBase):
    """A stand-in for ``sys.stderr`` that keeps what is written until :meth:`release` (then writes it, and
    everything after, to the real stream) or :meth:`discard`."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target
        self.held: list[str] = []
        self.holding = True

    def write(self, text: str) -> int:
        if self.holding:
            self.held.append(text)
        else:
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        if not self.holding:
            self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")

    def release(self) -> None:
        if self.holding:
            self.holding = False
            self.target.write("".join(self.held))
            self.held.clear()
            self.target.flush()

    def discard(self) -> None:
        self.held.clear()
        self.holding = False


_held: list[HeldStderr] = []


def _stream_handlers() -> list[logging.StreamHandler]:
    named = (v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))
    loggers = [logging.getLogger(), *named]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


@contextlib.contextmanager
def _holding_stderr() -> Iterator[HeldStderr]:
    real = sys.stderr
    held = HeldStderr(real)
    handlers = [h for h in _stream_handlers() if h.stream is real]
    sys.stderr = held
    for handler in handlers:
        handler.setStream(held)
    _held.append(held)
    try:
        yield held
    finally:
        _held.remove(held)
        for handler in handlers:
            if handler.stream is held:
                handler.setStream(real)
        if sys.stderr is held:
            sys.stderr = real


def release_held_output() -> None:
    """Write out what the running command held back (see the module doc); from then on stderr is live."""
    for held in _held:
        held.release()


def run_command(prog: str, command: Callable[[], Any]) -> int:
    """Run ``command`` (a callable returning an exit status or None) as the ``bnzoo`` command ``prog``: its
    setup output held, an exception turned into :func:`error_lines` on stderr and exit status 2. With
    ``BNZOO_DEBUG=1`` it runs as is (output live, exceptions with their traceback)."""
    if debug_enabled():
        return int(command() or 0)
    with _holding_stderr() as held:
        try:
            code = command()
        except Exception as err:  # noqa: BLE001 -- the one place a command's failure is reported
            held.discard()
            print("\n".join(error_lines(err, prog)), file=held.target)
            held.target.flush()
            return 2
        except BaseException:  # SystemExit (--help, --print_config), KeyboardInterrupt: as they are
            held.release()
            raise
        held.release()
        return int(code or 0)
