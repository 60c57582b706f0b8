"""What every ``glip`` command shares: the exit codes, the usage error, the error boundary and the skip report
(all from :mod:`glip_data.report`, the one home of reporting to a command's user), with glip-train's usage errors.

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
from typing import Any, Callable

from glip_data.report import (EXIT_CODES_HELP, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE,
                              UsageError, cli_spelling)
from glip_data.report import run_command as _run_command

__all__ = ["EXIT_CODES_HELP", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE",
           "UsageError", "cli_spelling", "run_command", "skip_report"]


def skip_report(command: str) -> Any:
    """The run's :class:`glip_data.report.SkipReport` (lines start with ``glip COMMAND``)."""
    from glip_data.report import SkipReport

    return SkipReport(f"glip {command}")


def _usage_errors() -> tuple[type[BaseException], ...]:
    from glip_data import ImageLoadError, ReaderError
    from glip_data.io import OutputLockedError

    from ..adapters import AdapterError
    from ..evaluation.datasets import EvaluationError
    from ..official_checkpoint import CheckpointError
    from ..training import ConfigError, ResumeError

    return (CheckpointError, AdapterError, ConfigError, ResumeError, ReaderError, ImageLoadError, EvaluationError,
            OutputLockedError)


def run_command(name: str, work: Callable[[], int], parser: argparse.ArgumentParser | None = None) -> int:
    """Run a ``glip`` command inside the error boundary (:func:`glip_data.report.run_command`)."""
    return _run_command(name, work, usage_errors=_usage_errors(), parser=parser)
