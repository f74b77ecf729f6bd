"""Tables and plots from the results store.

The table follows the seeds' layout: one row per sparsity, one column per method, each cell the mean ± std over
seeds of a metric (test accuracy in %, final epoch by default), the best of each row marked with ``*``. The dense
baseline (``none``) is shown in its own row. The runs' numbers come from :mod:`.summary`, the formatting from
:mod:`.tables`, the figures are written by :mod:`.figures`; IMP runs are reported level by level
(:mod:`.imp_report`).
"""
from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import PrunekitError, unknown
from . import figures
from .figures import Panel
from .downstream import downstream_report
from .imp_report import imp_report
from .reconstruction_report import reconstruction_report
from .store import Store
from .summary import METRICS, aggregate, labelled, metric_column, recipe, split_level_runs, value, with_levels
from .tables import cell_text, delta_rows, group_title, mean_std, method_order, text_table

__all__ = ["METRICS", "aggregate", "fairness_notes", "plot", "plot_layers", "plot_runs", "plot_speedup", "recipe",
           "render", "render_texts", "report", "split_level_runs", "structured_rows", "structured_table", "table",
           "table_rows", "within_delta_table"]


def table_rows(runs: list[dict], metric: str = "test_acc") -> list[dict]:
    """The seed-style tables as data, one block per (model, dataset, recipe): ``title``, ``dense`` (the dense
    baseline, formatted, or None), ``head``, ``rows`` (cells are (text, value) pairs; value None for "—") and
    ``best`` ((row, column) of each row's best mean)."""
    agg = aggregate(runs, metric)
    blocks = []
    keys = sorted({k[:3] for k in agg})
    for md in keys:
        cells = {k[3:]: v for k, v in agg.items() if k[:3] == md}
        methods = sorted({m for m, _ in cells if m != "none"}, key=method_order)
        sparsities = sorted({s for m, s in cells if m != "none"})
        rows, best = [], set()
        for i, s in enumerate(sparsities):
            vals = {m: cells.get((m, s)) for m in methods}
            top = max((v["mean"] for v in vals.values() if v), default=None)
            row = [(f"{s:g}", s)]
            for j, m in enumerate(methods, start=1):
                v = vals[m]
                row.append(("—", None) if v is None else (mean_std(v), v["mean"]))
                if v is not None and len(methods) > 1 and v["mean"] == top:
                    best.add((i, j))
            rows.append(row)
        n_seeds = sorted({v["n"] for v in cells.values()})
        title = f"{md[0]} on {md[1]}: {metric} (%), mean ± std over {'/'.join(map(str, n_seeds))} seed(s)"
        if sum(1 for k in keys if k[:2] == md[:2]) > 1:
            title += f" [training recipe {md[2]}]"
        dense = mean_std(cells[("none", 0.0)]) if ("none", 0.0) in cells else None
        blocks.append({"title": title, "dense": dense, "head": ["sparsity"] + methods, "rows": rows, "best": best,
                       "methods": methods})
    return blocks


def table(runs: list[dict], metric: str = "test_acc") -> str:
    """A text table per (model, dataset): sparsity rows x method columns, mean ± std over seeds."""
    blocks = table_rows(runs, metric)
    if not blocks:
        return "(no finished runs)"
    out = []
    for b in blocks:
        lines = [b["title"]]
        if b["dense"] is not None:
            lines.append(f"dense (none): {b['dense']}")
        if b["rows"]:
            rows = [[text + ("*" if (i, j) in b["best"] else "") for j, (text, _v) in enumerate(row)]
                    for i, row in enumerate(b["rows"])]
            lines.append(text_table([b["head"]] + rows))
            if len(b["methods"]) > 1:
                lines.append("* = best in its row")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def fairness_notes(runs: list[dict], tol: float = 0.005) -> str:
    """What makes a comparison unequal, said next to the tables: runs whose achieved sparsity misses the requested
    one by more than ``tol`` of the requested kept fraction, and models trained with more than one recipe (their
    tables are separate and must not be compared). Empty when there is nothing to say."""
    lines = []
    for r in runs:
        req, got = r.get("sparsity"), r.get("achieved_sparsity")
        if r["method"] == "none" or req is None or got is None:
            continue
        if abs(got - req) > tol * max(1.0 - req, 1e-12):
            lines.append(f"  {r['run_id']} {r['method']} seed {r['seed']}: requested sparsity {req:g}, achieved "
                         f"{got:.5f}")
    out = []
    if lines:
        out.append(f"sparsity check: {len(lines)} run(s) miss the requested sparsity by more than {100 * tol:g}% "
                   "of the kept weights\n" + "\n".join(lines))
    recipes: dict[tuple, set] = defaultdict(set)
    for r in runs:
        recipes[(r["model"], r["dataset"])].add(recipe(r))
    for (model, ds), rs in sorted(recipes.items()):
        if len(rs) > 1:
            out.append(f"budget check: {model} on {ds} was trained with {len(rs)} different recipes "
                       f"({', '.join(sorted(rs))}); their tables are separate and not comparable")
    return "\n".join(out)


