"""Ledger: ids, the live → final transition happening exactly once, bests, and several writers."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from server.errors import NotFoundError
from sandbox.reaper import owner_alive, process_start

from server.ledger import SCHEMA, Ledger


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


def test_run_ids_are_per_agent_and_rows_start_queued(ledger):
    a1 = ledger.create_run("alice", "baseline", "c0")
    a2 = ledger.create_run("alice", "two", "c0")
    b1 = ledger.create_run("bob", "baseline", "c0")
    assert [a1.run_id, a2.run_id, b1.run_id] == ["alice-0001", "alice-0002", "bob-0001"]
    assert {r.status for r in (a1, a2, b1)} == {"queued"}
    assert a1.owner_pid == os.getpid() and owner_alive(a1.owner_pid, a1.owner_start, host="")


def test_finish_happens_exactly_once(ledger):
    rec = ledger.create_run("alice", "baseline", "c0")
    ledger.mark_running(rec.run_id, "0")
    assert ledger.get(rec.run_id).status == "running"
    assert ledger.finish(rec.run_id, "ok", val_bpb=1.5, kept=True, commit="abc", decision="keep")
    assert not ledger.finish(rec.run_id, "interrupted", detail="late")
    row = ledger.get(rec.run_id)
    assert (row.status, row.val_bpb, row.kept, row.detail, row.gpu) == ("ok", 1.5, True, None, "0")
    assert row.finished_at is not None and row.started_at is not None


def test_a_ledger_from_before_the_epochs_column_gains_it_and_keeps_its_rows(tmp_path):
    path = tmp_path / "ledger.sqlite"
    old_schema = SCHEMA.replace("    epochs REAL,\n", "")
    assert old_schema != SCHEMA
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        db.execute("INSERT INTO runs (run_id, agent, seq, description, status, val_bpb, created_at, owner_pid, "
                   "owner_start) VALUES ('alice-0001', 'alice', 1, 'baseline', 'ok', 1.25, 0, 1, 'gone')")
    ledger = Ledger(path)
    try:
        old = ledger.get("alice-0001")
        assert (old.status, old.val_bpb, old.epochs) == ("ok", 1.25, None)
        rec = ledger.create_run("alice", "next", None)
        assert ledger.finish(rec.run_id, "ok", val_bpb=1.2, epochs=0.75)
        assert ledger.get(rec.run_id).epochs == 0.75
    finally:
        ledger.close()
    Ledger(path).close()  # opening it again adds nothing twice


def test_finish_rejects_unknown_fields(ledger):
    rec = ledger.create_run("alice", "x", None)
    with pytest.raises(ValueError, match="unknown ledger fields"):
        ledger.finish(rec.run_id, "ok", val_bpb=1.0, hacked=1)
    assert ledger.get(rec.run_id).status == "queued"


def test_best_and_baseline(ledger):
    for desc, val, kept in [("base", 2.0, True), ("worse", 2.5, False), ("better", 1.8, True)]:
        r = ledger.create_run("alice", desc, None)
        ledger.finish(r.run_id, "ok", val_bpb=val, kept=kept, commit=desc)
    r = ledger.create_run("bob", "base", None)
    ledger.finish(r.run_id, "ok", val_bpb=1.9, kept=True, commit="b")
    assert ledger.best("alice").description == "better"
    assert ledger.baseline("alice").description == "base"
    assert ledger.best().val_bpb == 1.8
    assert ledger.best("carol") is None
    assert [r.description for r in ledger.runs(agent="alice")] == ["better", "worse", "base"]
    assert ledger.agents() == ["alice", "bob"]


def test_unknown_run_is_a_clear_error(ledger):
    with pytest.raises(NotFoundError, match="list_experiments"):
        ledger.get("nobody-0001")


def test_dead_owner_is_detected_zombie_or_reaped():
    """One liveness rule for the ledger's rows and the reaper's containers: a zombie is gone too."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start(proc.pid)
    assert start and owner_alive(proc.pid, start, host="")
    for _ in range(200):  # exited but not waited for: a zombie
        if not process_start(proc.pid):
            break
        time.sleep(0.01)
    assert not owner_alive(proc.pid, start, host="")
    proc.wait()
    assert not owner_alive(proc.pid, start, host="")
    assert not owner_alive(os.getpid(), "not-my-start-time", host="")


def _insert_many(path, agent, n):
    led = Ledger(path)
    for i in range(n):
        led.create_run(agent, f"run {i}", None)
    led.close()


def test_concurrent_processes_get_unique_ids(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_insert_many, args=(path, "alice", 25)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    led = Ledger(path)
    ids = [r.run_id for r in led.runs(agent="alice")]
    led.close()
    assert len(ids) == 75 == len(set(ids))
    assert sorted(ids)[-1] == "alice-0075"
