"""The reaper removes runs whose owner died or whose deadline passed, and leaves live ones alone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from sandbox.hardening import Owner, container_kwargs
from sandbox.reaper import judge, process_start, reap_periodically

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120, func_only=True)]  # a broken deadline fails fast

# The owner: a separate server-like process that starts one long run and is then SIGKILLed,
# so it never gets to clean up.
OWNER = """
import asyncio, sys
from pathlib import Path
from sandbox.config import {cfg}
from sandbox.config import make_backend
from sandbox.models import RunSpec
spec = RunSpec.model_validate_json(Path(sys.argv[1]).read_text())
async def main():
    await make_backend({cfg}({args})).run(spec, on_progress=lambda p: print("RUNNING", flush=True))
asyncio.run(main())
"""

SLEEPER = """
    import json, os, sys, time
    out = sys.argv[1]
    open(f"{out}/pid.txt", "w").write(str(os.getpid()))
    with open(f"{out}/progress.jsonl", "a") as f:
        f.write(json.dumps({"phase": "startup"}) + "\\n")
    time.sleep(10_000)
"""


def _start_owner(tmp_path, spec, cfg: str, args: str) -> subprocess.Popen:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-c", OWNER.format(cfg=cfg, args=args), str(spec_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # structlog lines may come first
        seen.append(line)
        if line.strip() == "RUNNING":
            return proc
    proc.kill()
    raise AssertionError(f"the owner process never started its run: {''.join(seen)[-2000:]}")


async def test_reaper_removes_the_container_of_a_killed_owner(docker_backend, docker_client, make_spec, tmp_path,
                                                              no_leftovers):
    spec = make_spec(SLEEPER, deadline_s=300)
    owner = _start_owner(tmp_path, spec, "DockerBackendConfig", f"image={spec.image!r}")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert no_leftovers(spec.run_id) != []  # nobody cleaned up: the container still runs
    reaped = [r for r in await asyncio.to_thread(docker_backend.reap) if r.run_id == spec.run_id]
    assert [r.reason for r in reaped] == ["owner-gone"]
    assert no_leftovers(spec.run_id) == []


async def test_reaper_leaves_live_runs_alone_and_kills_overdue_ones(docker_backend, docker_client, make_spec):
    live = make_spec(SLEEPER, deadline_s=60)
    task = asyncio.create_task(docker_backend.run(live, on_progress=lambda p: None))
    # a container of a live owner (this process) whose deadline passed long ago, as if its
    # owner hung: start it directly with the same hardened arguments
    overdue = make_spec(SLEEPER, deadline_s=60)
    overdue.output_dir.mkdir()
    os.chmod(overdue.output_dir, 0o777)
    me = Owner(pid=os.getpid(), start=process_start(os.getpid()), host=os.uname().nodename)
    kw = container_kwargs(overdue, user="10001:10001", owner=me, deadline_unix=time.time() - 120)
    await asyncio.to_thread(docker_client.containers.run, **kw)
    try:
        for _ in range(200):
            if (live.output_dir / "pid.txt").exists() or task.done():
                break
            await asyncio.sleep(0.1)
        assert not task.done(), task.result()
        reaped = {r.run_id: r.reason for r in await asyncio.to_thread(docker_backend.reap)}
        assert reaped.get(overdue.run_id) == "deadline-passed"
        assert live.run_id not in reaped
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_periodic_local_reaper_kills_the_process_group_of_a_killed_owner(local_backend, make_spec, tmp_path):
    from sandbox_testlib import pid_alive

    spec = make_spec(SLEEPER, deadline_s=300)
    state = local_backend.config.state_dir
    owner = _start_owner(tmp_path, spec, "LocalBackendConfig", f"state_dir={str(state)!r}")
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    pid = int((spec.output_dir / "pid.txt").read_text())
    assert pid_alive(pid)  # orphaned, still running
    reaped: list = []
    task = asyncio.create_task(reap_periodically(local_backend, interval_s=0.1, on_reaped=reaped.append))
    try:
        for _ in range(50):
            if reaped:
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
    assert [(r.run_id, r.reason) for r in reaped] == [(spec.run_id, "owner-gone")]
    for _ in range(50):
        if not pid_alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not pid_alive(pid)
    assert list(state.glob("*.json")) == []


def test_judge_uses_owner_start_time_against_pid_reuse():
    me, start, host = os.getpid(), process_start(os.getpid()), os.uname().nodename
    future, past = time.time() + 100, time.time() - 100
    assert judge(me, start, host, future, running=True) is None
    assert judge(me, "1", host, future, running=True) == "owner-gone"  # same pid, other process
    assert judge(me, start, host, past, running=True) == "deadline-passed"
    assert judge(me, start, "another-host", future, running=True) is None  # cannot know: wait
    assert judge(me, start, "another-host", past, running=True) == "deadline-passed"
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert judge(dead.pid, "", host, future, running=False) == "finished-unclaimed"
