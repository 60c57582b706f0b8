"""Reporting skipped inputs: the one discipline of every glip command that reads data.

A run never drops an input silently. Each skipped or dropped input (an unreadable image, an annotation with an unknown
category, a caption with no readable phrase, ...) is

* **counted** by reason,
* **named** on stderr, one line each (``glip eval: skipped photos/3.jpg: unreadable image: ...``), up to a cap per
  reason, then one line saying how many more were not named,
* **recorded** in the run's outputs (:meth:`SkipReport.to_dict`: counts and the first names of every reason),
* and makes the **exit code 1** (:meth:`SkipReport.exit_code`).

Reports of several processes (or shards) merge with :meth:`SkipReport.merge`.
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import IO, Any

__all__ = ["SkipReport"]


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
