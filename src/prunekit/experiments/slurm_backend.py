"""The Slurm sweep backend: each run is a task of a Slurm job array, through submitit
(``pip install 'prunekit[slurm]'``).

Start the sweep on a login node; it submits the runs as job arrays (at most ``array_parallelism`` tasks running
at once), waits for them and imports each run's store rows into ``ROOT/results.sqlite``. Tasks never open that
file (SQLite locking is unsafe on NFS): they run :func:`prunekit.experiments.isolated.run_isolated` into a private
store on the node's local disk, and their rows come back as the job's result (and in ``ROOT/<run_id>/store.json``).

The job's callable is checkpointable: when Slurm preempts a task or its time limit nears, submitit calls
:meth:`SlurmRun.checkpoint`, requeues the task, and the new attempt resumes the run from its own checkpoint in
``ROOT/<run_id>/`` (``last.pt``), keeping the epochs already recorded. So ROOT must be on a filesystem shared by
the login node and every compute node, at the same path; so must the log folder.

``executor="local"`` runs the same jobs as processes on this machine (submitit's local executor), for testing.
"""
from __future__ import annotations

import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ..errors import PrunekitError
from .backends import Job, OnDone, Outcome, SweepContext, require

MAX_ARRAY = 1000  # Slurm's default MaxArraySize is 1001: bigger sweeps go out as several arrays


def parse_time(text: str | int) -> int:
    """Minutes from a Slurm time limit: ``MINUTES``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` or
    ``D-HH:MM:SS`` (seconds round up)."""
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise PrunekitError(f"slurm time {text!r}: write MINUTES, HH:MM:SS or D-HH:MM:SS (e.g. 90, 1:30:00, "
                            "2-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:   # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:   # MM:SS
        seconds = int(a) * 60 + int(b)
    else:                 # MINUTES
        seconds = int(a) * 60
    if seconds <= 0:
        raise PrunekitError(f"slurm time {text!r}: the time limit must be positive")
    return math.ceil(seconds / 60)


def parse_mem_gb(text: str | float) -> float:
    """GiB from a Slurm memory size: ``16G``, ``16GB``, ``500M``, ``1T`` or a bare number (GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise PrunekitError(f"slurm mem {text!r}: write a size such as 16G, 500M or 1T")
    scale = {"K": 1 / 2**20, "M": 1 / 2**10, "G": 1.0, "": 1.0, "T": 2.0**10}[m.group(2).upper()]
    return float(m.group(1)) * scale


@dataclass(frozen=True)
class SlurmOptions:
    """What each run's task asks Slurm for, and how the sweep submits them.

    ``partition``: None = the cluster's default. ``time_min``: each task's time limit (a requeued task gets a new
    one). ``cpus_per_task`` (a run computes with ``train.threads``; give it as many), ``gpus_per_task``, ``mem_gb`` (None: the partition's
    default). ``log_dir``: submitit's folder of job pickles and logs (default ``ROOT/slurm_logs``; must be shared).
    ``array_parallelism``: at most this many tasks of an array run at once. ``max_timeouts``: how often a task that
    hits its time limit is requeued (preemptions do not count). ``executor``: ``slurm``, or ``local`` to run the
    jobs as processes on this machine (testing). ``poll_s``: seconds between status checks (default 10; 0.5 with
    the local executor)."""

    partition: str | None = None
    time_min: int = 60
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    mem_gb: float | None = None
    log_dir: str | None = None
    array_parallelism: int = 64
    max_timeouts: int = 3
    executor: Literal["slurm", "local"] = "slurm"
    poll_s: float | None = None

    def __post_init__(self):
        if self.executor not in ("slurm", "local"):
            raise PrunekitError(f"slurm executor {self.executor!r}: choose slurm or local")
        for name in ("time_min", "cpus_per_task", "array_parallelism"):
            if int(getattr(self, name)) < 1:
                raise PrunekitError(f"slurm {name}={getattr(self, name)!r}: pass a positive number")
        if self.gpus_per_task < 0 or self.max_timeouts < 0:
            raise PrunekitError("slurm gpus_per_task and max_timeouts must be 0 or more")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise PrunekitError(f"slurm mem_gb={self.mem_gb!r}: pass a positive size")


class SlurmRun:
    """The callable of each task: one run through :func:`~.isolated.run_isolated`. Checkpointable: on preemption or
    timeout submitit calls :meth:`checkpoint` and requeues what it returns, the same call, whose new attempt
    resumes the run from ``ROOT/<run_id>/last.pt``."""

    def __init__(self, root: str, data_dir: str | None, threads: int):
        self.root, self.data_dir, self.threads = root, data_dir, threads

    def __call__(self, job: Job) -> Outcome:
        from .isolated import run_isolated

        return run_isolated(job, self.root, self.data_dir, threads=self.threads)

    def checkpoint(self, job: Job):
        """Requeue the same run: its state is on disk (checkpoint and ``store.json`` in its run folder)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, job)


