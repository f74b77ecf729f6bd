"""The grid executor of ``prunekit run`` and ``prunekit sweep``.

Each run is idempotent by its config hash (:func:`prunekit.experiments.run`): a finished run is skipped, an
interrupted one resumes from its checkpoint, so killing a sweep and starting it again finishes only what is
missing. A run that fails is recorded in the store with its error and reported; it is not retried unless asked
(``retry_failed``), and never silently dropped. :func:`plan` turns a config into a :class:`Grid`; :func:`execute`
runs it on a :class:`~prunekit.experiments.backends.Backend` (this process, a local process pool, Ray, Slurm) and
alone keeps the store, the result and the lines, whatever the backend: remote workers send their rows back.
``prunekit sweep`` is :func:`sweep`; ``prunekit run`` is the in-process backend with :data:`RUN_OPTIONS`. Runs that
start from a trained model (``model.pretrained`` naming a config) need that run first: a sweep runs those starting
points before the grid, so two workers never train the same dense network at once.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import config as C
from .backends import Backend, Job, Outcome, SweepContext, check_workers, make_backend, run_one, worker_init
from .isolated import export_for_worker, own_journal, recover_journals
from .lifecycle import open_store
from .store import INTERRUPTED, Store

__all__ = ["Cell", "Grid", "GridOptions", "RUN_OPTIONS", "SweepResult", "SweepProgress", "plan", "execute", "sweep",
           "sweep_runs", "with_baselines", "check_workers", "record_failure", "starting_points", "BASELINES",
           "run_one", "worker_init"]

BASELINES = ("random", "magnitude")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plain(resolved) -> dict:
    """A resolved run as plain data: the form of its run id, its config.json and its store row."""
    return resolved.to_dict() if hasattr(resolved, "to_dict") else resolved


# ------------------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Cell:
    """One run of a grid: its id, its plain config (one run, no grid), its resolved config (plain data), and why it
    is there: ``grid`` (a cell of the config), ``baseline`` (added by the sweep) or ``starting point`` (a run that
    ``model.pretrained`` of others names)."""

    run_id: str
    cfg: dict
    resolved: dict
    role: str = "grid"

    @property
    def sparsity(self) -> str:
        """The target sparsity, or ``N levels`` for the IMP codes, whose levels set it."""
        p = self.resolved["prune"]
        if p["sparsity"] is not None:
            return f"{p['sparsity']:g}"
        levels = (p.get("method_options") or {}).get("levels")
        return f"{levels} levels" if levels is not None else "-"

    def what(self) -> str:
        """``METHOD s=SPARSITY seed N`` (no sparsity for the IMP codes)."""
        p = self.resolved["prune"]
        s = f" s={p['sparsity']}" if p["sparsity"] is not None else ""
        return f"{p['method']}{s} seed {self.resolved['seed']}"


@dataclass
class Grid:
    """The distinct runs of a config, in grid order (a run id that repeats keeps its first cell)."""

    name: str
    cells: list[Cell]

    @property
    def ids(self) -> list[str]:
        return [c.run_id for c in self.cells]


def plan(data: dict, baselines: bool = True) -> Grid:
    """The :class:`Grid` of the config ``data`` (plain data, grid included): the cells of :func:`sweep_runs` (with
    ``baselines``, those the sweep adds), every one resolved and validated once, before anything runs."""
    cells: dict[str, Cell] = {}
    for cfg, role in _grid_configs(data, baselines):
        resolved = C.resolve(cfg)
        rid = C.run_id(resolved)
        if rid not in cells:
            cells[rid] = Cell(rid, cfg, plain(resolved), role)
    name = next(iter(cells.values())).resolved["name"] if cells else ""
    return Grid(name, list(cells.values()))


def with_baselines(data: dict) -> dict:
    """``data`` with the ``random`` and ``magnitude`` baselines added to a grid over pruning methods (a
    ``prune.method`` list, or ``prune`` mapping entries), when they are missing. Grids over one-shot/gradual
    methods only: IMP codes and cascades compare among themselves. The added cells still carry the base ``prune``
    section's method options; :func:`sweep_runs` gives them the shared options only."""
    return _with_baselines(data)[0]


