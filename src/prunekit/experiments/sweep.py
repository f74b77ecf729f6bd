"""``prunekit sweep``: every run of a config's grid, on a local process pool, resumable.

Each run is idempotent by its config hash (:func:`prunekit.experiments.run`): a finished run is skipped, an
interrupted one resumes from its checkpoint, so killing a sweep and starting it again finishes only what is
missing (at most the runs in flight lose their current epoch). A run that fails is recorded in the store with its
error and reported at the end; it is not retried unless asked (``retry_failed``), and never silently dropped.

Runs that start from a trained model (``model.pretrained`` naming a config) need that run first: the sweep runs
those dependencies before the grid, so two workers never train the same dense network at once.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io import RunBusyError
from . import config as C
from .store import Store


@dataclass
class SweepResult:
    total: int
    done: list[str] = field(default_factory=list)       # finished in this sweep
    skipped: list[str] = field(default_factory=list)    # already done before it
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error (this sweep or earlier, not retried)
    busy: list[str] = field(default_factory=list)       # being run by another process right now

    @property
    def ok(self) -> bool:
        return not self.failed


def _worker_init(threads: int) -> None:
    """Torch threads, and a watchdog: a worker whose sweep process died exits (its run resumes from its last
    checkpoint when the sweep is started again; its lock goes with it)."""
    import threading

    import torch

    torch.set_num_threads(max(1, threads))
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_one(cfg: dict, root: str, data_dir) -> tuple[str, float]:
    """One run in a worker process; returns (run id, seconds). Exceptions propagate to the parent."""
    from .runner import run

    t0 = time.perf_counter()
    rec = run(cfg, root, data_dir=data_dir, log=lambda msg: None)
    return rec.run_id, time.perf_counter() - t0


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
    methods only: IMP codes and cascades compare among themselves."""
    from ..registry import get_method

    grid = dict(data.get("grid") or {})
    if "prune.method" in grid and isinstance(grid["prune.method"], list):
        methods = [get_method(m).name for m in grid["prune.method"]]
        if any(get_method(m).needs_data == "training" for m in methods):
            return data
        extra = [b for b in BASELINES if b not in methods]
        if extra:
            grid["prune.method"] = list(grid["prune.method"]) + extra
    elif isinstance(grid.get("prune"), list) and all(isinstance(e, dict) for e in grid["prune"]):
        entries = grid["prune"]
        base = (data.get("prune") or {})
        names = [get_method(e.get("method", base.get("method", "none"))).name for e in entries]
        if any(get_method(m).needs_data == "training" for m in names) or any("cascade" in e for e in entries):
            return data
        grid["prune"] = list(entries) + [{"method": b} for b in BASELINES if b not in names]
    else:
        return data
    return {**data, "grid": grid}


