"""The MCP tools through the official client, in memory: every bad input is rejected clearly and
changes nothing. (Runs go through real stdio and real containers in test_server_e2e_stdio.py.)"""

from __future__ import annotations

import fcntl
import os

import anyio
import pytest
from mcp import Client
from server_helpers import lab_state, make_diff

from server.app import build_server

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(make_lab, tiny_data):
    root = make_lab(data_dir=tiny_data)
    async with Client(build_server(root, stdio_agent="alice")) as c:
        c.lab_root = root
        yield c


def bad_cases(train: str) -> list[tuple[str, str, dict, str]]:
    """(id, tool, arguments, words the error must contain)."""
    ok = make_diff(train, "LR = ", "LR = 5e-3")
    return [
        ("traversal", "apply_patch", {"diff": ok.replace("train.py", "../../etc/passwd")}, "only train.py"),
        ("absolute-path", "apply_patch", {"diff": ok.replace("a/train.py", "/etc/passwd").replace("b/train.py", "/etc/passwd")}, "train.py"),
        ("other-file", "apply_patch", {"diff": ok.replace("train.py", "program.toml")}, "only train.py"),
        ("second-file", "apply_patch", {"diff": ok + ok.replace("train.py", "prepare.py")}, "only train.py"),
        ("new-file", "apply_patch", {"diff": "--- /dev/null\n+++ b/evil.py\n@@ -0,0 +1 @@\n+import os\n"}, "only train.py"),
        ("rename", "apply_patch", {"diff": "diff --git a/train.py b/t2.py\nsimilarity index 100%\nrename from train.py\nrename to t2.py\n"}, "only train.py"),
        ("delete", "apply_patch", {"diff": "diff --git a/train.py b/train.py\ndeleted file mode 100644\n--- a/train.py\n+++ /dev/null\n"}, "diff"),
        ("binary", "apply_patch", {"diff": "diff --git a/train.py b/train.py\nindex 1..2 100644\nGIT binary patch\nliteral 4\nLcmZ?d00001\n"}, "binary"),
        ("nul-byte", "apply_patch", {"diff": ok.replace("5e-3", "5e-3\x00")}, "binary"),
        ("huge", "apply_patch", {"diff": ok + "+#" + "x" * 200_000 + "\n"}, "cap"),
        ("invalid-utf8", "apply_patch", {"diff": ok.replace("5e-3", "5e-3  # \udcff")}, "UTF-8"),
        ("syntax-error", "apply_patch", {"diff": make_diff(train, "LR = ", "LR = = 4e-3")}, "does not compile"),
        ("stale-context", "apply_patch", {"diff": ok.replace("-LR = ", "-LR_OLD = ")}, "does not apply"),
        ("empty-diff", "apply_patch", {"diff": ""}, "empty"),
        ("not-a-diff", "apply_patch", {"diff": "please make it faster"}, "diff"),
        ("missing-arg", "apply_patch", {}, "diff"),
        ("wrong-type", "apply_patch", {"diff": 42}, "diff"),
        ("unknown-arg-patch", "apply_patch", {"diff": ok, "path": "train.py"}, "path"),
        ("unknown-arg-read", "read_train", {"agent": "bob"}, "agent"),
        ("unknown-arg-best", "get_best", {"all": True}, "all"),
        ("empty-description", "run_experiment", {"description": "   "}, "description"),
        ("long-description", "run_experiment", {"description": "x" * 501}, "500"),
        ("unknown-arg-run", "run_experiment", {"description": "x", "budget_s": 1}, "budget_s"),
        ("start-empty-description", "start_experiment", {"description": ""}, "description"),
        ("unknown-run", "get_experiment", {"run_id": "alice-9999"}, "no run"),
        ("wait-unknown-run", "wait_experiment", {"run_id": "alice-9999"}, "no run"),
        ("cancel-other-agents-run", "cancel_experiment", {"run_id": "bob-0001"}, "no run"),
        ("other-agents-run", "get_log", {"run_id": "bob-0001"}, "no run"),
        ("log-lines-range", "get_log", {"run_id": "alice-0001", "lines": 0}, "lines"),
        ("reset-target", "reset_train", {"to": "yesterday"}, "to"),
        ("list-status", "list_experiments", {"status": "great"}, "status"),
        ("list-limit", "list_experiments", {"limit": 100000}, "limit"),
    ]


CASE_IDS = [c[0] for c in bad_cases("LR = 1\n")]


@pytest.mark.parametrize("case", CASE_IDS)
async def test_bad_input_is_rejected_and_changes_nothing(client, case):
    train = (await client.call_tool("read_train", {})).structured_content["text"]
    _, tool, args, words = next(c for c in bad_cases(train) if c[0] == case)
    before = lab_state(client.lab_root)
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{case}: accepted {args!r}"
    message = result.content[0].text
    assert words.lower() in message.lower(), message
    assert lab_state(client.lab_root) == before


