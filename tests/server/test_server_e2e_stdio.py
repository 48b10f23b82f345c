"""End to end: the official MCP client drives `autoresearch-mcp serve` over a real stdio pipe, and
every experiment runs in a real container (docker backend, tiny-stdlib, a few-second budget).

The agent's first run is its baseline; here that first run uses a learning rate 100x too small, so
that the next step (back to the program's tuned rate) is an improvement on any machine, and a zero
learning rate after it is reliably worse.
"""

from __future__ import annotations

import anyio
import git
import pytest
from mcp import Client
from server_helpers import ledger_rows, make_diff, open_dir, stdio_params

from server.lab import read_results

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

CRASH_MARK = "boom: injected by the e2e test"


async def call(client: Client, tool: str, args: dict | None = None, **kw) -> dict:
    result = await client.call_tool(tool, args or {}, **kw)
    assert not result.is_error, f"{tool}: {result.content[0].text}"
    return result.structured_content


async def patch(client: Client, old: str, new: str) -> None:
    text = (await call(client, "read_train"))["text"]
    await call(client, "apply_patch", {"diff": make_diff(text, old, new)})


async def test_experiment_loop_over_stdio(make_lab, tiny_data, lab_containers):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data), progress_interval_s=1.0)
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        await patch(client, "LR = ", "LR = 4e-5")
        await patch(client, "EMBED_LR = ", "EMBED_LR = 1e-4")
        base = await call(client, "run_experiment", {"description": "baseline, learning rates 100x too small"})
        assert (base["status"], base["kept"], base["decision"], base["delta"]) == ("ok", True, "keep", None)
        assert 0 < base["epochs"] < 1, base  # the tiny program reads a fraction of its data in its budget

        await call(client, "reset_train", {"to": "baseline"})  # the program's tuned learning rates
        progress: list[tuple[float, str | None]] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, message))

        good = await call(client, "run_experiment", {"description": "tuned learning rates"},
                          progress_callback=on_progress)
        assert good["status"] == "ok" and good["kept"] and good["val_bpb"] < base["val_bpb"]
        assert good["delta"] == pytest.approx(good["val_bpb"] - base["val_bpb"])
        assert len(progress) >= 3, progress
        values = [v for v, _ in progress]
        assert values == sorted(values) and len(set(values)) == len(values)
        assert any("phase train" in (m or "") for _, m in progress), progress

        await patch(client, "LR = ", "LR = 0.0")
        await patch(client, "EMBED_LR = ", "EMBED_LR = 0.0")
        bad = await call(client, "run_experiment", {"description": "zero learning rate"})
        assert bad["status"] == "ok" and not bad["kept"] and bad["decision"] == "discard"
        assert bad["val_bpb"] > good["val_bpb"] and bad["delta"] > 0
        assert (await call(client, "read_train"))["base_commit"] == good["commit"]  # back to the best

        await patch(client, "cfg = trainer.program()", f"cfg = trainer.program(); raise RuntimeError({CRASH_MARK!r})")
        started = await call(client, "start_experiment", {"description": "crashes on purpose"})
        busy = await client.call_tool("run_experiment", {"description": "a second run at once"})
        assert busy.is_error and "in flight" in busy.content[0].text  # one run per agent at a time
        state = await wait_for_finish(client, started["run_id"])
        crash = state["result"]
        assert crash["status"] == "crash" and crash["decision"] == "crash" and not crash["kept"]
        assert CRASH_MARK in crash["log_tail"] and "Traceback" in crash["log_tail"]
        log = await call(client, "get_log", {"run_id": crash["run_id"], "lines": 50})
        assert CRASH_MARK in log["text"]

        best = await call(client, "get_best")
        assert best["agent_best"]["run_id"] == good["run_id"] == best["lab_best"]["run_id"]
        assert best["agent_best"]["val_bpb"] == good["val_bpb"]
        assert best["agent_best"]["improvement_over_baseline"] == pytest.approx(base["val_bpb"] - good["val_bpb"])
        listed = await call(client, "list_experiments", {"kept_only": True})
        assert [r["run_id"] for r in listed["runs"]] == [good["run_id"], base["run_id"]]
    assert lab_containers() == []
    check_books_agree(root, "alice", [base, good, bad, crash])


