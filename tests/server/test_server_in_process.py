"""scoring = "in-process", the explicit opt-out of sealed scoring: its results are marked unverified in
the ledger, the tools, git and results.tsv, and never rank above a sealed result (issue 18). Honest
code only, on the local backend."""

from __future__ import annotations

import shutil

import git
import pytest
from mcp import Client
from server_helpers import LOADED_HOST_TIME_SLACK_S, PROGRAM, TEST_BUDGET_S

from server.app import build_server
from server.lab import Lab, create_lab, program_dir, read_results
from server.ledger import Ledger

pytestmark = pytest.mark.anyio


async def test_an_in_process_program_s_results_are_unverified_everywhere(tmp_path, slots_dir, tiny_data):
    program = tmp_path / "tiny-in-process"
    shutil.copytree(program_dir(PROGRAM), program)
    toml = program / "program.toml"
    toml.write_text(toml.read_text().replace("[data]", 'scoring = "in-process"\n[data]', 1))
    root = tmp_path / "lab"
    create_lab(root, str(program), budget_s=TEST_BUDGET_S, data_dir=tiny_data,
               backend={"type": "local", "state_dir": str(tmp_path / "local-state")},
               pool={"state_dir": str(slots_dir), "gpus": [], "cpu_slots": 1},
               min_time_slack_s=LOADED_HOST_TIME_SLACK_S)
    async with Client(build_server(root, stdio_agent="alice"), read_timeout_seconds=300) as client:
        run = (await client.call_tool("run_experiment", {"description": "baseline, scored in-process"})).structured_content
        assert run["status"] == "ok" and run["verified"] is False and run["kept"] and run["val_bpb"] > 0
        assert run["score_seconds"] is None  # no score phase ran
        best = (await client.call_tool("get_best", {})).structured_content
        assert best["agent_best"]["verified"] is False
        listed = (await client.call_tool("list_experiments", {})).structured_content["runs"]
        assert listed[0]["verified"] is False
    [row] = read_results(root / "results" / "alice.tsv")
    assert row["description"].startswith("[unverified: in-process score] ")
    commit = git.Repo(root / "repo").commit(f"refs/autoresearch/attempts/{run['run_id']}")
    assert "Verified: no" in commit.message
    lab = Lab(root)
    try:
        assert lab.ledger.get(run["run_id"]).verified is False
    finally:
        lab.close()


def test_an_unverified_result_never_ranks_above_a_sealed_one(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        for agent, val, verified in (("alice", 2.5, True), ("bob", 1.0, False)):
            rec = ledger.create_run(agent, "x", None)
            ledger.finish(rec.run_id, "ok", val_bpb=val, kept=True, decision="keep", verified=verified)
        assert ledger.best().agent == "alice"  # 2.5 sealed beats 1.0 unverified
        assert ledger.best("bob").val_bpb == 1.0  # bob's own best is still his
    finally:
        ledger.close()