def _with_baselines(data: dict) -> tuple[dict, tuple[str, ...]]:
    """(:func:`with_baselines` of ``data``, the baselines it added)."""
    from ..registry import get_method

    grid = dict(data.get("grid") or {})
    if "prune.method" in grid and isinstance(grid["prune.method"], list) and grid["prune.method"]:
        methods = [get_method(m).name for m in grid["prune.method"]]
        if any(get_method(m).kind == "levels" for m in methods):
            return data, ()
        extra = tuple(b for b in BASELINES if b not in methods)
        if extra:
            grid["prune.method"] = list(grid["prune.method"]) + list(extra)
    elif isinstance(grid.get("prune"), list) and grid["prune"] and all(isinstance(e, dict) for e in grid["prune"]):
        entries = grid["prune"]
        base = (data.get("prune") or {})
        names = [get_method(e.get("method", base.get("method", "none"))).name for e in entries]
        if any(get_method(m).kind == "levels" for m in names) or any("cascade" in e for e in entries):
            return data, ()
        extra = tuple(b for b in BASELINES if b not in names)
        grid["prune"] = list(entries) + [{"method": b} for b in extra]
    else:
        return data, ()
    return {**data, "grid": grid}, extra


def sweep_runs(data: dict, baselines: bool = True) -> list[dict]:
    """The plain configs (one run each, no grid) of every cell :func:`sweep` runs for ``data``, in grid order,
    validated as far as :func:`prunekit.experiments.config.expand` goes (an empty grid axis is an error).

    With ``baselines``, a grid over methods gets the cells of the :data:`BASELINES` it lacks
    (:func:`with_baselines`). A baseline cell keeps, of the ``prune`` section, what every method shares (the
    sparsity, warm-up, gradual schedule, the options of :class:`prunekit.prune.PruneOptions`) and drops the
    options of the grid's own methods (``fisher_samples`` of ``woodfisher``), which are no option of it: so a
    config that ``prunekit run`` accepts is accepted by ``prunekit sweep`` too, and each baseline cell is the
    same run, with the same run id, as that baseline written by hand with the shared options."""
    return [cfg for cfg, _ in _grid_configs(data, baselines)]


def _grid_configs(data: dict, baselines: bool) -> list[tuple[dict, str]]:
    """(plain config, ``grid`` or ``baseline``) of every cell of :func:`sweep_runs`."""
    data = C.translate(data)  # seed 000's and seed 001's layouts: their grids and prune sections as prunekit's
    C.check_grid(data)  # before the baselines join: an empty method axis must not become a grid of baselines
    full, added = _with_baselines(data) if baselines else (data, ())
    if not added:
        return [(r, "grid") for r in C.expand(full)]
    from ..registry import get_method

    return [(_shared_only(r), "baseline") if get_method((r.get("prune") or {}).get("method", "none")).name in added
            else (r, "grid") for r in C.expand(full)]


def _shared_only(cfg: dict) -> dict:
    """``cfg`` with its ``prune`` section cut down to the keys every method takes."""
    import dataclasses

    from ..prune import PruneOptions

    shared = {f.name for f in dataclasses.fields(PruneOptions)} | set(C.PRUNE_KEYS)
    return {**cfg, "prune": {k: v for k, v in cfg["prune"].items() if k in shared}}


def _pretrained(resolved: dict) -> tuple[str, dict] | None:
    """(run id, plain config) of the run a resolved config starts from, or None."""
    pre = resolved["model"].get("pretrained")
    return (pre["run_id"], pre["config"]) if pre and "config" in pre else None


def starting_points(cells: list[Cell], depths: dict[str, int] | None = None) -> list[Cell]:
    """Every run that ``model.pretrained`` of ``cells`` names, and the runs those start from in turn, deepest first
    (each after the one it starts from); ``depths`` gets each one's depth (0: it starts from no run)."""
    found: dict[str, Cell] = {}
    depths = {} if depths is None else depths

    def visit(resolved: dict) -> int:
        dep = _pretrained(resolved)
        if dep is None:
            return -1
        rid, cfg = dep
        if rid not in found:
            found[rid] = Cell(rid, cfg, plain(C.resolve(cfg)), "starting point")
            depths[rid] = visit(found[rid].resolved) + 1
        return depths[rid]

    for cell in cells:
        visit(cell.resolved)
    return sorted(found.values(), key=lambda c: depths[c.run_id])


