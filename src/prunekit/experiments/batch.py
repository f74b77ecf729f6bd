"""``prunekit run DIR/``: every config file of a folder, one after the other (seed 000's ``main.py --config
exp_configs/``).

The files are ``*.yaml``, ``*.yml`` and ``*.json`` directly in the folder, in name order (subfolders and hidden
files are left alone). Each is loaded like ``prunekit run FILE`` (prunekit's layout, seed 001's flags or seed 000's
JSON layout), with the same ``--set`` overrides applied to every file, and a config with a grid expands into its
runs. A run the store already has as done is skipped (the runner makes a finished run a no-op, keyed by the hash of
its resolved config), an interrupted one resumes, and one that failed before is run again. A run that fails is
recorded in the store as failed with its error, and the batch goes on; a file that does not load or validate has
no run id, so its error is only in the summary. The summary at the end lists what was done, skipped and failed;
the exit status is 1 when anything failed.

Also ``prunekit run``'s side of the grid executor (:mod:`.sweep`) for one file: the config with the command line's
overrides (:func:`prepare`), its lines (:class:`RunLines`), the report after the runs (:func:`render_runs`); and
the ``--dry-run`` listing of ``prunekit run`` and ``prunekit sweep`` (:func:`dry_run`, :func:`dry_run_folder`).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError
from . import config as C
from .backends import InProcessBackend
from .lifecycle import open_store
from .store import INTERRUPTED, Store, StoreError
from .sweep import RUN_OPTIONS, Cell, Grid, execute, plan, starting_points

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class FileResult:
    """What became of one config file."""

    path: Path
    name: str | None = None
    runs: list[str] = field(default_factory=list)             # its distinct run ids, in grid order
    done: list[str] = field(default_factory=list)             # finished in this batch
    skipped: list[str] = field(default_factory=list)          # finished before (not run again)
    failed: dict[str, str] = field(default_factory=dict)      # run id -> error (recorded in the store)
    busy: list[str] = field(default_factory=list)             # being run by another process right now
    error: str | None = None                                  # the file did not load or validate
    metric: str = "test_acc"
    plot: bool = True

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed


@dataclass
class BatchResult:
    folder: Path
    files: list[FileResult] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(len(f.done) for f in self.files)

    @property
    def skipped(self) -> int:
        return sum(len(f.skipped) for f in self.files)

    @property
    def failed(self) -> int:
        """Failed runs plus files that did not load or validate."""
        return sum(len(f.failed) + (f.error is not None) for f in self.files)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)


def config_files(folder: str | Path) -> list[Path]:
    """The config files directly in ``folder`` (``*.yaml``, ``*.yml``, ``*.json``), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{str(folder)!r} is not a folder of config files")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                    and not p.name.startswith(".")), key=lambda p: p.name)
    if not files:
        raise ConfigError(f"{folder}: no config files (*.yaml, *.yml, *.json) in this folder")
    return files


def prepare(path: str | Path, overrides: list[str] | None = None, *, device: str | None = None,
            progress: bool | None = None) -> dict:
    """The config file at ``path`` as plain data, with the ``--set`` ``overrides``, ``device`` as ``train.device``
    (when given) and ``progress`` as ``train.progress`` (when not None)."""
    data = C.apply_overrides(C.load(path), list(overrides or []))
    if device:
        data = C.set_path(data, "train.device", device)
    if progress is not None:
        data = C.set_path(data, "train.progress", progress)
    return data


def record_line(rec) -> str:
    """``prunekit run``'s line of a run's record: method, sparsity, seed, test accuracy, achieved sparsity, time."""
    acc = "—" if rec.final_test_acc is None else f"{100 * rec.final_test_acc:.2f}%"
    how = "already done" if rec.cached else f"{rec.total_seconds:.0f}s"
    return (f"{rec.method:<12} sparsity {rec.sparsity:<6g} seed {rec.seed}: test acc {acc} "
            f"(achieved sparsity {rec.achieved_sparsity:.4f}; {how})")


class RunLines:
    """``prunekit run``'s lines for :func:`~prunekit.experiments.sweep.execute`: ``header`` before the runs, then
    per run ``[i/n]`` (after ``indent``) and its :func:`record_line`, or why it did not finish."""

    def __init__(self, log: Callable[[str], None], header: str, indent: str = ""):
        self.log, self.header, self.indent = log, header, indent
        self.i = self.n = 0

    def planned(self, grid, result, pending: int, where: str, root: Path) -> None:
        self.log(self.header)

    def started(self, total: int, slots: int) -> None:
        self.n = total

    def finished(self, cell, out, result, running: int) -> None:
        self.i += 1
        at = f"{self.indent}[{self.i}/{self.n}]"
        if out.busy:  # another process is running it: neither ours nor a failure
            self.log(f"{at} {cell.run_id} skipped: {out.error}")
        elif not out.ok:
            self.log(f"{at} {cell.run_id} FAILED: {out.error}")
        else:
            self.log(f"{at} {record_line(out.record)}")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(path: Path, overrides, device, progress: bool) -> tuple[C.ExperimentConfig, Grid]:
    """The parsed config and the grid (``prunekit run``'s, no baselines) of one config file of a folder."""
    data = prepare(path, overrides, device=device, progress=None if progress else False)
    return C.parse(data), plan(data, baselines=False)


