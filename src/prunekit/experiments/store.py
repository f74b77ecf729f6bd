"""The results store: one SQLite file (embedded, no server).

Tables: ``runs`` (one row per run: identity, config, status, headline metrics, timings, versions, hardware),
``experiments`` (which experiment names a run belongs to), ``epochs`` (per-epoch metrics), ``layers`` (per-layer
sparsity of the final masks), ``levels`` (IMP codes: one row per level and branch, written as each level ends). Every write is one transaction, so a crash never leaves a half-written row; WAL mode
lets readers (``prunekit report``) work while a run writes.

:meth:`Store.export_run` and :meth:`Store.import_run` move all the rows of one run between stores: remote sweep
workers (Ray, Slurm) never open the sweep's SQLite file, which may sit on a network filesystem where SQLite locking
is unsafe; they run into a private store and send the run's rows back (:mod:`prunekit.experiments.backends`).
"""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import PrunekitError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,              -- running | done | failed
    method TEXT, sparsity REAL, seed INTEGER, model TEXT, dataset TEXT,
    config TEXT NOT NULL,              -- resolved config, JSON
    created REAL, updated REAL, finished REAL,
    final_test_acc REAL, best_val_acc REAL, test_acc_at_best_val REAL, best_epoch INTEGER,
    achieved_sparsity REAL, prune_seconds REAL, train_seconds REAL, total_seconds REAL,
    collapsed TEXT,                    -- JSON list of collapsed tensors
    error TEXT,
    versions TEXT, hardware TEXT,      -- JSON
    record TEXT                        -- the full RunRecord, JSON
);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT NOT NULL, run_id TEXT NOT NULL, added REAL,
    PRIMARY KEY (name, run_id)
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL, epoch INTEGER NOT NULL,
    lr REAL, train_loss REAL, train_acc REAL, val_loss REAL, val_acc REAL, test_loss REAL, test_acc REAL,
    seconds REAL, sparsity REAL,
    PRIMARY KEY (run_id, epoch)
);
CREATE TABLE IF NOT EXISTS layers (
    run_id TEXT NOT NULL, layer TEXT NOT NULL, position INTEGER, shape TEXT, kept INTEGER, total INTEGER,
    density REAL,
    PRIMARY KEY (run_id, layer)
);
CREATE TABLE IF NOT EXISTS levels (
    run_id TEXT NOT NULL, level INTEGER NOT NULL, branch TEXT NOT NULL,
    density REAL, kept INTEGER, total INTEGER, epochs INTEGER, seconds REAL, check_seconds REAL,
    stop_reason TEXT, stop_epoch REAL, best_val_acc REAL, test_acc_at_best_val REAL, final_val_acc REAL,
    final_test_acc REAL, early_stop_epoch INTEGER, early_stop_test_acc REAL,
    data TEXT,                         -- the whole row, JSON (stop checks, prune fraction)
    PRIMARY KEY (run_id, level, branch)
);
"""

#: The tables of SCHEMA (a store that has them all is not written to when opened).
TABLES = ("runs", "experiments", "epochs", "layers", "levels")

LEVEL_FIELDS = ("density", "kept", "total", "epochs", "seconds", "check_seconds", "stop_reason", "stop_epoch",
                "best_val_acc", "test_acc_at_best_val", "final_val_acc", "final_test_acc", "early_stop_epoch",
                "early_stop_test_acc")

RUN_EXPORT_FORMAT = "prunekit.store.run/1"

EPOCH_FIELDS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "sparsity")


#: The error recorded for a run stopped by Ctrl-C: not a failure; a sweep resumes it without --retry-failed.
INTERRUPTED = "interrupted"


class StoreError(PrunekitError):
    """The results store cannot be opened, read or written: a one-line message naming the file, the cause and the
    fix (not a database, damaged, read-only, disk full, locked)."""


#: Columns of ``runs`` that every prunekit store has had; a SQLite file without them is someone else's database.
_REQUIRED = ("run_id", "status", "config")


class Store:
    """A results store at ``path`` (created on first use).

    ``readonly``: open an existing store for reading only (SQLite ``mode=ro``), as reports do: that works on a
    store the user may not write (a read-only file or folder, a finished project's archive), and never changes the
    file. Every SQLite or filesystem error becomes a :class:`StoreError` whose one line names the file and the
    fix; a write that fails (disk full, say) is rolled back whole."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a results store: move it aside or point --root elsewhere")
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"no results store at {self.path}: run an experiment first (prunekit run CONFIG), "
                                 "or point --root at the folder that holds results.sqlite")
            self._conn = self._connect_readonly()
        else:
            self._check_writable()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            except (OSError, sqlite3.Error) as e:
                raise self._error(e) from None
        try:
            self._conn.row_factory = sqlite3.Row
            self._tables = self._table_names()
            if not readonly:
                # a store that is already set up is opened without taking a write lock (several processes open it at
                # once: a torchrun's ranks, sweep workers), so opening never waits on a writer
                if self._conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
                if not set(TABLES) <= self._tables:
                    self._conn.executescript(SCHEMA)
                    self._tables = self._table_names()
            self._check_schema()
        except sqlite3.Error as e:
            self._conn.close()
            raise self._error(e) from None
        except StoreError:
            self._conn.close()
            raise

    def _connect_readonly(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri()
        try:
            return sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
        except sqlite3.OperationalError as e:
            # a WAL store in a folder we may not write has no shared-memory file to open: read it as an unchanging
            # file (nobody can be writing it here)
            if os.access(self.path.parent, os.W_OK):
                raise self._error(e) from None
            try:
                return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=60, isolation_level=None)
            except sqlite3.Error as e2:
                raise self._error(e2) from None

    def _check_writable(self) -> None:
        """Fail before any work when the store (or the folder its journal files go to) cannot be written."""
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(self._readonly_message("the file is read-only"))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(self._readonly_message(f"its folder {folder} is not writable"))

    def _readonly_message(self, why: str) -> str:
        reads = (f"; reports can still read it (prunekit report --root {self.path.parent})"
                 if self.path.is_file() else "")
        return (f"{self.path} cannot be written ({why}): this command records runs there; make it writable or point "
                f"--root at another folder{reads}")

    def _table_names(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _check_schema(self) -> None:
        if "runs" not in self._tables:
            raise StoreError(f"{self.path} is not a prunekit results store (an SQLite database without a runs "
                             "table): move it aside or point --root elsewhere")
        columns = set(self._columns("runs"))
        missing = [c for c in _REQUIRED if c not in columns]
        if missing:
            raise StoreError(f"{self.path} is not a prunekit results store (its runs table has no "
                             f"{', '.join(missing)} column{'s' if len(missing) > 1 else ''}): move it aside or point "
                             "--root elsewhere")

    def _error(self, e: BaseException) -> StoreError:
        """The one-line :class:`StoreError` for a SQLite or filesystem error on this store."""
        path = self.path
        if isinstance(e, OSError):
            if e.errno == errno.ENOSPC:
                return StoreError(f"{path}: disk full: no space left to create the results store; free space on "
                                  f"{path.parent} and run the same command again")
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return StoreError(self._readonly_message(e.strerror or "permission denied"))
            return StoreError(f"{path}: cannot create the results store ({e.strerror or e})")
        msg = str(e)
        low = msg.lower()
        if "not a database" in low:
            return StoreError(f"{path} is not a prunekit results store ({msg}): move it aside or point --root "
                              "elsewhere")
        if "malformed" in low or "corrupt" in low:
            return StoreError(f"{path} is damaged ({msg}: truncated or overwritten?): restore it from a backup, or "
                              "move it aside and point --root elsewhere")
        if "is full" in low:
            return StoreError(f"{path}: disk full ({msg}); the write was rolled back, nothing of it is in the "
                              f"store: free space on {path.parent} and run the same command again (finished runs "
                              "are kept, interrupted ones resume)")
        if "readonly" in low or "read-only" in low:
            return StoreError(self._readonly_message(msg))
        if "locked" in low or "busy" in low:
            return StoreError(f"{path} is locked by another process ({msg}, after waiting 60 s): let it finish or "
                              "stop it, then run the same command again")
        if "unable to open" in low:
            return StoreError(f"cannot open the results store {path} ({msg}): check that the file and its folder "
                              "exist and are readable, or point --root elsewhere")
        return StoreError(f"{path}: results store error ({type(e).__name__}: {msg})")

    def _read(self, sql: str, args=()) -> list[sqlite3.Row]:
        """Rows of one read query; SQLite errors as :class:`StoreError`."""
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._error(e) from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside commits together or not at all (a failed write, the disk full for
        one, is rolled back whole and raised as a :class:`StoreError`)."""
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only (for a report): it cannot record runs")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._error(e) from None
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as e:
            if self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:  # SQLite may have rolled back already (a full disk)
                    pass
            if isinstance(e, sqlite3.Error):
                raise self._error(e) from None
            raise

    # ------------------------------------------------------------------------------------------------------ writes
    def begin_run(self, run_id: str, name: str, resolved: dict, versions: dict, hardware: dict) -> None:
        """Register a run as running (keeps the row of an interrupted run, whose epochs stay valid)."""
        now = time.time()
        p = resolved["prune"]
        with self.transaction() as c:
            c.execute(
                """INSERT INTO runs (run_id, status, method, sparsity, seed, model, dataset, config, created, updated,
                                     versions, hardware)
                   VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(run_id) DO UPDATE SET status='running', error=NULL, updated=excluded.updated,
                       versions=excluded.versions, hardware=excluded.hardware""",
                (run_id, p["method"], p["sparsity"], resolved["seed"], resolved["model"]["name"],
                 resolved["data"]["name"], json.dumps(resolved, sort_keys=True), now, now, json.dumps(versions),
                 json.dumps(hardware)),
            )
            c.execute("INSERT OR IGNORE INTO experiments (name, run_id, added) VALUES (?, ?, ?)", (name, run_id, now))

    def link(self, name: str, run_id: str) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR IGNORE INTO experiments (name, run_id, added) VALUES (?, ?, ?)",
                      (name, run_id, time.time()))

    def log_epoch(self, run_id: str, epoch: int, metrics: dict) -> None:
        vals = [metrics.get(k) for k in EPOCH_FIELDS]
        with self.transaction() as c:
            c.execute(
                f"INSERT OR REPLACE INTO epochs (run_id, epoch, {', '.join(EPOCH_FIELDS)}) "
                f"VALUES (?, ?, {', '.join('?' * len(EPOCH_FIELDS))})",
                (run_id, epoch, *vals),
            )
            c.execute("UPDATE runs SET updated=? WHERE run_id=?", (time.time(), run_id))

    def log_levels(self, run_id: str, rows: list[dict]) -> None:
        """Write (or replace) the rows of finished IMP levels, in one transaction."""
        with self.transaction() as c:
            c.executemany(
                f"INSERT OR REPLACE INTO levels (run_id, level, branch, {', '.join(LEVEL_FIELDS)}, data) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(LEVEL_FIELDS))}, ?)",
                [(run_id, r["level"], r.get("branch", "main"), *[r.get(k) for k in LEVEL_FIELDS],
                  json.dumps(r, default=str)) for r in rows],
            )
            c.execute("UPDATE runs SET updated=? WHERE run_id=?", (time.time(), run_id))

    def finish_run(self, run_id: str, record: dict, layers: list[dict]) -> None:
        """Write the final record and per-layer sparsity, and mark the run done, in one transaction."""
        now = time.time()
        with self.transaction() as c:
            c.execute("DELETE FROM layers WHERE run_id=?", (run_id,))
            c.executemany(
                "INSERT INTO layers (run_id, layer, position, shape, kept, total, density) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, l["layer"], i, l["shape"], l["kept"], l["total"], l["density"]) for i, l in enumerate(layers)],
            )
            c.execute(
                """UPDATE runs SET status='done', finished=?, updated=?, final_test_acc=?, best_val_acc=?,
                       test_acc_at_best_val=?, best_epoch=?, achieved_sparsity=?, prune_seconds=?, train_seconds=?,
                       total_seconds=?, collapsed=?, error=NULL, record=?,
                       sparsity=COALESCE(sparsity, ?) WHERE run_id=?""",  # a budget run: the sparsity reached
                (now, now, record.get("final_test_acc"), record.get("best_val_acc"), record.get("test_acc_at_best_val"),
                 record.get("best_epoch"), record.get("achieved_sparsity"), record.get("prune_seconds"),
                 record.get("train_seconds"), record.get("total_seconds"), json.dumps(record.get("collapsed", [])),
                 json.dumps(record, default=str), record.get("sparsity"), run_id),
            )

    def fail_run(self, run_id: str, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='failed', error=?, updated=? WHERE run_id=?", (error, time.time(), run_id))

    # ------------------------------------------------------------------------------------------- whole runs
    def run_tables(self) -> list[str]:
        """The tables that hold rows of runs (those with a ``run_id`` column), in name order."""
        names = [r[0] for r in self._read(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return [t for t in names if "run_id" in self._columns(t)]

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self._read(f'PRAGMA table_info("{table}")')]

    def export_run(self, run_id: str) -> dict[str, Any]:
        """Every row of one run, in every table that has a ``run_id`` column, as plain JSON-able data::

            {"format": "prunekit.store.run/1", "run_id": ..., "tables": {"runs": [{...}], "epochs": [...], ...}}

        Remote sweep workers run into a store of their own and send this back; :meth:`import_run` writes it into
        the sweep's store. Tables without rows of the run are present with an empty list."""
        tables = {t: [dict(r) for r in self._read(f'SELECT * FROM "{t}" WHERE run_id=? ORDER BY rowid', (run_id,))]
                  for t in self.run_tables()}
        return {"format": RUN_EXPORT_FORMAT, "run_id": run_id, "tables": tables}

    def import_run(self, payload: dict[str, Any]) -> None:
        """Write a run exported by :meth:`export_run` (from this store or another one), in one transaction.

        The run's rows in every table of the payload replace the ones here, except ``experiments`` (which names a
        run belongs to): those are added to, since a run can belong to several experiments and the payload only
        knows the one it ran under. Raises :class:`~prunekit.errors.PrunekitError` for a payload that is not an
        export, or that has tables or columns this store lacks (written by a newer prunekit)."""
        if not isinstance(payload, dict) or payload.get("format") != RUN_EXPORT_FORMAT:
            raise PrunekitError(f"not a run export ({RUN_EXPORT_FORMAT}): got "
                                f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}")
        run_id, tables = payload["run_id"], payload["tables"]
        known = set(self.run_tables())
        for table, rows in tables.items():
            if table not in known:
                raise PrunekitError(f"run {run_id}: table {table!r} is not in {self.path} (written by a newer "
                                    "prunekit?); upgrade prunekit where the sweep runs")
            columns = set(self._columns(table))
            for row in rows:
                extra = sorted(set(row) - columns)
                if extra:
                    raise PrunekitError(f"run {run_id}: table {table!r} has no column(s) {', '.join(extra)} in "
                                        f"{self.path} (written by a newer prunekit?); upgrade prunekit where the "
                                        "sweep runs")
                if row.get("run_id") != run_id:
                    raise PrunekitError(f"run export of {run_id} holds a row of run {row.get('run_id')!r} in "
                                        f"table {table!r}")
        with self.transaction() as c:
            for table, rows in tables.items():
                merge = table == "experiments"
                if not merge:
                    c.execute(f'DELETE FROM "{table}" WHERE run_id=?', (run_id,))
                verb = "INSERT OR IGNORE" if merge else "INSERT"
                for row in rows:
                    cols = list(row)
                    names = ", ".join(f'"{k}"' for k in cols)
                    c.execute(f'{verb} INTO "{table}" ({names}) VALUES ({", ".join("?" * len(cols))})',
                              [row[k] for k in cols])

    # ------------------------------------------------------------------------------------------------------- reads
    def status(self, run_id: str) -> str | None:
        rows = self._read("SELECT status FROM runs WHERE run_id=?", (run_id,))
        return rows[0]["status"] if rows else None

    def record(self, run_id: str) -> dict | None:
        rows = self._read("SELECT record FROM runs WHERE run_id=? AND status='done'", (run_id,))
        return None if not rows or rows[0]["record"] is None else json.loads(rows[0]["record"])

    def runs(self, name: str | None = None, status: str | None = "done") -> list[dict[str, Any]]:
        """Run rows (dicts), optionally of one experiment name and/or status, oldest first."""
        sql = "SELECT r.* FROM runs r"
        args: list = []
        where = []
        if name is not None:
            if "experiments" not in self._tables:
                return []
            sql += " JOIN experiments e ON e.run_id = r.run_id"
            where.append("e.name = ?")
            args.append(name)
        if status is not None:
            where.append("r.status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.created"
        return [dict(r) for r in self._read(sql, args)]

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        if "epochs" not in self._tables:
            return []
        return [dict(r) for r in self._read("SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,))]

    def layers(self, run_id: str) -> list[dict[str, Any]]:
        if "layers" not in self._tables:
            return []
        return [dict(r) for r in self._read("SELECT * FROM layers WHERE run_id=? ORDER BY position", (run_id,))]

    def levels(self, run_id: str) -> list[dict[str, Any]]:
        """The IMP level rows of a run (the JSON data of each row), level order, main branch first."""
        if "levels" not in self._tables:  # a store written before IMP levels were recorded, opened read-only
            return []
        rows = self._read("SELECT data FROM levels WHERE run_id=? ORDER BY level, branch != 'main', branch", (run_id,))
        return [json.loads(r["data"]) for r in rows]

    def experiment_names(self) -> list[str]:
        if "experiments" not in self._tables:
            return []
        return [r[0] for r in self._read("SELECT DISTINCT name FROM experiments ORDER BY name")]
