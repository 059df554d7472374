"""Text cells and tables of results: markdown tables, p-values, intervals, durations."""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats with 4 significant digits, "n/a" where a value is undefined
    (a seed std over one seed, a metric a model was not evaluated on)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)
    ]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in text]
    return "\n".join(lines)


def p_cell(adjusted: float | None, raw: float | None) -> str:
    """A p-value: Holm-adjusted within its family, else the raw p marked unadjusted."""
    if adjusted is not None:
        return f"{adjusted:.3g}"
    return "n/a" if raw is None else f"{raw:.3g} (unadjusted)"


def interval(value: float, ci: tuple[float, float]) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]" if not math.isnan(ci[0]) else f"{value:.3g}"


def clock(seconds: float) -> str:
    """'4 min 05 s' (or '38.2 s' under a minute)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