class SlurmBackend:
    """Submits the jobs as Slurm job arrays (or local processes with ``executor="local"``) and waits for them."""

    name = "slurm"
    remote = True

    def __init__(self, options: SlurmOptions | None = None):
        self.options = options or SlurmOptions()
        self._submitit = None

    def describe(self, n_jobs: int) -> str:
        o = self.options
        at_once = min(o.array_parallelism, max(1, n_jobs))
        if o.executor == "local":
            return f"the submitit local executor ({at_once} at once)"
        return (f"Slurm job arrays (partition {o.partition or 'default'}, {o.time_min} min each, at most "
                f"{at_once} at once)")

    def start(self, n_jobs: int) -> int:
        self._submitit = require("submitit", "slurm")
        if self.options.executor == "slurm" and shutil.which("sbatch") is None:
            raise PrunekitError("no sbatch on PATH: start the Slurm sweep from a login node of the cluster (or use "
                                "--slurm-executor local to run the jobs on this machine)")
        return min(self.options.array_parallelism, max(1, n_jobs))

    def stop(self) -> None:
        pass

    def _executor(self, ctx: SweepContext, name: str):
        o = self.options
        folder = Path(o.log_dir) if o.log_dir else ctx.root / "slurm_logs"
        cluster = "local" if o.executor == "local" else "slurm"
        ex = self._submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster,
                                         **{f"{cluster}_max_num_timeout": o.max_timeouts})
        ex.update_parameters(name=name, timeout_min=int(o.time_min), cpus_per_task=int(o.cpus_per_task),
                             gpus_per_node=int(o.gpus_per_task) or None,
                             mem_gb=None if o.mem_gb is None else float(o.mem_gb), slurm_partition=o.partition,
                             slurm_array_parallelism=int(o.array_parallelism))
        return ex

    def run_all(self, jobs: Sequence[Job], ctx: SweepContext, on_done: OnDone) -> None:
        if self._submitit is None:
            self.start(len(jobs))
        o = self.options
        if not jobs:
            return
        name = f"prunekit-{jobs[0].cfg.get('name', 'sweep')}"
        ex = self._executor(ctx, name)
        fn = SlurmRun(str(ctx.root), ctx.data_dir, o.cpus_per_task)
        poll = o.poll_s if o.poll_s is not None else (0.5 if o.executor == "local" else 10.0)
        queue = list(jobs)
        waiting: dict = {}  # submitit job -> run id
        if o.executor == "slurm":  # whole arrays; Slurm throttles them (array_parallelism)
            for i in range(0, len(queue), MAX_ARRAY):
                chunk = queue[i:i + MAX_ARRAY]
                with ex.batch():
                    handles = [ex.submit(fn, job) for job in chunk]
                waiting.update({h: job.run_id for h, job in zip(handles, chunk)})
            queue = []
            arrays = sorted({h.job_id.split("_")[0] for h in waiting})
            ctx.log(f"sweep: submitted {len(jobs)} run(s) as Slurm job array(s) {', '.join(arrays)}; logs in "
                    f"{Path(o.log_dir) if o.log_dir else ctx.root / 'slurm_logs'}/")
        try:
            while queue or waiting:
                while queue and len(waiting) < o.array_parallelism:  # the local executor has no arrays
                    job = queue.pop(0)
                    waiting[ex.submit(fn, job)] = job.run_id
                finished = [h for h in list(waiting) if h.done()]
                for h in finished:
                    rid = waiting.pop(h)
                    on_done(self._outcome(h, rid), len(waiting))
                if not finished:
                    time.sleep(poll)
        except KeyboardInterrupt:
            if o.executor == "slurm" and waiting:
                ids = sorted({h.job_id.split("_")[0] for h in waiting})
                ctx.log(f"sweep: the Slurm jobs keep running (stop them with: scancel {' '.join(ids)}); rerun the "
                        "same command to collect their records")
            raise

    @staticmethod
    def _outcome(handle, rid: str) -> Outcome:
        try:
            out = handle.result()
        except Exception as e:  # noqa: BLE001 - the job died (killed, cancelled, out of memory, requeues spent)
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            why = lines[0].strip()[:300] if lines else type(e).__name__
            if len(lines) > 1 and "Traceback" in str(e):
                why = lines[-1].strip()[:300]
            return Outcome(rid, False, error=f"Slurm job {handle.job_id} ended without a result: {why} "
                                             f"(log: {handle.paths.stderr})")
        if not isinstance(out, Outcome):
            return Outcome(rid, False, error=f"Slurm job {handle.job_id} returned {type(out).__name__}, not an "
                                             "outcome (a different prunekit version on the nodes?)")
        return out
