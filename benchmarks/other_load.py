"""How busy the rest of the machine was during a timed interval (Linux): a contamination flag for CPU benchmarks.

``OtherLoad`` reads the machine's busy CPU time from ``/proc/stat`` (user, nice, system, irq, softirq and steal, all
cores) and this process's own CPU time from ``os.times()``; the difference over an interval, divided by the total
CPU time of the interval, is the share of the machine other processes (or the hypervisor) took: 0 on a quiet machine,
0.5 when another job kept one of two cores busy. On a machine without ``/proc/stat`` it reports None.

Used by the benchmark scripts to record, per timed sample, how loaded the machine was and to retry samples taken
under load (``--max-other-load``): on a small shared machine a parallel region whose threads are descheduled can be
several times slower, so contaminated samples are not slightly noisy but wrong.
"""
from __future__ import annotations

import os
from typing import Optional

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_ticks() -> Optional[tuple[int, int]]:
    """(busy, total) CPU ticks of all cores since boot, or None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _own_ticks() -> float:
    t = os.times()
    return (t.user + t.system + t.children_user + t.children_system) * _CLK_TCK


class OtherLoad:
    """``with OtherLoad() as load: ...`` then ``load.share``: CPU share of other processes during the block."""

    def __enter__(self) -> "OtherLoad":
        self._machine = _machine_ticks()
        self._own = _own_ticks()
        self.share: Optional[float] = None
        return self

    def __exit__(self, *exc) -> None:
        end = _machine_ticks()
        if self._machine is None or end is None:
            return
        busy = end[0] - self._machine[0]
        total = end[1] - self._machine[1]
        others = busy - (_own_ticks() - self._own)
        self.share = max(0.0, others / total) if total > 0 else None


def clean(share: Optional[float], limit: Optional[float]) -> bool:
    """Whether a sample with this other-load share passes ``limit`` (no limit, or no measurement: always)."""
    return limit is None or share is None or share <= limit


def sample(fn, max_share: Optional[float] = None, retries: int = 0):
    """Run ``fn()`` until the other-load share during it is at most ``max_share`` or ``retries`` are used up.

    Returns ``(fn's value, share of the last run, runs)``.
    """
    runs = 0
    while True:
        runs += 1
        with OtherLoad() as load:
            value = fn()
        if clean(load.share, max_share) or runs > retries:
            return value, load.share, runs


def clean_median(values, shares, limit: Optional[float]):
    """Median of the samples taken with at most ``limit`` other load (all samples if none qualifies).

    Returns ``(median, number of samples used)``.
    """
    import statistics

    kept = [v for v, s in zip(values, shares) if clean(s, limit)] or list(values)
    return statistics.median(kept), len(kept)
