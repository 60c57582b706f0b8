"""The printed report: a metrics table per protocol and the counts of everything skipped, filled or relocated."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "metrics_table", "EVAL_HEADLINES"]

#: the metrics shown in the table for each protocol kind (all of them are in metrics.json)
EVAL_HEADLINES = {
    "coco": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"),
    "lvis": ("AP", "APr", "APc", "APf", "AP50", "AP75", "APs", "APm", "APl"),
}


def _pct(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return "-" if value < 0 else f"{100.0 * value:.2f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (first column left-aligned, the others right-aligned)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def metrics_table(kind: str, metrics: dict[str, Any]) -> str:
    """The metrics of one run as a table, in percent."""
    if kind in EVAL_HEADLINES:
        names = [n for n in EVAL_HEADLINES[kind] if n in metrics]
        return format_table(["metric (%)", *names], [["box", *(_pct(metrics[n]) for n in names)]])
    if kind == "odinw":
        rows = [[name, _pct(m["AP"]), _pct(m["AP50"])] for name, m in metrics["datasets"].items()]
        rows.append([f"mean over {len(metrics['datasets'])} datasets", _pct(metrics["AP"]), _pct(metrics["AP50"])])
        return format_table(["dataset", "AP (%)", "AP50 (%)"], rows)
    if kind == "flickr":
        parts = []
        for protocol in ("any_box", "merged_box"):
            m = metrics[protocol]
            keys = [k for k in m if k.startswith("R@")] + ["upper_bound"]
            rows = [["all", m["phrases"], *(_pct(m[k]) for k in keys)]]
            rows += [[t, v["phrases"], *(_pct(v[k]) for k in keys)] for t, v in m["by_type"].items()]
            title = "any box (separate GT boxes)" if protocol == "any_box" else "merged box (one GT box per phrase)"
            parts.append(f"{title}\n" + format_table(["phrase type", "phrases", *(k + " (%)" for k in keys)], rows))
        return "\n\n".join(parts)
    raise ValueError(f"unknown protocol kind {kind!r}")


def counts_lines(counts: dict[str, Any]) -> str:
    """``key: value`` lines of the non-zero counts."""
    items = [(k, v) for k, v in counts.items() if v not in (0, None, {}, [])]
    return "\n".join(f"  {k}: {v}" for k, v in items) if items else "  nothing skipped or changed"
