"""Runs that do not end normally, and runs of several agents: client cancellation, a server killed
with SIGKILL mid-run, two agents sharing one CPU slot. Real stdio servers, real containers."""

from __future__ import annotations

import json
import os
import secrets
import signal

import anyio
import git
import pytest
from mcp import Client
from server_helpers import IMAGE, ledger_rows, make_diff, open_dir, server_pids, stdio_params, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def running_container(lab_containers):
    return lambda: [c for c in lab_containers() if c.status == "running"]


async def test_cancelling_a_run_kills_its_container(make_lab, tiny_data, lab_containers):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data), budget_s=60)
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await client.call_tool("run_experiment", {"description": "to be cancelled"})

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_until(running_container(lab_containers), 60, "the run's container")
            scope.cancel()
        await wait_until(lambda: [r.status for r in ledger_rows(root)] == ["cancelled"], 30, "status cancelled")
        await wait_until(lambda: lab_containers() == [], 30, "the container to be removed")
        # the agent's lock is free again: it can patch and list
        text = (await client.call_tool("read_train", {})).structured_content["text"]
        result = await client.call_tool("apply_patch", {"diff": make_diff(text, "LR = ", "LR = 5e-3")})
        assert not result.is_error, result.content[0].text
        listed = (await client.call_tool("list_experiments", {})).structured_content
        assert [r["status"] for r in listed["runs"]] == ["cancelled"] and listed["runs"][0]["commit"] is None


async def test_a_run_outlives_the_client_and_the_server_that_started_it(make_lab, tiny_data, lab_containers):
    """The Inspector scenario (issue 19): one client process starts a run and exits (its stdio server
    with it); a second client, through a new server, waits for the result. Then a blocking call whose
    server is killed with SIGKILL: the run is recorded all the same."""
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data))
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as first:
        started = (await first.call_tool("start_experiment", {"description": "started, then the client left"}))
        run_id = started.structured_content["run_id"]
    await wait_until(lambda: server_pids(root) == [], 30, "the first server to exit")
    assert ledger_rows(root)[0].status in ("queued", "running")  # still going without any server
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as second:
        result = (await second.call_tool("wait_experiment", {"run_id": run_id})).structured_content
        assert (result["run_id"], result["status"], result["kept"]) == (run_id, "ok", True), result
        state = (await second.call_tool("get_experiment", {"run_id": run_id})).structured_content
        assert state["finished"] and state["result"]["val_bpb"] == result["val_bpb"]

    async def doomed_session() -> None:
        try:
            async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
                await client.call_tool("run_experiment", {"description": "its server dies during this"})
        except BaseException:  # noqa: BLE001 - the server is killed under the call; any way out is fine
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(doomed_session)
        await wait_until(running_container(lab_containers), 60, "the second run's container")
        [pid] = server_pids(root)
        os.kill(pid, signal.SIGKILL)
        tg.cancel_scope.cancel()
    await wait_until(lambda: ledger_rows(root)[-1].status not in ("queued", "running"), 120, "the run's record")
    rows = ledger_rows(root)
    assert [r.status for r in rows] == ["ok", "ok"] and rows[0].commit  # the same file again: a rerun (issue 23)
    assert (rows[1].decision, rows[1].commit, rows[1].seed) == ("rerun", None, rows[0].seed)
    await wait_until(lambda: lab_containers() == [], 30, "its containers to be removed")


