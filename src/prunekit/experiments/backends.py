"""Where the runs of a sweep execute: one small interface, three implementations.

A :class:`Backend` gets the sweep's pending runs as :class:`Job` s and reports each one's :class:`Outcome` to the
sweep (``on_done``), which keeps the results store, the progress display and the lists of done/failed runs. The
store stays the single source of truth:

- :class:`LocalBackend` (``--backend local``, the default): a spawn process pool on this machine (or this process
  with one worker). Workers write ``ROOT/results.sqlite`` directly, which is safe on a local disk.
- :class:`InProcessBackend` (``prunekit run``, and the local backend's one worker): the runs one after the other in
  this process, with the runner's own output.
- :class:`~prunekit.experiments.ray_backend.RayBackend` (``--backend ray``, ``pip install 'prunekit[ray]'``): each
  run is a Ray task, on a local Ray cluster or a real one.
- :class:`~prunekit.experiments.slurm_backend.SlurmBackend` (``--backend slurm``, ``pip install 'prunekit[slurm]'``):
  each run is a task of a Slurm job array (submitit), requeued on preemption and resumed from its checkpoint.

Remote workers (Ray, Slurm) never open the sweep's SQLite file: SQLite's locking is not safe on NFS and other
shared filesystems. Each runs its run into a private store on its local disk (:mod:`.isolated`) and sends the run's
rows back (:meth:`Store.export_run`); the sweep imports them in one transaction (:meth:`Store.import_run`).

Nothing here imports ``ray`` or ``submitit``: the remote backends import them when they start.
"""
from __future__ import annotations

import importlib
import os
import time
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from ..errors import PrunekitError
from ..io import RunBusyError
from .store import Store

BACKENDS = ("local", "ray", "slurm")


@dataclass(frozen=True)
class Job:
    """One run to execute: its id, its plain config (one run, no grid) and, for remote workers, the store exports
    of the runs it starts from (``model.pretrained``), so the worker finds them done instead of training them."""

    run_id: str
    cfg: dict
    needs: tuple[dict, ...] = ()


@dataclass
class Outcome:
    """What became of a job. ``payload``: the run's store rows (:meth:`Store.export_run`) from a remote worker,
    imported by the sweep; None from local workers (they wrote the store themselves) or when the worker died.
    ``attempts`` and ``epochs_before``: remote workers only, how many times the run was started (requeues
    included) and how many epochs were in the store when the last attempt started (a resumed run has some)."""

    run_id: str
    ok: bool
    seconds: float = 0.0
    error: str | None = None
    busy: bool = False          # another process holds the run's lock: skipped, neither done nor failed
    payload: dict | None = None
    host: str | None = None
    attempts: int = 1
    epochs_before: int = 0
    record: Any = None          # the RunRecord the run returned (``record.cached``: looked up in the store)


@dataclass
class SweepContext:
    """What every backend needs from the sweep: the root of run folders, the data directory, the sweep's store
    (written by the sweep only, except by local workers) and its log."""

    root: Path
    data_dir: str | None
    store: Store
    log: Callable[[str], None] = field(default=lambda msg: None)


OnDone = Callable[[Outcome, int], None]
"""``on_done(outcome, running)``: called in the sweep's thread as each job ends, with the number still running."""


class Backend(Protocol):
    """Executes jobs. ``remote``: workers run into private stores and send their rows back (see the module
    docstring); the sweep then hands them absolute paths and imports the payloads."""

    name: str
    remote: bool

    def describe(self, n_jobs: int) -> str:
        """Where ``n_jobs`` runs will execute, for the sweep's first line (starts nothing)."""
        ...

    def start(self, n_jobs: int) -> int:
        """Get ready (start or connect to a cluster); returns how many runs execute at once (for the ETA)."""
        ...

    def run_all(self, jobs: Sequence[Job], ctx: SweepContext, on_done: OnDone) -> None:
        """Execute every job, calling ``on_done`` once per job (failures included: never raise for a run's error).
        KeyboardInterrupt propagates."""
        ...

    def stop(self) -> None:
        """Release what :meth:`start` took (a local cluster is shut down; a real one is left running)."""
        ...


