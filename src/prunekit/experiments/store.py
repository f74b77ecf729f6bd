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

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

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

LEVEL_FIELDS = ("density", "kept", "total", "epochs", "seconds", "check_seconds", "stop_reason", "stop_epoch",
                "best_val_acc", "test_acc_at_best_val", "final_val_acc", "final_test_acc", "early_stop_epoch",
                "early_stop_test_acc")

RUN_EXPORT_FORMAT = "prunekit.store.run/1"

EPOCH_FIELDS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "seconds", "sparsity")


#: The error recorded for a run stopped by Ctrl-C: not a failure; a sweep resumes it without --retry-failed.
INTERRUPTED = "interrupted"


class Store:
    """A results store at ``path`` (created on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic write: everything inside commits together or not at all."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

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
                       total_seconds=?, collapsed=?, error=NULL, record=? WHERE run_id=?""",
                (now, now, record.get("final_test_acc"), record.get("best_val_acc"), record.get("test_acc_at_best_val"),
                 record.get("best_epoch"), record.get("achieved_sparsity"), record.get("prune_seconds"),
                 record.get("train_seconds"), record.get("total_seconds"), json.dumps(record.get("collapsed", [])),
                 json.dumps(record, default=str), run_id),
            )

    def fail_run(self, run_id: str, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET status='failed', error=?, updated=? WHERE run_id=?", (error, time.time(), run_id))

    # ------------------------------------------------------------------------------------------- whole runs
    def run_tables(self) -> list[str]:
        """The tables that hold rows of runs (those with a ``run_id`` column), in name order."""
        names = [r[0] for r in self._conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return [t for t in names if "run_id" in self._columns(t)]

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self._conn.execute(f'PRAGMA table_info("{table}")').fetchall()]

    def export_run(self, run_id: str) -> dict[str, Any]:
        """Every row of one run, in every table that has a ``run_id`` column, as plain JSON-able data::

            {"format": "prunekit.store.run/1", "run_id": ..., "tables": {"runs": [{...}], "epochs": [...], ...}}

        Remote sweep workers run into a store of their own and send this back; :meth:`import_run` writes it into
        the sweep's store. Tables without rows of the run are present with an empty list."""
        tables = {t: [dict(r) for r in self._conn.execute(f'SELECT * FROM "{t}" WHERE run_id=? ORDER BY rowid',
                                                          (run_id,)).fetchall()]
                  for t in self.run_tables()}
        return {"format": RUN_EXPORT_FORMAT, "run_id": run_id, "tables": tables}

    def import_run(self, payload: dict[str, Any]) -> None:
        """Write a run exported by :meth:`export_run` (from this store or another one), in one transaction.

        The run's rows in every table of the payload replace the ones here, except ``experiments`` (which names a
        run belongs to): those are added to, since a run can belong to several experiments and the payload only
        knows the one it ran under. Raises :class:`~prunekit.errors.PrunekitError` for a payload that is not an
        export, or that has tables or columns this store lacks (written by a newer prunekit)."""
        from ..errors import PrunekitError

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
        row = self._conn.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return None if row is None else row["status"]

    def record(self, run_id: str) -> dict | None:
        row = self._conn.execute("SELECT record FROM runs WHERE run_id=? AND status='done'", (run_id,)).fetchone()
        return None if row is None or row["record"] is None else json.loads(row["record"])

    def runs(self, name: str | None = None, status: str | None = "done") -> list[dict[str, Any]]:
        """Run rows (dicts), optionally of one experiment name and/or status, oldest first."""
        sql = "SELECT r.* FROM runs r"
        args: list = []
        where = []
        if name is not None:
            sql += " JOIN experiments e ON e.run_id = r.run_id"
            where.append("e.name = ?")
            args.append(name)
        if status is not None:
            where.append("r.status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.created"
        return [dict(r) for r in self._conn.execute(sql, args).fetchall()]

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT * FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    def layers(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT * FROM layers WHERE run_id=? ORDER BY position", (run_id,)).fetchall()
        return [dict(r) for r in rows]

    def levels(self, run_id: str) -> list[dict[str, Any]]:
        """The IMP level rows of a run (the JSON data of each row), level order, main branch first."""
        rows = self._conn.execute("SELECT data FROM levels WHERE run_id=? ORDER BY level, branch != 'main', branch",
                                  (run_id,)).fetchall()
        return [json.loads(r["data"]) for r in rows]

    def experiment_names(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT DISTINCT name FROM experiments ORDER BY name").fetchall()]