async def test_a_killed_supervisor_is_recovered_at_restart(make_lab, tiny_data, lab_containers):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data), budget_s=60)
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        await client.call_tool("start_experiment", {"description": "its supervisor dies during this"})
        await wait_until(running_container(lab_containers), 60, "the run's container")
        [row] = ledger_rows(root)
        assert row.status == "running" and row.owner_pid not in server_pids(root)  # the row names its supervisor
        await wait_until(lambda: '"phase": "train"' in _progress(root, row.run_id), 60, "training to start")
        os.kill(row.owner_pid, signal.SIGKILL)
        await wait_until(lambda: not os.path.exists(f"/proc/{row.owner_pid}"), 10, "the supervisor to die", 0.05)
        # at once: the server of any other lab on the engine (the tests beside this one) reaps orphans too
        assert running_container(lab_containers)(), "the orphaned container should outlive its supervisor"

    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        assert lab_containers() == []  # reaped at start-up, before the first request is served
        listed = (await client.call_tool("list_experiments", {})).structured_content
        assert [(r["run_id"], r["status"]) for r in listed["runs"]] == [(row.run_id, "interrupted")]
        await _shrink_budget(client, root)
        result = await client.call_tool("run_experiment", {"description": "after the restart"})
        assert not result.is_error, result.content[0].text
        assert result.structured_content["status"] == "ok" and result.structured_content["kept"]
    rows = ledger_rows(root)
    assert [(r.status, r.kept) for r in rows] == [("interrupted", False), ("ok", True)]
    # "; its container was reaped" follows when this lab's server reaped it, but the server of any other lab
    # on the engine may reap an orphan first (as the tests beside this one do)
    assert rows[0].detail.startswith("the run's supervisor stopped during the run"), rows[0].detail


def _progress(root, run_id: str) -> str:
    path = root / "runs" / run_id / "out" / "progress.jsonl"
    return path.read_text() if path.exists() else ""


async def _shrink_budget(client: Client, root) -> None:
    """The killed run used a long budget; the next one only needs a short one."""
    toml = root / "repo" / "program.toml"
    toml.write_text(toml.read_text().replace("budget_s = 60.0", "budget_s = 4.0"))


async def test_two_agents_share_one_cpu_slot(make_lab, tiny_data, lab_containers):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data), progress_interval_s=1.0)
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as alice, \
            Client(stdio_params(root, "bob"), read_timeout_seconds=600) as bob:
        original = (await bob.call_tool("read_train", {})).structured_content["text"]
        text = (await alice.call_tool("read_train", {})).structured_content["text"]
        await alice.call_tool("apply_patch", {"diff": make_diff(text, "LR = ", "LR = 5e-3  # alice's idea")})
        assert (await bob.call_tool("read_train", {})).structured_content["text"] == original
        results, messages = {}, {"alice": [], "bob": []}

        async def run(name: str, client: Client) -> None:
            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                messages[name].append(message)

            result = await client.call_tool("run_experiment", {"description": f"{name}'s run"},
                                            progress_callback=on_progress)
            assert not result.is_error, result.content[0].text
            results[name] = result.structured_content

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "alice", alice)
            tg.start_soon(run, "bob", bob)
        assert {r["status"] for r in results.values()} == {"ok"}
        waited = [name for name, ms in messages.items()
                  if any("queued: waiting for a run slot: every slot is busy and this run is next" in (m or "")
                         for m in ms)]
        assert waited, messages  # the second in line was told it was queued for the slot, and next
        assert not any("0 run(s)" in (m or "") for ms in messages.values() for m in ms)
        assert "alice's idea" not in (await bob.call_tool("read_train", {})).structured_content["text"]
        assert "alice's idea" in (await alice.call_tool("read_train", {})).structured_content["text"]
        bob_runs = (await bob.call_tool("list_experiments", {})).structured_content["runs"]
        assert [r["run_id"] for r in bob_runs] == [results["bob"]["run_id"]]  # only its own runs
    rows = ledger_rows(root)
    assert [(r.agent, r.status, r.kept) for r in rows] == [("alice", "ok", True), ("bob", "ok", True)]
    windows = sorted(_training_window(root, r.run_id) for r in rows)
    assert windows[0][1] < windows[1][0], f"runs overlapped: {windows}"
    for agent in ("alice", "bob"):
        assert len((root / "results" / f"{agent}.tsv").read_text().splitlines()) == 2


