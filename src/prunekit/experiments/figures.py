"""The one figure writer of the reports: figures made with matplotlib's object API, finished and written atomically.

No backend is selected (library code never calls ``matplotlib.use``): a figure is a
:class:`matplotlib.figure.Figure` with its own Agg canvas, so making plots neither needs a display nor changes the
caller's pyplot state. Every plot draws its data on the axes of :func:`figure`, describes each axes as a
:class:`Panel` (labels, title, grid, legend) and hands them to :func:`finish`, which lays the figure out and writes
it as PNG or PDF (the format of the file's suffix, PNG without one).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .files import write_shared

#: Where a panel's legend goes: ``best`` (matplotlib's choice, default size), ``small`` (same, small text),
#: ``outside`` (right of the axes, small text: for many curves).
LEGENDS = ("best", "small", "outside")


@dataclass(frozen=True)
class Panel:
    """How one axes of a figure is finished: axis labels, an optional title (``title_size`` a matplotlib font
    size, None for the default), light grid lines (``grid``: the axis that gets them, ``both``, ``x`` or ``y``)
    and a legend (one of :data:`LEGENDS`)."""
    ax: Any
    xlabel: str
    ylabel: str
    title: str | None = None
    title_size: str | None = None
    grid: str = "both"
    legend: str = "best"


def figure(n: int = 1, size: tuple[float, float] = (6.0, 4.0), dpi: int = 120, ncols: int = 1):
    """A new figure of ``n`` axes on a grid of ``ncols`` columns (at most ``n``), each cell ``size`` inches;
    returns (figure, list of axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(n, ncols))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]


def palette(n: int) -> list[tuple]:
    """``n`` distinct colors: matplotlib's tab10, or tab20 beyond 10 (repeating beyond 20)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def reference_line(ax, y: float, label: str) -> None:
    """A dashed black horizontal line at ``y`` (the dense model's accuracy, a global density)."""
    ax.axhline(y, color="k", ls="--", lw=1, label=label)


def log_ticks(ax, ticks: Sequence[float]) -> None:
    """Major x ticks of a log axis at ``ticks``, labelled plainly (``0.5``, ``10``), without minor tick labels."""
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def finish(fig, path: str | os.PathLike, panels: Sequence[Panel], suptitle: str | None = None) -> Path:
    """Label every panel (axis labels, title, grid, legend), give the figure its ``suptitle``, lay it out tightly
    and write it to ``path`` atomically (a temporary file beside it, renamed into place; the file gets the
    permissions of a normally created one). Returns the path."""
    for p in panels:
        _label(p)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    path = Path(path)
    return write_shared(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png"))


def _label(p: Panel) -> None:
    if p.legend not in LEGENDS:
        raise ValueError(f"legend {p.legend!r}: expected one of {', '.join(LEGENDS)}")
    p.ax.set_xlabel(p.xlabel)
    p.ax.set_ylabel(p.ylabel)
    if p.title:
        p.ax.set_title(p.title, **({"fontsize": p.title_size} if p.title_size else {}))
    p.ax.grid(True, which="both", axis=p.grid, alpha=0.3)
    if p.legend == "outside":
        p.ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        p.ax.legend(**({"fontsize": "small"} if p.legend == "small" else {}))

