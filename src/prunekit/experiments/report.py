"""Tables and plots from the results store.

The table follows the seeds' layout: one row per sparsity, one column per method, each cell the mean ± std over
seeds of a metric (test accuracy in %, final epoch by default), the best of each row marked with ``*``. The dense
baseline (``none``) is shown in its own row.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from pathlib import Path

from .store import Store

METRICS = {
    "test_acc": "final_test_acc",
    "final_test_acc": "final_test_acc",
    "best_val_test_acc": "test_acc_at_best_val",
    "test_acc_at_best_val": "test_acc_at_best_val",
    "best_val_acc": "best_val_acc",
}


def _metric_column(metric: str) -> str:
    from ..errors import unknown

    if metric not in METRICS:
        raise unknown("report metric", metric, METRICS)
    return METRICS[metric]


def recipe(run: dict) -> str:
    """Short hash of what a comparison must hold equal: model, data and training recipe (not seed, not method)."""
    cfg = json.loads(run["config"])
    blob = json.dumps({k: cfg.get(k) for k in ("model", "data", "train")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def aggregate(runs: list[dict], metric: str = "test_acc") -> dict[tuple, dict]:
    """``{(model, dataset, recipe, method, sparsity): {"mean", "std", "n", "values"}}`` of a metric over seeds
    (in %). Runs with a different model, data or training recipe are never averaged together."""
    col = _metric_column(metric)
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        v = r.get(col)
        if v is None:
            continue
        groups[(r["model"], r["dataset"], recipe(r), r["method"], round(r["sparsity"], 10))].append(100.0 * v)
    out = {}
    for key, vals in groups.items():
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "n": len(vals), "values": vals}
    return out


def table(runs: list[dict], metric: str = "test_acc") -> str:
    """A text table per (model, dataset): sparsity rows x method columns, mean ± std over seeds."""
    agg = aggregate(runs, metric)
    if not agg:
        return "(no finished runs)"
    blocks = []
    keys = sorted({k[:3] for k in agg})
    for md in keys:
        cells = {k[3:]: v for k, v in agg.items() if k[:3] == md}
        methods = sorted({m for m, _ in cells if m != "none"}, key=_method_order)
        sparsities = sorted({s for m, s in cells if m != "none"})
        head = ["sparsity"] + methods
        rows = []
        for s in sparsities:
            vals = {m: cells.get((m, s)) for m in methods}
            best = max((v["mean"] for v in vals.values() if v), default=None)
            row = [f"{s:g}"]
            for m in methods:
                v = vals[m]
                row.append("—" if v is None else _fmt(v) + ("*" if len(methods) > 1 and v["mean"] == best else ""))
            rows.append(row)
        n_seeds = sorted({v["n"] for v in cells.values()})
        title = f"{md[0]} on {md[1]}: {metric} (%), mean ± std over {'/'.join(map(str, n_seeds))} seed(s)"
        if sum(1 for k in keys if k[:2] == md[:2]) > 1:
            title += f" [training recipe {md[2]}]"
        lines = [title]
        if ("none", 0.0) in cells:
            lines.append(f"dense (none): {_fmt(cells[('none', 0.0)])}")
        if rows:
            lines.append(_render([head] + rows))
            if len(methods) > 1:
                lines.append("* = best in its row")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _method_order(m: str) -> tuple:
    first = {"random": 0, "magnitude": 1}
    return (first.get(m, 2), m)


def _fmt(v: dict) -> str:
    return f"{v['mean']:.2f} ± {v['std']:.2f}"


def _render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(runs: list[dict], path: str | Path, metric: str = "test_acc", title: str | None = None) -> Path:
    """Accuracy vs remaining weights (log axis) per method, seed std as error bars; dense as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    agg = aggregate(runs, metric)
    methods = sorted({k[3] for k in agg if k[3] != "none"}, key=_method_order)
    fig, ax = plt.subplots(figsize=(6 + (2 if len(methods) > 4 else 0), 4), dpi=120)
    colors = plt.cm.tab10.colors if len(methods) <= 10 else plt.cm.tab20.colors
    markers = "osD^vP*Xhp<>"
    for i, m in enumerate(methods):
        pts = sorted((1.0 - k[4], v) for k, v in agg.items() if k[3] == m)
        xs = [100 * d for d, _ in pts]
        ax.errorbar(xs, [v["mean"] for _, v in pts], yerr=[v["std"] for _, v in pts], marker=markers[i % len(markers)],
                    color=colors[i % len(colors)], capsize=3, label=m)
    for k, v in agg.items():
        if k[3] == "none":
            ax.axhline(v["mean"], color="k", ls="--", lw=1, label="dense")
            break
    ax.set_xscale("log")
    ticks = sorted({100 * (1.0 - k[4]) for k in agg if k[3] != "none"})
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("remaining weights (%)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(True, which="both", alpha=0.3)
    if len(methods) > 4:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def render(store: Store, runs: list[dict], metric: str = "test_acc", plot_path: str | Path | None = None,
           title: str | None = None) -> tuple[str, list[Path]]:
    """The report of ``runs``: the sparsity x method table of one-shot and gradual runs, and the level-by-level
    tables of IMP runs (:mod:`.imp_report`); with ``plot_path``, the plot of the former at that path and the IMP
    plots beside it (``<stem>_accuracy.png``, ``<stem>_epochs.png``). Returns (text, plot paths)."""
    from .imp_report import IMP_METHODS, imp_report

    col = _metric_column(metric)
    imp = [r for r in runs if r["method"] in IMP_METHODS]
    other = [r for r in runs if r["method"] not in IMP_METHODS]
    parts, plots = [], []
    if other or not imp:
        parts.append(table(other, metric))
        if plot_path is not None and other:
            plots.append(plot(other, plot_path, metric, title=title))
    if imp:
        rows = [{**r, "recipe": recipe(r), "levels": store.levels(r["run_id"])} for r in imp]
        plot_dir = Path(plot_path).parent if plot_path is not None else None
        stem = Path(plot_path).stem if plot_path is not None else "imp"
        parts.append(imp_report(rows, col, plot_dir=plot_dir, name=stem))
        if plot_dir is not None:
            plots += [plot_dir / f"{stem}_accuracy.png", plot_dir / f"{stem}_epochs.png"]
    return "\n\n".join(parts), plots


def report(root: str | Path = "runs", name: str | None = None, metric: str = "test_acc",
           plot_path: str | Path | None = None) -> str:
    """The text table of the store under ``root`` (optionally one experiment), and a plot when asked."""
    from ..errors import PrunekitError

    path = Path(root) / "results.sqlite"
    if not path.exists():
        raise PrunekitError(f"no results store at {path}: run an experiment first (prunekit run CONFIG)")
    with Store(path) as store:
        if name is not None and name not in store.experiment_names():
            from ..errors import unknown

            raise unknown("experiment", name, store.experiment_names())
        runs = store.runs(name=name)
        text, _ = render(store, runs, metric, plot_path, title=name)
    return text