def sweep(data: dict, root: str | Path = "runs", *, workers: int | None = None, data_dir=None,
          retry_failed: bool = False, baselines: bool = True,
          log: Callable[[str], None] | None = None) -> SweepResult:
    """Run every run of the config ``data`` (plain data, grid included) that the store under ``root`` lacks.

    ``workers``: parallel processes (default: the number of CPU cores; 1 runs in this process). Each worker uses
    cores / workers torch threads. ``baselines``: add ``random`` and ``magnitude`` to a grid over methods
    (:func:`with_baselines`). Returns what was done, skipped and failed.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if baselines:
        data = with_baselines(data)
    runs = C.expand(data)
    resolved = [C.resolve(r) for r in runs]  # every cell is validated before anything runs
    by_id: dict[str, tuple[dict, dict]] = {}
    for cfg, res in zip(runs, resolved):
        by_id.setdefault(C.run_id(res), (cfg, res))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    result = SweepResult(total=len(by_id))
    store = Store(root / "results.sqlite")
    try:
        pending: list[str] = []
        for rid, (_cfg, res) in by_id.items():
            status = store.status(rid)
            if status == "done":
                result.skipped.append(rid)
                store.link(res["name"], rid)
            elif status == "failed" and not retry_failed:
                row = [r for r in store.runs(status="failed") if r["run_id"] == rid]
                result.failed[rid] = (row[0]["error"] if row else None) or "failed earlier"
            else:
                pending.append(rid)  # new, interrupted ("running" in a store nobody writes to) or retried
        n_workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
        n_workers = min(n_workers, max(1, len(pending)))
        log(f"sweep {resolved[0]['name'] if resolved else ''}: {len(by_id)} run(s) -> {root}/  "
            f"{len(result.skipped)} done already, {len(result.failed)} failed earlier"
            f"{' (rerun with --retry-failed)' if result.failed else ''}, {len(pending)} to run on {n_workers} "
            f"worker(s)")
        if not pending:
            return result
        _run_dependencies(by_id, pending, root, data_dir, store, log)
        _execute(by_id, pending, root, data_dir, store, n_workers, result, log)
    finally:
        store.close()
    return result


def _run_dependencies(by_id, pending, root, data_dir, store: Store, log) -> None:
    """Run the distinct ``model.pretrained`` configs of the pending runs first, one at a time."""
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


def _execute(by_id, pending, root, data_dir, store: Store, n_workers: int, result: SweepResult, log) -> None:
    total, t_start = len(pending), time.perf_counter()
    durations: list[float] = []

    def progress(rid: str, ok: bool, seconds: float, running: int) -> None:
        finished = len(durations)
        left = total - finished
        eta = (sum(durations) / len(durations)) * left / n_workers if durations else 0.0
        res = by_id[rid][1]
        what = f"{res['prune']['method']} s={res['prune']['sparsity']} seed {res['seed']}" \
            if res["prune"]["sparsity"] is not None else f"{res['prune']['method']} seed {res['seed']}"
        log(f"[{finished}/{total}] {'ok    ' if ok else 'FAILED'} {rid} {what} ({seconds:.0f}s)  running {running}, "
            f"failed {len(result.failed)}, elapsed {_fmt_eta(time.perf_counter() - t_start)}, ETA {_fmt_eta(eta)}")

    if n_workers == 1:
        from .runner import run

        for rid in pending:
            t0 = time.perf_counter()
            try:
                run(by_id[rid][0], root, data_dir=data_dir, store=store, log=lambda msg: None)
                result.done.append(rid)
                ok = True
            except KeyboardInterrupt:
                log("sweep interrupted: rerun the same command to finish the missing runs")
                raise
            except RunBusyError as e:  # another process is running it: not a failure, not ours
                result.busy.append(rid)
                log(f"skipped {rid}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
                result.failed[rid] = f"{type(e).__name__}: {e}"
                _record_failure(store, rid, by_id[rid][1], result.failed[rid])
                ok = False
            durations.append(time.perf_counter() - t0)
            progress(rid, ok, durations[-1], 0)
        return

    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // n_workers)
    ctx = mp.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        queue = list(pending)
        futures = {}
        started = {}
        try:
            while queue or futures:
                while queue and len(futures) < n_workers:
                    rid = queue.pop(0)
                    futures[pool.submit(_run_one, by_id[rid][0], str(root), data_dir)] = rid
                    started[rid] = time.perf_counter()
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                for fut in finished:
                    rid = futures.pop(fut)
                    seconds = time.perf_counter() - started[rid]
                    try:
                        fut.result()
                        result.done.append(rid)
                        ok = True
                    except RunBusyError as e:
                        result.busy.append(rid)
                        log(f"skipped {rid}: {e}")
                        continue
                    except Exception as e:  # noqa: BLE001
                        msg = f"{type(e).__name__}: {e}"
                        if not str(e):
                            msg = traceback.format_exception_only(type(e), e)[-1].strip()
                        result.failed[rid] = msg
                        _record_failure(store, rid, by_id[rid][1], msg)
                        ok = False
                    durations.append(seconds)
                    progress(rid, ok, seconds, len(futures))
        except KeyboardInterrupt:
            for fut in futures:
                fut.cancel()
            log("sweep interrupted: rerun the same command to finish the missing runs")
            raise
