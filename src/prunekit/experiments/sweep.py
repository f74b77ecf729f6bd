"""``prunekit sweep``: every run of a config's grid, on a backend (local process pool, Ray, Slurm), resumable.

Each run is idempotent by its config hash (:func:`prunekit.experiments.run`): a finished run is skipped, an
interrupted one resumes from its checkpoint, so killing a sweep and starting it again finishes only what is
missing (at most the runs in flight lose their current epoch). A run that fails is recorded in the store with its
error and reported at the end; it is not retried unless asked (``retry_failed``), and never silently dropped.

Where the runs execute is a :class:`~prunekit.experiments.backends.Backend`: ``local`` (default), ``ray`` or
``slurm``. The sweep alone keeps the store, the progress line and the result, whatever the backend; remote workers
send their rows back and the sweep imports them (:mod:`prunekit.experiments.backends`).

Runs that start from a trained model (``model.pretrained`` naming a config) need that run first: the sweep runs
those dependencies before the grid, so two workers never train the same dense network at once.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config as C
from .backends import Backend, Job, Outcome, SweepContext, _run_one, _worker_init, make_backend
from .store import INTERRUPTED, Store

__all__ = ["SweepResult", "sweep", "sweep_runs", "with_baselines", "check_workers", "BASELINES", "_run_one",
           "_worker_init"]


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


def _record_failure(store: Store, rid: str, resolved: dict, error: str) -> None:
    """Make sure a failed run is in the store as failed, even when it failed before the runner wrote anything."""
    if store.status(rid) != "failed":
        from .runner import hardware, versions

        store.begin_run(rid, resolved["name"], resolved, versions(), hardware(str(resolved["train"]["device"])))
        store.fail_run(rid, error)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


BASELINES = ("random", "magnitude")



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
        if any(get_method(m).needs_data == "training" for m in methods):
            return data, ()
        extra = tuple(b for b in BASELINES if b not in methods)
        if extra:
            grid["prune.method"] = list(grid["prune.method"]) + list(extra)
    elif isinstance(grid.get("prune"), list) and grid["prune"] and all(isinstance(e, dict) for e in grid["prune"]):
        entries = grid["prune"]
        base = (data.get("prune") or {})
        names = [get_method(e.get("method", base.get("method", "none"))).name for e in entries]
        if any(get_method(m).needs_data == "training" for m in names) or any("cascade" in e for e in entries):
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
    data = C.translate(data)  # seed 000's and seed 001's layouts: their grids and prune sections as prunekit's
    C.check_grid(data)  # before the baselines join: an empty method axis must not become a grid of baselines
    if not baselines:
        return C.expand(data)
    full, added = _with_baselines(data)
    runs = C.expand(full)
    if not added:
        return runs
    from ..registry import get_method

    return [_shared_only(r) if get_method((r.get("prune") or {}).get("method", "none")).name in added else r
            for r in runs]


def _shared_only(cfg: dict) -> dict:
    """``cfg`` with its ``prune`` section cut down to the keys every method takes."""
    import dataclasses

    from ..prune import PruneOptions

    shared = {f.name for f in dataclasses.fields(PruneOptions)} | set(C._PRUNE_KEYS)
    return {**cfg, "prune": {k: v for k, v in cfg["prune"].items() if k in shared}}


def check_workers(workers) -> None:
    """``workers`` must be None (one per core) or a whole number >= 1."""
    from ..errors import PrunekitError

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise PrunekitError(f"--workers must be a whole number >= 1 (1 runs the runs one after the other in the "
                            f"sweep process; leave it out for one per CPU core), got {workers!r}")


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
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_workers(workers)
    runs = sweep_runs(data, baselines)
    resolved = [C.resolve(r) for r in runs]  # every cell is validated before anything runs
    if backend is None or isinstance(backend, str):
        backend = make_backend(backend, workers=workers)
    by_id: dict[str, tuple[dict, dict]] = {}
    for cfg, res in zip(runs, resolved):
        by_id.setdefault(C.run_id(res), (cfg, res))
    root = Path(root)
    if backend.remote:  # workers elsewhere: paths that mean the same there
        root = root.resolve()
        if data_dir is None and os.environ.get("PRUNEKIT_DATA"):
            data_dir = os.environ["PRUNEKIT_DATA"]
        data_dir = None if data_dir is None else str(Path(data_dir).resolve())
    root.mkdir(parents=True, exist_ok=True)
    result = SweepResult(total=len(by_id), backend=backend.name)
    store = Store(root / "results.sqlite")
    try:
        recovered = _recover_journals(store, by_id, root)
        pending: list[str] = []
        errors = {r["run_id"]: r["error"] for r in store.runs(status="failed")}  # read once
        for rid, (_cfg, res) in by_id.items():
            status = store.status(rid)
            if status == "done":
                result.skipped.append(rid)
                store.link(res["name"], rid)
            elif status == "failed" and not retry_failed and errors.get(rid) != INTERRUPTED:
                result.failed[rid] = errors.get(rid) or "failed earlier"
            else:  # new, interrupted (Ctrl-C, or "running" in a store nobody writes to) or retried
                pending.append(rid)
        log(f"sweep {resolved[0]['name'] if resolved else ''}: {len(by_id)} run(s) -> {root}/  "
            f"{len(result.skipped)} done already, {len(result.failed)} failed earlier"
            f"{' (rerun with --retry-failed)' if result.failed else ''}, {len(pending)} to run on "
            f"{backend.describe(len(pending))}")
        if recovered:
            log(f"sweep: imported the records of {recovered} run(s) from their run folders (store.json), left by "
                "remote workers whose sweep stopped before collecting them")
        if not pending:
            return result
        slots = backend.start(len(pending))
        try:
            ctx = SweepContext(root, None if data_dir is None else str(data_dir), store, log)
            if backend.remote:
                pending = _remote_dependencies(by_id, pending, backend, ctx, result)
            else:
                _run_dependencies(by_id, pending, root, data_dir, store, log)
            _execute(by_id, pending, backend, ctx, slots, result)
        finally:
            backend.stop()
    finally:
        store.close()
    return result


def _recover_journals(store: Store, by_id, root: Path) -> int:
    """Import the rows remote workers left in run folders (``store.json``) for runs the store lacks, or has
    unfinished while the folder holds them finished (a sweep stopped before it collected them). Returns how many
    finished runs came in this way."""
    from .isolated import journal_status, read_journal

    n = 0
    for rid in by_id:
        status = store.status(rid)
        if status == "done" or not (root / rid / "store.json").exists():
            continue
        payload = read_journal(root / rid)
        if payload is None or payload.get("run_id") != rid:
            continue
        if status is None or journal_status(payload) == "done":
            store.import_run(payload)
            n += journal_status(payload) == "done"
    return n


def _run_dependencies(by_id, pending, root, data_dir, store: Store, log) -> None:
    """Run the distinct ``model.pretrained`` configs of the pending runs first, one at a time, in this process."""
    from .runner import run

    seen = set()
    for rid in pending:
        pre = by_id[rid][1]["model"].get("pretrained")
        if not pre or "config" not in pre or pre["run_id"] in seen:
            continue
        seen.add(pre["run_id"])
        if store.status(pre["run_id"]) != "done":
            log(f"sweep: training the starting point {pre['run_id']} first (model.pretrained)")
            run(pre["config"], root, data_dir=data_dir, store=store, log=lambda msg: None)


def _pretrained(resolved: dict) -> tuple[str, dict] | None:
    """(run id, plain config) of the run a resolved config starts from, or None."""
    pre = resolved["model"].get("pretrained")
    return (pre["run_id"], pre["config"]) if pre and "config" in pre else None


def _needs(store: Store, resolved: dict, root: Path) -> tuple[dict, ...]:
    """The store export of the run ``resolved`` starts from (done by now), with its run folder under ``root``."""
    import json

    dep = _pretrained(resolved)
    if dep is None or store.status(dep[0]) != "done":
        return ()
    payload = store.export_run(dep[0])
    for row in payload["tables"]["runs"]:  # its record names its folder: make it the one the workers see
        if row.get("record"):
            rec = json.loads(row["record"])
            rec["run_dir"] = str(root / dep[0])
            row["record"] = json.dumps(rec, default=str)
    return (payload,)


def _remote_dependencies(by_id, pending, backend: Backend, ctx: SweepContext, result: SweepResult) -> list[str]:
    """Run the ``model.pretrained`` runs of the pending runs on the backend first, deepest first (a starting point
    can have its own), one wave per depth. Pending runs whose starting point failed are recorded as failed with
    that reason; returns the runs still to run."""
    store = ctx.store
    configs: dict[str, dict] = {}   # dependency run id -> plain config
    depth: dict[str, int] = {}      # how many dependencies lie below it

    def visit(resolved: dict) -> int:
        dep = _pretrained(resolved)
        if dep is None:
            return -1
        rid, cfg = dep
        if rid not in depth:
            configs[rid] = cfg
            depth[rid] = visit(C.resolve(cfg)) + 1
        return depth[rid]

    for rid in pending:
        visit(by_id[rid][1])
    todo = [r for r in configs if store.status(r) != "done"]
    for level in sorted({depth[r] for r in todo}):
        wave = [r for r in todo if depth[r] == level]
        jobs = []
        for r in wave:
            res = C.resolve(configs[r])
            below = _pretrained(res)
            if below is not None and store.status(below[0]) != "done":  # its own starting point failed
                _record_failure(store, r, res, f"its starting point (model.pretrained) {below[0]} did not finish")
                continue
            ctx.log(f"sweep: training the starting point {r} first (model.pretrained)")
            jobs.append(Job(r, configs[r], _needs(store, res, ctx.root)))

        def dep_done(out: Outcome, running: int) -> None:
            try:
                _collect(out, backend, ctx)
            except Exception as e:  # noqa: BLE001 - its dependents are then recorded as failed, with this reason
                out.ok, out.error = False, f"its records could not be imported: {type(e).__name__}: {e}"
            if not out.ok and not out.busy:
                ctx.log(f"sweep: the starting point {out.run_id} FAILED: {out.error}")
                _record_failure(store, out.run_id, C.resolve(configs[out.run_id]), out.error or "failed")

        backend.run_all(jobs, ctx, dep_done)
    still = []
    for rid in pending:
        dep = _pretrained(by_id[rid][1])
        if dep is not None and store.status(dep[0]) != "done":
            why = next((r["error"] for r in store.runs(status="failed") if r["run_id"] == dep[0]), None)
            err = f"its starting point (model.pretrained) {dep[0]} did not finish: {why or 'see the log above'}"
            result.failed[rid] = err
            _record_failure(store, rid, by_id[rid][1], err)
        elif store.status(rid) == "done":  # it was itself a starting point
            result.done.append(rid)
        else:
            still.append(rid)
    return still


def _collect(out: Outcome, backend: Backend, ctx: SweepContext) -> None:
    """Bring a remote outcome into the store: the rows it carries, or else (its worker died) those its worker left
    in the run folder; then make sure a failure is recorded with its error."""
    if out.busy:
        return
    if out.payload is not None:
        ctx.store.import_run(out.payload)
    elif backend.remote:
        from .isolated import read_journal

        journal = read_journal(ctx.root / out.run_id)
        if journal is not None and journal.get("run_id") == out.run_id:
            ctx.store.import_run(journal)


def _execute(by_id, pending, backend: Backend, ctx: SweepContext, slots: int, result: SweepResult) -> None:
    total, t_start = len(pending), time.perf_counter()
    durations: list[float] = []
    log, store = ctx.log, ctx.store

    def progress(rid: str, ok: bool, seconds: float, running: int) -> None:
        finished = len(durations)
        left = total - finished
        eta = (sum(durations) / len(durations)) * left / max(1, slots) if durations else 0.0
        res = by_id[rid][1]
        what = f"{res['prune']['method']} s={res['prune']['sparsity']} seed {res['seed']}" \
            if res["prune"]["sparsity"] is not None else f"{res['prune']['method']} seed {res['seed']}"
        log(f"[{finished}/{total}] {'ok    ' if ok else 'FAILED'} {rid} {what} ({seconds:.0f}s)  running {running}, "
            f"failed {len(result.failed)}, elapsed {_fmt_eta(time.perf_counter() - t_start)}, ETA {_fmt_eta(eta)}")

    def on_done(out: Outcome, running: int) -> None:
        rid = out.run_id
        if out.busy:  # another process is running it: not a failure, not ours
            result.busy.append(rid)
            log(f"skipped {rid}: {out.error}")
            return
        try:
            _collect(out, backend, ctx)
        except Exception as e:  # noqa: BLE001 - rows we cannot import: the run counts as failed, with the reason
            out.ok, out.error = False, f"its records could not be imported: {type(e).__name__}: {e}"
        if out.ok and store.status(rid) == "done":
            result.done.append(rid)
        else:
            msg = out.error or f"the worker ended without finishing the run (status {store.status(rid)})"
            out.ok = False
            result.failed[rid] = msg
            _record_failure(store, rid, by_id[rid][1], msg)
        durations.append(out.seconds)
        progress(rid, out.ok, out.seconds, running)

    jobs = [Job(rid, by_id[rid][0], _needs(store, by_id[rid][1], ctx.root) if backend.remote else ())
            for rid in pending]
    try:
        backend.run_all(jobs, ctx, on_done)
    except KeyboardInterrupt:
        log("sweep interrupted: rerun the same command to finish the missing runs")
        raise
