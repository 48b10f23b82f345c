"""Start-up recovery when a server died after committing a run but before recording it: the commit
is the decision, so the ledger row, the branch and results.tsv are completed from it."""

from __future__ import annotations

import json
import sqlite3

import pytest

from server.lab import Lab, read_results
from server.reconcile import reconcile
from server.runtime import make_runtime, recover

pytestmark = pytest.mark.anyio


def orphan_run(lab: Lab, agent: str, description: str) -> str:
    """A `running` row whose server is gone (its owner start time no longer matches)."""
    lab.history.ensure_agent(agent)
    rec = lab.ledger.create_run(agent, description, lab.history.head(agent))
    lab.ledger.mark_running(rec.run_id, None)
    with sqlite3.connect(lab.root / "ledger.sqlite") as db:
        db.execute("UPDATE runs SET owner_start = 'a server that died' WHERE run_id = ?", (rec.run_id,))
    out = lab.run_dir(rec.run_id) / "out"
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({"status": "ok", "training_seconds": 4.1, "total_seconds": 9.5,
                                                 "peak_memory_mb": 700.0, "num_steps": 21,
                                                 "epochs": 0.4}))
    return rec.run_id


def commit(lab: Lab, agent: str, run_id: str, status: str, val: str, reset_done: bool) -> str:
    text = lab.history.read_train(agent) + f"# {run_id}\n"
    trailers = {"Run-Id": run_id, "Val-BPB": val, "Status": status}
    # keep=True leaves the commit on the branch: a discard whose reset never happened
    return lab.history.commit_attempt(agent, run_id, text, run_id, trailers, keep=status == "keep" or not reset_done)


async def test_committed_runs_are_finished_from_their_commit(lab):
    backend, _ = make_runtime(lab)
    base = orphan_run(lab, "alice", "baseline")
    kept = commit(lab, "alice", base, "keep", "2.500000", reset_done=True)
    worse = orphan_run(lab, "alice", "a worse idea")
    dropped = commit(lab, "alice", worse, "discard", "2.700000", reset_done=False)
    assert lab.history.head("alice") == dropped  # the dead server never reset the branch
    lost = orphan_run(lab, "alice", "never committed")
    bobs = orphan_run(lab, "bob", "bob's baseline")
    bobs_commit = commit(lab, "bob", bobs, "keep", "2.600000", reset_done=True)
    lab.history.repo.git.update_ref("-d", f"refs/autoresearch/attempts/{bobs}")  # died before the ref

    assert await recover(lab, backend) == [lost]

    rows = {r.run_id: r for r in lab.ledger.runs("alice")}
    assert (rows[base].status, rows[base].decision, rows[base].kept, rows[base].commit) == ("ok", "keep", True, kept)
    assert rows[base].val_bpb == pytest.approx(2.5) and (rows[base].num_steps, rows[base].epochs) == (21, 0.4)
    assert (rows[worse].status, rows[worse].decision, rows[worse].kept) == ("ok", "discard", False)
    assert rows[worse].delta == pytest.approx(0.2) and rows[worse].commit == dropped
    assert rows[lost].status == "interrupted" and rows[lost].commit is None
    assert lab.history.head("alice") == kept  # the discard's reset is completed
    bob = lab.ledger.get(bobs)
    assert (bob.status, bob.kept, bob.commit) == ("ok", True, bobs_commit)
    assert lab.history.attempt(bobs) == bobs_commit  # the missing ref is made
    assert lab.history.attempt(worse) == dropped  # and its commit stays reachable
    tsv = read_results(lab.results_path("alice"))
    assert [(r["commit"], r["status"], r["val_bpb"]) for r in tsv] == [
        (kept[:7], "keep", "2.500000"), (dropped[:7], "discard", "2.700000")]
    assert await recover(lab, backend) == []  # a second start records nothing twice
    assert len(read_results(lab.results_path("alice"))) == 2
    assert reconcile(lab) == []  # ledger, git and results.tsv tell one story


async def test_the_reconciler_finds_each_disagreement(lab):
    backend, _ = make_runtime(lab)
    kept_run = orphan_run(lab, "alice", "baseline")
    kept = commit(lab, "alice", kept_run, "keep", "2.500000", reset_done=True)
    dropped_run = orphan_run(lab, "alice", "worse")
    commit(lab, "alice", dropped_run, "discard", "2.700000", reset_done=True)
    await recover(lab, backend)
    assert reconcile(lab) == []
    live = orphan_run(lab, "alice", "still going")
    assert [str(f) for f in reconcile(lab)] == [f"{live}: still running in the ledger"]
    assert reconcile(lab, allow_live=True) == []
    lab.ledger.finish(live, "crash", detail="x")

    def found(*words: str) -> bool:
        return any(all(w in str(f) for w in words) for f in reconcile(lab))

    tsv = lab.results_path("alice")
    rows = tsv.read_text()
    tsv.write_text(rows + rows.splitlines()[1] + "\n")  # a row written twice
    assert found(kept_run, "2 results.tsv rows")
    tsv.write_text("\n".join(rows.splitlines()[:1] + rows.splitlines()[2:]) + "\n")  # a row lost
    assert found(kept_run, "0 results.tsv rows")
    tsv.write_text(rows)
    repo = lab.history.repo
    repo.git.update_ref("-d", f"refs/autoresearch/attempts/{dropped_run}")
    assert found(dropped_run, "no attempt ref")
    repo.git.update_ref(f"refs/autoresearch/attempts/{dropped_run}", kept)
    assert found(dropped_run, "Run-Id trailer") and found(dropped_run, "attempt ref")
    repo.git.update_ref(f"refs/autoresearch/attempts/alice-0099", kept)
    assert found("alice-0099", "no such run")
    repo.git.update_ref("-d", "refs/autoresearch/attempts/alice-0099")
    with sqlite3.connect(lab.root / "ledger.sqlite") as db:
        db.execute("UPDATE runs SET kept = 0, decision = 'discard' WHERE run_id = ?", (kept_run,))
    assert found(kept_run, "still on the branch") and found(kept_run, "decision")
    assert not any(f.run_id == live for f in reconcile(lab))  # a crash without a commit has nothing to agree on