def within_delta_table(runs: list[dict], metric: str = "test_acc", deltas=(0.0, 0.005, 0.01, 0.02)) -> str:
    """Seed 002's summary for one-shot/retrain runs: per method, the highest sparsity whose mean ``metric`` is at
    least the dense run's (method ``none``, same model, data and recipe) minus δ, with its accuracy difference.
    Empty when there is no dense run to compare with."""
    agg = aggregate(runs, metric)
    dense = {k[:3]: v["mean"] for k, v in agg.items() if k[3] == "none"}
    blocks = []
    for key3, ref in dense.items():
        methods = sorted({k[3] for k in agg if k[:3] == key3 and k[3] != "none"}, key=method_order)
        if not methods:
            continue
        rows = delta_rows(deltas, methods, "sparsity  Δacc", functools.partial(_within, agg, key3, ref))
        blocks.append(group_title(key3, f"highest sparsity within δ of dense ({ref:.2f}%)") + "\n" + text_table(rows))
    return "\n\n".join(blocks)


def _within(agg: dict, key3: tuple, ref: float, method: str, delta: float) -> str:
    """``<sparsity>  <Δacc>`` of the highest sparsity at which ``method`` stays within ``delta`` of ``ref``."""
    ok = [(k[4], v["mean"]) for k, v in agg.items() if k[:3] == key3 and k[3] == method
          and v["mean"] >= ref - 100 * delta]
    if not ok:
        return "-"
    sparsity, acc = max(ok)
    return f"{sparsity:g}  {acc - ref:+.2f}"


