"""One run on a remote sweep worker (Ray task, Slurm job), without touching the sweep's SQLite file.

:func:`run_isolated` runs :func:`prunekit.experiments.runner.run` into a private store in a temporary folder on the
worker's local disk, and returns an :class:`~.backends.Outcome` whose payload is the run's store rows, which the
sweep imports into ``ROOT/results.sqlite``. Checkpoints and artifacts go to the run folder ``ROOT/<run_id>/`` as
for any run (so ROOT should be on a filesystem every worker shares, at the same path).

The run folder also gets two small files, written with atomic renames (safe on NFS, unlike SQLite locking):

- ``store.json``: the run's store rows, rewritten after every store write (each epoch). A requeued or retried
  attempt starts from them, so the epochs of earlier attempts are kept, and a sweep that was stopped before it
  collected a finished run imports them from there (:func:`read_journal`).
- ``attempts.jsonl``: one line per attempt (host, process id, job id, epochs already in the store when it
  started).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..io import atomic_write_json
from .backends import Job, Outcome, settle
from .store import Store

JOURNAL = "store.json"
ATTEMPTS = "attempts.jsonl"


class JournalStore(Store):
    """A private store that copies one run's rows to ``journal`` (atomically) after every write."""

    def __init__(self, path: str | Path, run_id: str, journal: Path):
        super().__init__(path)
        self.run_id = run_id
        self.journal = journal

    @contextmanager
    def transaction(self):
        with super().transaction() as c:
            yield c
        payload = self.export_run(self.run_id)
        if payload["tables"].get("runs"):
            atomic_write_json(self.journal, payload)


def read_journal(run_dir: str | Path) -> dict | None:
    """The run's rows a remote worker left in its run folder, or None (none, or unreadable: a torn copy from a
    filesystem that does not rename atomically is ignored, the run's next attempt rewrites it)."""
    path = Path(run_dir) / JOURNAL
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("tables", {}).get("runs") else None


def own_journal(run_dir: str | Path, run_id: str) -> dict | None:
    """:func:`read_journal` of ``run_dir`` when it holds the rows of ``run_id`` (else None)."""
    payload = read_journal(run_dir)
    return payload if payload is not None and payload.get("run_id") == run_id else None


def recover_journals(store: Store, run_ids: Iterable[str], root: Path) -> int:
    """Import into ``store`` the rows remote workers left in the run folders under ``root`` for runs it lacks, or
    has unfinished while the folder holds them finished (a sweep stopped before it collected them). Returns how
    many finished runs came in this way."""
    n = 0
    for rid in run_ids:
        status = store.status(rid)
        payload = None if status == "done" else own_journal(root / rid, rid)
        if payload is not None and (status is None or journal_status(payload) == "done"):
            store.import_run(payload)
            n += journal_status(payload) == "done"
    return n


def export_for_worker(store: Store, run_id: str, run_dir: Path) -> dict:
    """The store rows of the finished run ``run_id`` for a remote worker, its record naming ``run_dir`` as its folder
    (the folder the workers see)."""
    payload = store.export_run(run_id)
    for row in payload["tables"]["runs"]:
        if row.get("record"):
            rec = json.loads(row["record"])
            rec["run_dir"] = str(run_dir)
            row["record"] = json.dumps(rec, default=str)
    return payload


def journal_status(payload: dict | None) -> str | None:
    """The status (running | done | failed) of the run in a journal."""
    rows = (payload or {}).get("tables", {}).get("runs") or []
    return rows[0].get("status") if rows else None


def attempts(run_dir: str | Path) -> list[dict]:
    """The attempts recorded in a run folder, oldest first."""
    path = Path(run_dir) / ATTEMPTS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _job_id() -> str | None:
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):
        if os.environ.get(var):
            task = os.environ.get("SLURM_ARRAY_TASK_ID") if var == "SLURM_ARRAY_JOB_ID" else None
            return f"{os.environ[var]}_{task}" if task else os.environ[var]
    return None


@contextmanager
def _private_dir(run_id: str) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f"prunekit-{run_id}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_isolated(job: Job, root: str | Path, data_dir: str | None = None, *, threads: int | None = None,
                 log: Callable[[str], None] | None = None) -> Outcome:
    """Run ``job`` into a private store and return its outcome with the run's rows as payload.

    A run's own error is returned in the outcome (never raised); so is another process holding the run's lock
    (``busy``). BaseExceptions (SystemExit from a preemption handler, KeyboardInterrupt) propagate, after the run's
    rows so far are in ``ROOT/<run_id>/store.json`` for the next attempt.
    """
    from .runner import run

    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    log = log or (lambda msg: print(msg, file=sys.stdout, flush=True))
    root = Path(root)
    run_dir = root / job.run_id
    t0 = time.perf_counter()
    with _private_dir(job.run_id) as tmp:
        store = JournalStore(tmp / "results.sqlite", job.run_id, run_dir / JOURNAL)
        try:
            for dep in job.needs:
                store.import_run(dep)
            earlier = read_journal(run_dir)
            if earlier is not None:
                store.import_run(earlier)
            before = len(store.epochs(job.run_id))
            run_dir.mkdir(parents=True, exist_ok=True)
            n = len(attempts(run_dir)) + 1
            with open(run_dir / ATTEMPTS, "a") as f:
                f.write(json.dumps({"attempt": n, "host": socket.gethostname(), "pid": os.getpid(),
                                    "job_id": _job_id(), "started": time.time(), "epochs_before": before}) + "\n")
            log(f"[{job.run_id}] attempt {n} on {socket.gethostname()}"
                + (f", {before} epoch(s) already recorded" if before else ""))
            # the run's error goes back in the outcome (and its rows)
            out = settle(job.run_id, lambda: run(job.cfg, root, data_dir=data_dir, store=store, log=log))
            out.host, out.attempts, out.epochs_before = socket.gethostname(), n, before
            if not out.ok and not out.busy:
                log(f"[{job.run_id}] failed: {out.error}")
            if not out.busy and store.status(job.run_id) is not None:
                out.payload = store.export_run(job.run_id)
            out.seconds = time.perf_counter() - t0
            return out
        finally:
            store.close()