def run_folder(folder: str | Path, root: str | Path = "runs", *, overrides: list[str] | None = None,
               device: str | None = None, progress: bool = True, data_dir=None,
               log: Callable[[str], None] | None = None) -> BatchResult:
    """Run every config file of ``folder`` in name order into the store under ``root``; see the module text."""
    log = log or _stderr
    files = config_files(folder)
    root = Path(root)
    result = BatchResult(Path(folder))
    with open_store(root / "results.sqlite") as store:
        for n, path in enumerate(files, 1):
            fr = FileResult(path)
            result.files.append(fr)
            try:
                cfg, grid = _load(path, overrides, device, progress)  # every run is checked before any starts
                fr.name, fr.metric, fr.plot = cfg.name, cfg.report.metric, cfg.report.plot
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - a bad file is reported; the batch goes on
                fr.error = f"{type(e).__name__}: {e}"
                log(f"[file {n}/{len(files)}] {path.name}: FAILED to load: {fr.error}")
                continue
            fr.runs = grid.ids
            lines = RunLines(log, f"[file {n}/{len(files)}] {path.name}: {fr.name}, {len(fr.runs)} run(s) -> {root}/",
                             indent="  ")
            try:
                res = execute(grid, root, InProcessBackend(log), lines, options=RUN_OPTIONS, data_dir=data_dir,
                              store=store, log=log)
            except KeyboardInterrupt:
                log("interrupted: rerun the same command to finish the missing runs")
                raise
            fr.done, fr.skipped, fr.failed, fr.busy = res.done, res.skipped, res.failed, res.busy
    return result


def dry_run_folder(folder: str | Path, root: str | Path, *, overrides: list[str] | None = None,
                   device: str | None = None) -> tuple[str, list[str]]:
    """``prunekit run DIR --dry-run``: the :func:`~prunekit.experiments.sweep.dry_run` listing of each config file
    of ``folder`` (or why it does not load), and the status of every run listed."""
    blocks, found = [], []
    for path in config_files(folder):
        try:
            text, statuses = dry_run(_load(path, overrides, device, True)[1], root)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a bad file is reported; the listing goes on
            text, statuses = f"does not load: {type(e).__name__}: {e}", []
        blocks.append(f"== {path.name}: {text}")
        found += statuses
    return "\n".join(blocks), found


def render_runs(root: Path, name: str, metric: str, ids: set[str] | None, plot_path: Path | None) -> str:
    """The report (:func:`~prunekit.experiments.report.render`) of experiment ``name``'s finished runs in the store
    under ``root`` (only those of ``ids`` unless None), its plot written to ``plot_path`` when there are any: the
    tables, then a ``plot: FILE`` line per plot."""
    from .report import render

    with Store(root / "results.sqlite") as store:
        rows = [r for r in store.runs(name=name) if ids is None or r["run_id"] in ids]
        text, plots = render(store, rows, metric, plot_path if rows else None, title=name)
    return "\n".join([text] + [f"plot: {out}" for out in plots])


def summary(result: BatchResult) -> str:
    """The end-of-batch summary: totals, one line per file, then every failure with its error."""
    runs = sum(len(f.runs) for f in result.files)
    lines = [f"batch {result.folder}: {len(result.files)} config file(s), {runs} run(s): {result.done} done, "
             f"{result.skipped} skipped (finished before), {result.failed} failed"]
    width = max(len(f.path.name) for f in result.files)
    for f in result.files:
        if f.error is not None:
            what = "did not load"
        else:
            parts = [f"{len(v)} {k}" for k, v in (("done", f.done), ("skipped", f.skipped), ("failed", f.failed),
                                                  ("busy", f.busy)) if v]
            what = f"{f.name}: {len(f.runs)} run(s): " + (", ".join(parts) or "nothing to do")
        lines.append(f"  {'ok    ' if f.ok else 'FAILED'}  {f.path.name:<{width}}  {what}")
    failures = [(f.path.name, None, f.error) for f in result.files if f.error is not None]
    failures += [(f.path.name, rid, err) for f in result.files for rid, err in f.failed.items()]
    if failures:
        lines.append("failed:")
        lines += [f"  {name} {'run ' + rid if rid else '(config)'}: {err}" for name, rid, err in failures]
        lines.append("fix the cause and run the same command again: finished runs are skipped")
    busy = [rid for f in result.files for rid in f.busy]
    if busy:
        lines.append(f"busy (being run by another process, not run here): {', '.join(busy)}")
    return "\n".join(lines)