def require(module: str, backend: str):
    """Import an optional package a backend needs, or raise a PrunekitError that names the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PrunekitError(f"the {backend} sweep backend needs the '{module}' package, which cannot be imported "
                            f"({e}): install it with  pip install 'prunekit[{backend}]'") from None


def describe_error(e: BaseException) -> str:
    """``Type: message`` of an exception, one line (the last line of its traceback when it has no message)."""
    msg = f"{type(e).__name__}: {e}"
    if not str(e):
        msg = traceback.format_exception_only(type(e), e)[-1].strip()
    return msg


def make_backend(name: str | None = None, *, workers: int | None = None, ray=None, slurm=None) -> Backend:
    """A backend by name: ``local`` (default), ``ray`` (options: a :class:`~.ray_backend.RayOptions`) or ``slurm``
    (a :class:`~.slurm_backend.SlurmOptions`). ``workers``: local processes, or the size of a local Ray cluster."""
    name = (name or "local").lower()
    if name == "local":
        return LocalBackend(workers)
    if name == "ray":
        from .ray_backend import RayBackend, RayOptions

        opts = ray if ray is not None else RayOptions()
        if workers is not None and opts.num_cpus is None:
            from dataclasses import replace

            opts = replace(opts, num_cpus=workers)
        return RayBackend(opts)
    if name == "slurm":
        from .slurm_backend import SlurmBackend, SlurmOptions

        return SlurmBackend(slurm if slurm is not None else SlurmOptions())
    raise PrunekitError(f"unknown sweep backend {name!r}: choose one of {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------------------- local
def check_workers(workers) -> None:
    """``workers`` must be None (one per core) or a whole number >= 1."""
    from ..errors import PrunekitError

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise PrunekitError(f"--workers must be a whole number >= 1 (1 runs the runs one after the other in the "
                            f"sweep process; leave it out for one per CPU core), got {workers!r}")


def worker_init(threads: int) -> None:
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


def _quiet(msg: str) -> None:
    pass


def run_one(cfg: dict, root: str, data_dir):
    """One run in a worker process; returns its RunRecord. Exceptions propagate to the parent."""
    from .runner import run

    return run(cfg, root, data_dir=data_dir, log=_quiet)


def settle(run_id: str, result: Callable[[], Any], raise_errors: bool = False) -> Outcome:
    """The outcome of a run whose record ``result()`` returns, or whose error it raises: another process holding
    the run is ``busy`` (not a failure, not ours); any other error is a failed outcome. ``raise_errors``: every
    error propagates instead."""
    try:
        return Outcome(run_id, True, record=result())
    except RunBusyError as e:
        if raise_errors:
            raise
        return Outcome(run_id, False, error=str(e), busy=True)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        if raise_errors:
            raise
        return Outcome(run_id, False, error=describe_error(e))


class InProcessBackend:
    """The runs one after the other in this process, writing the sweep's store (``prunekit run``, and a local sweep
    of one worker). ``run_log``: what the runner logs (its per-run line and progress output; None: its default, to
    stderr). ``raise_errors``: a run's error (another process holding the run included) stops the grid and
    propagates, as ``prunekit run`` does, instead of becoming a failed outcome."""

    name = "local"
    remote = False

    def __init__(self, run_log: Callable[[str], None] | None = None, *, raise_errors: bool = False):
        self.run_log = run_log
        self.raise_errors = raise_errors

    def describe(self, n_jobs: int) -> str:
        return "this process"

    def start(self, n_jobs: int) -> int:
        return 1

    def stop(self) -> None:
        pass

    def run_all(self, jobs: Sequence[Job], ctx: SweepContext, on_done: OnDone) -> None:
        from .runner import run

        for job in jobs:
            t0 = time.perf_counter()
            out = settle(job.run_id, partial(run, job.cfg, ctx.root, data_dir=ctx.data_dir, store=ctx.store,
                                             log=self.run_log), self.raise_errors)
            out.seconds = time.perf_counter() - t0
            on_done(out, 0)


class LocalBackend:
    """A spawn process pool on this machine, ``workers`` processes (default: one per CPU core); one worker runs the
    runs in this process, one after the other (:class:`InProcessBackend`, the runner's log silenced). Each run
    computes with its own ``train.threads`` (default 1), never with a count derived from ``workers``, so a sweep
    gives the same numbers however it is launched. Workers write the sweep's store themselves (a local SQLite file,
    WAL mode, one transaction per write)."""

    name = "local"
    remote = False

    def __init__(self, workers: int | None = None):
        self.workers = workers

    def _n(self, n_jobs: int) -> int:
        n = max(1, int(self.workers if self.workers is not None else (os.cpu_count() or 1)))
        return min(n, max(1, n_jobs))

    def describe(self, n_jobs: int) -> str:
        return f"{self._n(n_jobs)} worker(s)"

    def start(self, n_jobs: int) -> int:
        return self._n(n_jobs)

    def stop(self) -> None:
        pass

    def run_all(self, jobs: Sequence[Job], ctx: SweepContext, on_done: OnDone) -> None:
        n_workers = self._n(len(jobs))
        if n_workers == 1:
            InProcessBackend(_quiet).run_all(jobs, ctx, on_done)
        else:
            self._pool(jobs, ctx, on_done, n_workers)

    @staticmethod
    def _pool(jobs: Sequence[Job], ctx: SweepContext, on_done: OnDone, n_workers: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        threads = max(1, (os.cpu_count() or 1) // n_workers)
        mpctx = mp.get_context("spawn")  # no forked torch thread pools
        with ProcessPoolExecutor(n_workers, mp_context=mpctx, initializer=worker_init,
                                 initargs=(threads,)) as pool:
            queue = list(jobs)
            futures: dict[Any, str] = {}
            started: dict[str, float] = {}
            try:
                while queue or futures:
                    while queue and len(futures) < n_workers:
                        job = queue.pop(0)
                        futures[pool.submit(run_one, job.cfg, str(ctx.root), ctx.data_dir)] = job.run_id
                        started[job.run_id] = time.perf_counter()
                    finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                    for fut in finished:
                        rid = futures.pop(fut)
                        out = settle(rid, fut.result)
                        out.seconds = time.perf_counter() - started[rid]
                        on_done(out, len(futures))
            except KeyboardInterrupt:
                for fut in futures:
                    fut.cancel()
                raise
