"""The Ray sweep backend: each run is a Ray task (``pip install 'prunekit[ray]'``).

``address=None`` starts a local Ray cluster of ``num_cpus`` CPUs (shut down when the sweep ends); an address
(``auto``, ``HOST:6379`` or ``ray://HOST:10001``) connects to a running cluster, which is left running. Tasks run
:func:`prunekit.experiments.isolated.run_isolated`: a private store on the worker's disk, the run's rows sent back
as the task's return value and imported by the sweep, which alone writes ``ROOT/results.sqlite``.

ROOT (run folders: checkpoints, artifacts) should be on a filesystem that every node mounts at the same path.
When it is not, the store is still complete (records travel as return values), but checkpoints and artifacts stay
on the node that ran the run, a run retried on another node starts over, and runs with ``model.pretrained`` fail
on nodes that do not hold their starting point's weights. ``prunekit`` must be installed on every node.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

from ..errors import PrunekitError
from .backends import Job, OnDone, Outcome, SweepContext, describe_error, require


@dataclass(frozen=True)
class RayOptions:
    """``address``: None starts a local cluster; ``auto``, ``HOST:PORT`` or ``ray://HOST:10001`` joins a running one.
    ``num_cpus``: the local cluster's CPUs (default: this machine's cores). ``cpus_per_run`` / ``gpus_per_run``: the
    resources each run's task asks for (a GPU sweep needs ``gpus_per_run`` > 0: Ray hides GPUs from tasks that ask
    for none). ``max_retries``: how often Ray reruns a task whose worker or node died (it resumes from its
    checkpoint when ROOT is shared)."""

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    max_retries: int = 3

    def __post_init__(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            raise PrunekitError(f"ray num_cpus={self.num_cpus!r}: pass a positive number of CPUs")
        if self.cpus_per_run <= 0 or self.gpus_per_run < 0:
            raise PrunekitError(f"ray cpus_per_run={self.cpus_per_run!r}, gpus_per_run={self.gpus_per_run!r}: "
                                "pass cpus_per_run > 0 and gpus_per_run >= 0")
        if self.max_retries < 0:
            raise PrunekitError(f"ray max_retries={self.max_retries!r}: pass 0 or more")


class RayBackend:
    """Runs each job as a Ray task; at most as many in flight as the cluster has room for (so "running" in the
    progress line means running, and an interrupted sweep loses only those)."""

    name = "ray"
    remote = True

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        self._ray = None
        self._owned = False
        self._slots = 1

    def describe(self, n_jobs: int) -> str:
        o = self.options
        if o.address is None:
            return f"a local Ray cluster ({o.num_cpus or os.cpu_count() or 1} CPUs)"
        return f"the Ray cluster at {o.address}"

    def start(self, n_jobs: int) -> int:
        ray = require("ray", "ray")
        self._ray = ray
        o = self.options
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            try:
                if o.address is None:  # "local": a new cluster, even when `ray start` left one on this machine
                    ray.init(address="local", num_cpus=o.num_cpus or os.cpu_count() or 1, **kwargs)
                else:
                    ray.init(address=o.address, **kwargs)
            except ConnectionError as e:
                auth = "" if os.environ.get("RAY_AUTH_MODE") else (
                    "; if the cluster uses token authentication (recent Ray releases turn it on in `ray start`), "
                    "run the sweep with RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token or "
                    "RAY_AUTH_TOKEN)")
                raise PrunekitError(f"cannot connect to the Ray cluster at {o.address!r} ({e}): start it with "
                                    "`ray start --head` on the head node, or pass its address (--address "
                                    f"HOST:6379){auth}") from None
            self._owned = True
        res = ray.cluster_resources()
        slots = int(res.get("CPU", 1) // o.cpus_per_run)
        if o.gpus_per_run > 0:
            slots = min(slots, int(res.get("GPU", 0) // o.gpus_per_run))
            if slots < 1:
                self.stop()
                raise PrunekitError(f"the Ray cluster has {res.get('GPU', 0):g} GPU(s), a run asks for "
                                    f"{o.gpus_per_run:g}: add GPU nodes or lower gpus_per_run")
        self._slots = max(1, min(slots, max(1, n_jobs)))
        return self._slots

    def stop(self) -> None:
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._owned = False

    def run_all(self, jobs: Sequence[Job], ctx: SweepContext, on_done: OnDone) -> None:
        if self._ray is None:
            self.start(len(jobs))
        ray = self._ray
        from .isolated import run_isolated

        o = self.options
        task = ray.remote(num_cpus=o.cpus_per_run, num_gpus=o.gpus_per_run, max_retries=o.max_retries)(run_isolated)
        threads = max(1, int(o.cpus_per_run))
        queue = list(jobs)
        in_flight: dict = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self._slots:
                    job = queue.pop(0)
                    ref = task.remote(job, str(ctx.root), ctx.data_dir, threads=threads, log=_quiet)
                    in_flight[ref] = job.run_id
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    rid = in_flight.pop(ref)
                    try:
                        out = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - the task or its worker died: record it, go on
                        out = Outcome(rid, False, error=_ray_error(e))
                    on_done(out, len(in_flight))
        except KeyboardInterrupt:
            for ref in in_flight:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort
                    pass
            raise


def _quiet(msg: str) -> None:
    """Ray workers' run logs go nowhere (the sweep prints one line per run)."""


def _ray_error(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"Ray task failed: {describe_error(cause)}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else describe_error(e)