def cmd_run_folder(args) -> int:
    """``prunekit run DIR/`` (the arguments of ``prunekit run``): run the folder, print each experiment's table
    unless ``--no-report``, then the summary; exit status 1 when anything failed. With ``--dry-run``, list the
    runs of every file with their status instead."""
    root = Path(args.root)
    if args.dry_run:
        text, statuses = dry_run_folder(args.config, root, overrides=args.overrides, device=args.device)
        print(f"{text}\n{count_line(statuses)}")
        return 0
    res = run_folder(args.config, root, overrides=args.overrides, device=args.device,
                     progress=not args.no_progress, data_dir=args.data_dir)
    if not args.no_report:
        for f in res.files:
            ids = set(f.done) | set(f.skipped)
            if ids:
                plot_path = root / f"{f.name}.png" if f.plot else None
                print(f"== {f.path.name}\n{render_runs(root, f.name, f.metric, ids, plot_path)}")
    print(summary(res))
    return 0 if res.ok else 1


# ------------------------------------------------------------------------------------------------------ dry run
STATUSES = ("done", "running", "failed", INTERRUPTED, "new")  # what --dry-run says of each run


@contextmanager
def _reading(path: Path) -> Iterator[Store]:
    """The store at ``path`` open for reading, creating no file beside it. SQLite's reader of a WAL store that nobody
    has open creates its ``-wal`` and ``-shm`` files (and cannot remove them), so without a ``-wal`` file a copy in a
    temporary folder is read instead (the main file is complete when no writer is connected); with one (a sweep is
    writing it now) the store is read where it is, with the files its writer keeps."""
    if Path(f"{path}-wal").exists():
        with Store(path, readonly=True) as store:
            yield store
        return
    with tempfile.TemporaryDirectory(prefix="prunekit-read-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        try:
            store = Store(copy, readonly=True)
        except StoreError as e:  # name the user's file, not the copy
            raise StoreError(str(e).replace(str(copy), str(path)).replace(tmp, str(path.parent))) from None
        with store:
            yield store


def statuses(cells: list[Cell], root: str | Path) -> dict[str, str]:
    """run id -> ``done``, ``running``, ``failed``, ``interrupted`` or ``new``: what the store under ``root`` says of
    each cell, read without writing anything (no store: every run is new)."""
    path = Path(root) / "results.sqlite"
    if not path.exists():
        return {c.run_id: "new" for c in cells}
    with _reading(path) as store:
        errors = {r["run_id"]: r["error"] for r in store.runs(status="failed")}
        found = {c.run_id: store.status(c.run_id) or "new" for c in cells}
    return {rid: INTERRUPTED if s == "failed" and errors.get(rid) == INTERRUPTED else s for rid, s in found.items()}


def dry_run(grid: Grid, root: str | Path) -> tuple[str, list[str]]:
    """``--dry-run``: (the listing, the status of each run listed). The listing has one line per run, the starting
    points the grid needs first (``model.pretrained``, deepest first), then the grid's cells: run id, method,
    sparsity, seed, status in the store under ``root`` (:func:`statuses`) and, for a run the config does not list
    itself, why it is there (``baseline``: added by the sweep; ``starting point``). Nothing runs, nothing is
    written."""
    ids = set(grid.ids)
    cells = [c for c in starting_points(grid.cells) if c.run_id not in ids] + grid.cells
    status = statuses(cells, root)
    head = ("run id", "method", "sparsity", "seed", "status", "")
    rows = [head] + [(c.run_id, c.resolved["prune"]["method"], c.sparsity, str(c.resolved["seed"]), status[c.run_id],
                      "" if c.role == "grid" else c.role) for c in cells]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    store = Path(root) / "results.sqlite"
    lines = [f"{grid.name}: {len(cells)} run(s) in {root}/"
             + ("" if store.exists() else f" (no results store at {store} yet: every run is new)")]
    lines += ["  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + (f"  {r[5]}" if r[5] else "") for r in rows]
    return "\n".join(line.rstrip() for line in lines), [status[c.run_id] for c in cells]


def count_line(values: list[str]) -> str:
    """``N run(s): a done, b running, c failed, d interrupted, e new`` of a dry run's statuses."""
    return f"{len(values)} run(s): " + ", ".join(f"{sum(v == s for v in values)} {s}" for s in STATUSES)