async def test_tools_are_listed_with_schemas_and_manuals(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {"read_program", "read_train", "apply_patch", "run_experiment", "start_experiment",
                          "get_experiment", "wait_experiment", "cancel_experiment", "get_best", "list_experiments",
                          "get_log", "reset_train"}
    for t in tools.values():
        assert t.output_schema is not None and len(t.description) > 80, t.name
        assert t.input_schema.get("additionalProperties") is False
        for name, prop in t.input_schema.get("properties", {}).items():
            assert prop.get("description"), f"{t.name}.{name} has no description"
    assert "val_bpb" in tools["run_experiment"].description


async def test_read_patch_reset_and_empty_history(client):
    program = (await client.call_tool("read_program", {})).structured_content
    assert program["budget_s"] == pytest.approx(4.0) and program["text"].strip()
    train = (await client.call_tool("read_train", {})).structured_content
    patched = await client.call_tool("apply_patch", {"diff": make_diff(train["text"], "LR = ", "LR = 5e-3")})
    assert not patched.is_error, patched.content[0].text
    assert patched.structured_content["lines_added"] == 1
    now = (await client.call_tool("read_train", {})).structured_content
    assert now["modified"] and "LR = 5e-3" in now["text"] and now["base_commit"] == train["base_commit"]
    reset = (await client.call_tool("reset_train", {"to": "best"})).structured_content
    assert reset["commit"] == train["base_commit"]
    assert (await client.call_tool("read_train", {})).structured_content["text"] == train["text"]
    assert (await client.call_tool("list_experiments", {})).structured_content == {"runs": [], "total": 0}
    best = (await client.call_tool("get_best", {})).structured_content
    assert {k: best[k] for k in ("agent_best", "agent_baseline_val_bpb", "lab_best")} == {
        "agent_best": None, "agent_baseline_val_bpb": None, "lab_best": None}
    assert best["noise"] == {"sigma": None, "margin": 0.025, "calibration_runs": [],  # tiny-stdlib's floor
                             "rule": "A run is kept only when its val_bpb beats your best by more than 0.025 (the "
                                     "program's min_improvement; the lab's noise is not measured yet); a smaller "
                                     "gain is rerun at 1 fresh seed(s) and the means decide."}


async def test_runs_need_prepared_data_and_leave_no_row_without_it(make_lab):
    root = make_lab(name="nodata")
    async with Client(build_server(root, stdio_agent="alice")) as c:
        before = lab_state(root)
        for tool in ("run_experiment", "start_experiment"):
            result = await c.call_tool(tool, {"description": "baseline"})
            assert result.is_error and "autoresearch-mcp prepare" in result.content[0].text
        assert lab_state(root) == before


async def test_a_run_being_recorded_is_still_in_flight_with_a_status_line(client):
    """Between the sandbox's end and the ledger's final row (the git commit), a poll must still see
    the run in flight and say what it is doing, never `running` with no progress. The test holds the
    lab's git lock (a file lock, as another server would) so the run's supervisor waits to commit."""
    run_id = (await client.call_tool("start_experiment", {"description": "baseline"})).structured_content["run_id"]
    fd = os.open(client.lab_root / "locks" / "git.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with anyio.fail_after(120):
            while True:
                state = (await client.call_tool("get_experiment", {"run_id": run_id})).structured_content
                assert not state["finished"] and state["progress"], state
                if state["progress"].startswith("running: phase train"):
                    break
                await anyio.sleep(0.05)
        fcntl.flock(fd, fcntl.LOCK_EX)  # the run's own git reads are done: it can only be blocked at its commit
        with anyio.fail_after(120):
            while not (state := (await client.call_tool("get_experiment", {"run_id": run_id})).structured_content)[
                    "progress"].startswith("finishing"):
                assert not state["finished"], state
                await anyio.sleep(0.1)
        await anyio.sleep(1.0)  # still held: still in flight
        state = (await client.call_tool("get_experiment", {"run_id": run_id})).structured_content
        assert (state["finished"], state["result"]["status"]) == (False, "running"), state
        assert state["progress"] == "finishing: recording the ok result", state
    finally:
        os.close(fd)
    with anyio.fail_after(60):
        while not (state := (await client.call_tool("get_experiment", {"run_id": run_id})).structured_content)["finished"]:
            await anyio.sleep(0.05)
    assert state["result"]["status"] == "ok" and state["result"]["kept"] and state["progress"] is None


async def test_error_text_is_written_for_an_agent(client):
    """An unknown argument names itself and what the tool takes, with no pydantic URL; a diff without
    its final newline is accepted (git alone would call it corrupt); git's shell hints are dropped."""
    bad = await client.call_tool("apply_patch", {"diff": "x", "path": "train.py"})
    text = bad.content[0].text
    assert bad.is_error and "unknown argument 'path' for apply_patch; it takes diff" in text, text
    assert "pydantic.dev" not in text
    train = (await client.call_tool("read_train", {})).structured_content["text"]
    ok = await client.call_tool("apply_patch", {"diff": make_diff(train, "LR = ", "LR = 5e-3").rstrip("\n")})
    assert not ok.is_error, ok.content[0].text
    stale = await client.call_tool("apply_patch", {"diff": make_diff(train, "LR = ", "LR = 4e-3")})
    assert stale.is_error and "does not apply" in stale.content[0].text and "hint:" not in stale.content[0].text
