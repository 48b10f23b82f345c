"""The ledger: one SQLite row per experiment, the lab's source of truth.

A row is written `queued` before anything runs, moves to `running` when the sandbox slot is granted,
and is finished exactly once (the UPDATE only matches a live row). Several server processes may
share one ledger: WAL mode, a busy timeout, and `BEGIN IMMEDIATE` around the read-then-insert that
allocates run ids. A write waits out another process's lock (a backup, a person with the sqlite3
shell): a new row for up to START_PATIENCE_S, a run's record for up to RECORD_PATIENCE_S, since a
finished run must not be lost; then, or on a full disk, it raises LedgerUnavailableError saying so.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from sandbox.reaper import process_start

from server.errors import LedgerUnavailableError, NotFoundError
from server.models import LIVE_STATUSES, Calibration, CalibrationRun, RunRecord
from server.text import DETAIL_CHARS, printable

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    seq INTEGER NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    decision TEXT,
    val_bpb REAL,
    delta REAL,
    kept INTEGER NOT NULL DEFAULT 0,
    "commit" TEXT,
    base_commit TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    training_seconds REAL,
    total_seconds REAL,
    peak_memory_mb REAL,
    num_steps INTEGER,
    epochs REAL,
    gpu TEXT,
    detail TEXT,
    owner_pid INTEGER NOT NULL,
    owner_start TEXT NOT NULL,
    UNIQUE (agent, seq)
);
CREATE INDEX IF NOT EXISTS runs_agent ON runs (agent, seq);
CREATE TABLE IF NOT EXISTS calibrations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    "commit" TEXT NOT NULL,
    run_ids TEXT NOT NULL,
    seeds TEXT NOT NULL,
    val_bpbs TEXT NOT NULL,
    sigma REAL NOT NULL
);
"""

# columns added after the first labs were made (NULL in older rows), added on open
ADDED_COLUMNS = {"epochs": "REAL", "verified": "INTEGER", "startup_seconds": "REAL", "train_phase_seconds": "REAL",
                 "score_phase_seconds": "REAL", "seed": "INTEGER", "code_hash": "TEXT", "role": "TEXT",
                 "parent": "TEXT", "sigma": "REAL", "z": "REAL", "significant": "INTEGER", "mean_val_bpb": "REAL",
                 "seeds_in_mean": "INTEGER", "confirm_runs": "TEXT", "slot": "TEXT"}
CREATE_FIELDS = frozenset({"seed", "code_hash", "role", "parent"})
FINISH_FIELDS = frozenset(
    {"decision", "val_bpb", "delta", "kept", "commit", "training_seconds", "total_seconds",
     "peak_memory_mb", "num_steps", "detail", *ADDED_COLUMNS} - CREATE_FIELDS
)


BUSY_S = 5.0  # SQLite's own wait for a lock, per try
START_PATIENCE_S = 45.0  # a new row: under the spawner's handshake wait (server.supervisor.HANDSHAKE_S)
RECORD_PATIENCE_S = 900.0  # a run's result


