"""``prunekit report --export DIR``: the raw numbers of the store as CSV and NPZ, and the report's plots as PNG and PDF.

Layout of ``DIR`` (every file is written atomically: a temporary file beside it, then renamed)::

    runs.csv, runs.npz          one row per finished run: identity (run id, experiment, method, requested sparsity,
                                seed, model, dataset, training recipe), accuracies (final, at the best validation
                                epoch, best validation, right after pruning), achieved sparsity, compression,
                                theoretical speedup, the shrunk model's size and measured speedup (structured
                                methods), epochs and timings (prune, train, total seconds), peak memory
    epochs.csv                  every run's per-epoch curves (run_id, epoch, lr, losses, accuracies, seconds,
                                sparsity)
    layers.csv                  every run's per-layer sparsity (run_id, layer, position, shape, kept, total,
                                density, sparsity)
    <run_id>/metrics.csv        the run's row of runs.csv
    <run_id>/epochs.csv         its per-epoch curves
    <run_id>/layers.csv         its per-layer sparsity
    <run_id>/levels.csv         its IMP levels or cascade steps (only for runs that have them)
    <run_id>/run.npz            all of the above as arrays: each metric of metrics.csv (0-d), epoch and
                                epoch_<field>, layer_name and layer_<field>, level and level_<field>
    <stem>.png / .pdf           the report's plots (accuracy vs sparsity, vs theoretical speedup, and the IMP
                                accuracy and epoch plots); <stem> is the experiment name, or "report"

In the NPZ files text columns are unicode arrays, whole-number columns without a missing value are int64 and
every other number is float64 (NaN where the store has no value), so ``numpy.load(path)`` needs no pickle. In the
CSV files a missing value is an empty cell and floats are written with ``repr`` (they read back bit for bit).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ..errors import PrunekitError, unknown
from .config import file_stem
from .files import write_shared
from .imp_report import plot_levels
from .report import plot_runs
from .store import EPOCH_FIELDS, LEVEL_FIELDS, Store
from .summary import metric_column, recipe, split_level_runs, value, with_levels

#: Text columns of runs.csv; every other column is a number.
TEXT_COLUMNS = ("run_id", "experiment", "method", "model", "dataset", "recipe")
#: The columns of runs.csv / runs.npz, in order.
RUN_COLUMNS = TEXT_COLUMNS[:3] + ("sparsity", "seed") + TEXT_COLUMNS[3:] + (
    "final_test_acc", "test_acc_at_best_val", "best_val_acc", "best_epoch", "val_acc_before_finetune",
    "test_acc_before_finetune", "achieved_sparsity", "compression", "theoretical_speedup", "params_ratio",
    "macs_ratio", "measured_speedup", "measured_speedup_batch", "epochs", "prune_seconds", "train_seconds",
    "total_seconds", "peak_memory_mb")
LAYER_COLUMNS = ("layer", "position", "shape", "kept", "total", "density", "sparsity")
LEVEL_COLUMNS = ("level", "branch") + LEVEL_FIELDS


def run_row(run: dict, experiment: str | None = None) -> dict:
    """The runs.csv row of a stored run (a row of :meth:`Store.runs`)."""
    row = {c: value(run, c) for c in RUN_COLUMNS
           if c not in ("experiment", "recipe", "params_ratio", "macs_ratio", "measured_speedup",
                        "measured_speedup_batch")}
    row["experiment"] = experiment if experiment is not None else value(run, "name")
    row["recipe"] = recipe(run)
    st = value(run, "structured") or {}
    row["params_ratio"] = st.get("params_ratio")
    row["macs_ratio"] = st.get("macs_ratio")
    shrunk = sorted((r for r in st.get("latency", []) if r.get("model") == "shrunk"), key=lambda r: r["batch_size"])
    row["measured_speedup"] = shrunk[-1]["speedup"] if shrunk else None
    row["measured_speedup_batch"] = shrunk[-1]["batch_size"] if shrunk else None
    return {c: row.get(c) for c in RUN_COLUMNS}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def _csv(columns, rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def _column(values: list, text: bool) -> np.ndarray:
    if text or not all(v is None or isinstance(v, (int, float)) for v in values):
        return np.array(["" if v is None else str(v) for v in values], dtype=str)
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _arrays(prefix: str, columns, rows: list[dict], text=(), rename=None) -> dict[str, np.ndarray]:
    rename = rename or {}
    return {rename.get(c, f"{prefix}{c}"): _column([r.get(c) for r in rows], c in text) for c in columns}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    return write_shared(path, lambda f: np.savez(f, **arrays))


def _write_csv(path: Path, columns, rows: list[dict]) -> Path:
    text = _csv(columns, rows)
    return write_shared(path, lambda f: f.write(text.encode()))


def export(store: Store, out_dir: str | Path, *, name: str | None = None, metric: str = "test_acc",
           plots: bool = True) -> list[Path]:
    """Write the finished runs of ``store`` (optionally of experiment ``name``) to ``out_dir`` as described in the
    module text; returns the paths written."""
    metric_column(metric)  # an unknown metric fails before anything is written
    if name is not None and name not in store.experiment_names():
        raise unknown("experiment", name, store.experiment_names())
    runs = store.runs(name=name)
    if not runs:
        raise PrunekitError(f"nothing to export: the store {store.path} has no finished runs"
                            + (f" in experiment {name!r}" if name else ""))
    out = Path(out_dir)
    written: list[Path] = []
    rows, all_epochs, all_layers = [], [], []
    for r in runs:
        rid = r["run_id"]
        row = run_row(r, name)
        rows.append(row)
        epochs = store.epochs(rid)
        layers = [{**l, "sparsity": 1.0 - l["density"]} for l in store.layers(rid)]
        levels = store.levels(rid)
        all_epochs += epochs
        all_layers += [{**l, "run_id": rid} for l in layers]
        d = out / rid
        written.append(_write_csv(d / "metrics.csv", RUN_COLUMNS, [row]))
        written.append(_write_csv(d / "epochs.csv", ("epoch",) + EPOCH_FIELDS, epochs))
        written.append(_write_csv(d / "layers.csv", LAYER_COLUMNS, layers))
        arrays = {c: _column([row[c]], c in TEXT_COLUMNS).reshape(()) for c in RUN_COLUMNS}
        arrays.update(_arrays("epoch_", ("epoch",) + EPOCH_FIELDS, epochs, rename={"epoch": "epoch"}))
        arrays.update(_arrays("layer_", LAYER_COLUMNS, layers, text=("layer", "shape"), rename={"layer": "layer_name"}))
        if levels:
            written.append(_write_csv(d / "levels.csv", LEVEL_COLUMNS, levels))
            arrays.update(_arrays("level_", LEVEL_COLUMNS, levels, text=("branch", "stop_reason"),
                                  rename={"level": "level"}))
        written.append(_write_npz(d / "run.npz", arrays))
    written.append(_write_csv(out / "runs.csv", RUN_COLUMNS, rows))
    written.append(_write_npz(out / "runs.npz", _arrays("", RUN_COLUMNS, rows, text=TEXT_COLUMNS)))
    written.append(_write_csv(out / "epochs.csv", ("run_id", "epoch") + EPOCH_FIELDS, all_epochs))
    written.append(_write_csv(out / "layers.csv", ("run_id",) + LAYER_COLUMNS, all_layers))
    if plots:
        written += export_plots(store, runs, out, file_stem(name) if name else "report", metric, title=name)
    return written


def export_plots(store: Store, runs: list[dict], out_dir: str | Path, stem: str, metric: str = "test_acc",
                 title: str | None = None) -> list[Path]:
    """The report's plots of ``runs`` in ``out_dir``, each as ``.png`` and ``.pdf``."""
    out = Path(out_dir)
    stem = file_stem(stem)  # a stored experiment name names files in out_dir: never a path out of it
    col = metric_column(metric)
    imp, other = split_level_runs(runs)
    imp_rows = with_levels(store, imp)
    written = []
    for ext in ("png", "pdf"):
        if other:
            written += plot_runs(other, out / f"{stem}.{ext}", metric, title=title)
        if imp_rows:
            written += plot_levels(imp_rows, out, stem, col, title=title, ext=ext)
    return written
