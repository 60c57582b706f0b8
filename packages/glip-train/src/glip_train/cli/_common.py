"""What every ``glip`` command shares: exit codes, the usage error, the one error boundary (one line per error, hints
in the command line's spelling, warnings as one line) and the run's skip report.

Exit codes (also in ``glip --help``):

    0  success
    1  finished, but some inputs were skipped (each named on stderr, all counted in the outputs)
    2  usage error: a bad option value, a missing or unusable input (weights, config, dataset, output folder, an
       output another run is writing), a prompt the model cannot read -- reported before any model is loaded
       whenever it can be
    3  runtime failure: the work started and could not finish (training diverged, out of memory, an internal error)
  130  interrupted
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Any, Callable

__all__ = ["EXIT_CODES_HELP", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE",
           "UsageError", "cli_spelling", "run_command", "skip_report"]

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = ("exit codes: 0 success, 1 some inputs skipped (named on stderr, counted in the outputs), 2 usage "
                   "error (bad option, missing or unusable input, output in use by another run), 3 runtime failure, "
                   "130 interrupted")

# warnings meant for developers (library deprecations), not for someone running a command
_DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# a library hint names an option the Python way: "pass on_bad_image='skip'", "pass trust_pickle=True"
_PYTHON_HINT = re.compile(r"\bpass (\w+)=(True|'[^']*')")


class UsageError(Exception):
    """A bad option value or input, found before the work starts (exit code 2)."""


def skip_report(command: str) -> Any:
    """The run's :class:`glip_data.report.SkipReport` (lines start with ``glip COMMAND``)."""
    from glip_data.report import SkipReport

    return SkipReport(f"glip {command}")


def cli_spelling(message: str, parser: argparse.ArgumentParser | None = None) -> str:
    """Rewrite the Python spelling of a hint (``pass on_bad_image='skip'``) into the command line's (``pass
    --on-bad-image skip``), for the options ``parser`` has (all, without a parser)."""
    options = None if parser is None else {s for a in parser._actions for s in a.option_strings}

    def cli(match: re.Match) -> str:
        flag = "--" + match.group(1).replace("_", "-")
        if options is not None and flag not in options:
            return match.group(0)
        value = match.group(2)
        return f"pass {flag}" if value == "True" else f"pass {flag} {value[1:-1]}"

    return _PYTHON_HINT.sub(cli, message)


def _usage_errors() -> tuple[type[BaseException], ...]:
    from glip_data import ImageLoadError, ReaderError
    from glip_data.io import OutputLockedError

    from ..adapters import AdapterError
    from ..evaluation.datasets import EvaluationError
    from ..official_checkpoint import CheckpointError
    from ..training import ConfigError, ResumeError

    return (UsageError, CheckpointError, AdapterError, ConfigError, ResumeError, ReaderError, ImageLoadError,
            EvaluationError, OutputLockedError, FileNotFoundError, FileExistsError, ValueError, TypeError)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def run_command(name: str, work: Callable[[], int], parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``work`` (a command; returns its exit code) inside the one error boundary of the command line.

    Every error becomes one line ``glip CMD: error: ...`` (usage, exit 2) or ``glip CMD: failed: ...`` (runtime,
    exit 3) with hints in the command line's spelling; a warning of the libraries becomes one line ``glip CMD:
    warning: ...`` (no source line). ``GLIP_DEBUG=1`` lets the traceback through.
    """
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
        except Exception as exc:  # noqa: BLE001 - the one error boundary of the command line
            if debug:
                raise
            usage = isinstance(exc, _usage_errors())
            message = str(exc).strip() or type(exc).__name__  # a checkpoint mismatch lists its keys on lines
            if not usage and not isinstance(exc, (RuntimeError, OSError, MemoryError)):
                message = (f"internal error ({type(exc).__name__}): {message} (rerun with GLIP_DEBUG=1 for the "
                           "traceback)")
            print(f"{name}: {'error' if usage else 'failed'}: {cli_spelling(message, parser)}", file=sys.stderr)
            return EXIT_USAGE if usage else EXIT_FAILURE
