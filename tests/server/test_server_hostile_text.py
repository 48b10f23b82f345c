"""A run's own text cannot break its record (issue 19): an error message with a lone surrogate and a
log full of escape sequences, NUL and bell bytes. Ledger, git and results.tsv agree; what reaches the
agent and the ledger is printable and capped; the raw log stays on disk. Real containers."""

from __future__ import annotations

import git
import pytest
from mcp import Client
from server_helpers import ledger_rows, open_dir, stdio_params

from server.lab import read_results
from server.text import TAIL_CHARS

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

NOISE = '''
import sys
sys.stdout.write("\\x1b[31mred\\x1b[0m" * 20000 + "\\x00" * 10000 + "\\x07" * 10000 + "\\n")
sys.stdout.flush()
raise RuntimeError("a bad byte \\udcff in the error")
'''


async def test_surrogates_and_control_bytes_are_recorded_cleanly(make_lab, tiny_data, lab_containers):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data))
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        text = (await client.call_tool("read_train", {})).structured_content["text"]
        line = next(ln for ln in text.splitlines() if ln.startswith("cfg = trainer.program()"))
        new = text.replace(line, line + "\n" + NOISE, 1)
        import difflib  # noqa: PLC0415

        diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "a/train.py", "b/train.py"))
        assert not (await client.call_tool("apply_patch", {"diff": diff})).is_error
        result = (await client.call_tool("run_experiment", {"description": "noisy and broken"})).structured_content
        log = (await client.call_tool("get_log", {"run_id": result["run_id"], "lines": 60})).structured_content
    assert result["status"] == "crash" and result["decision"] == "crash" and result["commit"]
    assert "a bad byte ? in the error" in result["reason"]
    for shown in (result["reason"], result["log_tail"], log["text"]):
        assert not any(c in shown for c in "\x1b\x00\x07") and len(shown) <= TAIL_CHARS + 100
    [row] = ledger_rows(root)
    assert row.status == "crash" and row.commit == result["commit"] and "\udcff" not in row.detail
    [tsv] = read_results(root / "results" / "alice.tsv")
    assert tsv["commit"] == row.commit[:7] and tsv["status"] == "crash"
    message = git.Repo(root / "repo").commit(f"refs/autoresearch/attempts/{row.run_id}").message
    assert "Status: crash" in message
    assert b"\x1b[31m" in (root / "runs" / row.run_id / "log.txt").read_bytes()  # the raw log is kept
    assert lab_containers() == []
