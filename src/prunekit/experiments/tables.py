"""Table formatting shared by every report: text tables, HTML tables and the cells in them.

A cell is either plain text or a ``(text, value)`` pair, the value being what a sortable HTML table sorts by (None
for a missing value). Numbers follow one convention everywhere: a mean over seeds as ``mean ± std`` with two
decimals, an accuracy as a percentage with two decimals, ``-`` where there is no value.
"""
from __future__ import annotations

import html
import statistics
from typing import Callable, Sequence

#: The text of a missing number.
MISSING = "-"


def stats(values: list[float]) -> dict:
    """``{"mean", "std", "n"}`` of ``values`` over seeds (std 0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def mean_std(v: dict) -> str:
    """``mean ± std`` of a :func:`stats` dict, two decimals."""
    return f"{v['mean']:.2f} ± {v['std']:.2f}"


def number(v: float | None, spec: str = ".2f") -> str:
    """``v`` formatted with ``spec``, or :data:`MISSING`."""
    return MISSING if v is None else format(v, spec)


def percent(fraction: float) -> str:
    """A fraction as a percentage with two decimals (0.9812 -> ``98.12``)."""
    return f"{100 * fraction:.2f}"


def percent_cell(fraction: float | None) -> tuple[str, float | None]:
    """A fraction as a sortable percentage cell; ``(-, None)`` when missing."""
    return (MISSING, None) if fraction is None else (percent(fraction), 100 * fraction)


def cell_text(c) -> str:
    """The text of a cell (plain, or a ``(text, value)`` pair)."""
    return c[0] if isinstance(c, tuple) else c


def method_order(method: str) -> tuple:
    """Sort key of method columns: random, then magnitude, then the others alphabetically."""
    first = {"random": 0, "magnitude": 1}
    return (first.get(method, 2), method)


def group_title(group: tuple, what: str) -> str:
    """``<model> on <dataset> [recipe <recipe>]: <what>``, the title of a table of one comparable group."""
    return f"{group[0]} on {group[1]} [recipe {group[2]}]: {what}"


def delta_rows(deltas: Sequence[float], methods: list[str], head: str, cell: Callable[[str, float], str]) -> list:
    """The rows of a within-δ table (the seeds' "smallest network within δ of dense" summaries): a header, then one
    row per δ (a fraction, shown in points) with ``cell(method, δ)`` per method; method columns are headed
    ``<method> <head>``."""
    rows = [["δ (points)"] + [f"{m} {head}" for m in methods]]
    rows += [[f"{100 * d:+.1f}"] + [cell(m, d) for m in methods] for d in deltas]
    return rows


def text_table(rows: list[list[str]], strip: bool = False) -> str:
    """Rows of text as aligned columns, the first row a header underlined with dashes; the first column is
    left-aligned, the others right-aligned, columns two spaces apart. ``strip`` drops trailing blanks (rows with
    empty last cells)."""
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    if strip:
        lines = [line.rstrip() for line in lines]
    return "\n".join(lines)


def html_table(head: list[str], rows: list[list], best: set[tuple[int, int]] = frozenset()) -> str:
    """A sortable HTML table; cells are ``(text, sort value)`` pairs or plain values, ``best`` the (row, column)
    cells shown in bold."""
    out = ['<table class="sortable"><thead><tr>', "".join(f"<th>{html.escape(str(h))}</th>" for h in head),
           "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cells = []
        for j, c in enumerate(row):
            text, v = c if isinstance(c, tuple) else (c, None)
            attr = f' data-v="{html.escape(str(v))}"' if v is not None else ""
            cls = ' class="best"' if (i, j) in best else ""
            cells.append(f"<td{attr}{cls}>{html.escape('' if text is None else str(text))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)