class Ledger:
    """SQLite access for one lab. All methods are short and safe to call from the event loop."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """read_only: a reader that never writes (the dashboard): no schema, no columns added, and
        SQLite refuses any write on this connection."""
        self.path = path
        self._lock = threading.Lock()
        if read_only:
            self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_S,
                                       isolation_level=None, check_same_thread=False)
        else:
            self._db = sqlite3.connect(path, timeout=BUSY_S, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        if not read_only:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._add_columns()
        self.owner_pid = os.getpid()
        self.owner_start = process_start(self.owner_pid) or "?"

    def _add_columns(self) -> None:
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(runs)")}
        for name, kind in ADDED_COLUMNS.items():
            if name in have:
                continue
            try:
                self._db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as e:  # another server of this lab added it first
                if "duplicate column" not in str(e):
                    raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes --------------------------------------------------------------------------------

    def _write(self, patience_s: float, fn):
        """fn() under the ledger's lock, retried while another process holds SQLite's write lock."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                with self._lock:
                    return fn()
            except sqlite3.OperationalError as e:
                text = str(e)
                if "disk is full" in text or "disk I/O" in text:
                    raise LedgerUnavailableError(
                        f"the lab's disk is full: the ledger {self.path} cannot be written ({text}); free space "
                        "on that disk, then try again (nothing was recorded by this call)") from e
                if "locked" not in text and "busy" not in text:
                    raise
                if time.monotonic() >= deadline:
                    raise LedgerUnavailableError(
                        f"the lab's ledger {self.path} has been locked by another process for over "
                        f"{patience_s:g} s (`fuser {self.path}` names it); try again when it lets go") from e

    def create_run(self, agent: str, description: str, base_commit: str | None, *, seed: int | None = None,
                   code_hash: str | None = None, role: str = "experiment", parent: str | None = None) -> RunRecord:
        """Insert a `queued` row with the agent's next run id (`<agent>-0001`, ...): the run of train.py
        `code_hash` at `seed`, in its `role` (an agent's experiment, a confirm rerun of `parent`, a
        calibration run)."""

        def insert() -> str:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM runs WHERE agent = ?", (agent,)).fetchone()
                seq = row[0] + 1
                run_id = f"{agent}-{seq:04d}"
                self._db.execute(
                    'INSERT INTO runs (run_id, agent, seq, description, status, base_commit, created_at, '
                    "owner_pid, owner_start, seed, code_hash, role, parent) "
                    "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, agent, seq, description, base_commit, time.time(), self.owner_pid, self.owner_start,
                     seed, code_hash, role, parent),
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (a full disk)
                    self._db.execute("ROLLBACK")
                raise
            return run_id

        return self.get(self._write(START_PATIENCE_S, insert))

    def mark_running(self, run_id: str, gpu: str | None, slot: str | None = None) -> None:
        """The run holds its lease: on `slot` (cpu-0, gpu-1, or a cluster node's node/slot), GPU `gpu`."""
        self._write(RECORD_PATIENCE_S, lambda: self._db.execute(
            "UPDATE runs SET status = 'running', started_at = ?, gpu = ?, slot = ? WHERE run_id = ? AND status = 'queued'",
            (time.time(), gpu, slot, run_id)))

    def finish(self, run_id: str, status: str, **fields: Any) -> bool:
        """Give a live row its final status and fields. False if it was already final (never twice)."""
        unknown = set(fields) - FINISH_FIELDS
        if unknown:
            raise ValueError(f"unknown ledger fields: {sorted(unknown)}")
        sets = ", ".join(f'"{k}" = ?' for k in fields)
        sql = f"UPDATE runs SET status = ?, finished_at = ?{', ' + sets if sets else ''} WHERE run_id = ? AND status IN ('queued', 'running')"
        values = [status, time.time(), *(int(v) if isinstance(v, bool) else printable(v, DETAIL_CHARS)
                                         if isinstance(v, str) else v for v in fields.values()), run_id]
        return self._write(RECORD_PATIENCE_S, lambda: self._db.execute(sql, values)).rowcount == 1

    # -- reads ---------------------------------------------------------------------------------

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[RunRecord]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [RunRecord(**{**dict(r), "kept": bool(r["kept"]), "role": r["role"] or "experiment",
                             "verified": None if r["verified"] is None else bool(r["verified"]),
                             "significant": None if r["significant"] is None else bool(r["significant"])})
                for r in rows]

    def get(self, run_id: str) -> RunRecord:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise NotFoundError(f"no run {run_id!r} in this lab; list_experiments shows the run ids")
        return rows[0]

    def find(self, run_id: str) -> RunRecord | None:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return rows[0] if rows else None

    def runs(self, agent: str | None = None, status: str | None = None, limit: int | None = None,
             code_hash: str | None = None) -> list[RunRecord]:
        """Runs newest first, optionally of one agent, one status and/or one train.py."""
        where, args = [], []
        for column, value in (("agent", agent), ("status", status), ("code_hash", code_hash)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC, seq DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self._rows(sql, tuple(args))

    def live(self) -> list[RunRecord]:
        marks = ", ".join("?" for _ in LIVE_STATUSES)
        return self._rows(f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY created_at", LIVE_STATUSES)

    def best(self, agent: str | None = None) -> RunRecord | None:
        """The kept run with the lowest val_bpb, of one agent or of the whole lab; a sealed (verified)
        result always ranks above an unverified one, whatever their scores."""
        sql = "SELECT * FROM runs WHERE kept = 1 AND val_bpb IS NOT NULL"
        args: tuple[Any, ...] = ()
        if agent is not None:
            sql += " AND agent = ?"
            args = (agent,)
        rows = self._rows(sql + " ORDER BY COALESCE(verified, 1) DESC, val_bpb ASC, created_at ASC LIMIT 1", args)
        return rows[0] if rows else None

    def scores(self, agent: str, code_hash: str | None, exclude: str | None = None) -> dict[int, RunRecord]:
        """The agent's scored (ok) runs of one train.py, by seed (the earliest run of each seed)."""
        if code_hash is None:
            return {}
        rows = self._rows("SELECT * FROM runs WHERE agent = ? AND code_hash = ? AND status = 'ok' AND val_bpb IS NOT "
                          "NULL AND seed IS NOT NULL AND run_id != ? ORDER BY seq DESC", (agent, code_hash, exclude or ""))
        return {r.seed: r for r in rows if r.seed is not None}

    # -- calibrations ----------------------------------------------------------------------------

    def add_calibration(self, commit: str, runs: list[RunRecord], sigma: float) -> Calibration:
        values = (json.dumps([r.run_id for r in runs]), json.dumps([r.seed for r in runs]),
                  json.dumps([r.val_bpb for r in runs]))
        self._write(RECORD_PATIENCE_S, lambda: self._db.execute(
            'INSERT INTO calibrations (created_at, "commit", run_ids, seeds, val_bpbs, sigma) VALUES (?, ?, ?, ?, ?, ?)',
            (time.time(), commit, *values, sigma)))
        calibration = self.calibration()
        assert calibration is not None
        return calibration

    def calibration(self) -> Calibration | None:
        """The lab's latest measurement of its noise, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM calibrations ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return Calibration(sigma=row["sigma"], commit=row["commit"], created_at=row["created_at"],
                           runs=[CalibrationRun(run_id=i, seed=s, val_bpb=v) for i, s, v in
                                 zip(json.loads(row["run_ids"]), json.loads(row["seeds"]), json.loads(row["val_bpbs"]))])

    def baseline(self, agent: str) -> RunRecord | None:
        """The agent's first kept run: its baseline."""
        rows = self._rows("SELECT * FROM runs WHERE agent = ? AND kept = 1 ORDER BY seq ASC LIMIT 1", (agent,))
        return rows[0] if rows else None

    def agents(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT agent FROM runs ORDER BY agent").fetchall()]
