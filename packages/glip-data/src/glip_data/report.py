"""Reporting to the user of a command: skipped inputs, errors, warnings and exit codes -- the one discipline of
every glip command (``glip`` and ``glip-data``).

Skipped inputs.
A run never drops an input silently. Each skipped or dropped input (an unreadable image, an annotation with an unknown
category, a caption with no readable phrase, ...) is

* **counted** by reason,
* **named** on stderr, one line each (``glip eval: skipped photos/3.jpg: unreadable image: ...``), up to a cap per
  reason, then one line saying how many more were not named,
* **recorded** in the run's outputs (:meth:`SkipReport.to_dict`: counts and the first names of every reason),
* and makes the **exit code 1** (:meth:`SkipReport.exit_code`).

Reports of several processes (or shards) merge with :meth:`SkipReport.merge`.

Errors and warnings. :func:`run_command` is the error boundary of a command: every error becomes one line naming
the file, key or value (``<command>: error: ...``, exit code 2, for bad options and inputs; ``<command>: failed:
...``, exit code 3, when the work could not finish), with hints in the command line's spelling
(:func:`cli_spelling`); a library warning becomes one line ``<command>: warning: ...``. ``GLIP_DEBUG=1`` lets the
traceback through.

Exit codes: 0 success, 1 some inputs skipped, 2 usage error, 3 runtime failure, 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections import Counter
from typing import IO, Any, Callable

__all__ = ["EXIT_CODES_HELP", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE",
           "SkipReport", "UsageError", "cli_spelling", "run_command"]

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = ("exit codes: 0 success, 1 some inputs skipped (named on stderr, counted in the outputs), 2 usage "
                   "error (bad option, missing or unusable input, output in use by another run), 3 runtime failure, "
                   "130 interrupted")


class SkipReport:
    """Skipped inputs of one run, by reason.

    Args:
        command: how lines start, e.g. ``"glip eval"``.
        stream: where lines go (default ``sys.stderr``); None: record only, print nothing.
        max_lines: inputs named per reason on the stream; the rest are counted (and said once, in
            :meth:`summary`).
        keep: names kept per reason for :meth:`to_dict`.
    """

    def __init__(self, command: str, *, stream: IO[str] | None | str = "stderr", max_lines: int = 20,
                 keep: int = 100):
        self.command = command
        self._stream = stream
        self.max_lines = int(max_lines)
        self.keep = int(keep)
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    @property
    def stream(self) -> IO[str] | None:
        return sys.stderr if self._stream == "stderr" else self._stream  # resolved late: tests capture stderr

    def skip(self, reason: str, item: Any, detail: str | None = None) -> None:
        """Record that ``item`` (a file, ``file#record``, an id) was skipped for ``reason`` (a short phrase such as
        ``"unreadable image"``); ``detail`` (e.g. the loader's message) goes on its line."""
        self.counts[reason] += 1
        name = str(item)
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.keep:
            kept.append(name if detail is None else f"{name}: {detail}")
        stream = self.stream
        if stream is not None and self.counts[reason] <= self.max_lines:
            line = f"{self.command}: skipped {name}: {reason}"
            if detail:
                line += f" ({detail})"
            print(line, file=stream)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def exit_code(self, ok: int = 0, skipped: int = 1) -> int:
        """``skipped`` (1) when anything was skipped, else ``ok``."""
        return skipped if self.total else ok

    def summary(self) -> str:
        """One line: ``"skipped 3 inputs: unreadable image 2, unknown category 1"`` (with how many were not named on
        the stream), or ``"skipped nothing"``."""
        if not self.total:
            return "skipped nothing"
        parts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.items()))
        unnamed = sum(max(0, n - self.max_lines) for n in self.counts.values())
        tail = f" ({unnamed} not named above)" if unnamed and self.stream is not None else ""
        return f"skipped {self.total} input{'s' if self.total != 1 else ''}: {parts}{tail}"

    def to_dict(self) -> dict[str, Any]:
        """What the run's output files record: ``{"total", "by_reason": {reason: n}, "examples": {reason: [...]}}``."""
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def merge(self, other: "SkipReport | dict[str, Any]") -> "SkipReport":
        """Add another report's counts and examples (a :class:`SkipReport` or its :meth:`to_dict`) without printing
        them again; returns self."""
        data = other.to_dict() if isinstance(other, SkipReport) else other
        for reason, n in data.get("by_reason", {}).items():
            self.counts[reason] += int(n)
        for reason, names in data.get("examples", {}).items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(names[: max(0, self.keep - len(kept))])
        return self


# ---------------------------------------------------------------------------------------------------------------------
# the error boundary


class UsageError(Exception):
    """A bad option value or input, found before the work starts (exit code 2)."""


# warnings meant for developers (library deprecations), not for someone running a command
_DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# a library hint names an option the Python way: "pass on_bad_image='skip'", "pass trust_pickle=True"
_PYTHON_HINT = re.compile(r"\bpass (\w+)=(True|'[^']*')")


def cli_spelling(message: str, parser: argparse.ArgumentParser | None = None) -> str:
    """Rewrite the Python spelling of a hint (``pass on_bad_image='skip'``) into the command line's (``pass
    --on-bad-image skip``), for the options ``parser`` has (every option, without a parser)."""
    options = None if parser is None else {s for a in parser._actions for s in a.option_strings}

    def cli(match: re.Match) -> str:
        flag = "--" + match.group(1).replace("_", "-")
        if options is not None and flag not in options:
            return match.group(0)
        value = match.group(2)
        return f"pass {flag}" if value == "True" else f"pass {flag} {value[1:-1]}"

    return _PYTHON_HINT.sub(cli, message)


def _one_line(text: Any) -> str:
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def run_command(name: str, work: Callable[[], int], *, usage_errors: tuple[type[BaseException], ...] = (),
                parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``work`` (a command; returns its exit code) inside the error boundary (see the module doc).

    Args:
        name: how lines start, e.g. ``"glip eval"``.
        usage_errors: the exceptions that mean a bad option or input (exit code 2; :class:`UsageError`,
            ``ValueError``, ``TypeError``, ``FileNotFoundError``, ``FileExistsError`` always are); any other error is
            a runtime failure (exit code 3).
        parser: the command's parser, whose options hints are rewritten to.
    """
    usage_errors = (UsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, *usage_errors)
    debug = bool(os.environ.get("GLIP_DEBUG"))

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{name}: warning: {cli_spelling(_one_line(message), parser)}", file=sys.stderr)

    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("default")
            for category in _DEVELOPER_WARNINGS:
                warnings.simplefilter("ignore", category)
            warnings.showwarning = show
        try:
            return work()
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - the one error boundary of a command line
            if debug:
                raise
            usage = isinstance(exc, usage_errors)
            message = str(exc).strip() or type(exc).__name__  # a checkpoint mismatch lists its keys on lines
            if not usage and not isinstance(exc, (RuntimeError, OSError, MemoryError)):
                message = (f"internal error ({type(exc).__name__}): {message} (rerun with GLIP_DEBUG=1 for the "
                           "traceback)")
            print(f"{name}: {'error' if usage else 'failed'}: {cli_spelling(message, parser)}", file=sys.stderr)
            return EXIT_USAGE if usage else EXIT_FAILURE