def structured_rows(runs: list[dict]) -> dict | None:
    """Physical size and speed of structured runs (those whose record has ``structured``) as data: ``head`` and
    ``rows`` per model, method and sparsity: the shrunk model's parameters and MACs as % of dense, the theoretical
    speedup, and the measured latency speedup over the dense model at each batch size (means over seeds)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        st = value(r, "structured")
        if st:
            groups[(r["model"], r["dataset"], r["method"], round(r["sparsity"], 10))].append(st)
    if not groups:
        return None
    sizes = sorted({row["batch_size"] for v in groups.values() for st in v for row in st["latency"]})
    head = ["model", "method", "sparsity", "params %", "MACs %", "theory x"] + [f"b{b} x" for b in sizes] + ["device"]
    rows = []
    for (model, _ds, method, sp), sts in sorted(groups.items(), key=lambda kv: (kv[0][0], method_order(kv[0][2]),
                                                                              kv[0][3])):
        params = 100 * statistics.fmean(st["params_ratio"] for st in sts)
        macs = 100 * statistics.fmean(st["macs_ratio"] for st in sts)
        theory = statistics.fmean(st["theoretical_speedup"] for st in sts)
        line = [model, method, (f"{sp:g}", sp), (f"{params:.1f}", params), (f"{macs:.1f}", macs),
                (f"{theory:.2f}", theory)]
        for bs in sizes:
            v = [row["speedup"] for st in sts for row in st["latency"] if row["model"] == "shrunk"
                 and row["batch_size"] == bs]
            line.append((f"{statistics.fmean(v):.2f}", statistics.fmean(v)) if v else ("-", None))
        line.append(sts[0].get("device", "?"))
        rows.append(line)
    return {"head": head, "rows": rows}


def structured_table(runs: list[dict]) -> str:
    """:func:`structured_rows` as text (empty if there are no structured runs)."""
    st = structured_rows(runs)
    if st is None:
        return ""
    rows = [[cell_text(c) for c in row] for row in st["rows"]]
    return ("structured runs: the shrunk model vs the dense one (params and MACs in % of dense; speedups measured "
            "in the run, median latency, dense / shrunk)\n" + text_table([st["head"]] + rows))


def render_texts(store: Store, runs: list[dict], metric: str = "test_acc") -> list[tuple[str, str]]:
    """The report's text-only sections as (name, text): the within-δ summary, the fairness notes and the IMP
    level report (no plots)."""
    imp, other = split_level_runs(runs)
    out = [(name, text) for name, text in (("Highest sparsity within δ of dense", within_delta_table(other, metric)),
                                           ("Fairness checks", fairness_notes(other))) if text]
    if imp:
        out.append(("Iterative pruning levels", imp_report(with_levels(store, imp), metric_column(metric))))
    return out


def render(store: Store, runs: list[dict], metric: str = "test_acc", plot_path: str | Path | None = None,
           title: str | None = None) -> tuple[str, list[Path]]:
    """The report of ``runs``: the sparsity x method table of one-shot and gradual runs, and the level-by-level
    tables of IMP runs (:mod:`.imp_report`); with ``plot_path``, the plot of the former at that path and the IMP
    plots beside it (``<stem>_accuracy.png``, ``<stem>_epochs.png``). Returns (text, plot paths)."""
    col = metric_column(metric)
    imp, other = split_level_runs(labelled(runs))
    parts, plots = [], []
    if other or not imp:
        parts.append(table(other, metric))
        parts += [t for t in (within_delta_table(other, metric), structured_table(other),
                              downstream_report(store, other, metric), reconstruction_report(store, other),
                              fairness_notes(other)) if t]
        if plot_path is not None and other:
            plots += plot_runs(other, plot_path, metric, title=title)
    if imp:
        rows = with_levels(store, imp)
        plot_dir = Path(plot_path).parent if plot_path is not None else None
        stem = Path(plot_path).stem if plot_path is not None else "imp"
        parts.append(imp_report(rows, col, plot_dir=plot_dir, name=stem))
        if plot_dir is not None:
            plots += [plot_dir / f"{stem}_accuracy.png", plot_dir / f"{stem}_epochs.png"]
    return "\n\n".join(parts), plots


def report(root: str | Path = "runs", name: str | None = None, metric: str = "test_acc",
           plot_path: str | Path | None = None) -> str:
    """The text table of the store under ``root`` (optionally one experiment), and a plot when asked."""
    path = Path(root) / "results.sqlite"
    if not path.exists():
        raise PrunekitError(f"no results store at {path}: run an experiment first (prunekit run CONFIG)")
    with Store(path, readonly=True) as store:  # reading only: works on a store this user may not write
        if name is not None and name not in store.experiment_names():
            raise unknown("experiment", name, store.experiment_names())
        runs = store.runs(name=name)
        text, _ = render(store, runs, metric, plot_path, title=name)
    return text


def _curve_label(name: str, group: tuple, groups: list) -> str:
    """A curve's legend label: its name, and its model and recipe when the plot has several groups."""
    return name if len(groups) == 1 else f"{name} ({group[0]}, {group[-1]})"


def _curves_figure(curves: list) -> tuple:
    """(figure, axes, colors) of a plot with one curve per (group, method): wider when the legend goes outside."""
    fig, [ax] = figures.figure(size=(6 + (2 if len(curves) > 4 else 0), 4), dpi=120)
    return fig, ax, figures.palette(len(curves))


def _finish_curves(fig, ax, path, title: str | None, xlabel: str, metric: str, n_curves: int) -> Path:
    panel = Panel(ax, xlabel, f"{metric} (%)", title=title, legend="outside" if n_curves > 4 else "best")
    return figures.finish(fig, path, [panel])


