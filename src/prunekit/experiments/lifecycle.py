"""The life of one run around its protocol: the store lookup that makes a finished run a no-op, the run's lock and
folder, its start in the store, the failure record of anything that goes wrong after that start, its thread count,
and its one finish (``record.json`` and the store's rows).

Under ``torchrun`` (several ranks, :mod:`prunekit.distributed`) rank 0 alone takes the lock and writes the folder
and the store rows; the other ranks see the store through :class:`RankStore`.
"""
from __future__ import annotations

import contextlib
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from .. import distributed
from ..io import acquire_lock, atomic_write_json, release_lock
from .record import RunRecord, hardware, versions
from .resolved import ResolvedRun
from .store import INTERRUPTED, Store


class RankStore:
    """The store as ranks other than 0 see it under DDP: the reads a run makes pass through, and the writes a run
    makes are rank 0's job (here they do nothing). Any other use is an error, not a silent no-op."""

    READS = ("record", "status", "runs", "levels", "epochs", "layers", "export_run")
    WRITES = ("begin_run", "link", "log_epoch", "log_levels", "finish_run", "fail_run", "import_run")

    def __init__(self, store: Store):
        self._store = store

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "RankStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name):
        if name in self.READS:
            return getattr(self._store, name)
        if name in self.WRITES:
            return _rank0_writes
        raise AttributeError(f"{type(self).__name__} (the store of a DDP rank other than 0) has no {name!r}: "
                             f"it reads ({', '.join(self.READS)}) and skips the run's writes "
                             f"({', '.join(self.WRITES)})")


def _rank0_writes(*args, **kwargs) -> None:
    """A store write on a DDP rank other than 0: rank 0 writes it."""


def open_store(path: str | Path) -> Store | RankStore:
    """The results store at ``path`` for this process. Under ``torchrun`` the ranks other than 0 never open it for
    writing: they wait for rank 0 to create it, read it through a read-only connection (which can take no lock that
    rank 0's writes would wait on) and skip the writes (:class:`RankStore`)."""
    path = Path(path)
    if distributed.launched_rank() == 0:
        return Store(path)
    deadline = time.monotonic() + 300
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    return RankStore(Store(path, readonly=True))


class RunLifecycle:
    """One run's bookkeeping, as a context manager: on exit the thread count is restored, the lock released and a
    store opened here closed. The run folder is ``<root>/<run id>/``; the store defaults to
    ``<root>/results.sqlite``."""

    def __init__(self, resolved: ResolvedRun, root: str | Path, store: Store | None = None,
                 log: Callable[[str], None] | None = None):
        self.resolved, self.rid, self.name = resolved, resolved.id, resolved.name
        self.root = Path(root)
        self.run_dir = self.root / self.rid
        self._own_store = store is None
        self._real_store = store = store or open_store(self.root / "results.sqlite")
        if distributed.init_from_env(resolved.train.device) and not distributed.is_main() \
                and not isinstance(store, RankStore):
            store = RankStore(store)
            log = lambda msg: None  # noqa: E731 - rank 0 reports
        self.store = store
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._lock = None
        self._threads = torch.get_num_threads()

    def __enter__(self) -> RunLifecycle:
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._threads)
        if self._lock is not None:
            release_lock(self._lock)
        if self._own_store:
            self._real_store.close()

    def cached(self) -> RunRecord | None:
        """The stored record of a finished run (its name linked to it), or None."""
        done = self.store.record(self.rid)
        if done is None:
            return None
        self.store.link(self.name, self.rid)
        return _cached(done)

    def use_threads(self, threads: int | None) -> None:
        """Results differ with the intra-op thread count: every run computes with its own (None: 1), whoever
        launched it; restored on exit."""
        torch.set_num_threads(threads or 1)

    def begin(self, device: str) -> RunRecord | None:
        """Take the run's folder and lock, and record its start (``config.json``, the store's row); returns the
        record instead when another process finished the run meanwhile."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():  # one process per run: a second sweep skips it (RunBusyError)
            self._lock = acquire_lock(self.run_dir / ".lock")
        if self.store.status(self.rid) == "done":  # finished by another process while we were getting here
            return _cached(self.store.record(self.rid))
        plain = self.resolved.to_dict()
        atomic_write_json(self.run_dir / "config.json", plain)
        self.store.begin_run(self.rid, self.name, plain, versions(), hardware(device))
        self.log(f"[{self.rid}] {self.name}: {self._describe()}" + (" (resuming)" if self._resuming() else ""))
        return None

    def _describe(self) -> str:
        r, p = self.resolved, self.resolved.prune
        if p.budget is not None:
            target = f"to {p.budget.fraction:g} of the dense {p.budget.unit}"
        else:
            target = f"at sparsity {p.sparsity:g}" if p.sparsity is not None else \
                f"for {p.method_options.levels} levels"
        return f"{r.model.name} on {r.data.name}, {p.method} {target}, seed {r.seed}"

    def _resuming(self) -> bool:
        return (self.run_dir / "last.pt").exists() or (self.run_dir / "imp").exists()

    @contextlib.contextmanager
    def recording_failure(self):
        """Record any exception (Ctrl-C included) in the store as the run's failure, with the traceback in
        ``error.txt``, and re-raise it."""
        try:
            yield
        except BaseException as e:
            msg = f"{type(e).__name__}: {e}"
            self.store.fail_run(self.rid, msg if not isinstance(e, KeyboardInterrupt) else INTERRUPTED)
            if not isinstance(e, (KeyboardInterrupt, SystemExit)) and distributed.is_main():
                try:
                    (self.run_dir / "error.txt").write_text(traceback.format_exc())
                except OSError:  # a full disk: the store row holds the error
                    pass
            raise

    def finish(self, rec: RunRecord, layers: list[dict]) -> RunRecord:
        """The run's one finish: ``record.json`` and the store's record and per-layer rows."""
        atomic_write_json(self.run_dir / "record.json", rec.to_dict())
        self.store.finish_run(self.rid, rec.to_dict(), layers)
        return rec


def _cached(done: dict) -> RunRecord:
    rec = RunRecord.from_dict(done)
    rec.cached = True
    return rec