async def wait_for_finish(client: Client, run_id: str) -> dict:
    """Poll get_experiment like a client with short call limits would."""
    seen = []
    for _ in range(600):
        state = await call(client, "get_experiment", {"run_id": run_id})
        seen.append(state["result"]["status"])
        if state["finished"]:
            assert set(seen) <= {"queued", "running", state["result"]["status"]}, seen
            return state
        assert state["progress"], state
        await anyio.sleep(0.5)
    raise AssertionError(f"{run_id} did not finish: {seen[-5:]}")


def check_books_agree(root, agent: str, results: list[dict]) -> None:
    """Ledger, git (branch + attempt refs + trailers) and results.tsv tell the same story."""
    rows = ledger_rows(root, agent)
    assert [r.run_id for r in rows] == [r["run_id"] for r in results]
    repo = git.Repo(root / "repo")
    branch = [c for c in repo.iter_commits(f"autoresearch/{agent}") if "Run-Id:" in c.message]
    assert [c.hexsha for c in reversed(branch)] == [r.commit for r in rows if r.kept]
    tsv = read_results(root / "results" / f"{agent}.tsv")
    assert len(tsv) == len(rows)
    for row, line in zip(rows, tsv):
        commit = repo.commit(f"refs/autoresearch/attempts/{row.run_id}")
        assert commit.hexsha == row.commit
        trailers = dict(ln.split(": ", 1) for ln in commit.message.strip().splitlines() if ": " in ln)
        assert trailers["Run-Id"] == row.run_id and trailers["Status"] == row.decision
        assert trailers["Val-BPB"] == (f"{row.val_bpb:.6f}" if row.val_bpb is not None else "none")
        assert line["commit"] == row.commit[:7] and line["status"] == row.decision
        assert line["val_bpb"] == f"{row.val_bpb or 0:.6f}" and line["description"] == row.description
        assert (root / "runs" / row.run_id / "train.py").read_text() == repo.git.show(
            f"{row.commit}:train.py", strip_newline_in_stdout=False)


async def test_an_edit_that_breaks_causality_is_invalid_not_a_record(make_lab, tiny_data, lab_containers):
    """The classic agent mistake: attention that can see the future. Its loss looks wonderful; the
    scorer refuses the exported graph before scoring it, so it never becomes the best run."""
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data))
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        base = await call(client, "run_experiment", {"description": "baseline"})
        assert base["status"] == "ok" and base["kept"]
        text = (await call(client, "read_train"))["text"]
        line = next(ln for ln in text.splitlines() if "is_causal=True" in ln)
        await patch(client, line, line.replace("is_causal=True", "is_causal=False"))
        leak = await call(client, "run_experiment", {"description": "attention without the causal mask"})
        assert (leak["status"], leak["decision"], leak["kept"], leak["val_bpb"]) == ("invalid", "invalid", False, None)
        assert "not causal" in leak["reason"], leak["reason"]
        best = await call(client, "get_best")
        assert best["agent_best"]["run_id"] == base["run_id"]
    assert lab_containers() == []
    check_books_agree(root, "alice", [base, leak])


async def test_train_py_cannot_find_the_validation_split(make_lab, tiny_data, lab_containers):
    """/data holds the training split only and stdin is empty: the validation split goes to the score
    phase alone, which still scores the run."""
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data))
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        await patch(client, "cfg = trainer.program()", "cfg = trainer.program(); import os, sys; "
                    "seen = sorted(os.listdir('/data')); print('DATA', seen, 'STDIN', repr(sys.stdin.buffer.read())); "
                    "assert 'train.bin' in seen and not [n for n in seen if n.startswith('val')], seen")
        run = await call(client, "run_experiment", {"description": "looks for validation data"})
        assert run["status"] == "ok" and run["val_bpb"] > 0, run
        log = await call(client, "get_log", {"run_id": run["run_id"], "lines": 400})
        assert "DATA ['meta.json'" in log["text"] and "STDIN b''" in log["text"], log["text"][-2000:]
    assert lab_containers() == []