# ------------------------------------------------------------------------------------------------ the executor
@dataclass
class SweepResult:
    total: int
    done: list[str] = field(default_factory=list)       # finished in this sweep
    skipped: list[str] = field(default_factory=list)    # already done before it
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error (this sweep or earlier, not retried)
    busy: list[str] = field(default_factory=list)       # being run by another process right now
    backend: str = "local"

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class GridOptions:
    """How :func:`execute` treats what the store already has. ``retry_failed``: run again the runs that failed
    (otherwise they are reported as failed earlier). ``lookup_done``: hand the finished runs to the backend too,
    which answers them from the store, so every run is reported in grid order (``prunekit run``), instead of
    skipping them up front. ``dependencies_first``: run the ``model.pretrained`` starting points before the grid,
    so that parallel workers never train one twice (otherwise each run trains its own when it gets there; remote
    backends always run them first)."""

    retry_failed: bool = False
    lookup_done: bool = False
    dependencies_first: bool = True


RUN_OPTIONS = GridOptions(retry_failed=True, lookup_done=True, dependencies_first=False)
"""``prunekit run``'s: every run in grid order, the finished ones looked up, the failed ones run again."""


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class SweepProgress:
    """``prunekit sweep``'s lines: what the store has and where the runs go, then one line per finished run with the
    counts, the elapsed time and the ETA."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.total, self.slots, self.t_start = 0, 1, time.perf_counter()
        self.durations: list[float] = []

    def planned(self, grid: Grid, result: SweepResult, pending: int, where: str, root: Path) -> None:
        self.log(f"sweep {grid.name}: {len(grid.cells)} run(s) -> {root}/  {len(result.skipped)} done already, "
                 f"{len(result.failed)} failed earlier{' (rerun with --retry-failed)' if result.failed else ''}, "
                 f"{pending} to run on {where}")

    def started(self, total: int, slots: int) -> None:
        self.total, self.slots, self.t_start = total, slots, time.perf_counter()

    def finished(self, cell: Cell, out: Outcome, result: SweepResult, running: int) -> None:
        if out.busy:  # another process is running it: not a failure, not ours
            self.log(f"skipped {cell.run_id}: {out.error}")
            return
        self.durations.append(out.seconds)
        n = len(self.durations)
        eta = sum(self.durations) / n * (self.total - n) / max(1, self.slots)
        self.log(f"[{n}/{self.total}] {'ok    ' if out.ok else 'FAILED'} {cell.run_id} {cell.what()} "
                 f"({out.seconds:.0f}s)  running {running}, failed {len(result.failed)}, elapsed "
                 f"{_fmt_eta(time.perf_counter() - self.t_start)}, ETA {_fmt_eta(eta)}")


def sweep(data: dict, root: str | Path = "runs", *, workers: int | None = None, data_dir=None,
          retry_failed: bool = False, baselines: bool = True, backend: str | Backend | None = None,
          log: Callable[[str], None] | None = None) -> SweepResult:
    """Run every run of the config ``data`` (plain data, grid included) that the store under ``root`` lacks.

    ``backend``: ``"local"`` (default), ``"ray"``, ``"slurm"`` (default options) or a backend object
    (:func:`~prunekit.experiments.backends.make_backend` with options). ``workers``: local parallel processes
    (default: the number of CPU cores; 1 runs in this process; each worker uses cores / workers torch threads), or
    the size of a local Ray cluster. ``baselines``: add ``random`` and ``magnitude`` to a grid over methods
    (:func:`with_baselines`). Returns what was done, skipped and failed.
    """
    log = log or _stderr
    check_workers(workers)
    grid = plan(data, baselines)  # every cell is validated before anything runs
    if backend is None or isinstance(backend, str):
        backend = make_backend(backend, workers=workers)
    try:
        return execute(grid, root, backend, SweepProgress(log), options=GridOptions(retry_failed=retry_failed),
                       data_dir=data_dir, log=log)
    except KeyboardInterrupt:
        log("sweep interrupted: rerun the same command to finish the missing runs")
        raise


def execute(grid: Grid, root: str | Path, backend: Backend, reporter: Any, *,
            options: GridOptions = GridOptions(), data_dir=None, store: Store | None = None,
            log: Callable[[str], None] | None = None) -> SweepResult:
    """Run the cells of ``grid`` on ``backend`` into the store under ``root`` (``store``: that store, already open
    and left open; else it is opened here), as ``options`` say, ``reporter`` writing the lines; ``log``: the other
    lines (journals imported, starting points). Returns what was done, skipped, failed and busy. A run's error is a
    failed run (recorded in the store), unless the backend raises it.

    The reporter has three methods (:class:`SweepProgress` is one): ``planned(grid, result, pending, where, root)``
    before anything runs (``result`` holds the runs skipped or failed earlier; ``pending`` runs go to the backend,
    which runs them on ``where``), ``started(total, slots)`` when the backend starts on ``total`` runs, ``slots`` at
    once, and ``finished(cell, out, result, running)`` as each run ends, ``running`` still running."""
    log = log or _stderr
    root = Path(root)
    if backend.remote:  # workers elsewhere: paths that mean the same there
        root = root.resolve()
        if data_dir is None and os.environ.get("PRUNEKIT_DATA"):
            data_dir = os.environ["PRUNEKIT_DATA"]
        data_dir = None if data_dir is None else Path(data_dir).resolve()
    result = SweepResult(total=len(grid.cells), backend=backend.name)
    own = store is None
    store = open_store(root / "results.sqlite") if own else store
    try:
        recovered = recover_journals(store, grid.ids, root)
        pending = _pending(grid, store, options, result)
        reporter.planned(grid, result, len(pending), backend.describe(len(pending)), root)
        if recovered:
            log(f"sweep: imported the records of {recovered} run(s) from their run folders (store.json), left by "
                "remote workers whose sweep stopped before collecting them")
        if pending:
            ctx = SweepContext(root, None if data_dir is None else str(data_dir), store, log)
            _run_pending(pending, backend, ctx, options, reporter, result)
    finally:
        if own:
            store.close()
    return result


def _pending(grid: Grid, store: Store, options: GridOptions, result: SweepResult) -> list[Cell]:
    """The cells to hand to the backend, in grid order; the finished ones (unless looked up) and those that failed
    before (unless retried) go into ``result`` instead."""
    errors = {r["run_id"]: r["error"] for r in store.runs(status="failed")}  # read once
    pending = []
    for cell in grid.cells:
        status = store.status(cell.run_id)
        if status == "done" and not options.lookup_done:
            result.skipped.append(cell.run_id)
            store.link(cell.resolved["name"], cell.run_id)
        elif status == "failed" and not options.retry_failed and errors.get(cell.run_id) != INTERRUPTED:
            result.failed[cell.run_id] = errors.get(cell.run_id) or "failed earlier"
        else:  # new, interrupted (Ctrl-C, or "running" in a store nobody writes to), retried or looked up
            pending.append(cell)
    return pending


def _run_pending(pending: list[Cell], backend: Backend, ctx: SweepContext, options: GridOptions,
                 reporter: Any, result: SweepResult) -> None:
    slots = backend.start(len(pending))
    try:
        if backend.remote:
            pending = _remote_dependencies(pending, backend, ctx, result)
        elif options.dependencies_first:
            _run_dependencies(pending, ctx)
        reporter.started(len(pending), slots)
        cells = {c.run_id: c for c in pending}

        def on_done(out: Outcome, running: int) -> None:
            cell = cells[out.run_id]
            if out.busy:  # another process is running it: not a failure, not ours
                result.busy.append(cell.run_id)
            # a local run that returned its record finished (a DDP rank other than 0 does not write the store)
            elif _imported(out, backend, ctx) and (out.record is not None and not backend.remote
                                                   or ctx.store.status(cell.run_id) == "done"):
                looked_up = options.lookup_done and getattr(out.record, "cached", False)
                (result.skipped if looked_up else result.done).append(cell.run_id)
            else:
                out.ok = False
                out.error = out.error or f"the worker ended without finishing the run (status " \
                                         f"{ctx.store.status(cell.run_id)})"
                result.failed[cell.run_id] = out.error
                record_failure(ctx.store, cell.run_id, cell.resolved, out.error)
            reporter.finished(cell, out, result, running)

        jobs = [Job(c.run_id, c.cfg, _needs(ctx.store, c.resolved, ctx.root) if backend.remote else ())
                for c in pending]
        backend.run_all(jobs, ctx, on_done)
    finally:
        backend.stop()


def record_failure(store: Store, rid: str, resolved: dict, error: str) -> None:
    """Make sure a failed run is in the store as failed, also when it failed before the runner wrote anything
    (a missing dataset, an unusable device)."""
    status = store.status(rid)
    if status == "failed":
        return
    if status is None:
        from .runner import hardware, versions

        store.begin_run(rid, resolved["name"], resolved, versions(), hardware(str(resolved["train"]["device"])))
    store.fail_run(rid, error)


def _run_dependencies(pending: list[Cell], ctx: SweepContext) -> None:
    """Run the starting points of the pending runs first, deepest first, one at a time, in this process."""
    from .runner import run

    for cell in starting_points(pending):
        if ctx.store.status(cell.run_id) != "done":
            ctx.log(f"sweep: training the starting point {cell.run_id} first (model.pretrained)")
            run(cell.cfg, ctx.root, data_dir=ctx.data_dir, store=ctx.store, log=lambda msg: None)


def _needs(store: Store, resolved: dict, root: Path) -> tuple[dict, ...]:
    """The store export of the run ``resolved`` starts from (done by now), with its run folder under ``root``."""
    dep = _pretrained(resolved)
    if dep is None or store.status(dep[0]) != "done":
        return ()
    return (export_for_worker(store, dep[0], root / dep[0]),)


def _remote_dependencies(pending: list[Cell], backend: Backend, ctx: SweepContext,
                         result: SweepResult) -> list[Cell]:
    """Run the ``model.pretrained`` runs of the pending runs on the backend first, deepest first (a starting point
    can have its own), one wave per depth. Pending runs whose starting point failed are recorded as failed with
    that reason; returns the runs still to run."""
    store, depth = ctx.store, {}
    todo = [c for c in starting_points(pending, depth) if store.status(c.run_id) != "done"]
    resolved = {c.run_id: c.resolved for c in todo}
    for level in sorted({depth[c.run_id] for c in todo}):
        jobs = []
        for cell in (c for c in todo if depth[c.run_id] == level):
            below = _pretrained(cell.resolved)
            if below is not None and store.status(below[0]) != "done":  # its own starting point failed
                record_failure(store, cell.run_id, cell.resolved,
                               f"its starting point (model.pretrained) {below[0]} did not finish")
                continue
            ctx.log(f"sweep: training the starting point {cell.run_id} first (model.pretrained)")
            jobs.append(Job(cell.run_id, cell.cfg, _needs(store, cell.resolved, ctx.root)))

        def dep_done(out: Outcome, running: int) -> None:
            if not _imported(out, backend, ctx) and not out.busy:  # its dependents then fail with this reason
                ctx.log(f"sweep: the starting point {out.run_id} FAILED: {out.error}")
                record_failure(store, out.run_id, resolved[out.run_id], out.error or "failed")

        backend.run_all(jobs, ctx, dep_done)
    still = []
    for cell in pending:
        dep = _pretrained(cell.resolved)
        if dep is not None and store.status(dep[0]) != "done":
            why = next((r["error"] for r in store.runs(status="failed") if r["run_id"] == dep[0]), None)
            err = f"its starting point (model.pretrained) {dep[0]} did not finish: {why or 'see the log above'}"
            result.failed[cell.run_id] = err
            record_failure(store, cell.run_id, cell.resolved, err)
        elif store.status(cell.run_id) == "done":  # it was itself a starting point
            result.done.append(cell.run_id)
        else:
            still.append(cell)
    return still


def _imported(out: Outcome, backend: Backend, ctx: SweepContext) -> bool:
    """Bring a remote outcome into the store: the rows it carries, or else (its worker died) those its worker left
    in the run folder. Rows that cannot be imported make the outcome a failure, with the reason. Returns
    ``out.ok``."""
    if out.busy:
        return out.ok
    try:
        if out.payload is not None:
            ctx.store.import_run(out.payload)
        elif backend.remote:
            journal = own_journal(ctx.root / out.run_id, out.run_id)
            if journal is not None:
                ctx.store.import_run(journal)
    except Exception as e:  # noqa: BLE001 - the run counts as failed, with the reason
        out.ok, out.error = False, f"its records could not be imported: {type(e).__name__}: {e}"
    return out.ok