def plot(runs: list[dict], path: str | Path, metric: str = "test_acc", title: str | None = None) -> Path:
    """Accuracy vs remaining weights (log axis) per method, seed std as error bars; dense as a dashed line."""
    agg = aggregate(runs, metric)
    groups = sorted({k[:3] for k in agg})  # (model, dataset, recipe): never one curve across them
    curves = sorted({(k[:3], k[3]) for k in agg if k[3] != "none"}, key=lambda c: (c[0], method_order(c[1])))
    fig, ax, colors = _curves_figure(curves)
    markers = "osD^vP*Xhp<>"
    for i, (g, m) in enumerate(curves):
        pts = sorted(((1.0 - k[4], v) for k, v in agg.items() if k[:3] == g and k[3] == m), key=lambda t: t[0])
        ax.errorbar([100 * d for d, _ in pts], [v["mean"] for _, v in pts], yerr=[v["std"] for _, v in pts],
                    marker=markers[i % len(markers)], color=colors[i], capsize=3, label=_curve_label(m, g, groups))
    for g in groups:
        if g + ("none", 0.0) in agg:
            figures.reference_line(ax, agg[g + ("none", 0.0)]["mean"], _curve_label("dense", g, groups))
    ax.set_xscale("log")
    ticks = sorted({100 * (1.0 - k[4]) for k in agg if k[3] != "none"})
    if ticks:
        figures.log_ticks(ax, ticks)
    ax.invert_xaxis()
    return _finish_curves(fig, ax, path, title, "remaining weights (%)", metric, len(curves))


def plot_speedup(runs: list[dict], path: str | Path, metric: str = "test_acc", title: str | None = None) -> Path:
    """Accuracy vs theoretical speedup (dense MACs / masked or shrunk MACs, log axis) per method: one point per
    (method, sparsity), mean over seeds with std error bars in both directions; dense as a dashed line."""
    col = metric_column(metric)
    pts: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        v, sp = value(r, col), value(r, "theoretical_speedup")
        if v is None or sp is None:
            continue
        pts[(r["model"], recipe(r), r["method"], round(r["sparsity"], 10))].append((sp, 100.0 * v))
    groups = sorted({k[:2] for k in pts})
    curves = sorted({(k[:2], k[2]) for k in pts if k[2] != "none"}, key=lambda c: (c[0], method_order(c[1])))
    fig, ax, colors = _curves_figure(curves)
    for i, (g, m) in enumerate(curves):
        rows = sorted((statistics.fmean(x for x, _ in v), statistics.fmean(y for _, y in v),
                       statistics.pstdev([x for x, _ in v]), statistics.pstdev([y for _, y in v]))
                      for k, v in pts.items() if k[:2] == g and k[2] == m)
        ax.errorbar([r[0] for r in rows], [r[1] for r in rows], xerr=[r[2] for r in rows],
                    yerr=[r[3] for r in rows], marker="o", color=colors[i], capsize=3,
                    label=_curve_label(m, g, groups))
    for g in groups:
        dense = [y for k, v in pts.items() if k[:2] == g and k[2] == "none" for _, y in v]
        if dense:
            figures.reference_line(ax, statistics.fmean(dense), _curve_label("dense", g, groups))
    ax.set_xscale("log")
    return _finish_curves(fig, ax, path, title, "theoretical speedup (dense MACs / pruned MACs)", metric,
                          len(curves))


def plot_runs(runs: list[dict], path: str | Path, metric: str = "test_acc", title: str | None = None,
              speedup_path: str | Path | None = None) -> list[Path]:
    """The plots of one-shot and gradual runs: :func:`plot` at ``path`` and, when a run has a theoretical speedup,
    :func:`plot_speedup` at ``speedup_path`` (default ``<stem>_speedup<suffix>`` beside ``path``)."""
    out = [plot(runs, path, metric, title=title)]
    if any(value(r, "theoretical_speedup") for r in runs):
        path = Path(path)
        out.append(plot_speedup(runs, speedup_path or path.with_name(f"{path.stem}_speedup{path.suffix}"), metric,
                                title=title))
    return out


def plot_layers(store: Store, run_id: str, path: str | Path, title: str | None = None) -> Path:
    """Per-layer density of one run's final masks (bars in forward order), with the global density as a line."""
    rows = store.layers(run_id)
    if not rows:
        raise PrunekitError(f"run {run_id!r} has no per-layer rows in the store (unknown id, or not finished)")
    fig, [ax] = figures.figure(size=(max(5, 0.45 * len(rows) + 2), 4), dpi=120)
    ax.bar(range(len(rows)), [100 * r["density"] for r in rows], color="tab:blue")
    kept, total = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
    figures.reference_line(ax, 100 * kept / max(total, 1), f"global {100 * kept / max(total, 1):.2f}%")
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=60, ha="right", fontsize="small")
    panel = Panel(ax, "", "remaining weights (%)", title=title or f"run {run_id}: per-layer density")
    return figures.finish(fig, path, [panel])
