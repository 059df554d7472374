"""Plain-text tables of study results (the per-ordering table the CLI prints)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats with 4 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)
    ]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in text]
    return "\n".join(lines)


def trials_table(results: list[tuple[object, dict[str, float]]]) -> str:
    """One row per trial (ordering, seed) with its final metrics as columns."""
    metrics = sorted({key for _, final in results for key in final})
    rows = [
        [t.ordering, t.seed, *(final.get(m, float("nan")) for m in metrics)] for t, final in results
    ]
    return format_table(["ordering", "seed", *metrics], rows)