def _training_window(root, run_id: str) -> tuple[float, float]:
    """First and last timestamp the harness wrote to the run's progress.jsonl."""
    lines = (root / "runs" / run_id / "out" / "progress.jsonl").read_text().splitlines()
    times = [json.loads(ln)["t"] for ln in lines if ln.strip()]
    return min(times), max(times)


async def test_a_run_past_its_deadline_is_a_timeout_with_its_log(make_lab, tiny_data, lab_containers):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data), startup_allowance_s=2.0)
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        text = (await client.call_tool("read_train", {})).structured_content["text"]
        stall = "cfg = trainer.program(); print('stalling on purpose', flush=True); __import__('time').sleep(600)"
        await client.call_tool("apply_patch", {"diff": make_diff(text, "cfg = trainer.program()", stall)})
        result = await client.call_tool("run_experiment", {"description": "never finishes"})
        assert not result.is_error, result.content[0].text
        r = result.structured_content
        assert (r["status"], r["decision"], r["kept"], r["val_bpb"]) == ("timeout", "timeout", False, None)
        assert "stalling on purpose" in r["log_tail"] and r["reason"]
        assert (await client.call_tool("read_train", {})).structured_content["text"] == text  # back to the best
    assert lab_containers() == []
    [row] = ledger_rows(root)
    assert row.status == "timeout" and row.commit is not None


async def test_a_broken_sandbox_is_an_infra_error_not_a_result(make_lab, tiny_data, docker_client):
    """The image vanishes after the server started: the run is an infra-error (not the agent's
    result), nothing is committed, and the agent's lock is free again."""
    tag = f"autoresearch-sandbox:vanishing-{secrets.token_hex(3)}"
    docker_client.images.get(IMAGE).tag(tag)  # a private tag: removing it leaves the shared image
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data))
    cfg = json.loads((root / "lab.json").read_text())
    cfg["backend"]["image"] = tag
    (root / "lab.json").write_text(json.dumps(cfg))
    async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
        docker_client.images.remove(tag)
        result = await client.call_tool("run_experiment", {"description": "the image is gone"})
        assert not result.is_error, result.content[0].text
        r = result.structured_content
        assert (r["status"], r["decision"], r["commit"], r["kept"]) == ("infra-error", None, None, False)
        assert tag in r["reason"]
        text = (await client.call_tool("read_train", {})).structured_content["text"]
        again = await client.call_tool("apply_patch", {"diff": make_diff(text, "LR = ", "LR = 5e-3")})
        assert not again.is_error, again.content[0].text  # the agent's lock was released
    [row] = ledger_rows(root)
    assert row.status == "infra-error" and row.commit is None
    assert not (root / "results" / "alice.tsv").exists()
    assert [c.hexsha for c in git.Repo(root / "repo").iter_commits("autoresearch/alice")] == [
        git.Repo(root / "repo").commit("main").hexsha]


async def test_sigterm_stops_the_server_but_not_its_run(make_lab, tiny_data, lab_containers):
    """A server told to stop exits at once; the blocking call's run goes on under its supervisor and
    is recorded (only a cancel stops a run)."""
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data))

    async def session() -> None:
        try:
            async with Client(stdio_params(root, "alice"), read_timeout_seconds=600) as client:
                await client.call_tool("run_experiment", {"description": "the server is told to stop"})
        except BaseException:  # noqa: BLE001 - the server goes away under the call
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(session)
        await wait_until(running_container(lab_containers), 60, "the run's container")
        [pid] = server_pids(root)
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 15, "the server to exit")
        tg.cancel_scope.cancel()
    await wait_until(lambda: ledger_rows(root)[0].status not in ("queued", "running"), 120, "the run's record")
    [row] = ledger_rows(root)
    assert (row.status, row.kept) == ("ok", True), (row.status, row.detail)
    await wait_until(lambda: lab_containers() == [], 30, "the container to be removed")
