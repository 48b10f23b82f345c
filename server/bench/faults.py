"""Faults, each on a lab of its own (docker backend, the trivial program with a few seconds of
budget): what the ledger says afterwards, whether the books reconcile, and whether a container is
left once the next server has started.

  server-kill-9      the MCP server that started the run is killed; a second server waits for it
  supervisor-kill-9  the run's supervisor is killed; the next server's recovery finishes the row
  dockerd-restart    the Docker engine is restarted while the run trains (an engine of the bench's own)
  disk-full          the lab's own small file system fills while the run trains, then is freed
  oom                train.py allocates past the run's memory cap
  ledger-locked      another process holds the ledger's write lock longer than SQLite waits
  fork-bomb          a fork bomb trains beside a neighbour; the neighbour's steps against alone

Each check looks only at what its own lab made (containers by the lab's label, processes by the lab's
path): another lab on the same engine, a user's, is never counted, stopped or restarted (issue 33).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from server.bench.common import (TRIVIAL_TRAIN, books, make_lab, processes_matching, replace_line, stdio_params,
                                 wait_for, write_program)
from server.bench.engine import PrivateEngine

BUDGET_S = 8.0
HOG = TRIVIAL_TRAIN.replace("trainer.submit(model)", "hog = [bytearray(1 << 26) for _ in range(64)]  # 4 GiB\n"
                            "trainer.submit(model)")
BOMB = TRIVIAL_TRAIN.replace("import time\n", """import os
import time

if os.fork() == 0:  # a fork bomb: every process forks and spins, until the pids cap stops the forks
    while True:
        try:
            os.fork()
        except OSError:
            pass
""", 1)


def _containers(docker_client, root: Path) -> list[str]:
    """The containers of the lab at `root` (its runs carry the lab's folder as a label), nobody else's."""
    found = docker_client.containers.list(all=True, filters={"label": f"autoresearch.lab={root}"}, ignore_removed=True)
    return [c.name for c in found]


async def _call(client, tool: str, args: dict | None = None) -> dict:
    res = await client.call_tool(tool, args or {})
    if res.is_error:
        raise RuntimeError(f"{tool}: {res.content[0].text}")
    return res.structured_content


async def _until_training(root: Path, run_id: str, timeout_s: float = 90.0) -> None:
    """Until the run's train.py has printed its first line (its container is up and training)."""
    log = root / "runs" / run_id / "log.txt"
    while not (log.exists() and "window-start" in log.read_text(errors="replace")):
        timeout_s -= 0.2
        if timeout_s < 0:
            raise TimeoutError(f"{run_id} did not start training")
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)


async def _start(root: Path, agent: str, description: str) -> str:
    from mcp import Client  # noqa: PLC0415

    async with Client(stdio_params(root, agent), read_timeout_seconds=600) as client:
        return (await _call(client, "start_experiment", {"description": description}))["run_id"]


async def _wait(root: Path, agent: str, run_id: str) -> dict:
    """A fresh server (its start-up recovery runs first) waits for the run and returns its result."""
    from mcp import Client  # noqa: PLC0415

    async with Client(stdio_params(root, agent), read_timeout_seconds=600) as client:
        return await _call(client, "wait_experiment", {"run_id": run_id})


def _report(name: str, root: Path, docker_client, result: dict | None, expect: set[str], **extra) -> dict:
    b = books(root)
    left = _containers(docker_client, root)
    status = result["status"] if result else None
    return {"fault": name, "ledger_says": status, "detail": (result or {}).get("reason"), "rows": b["rows"],
            "findings": b["findings"], "containers_left": left, **extra,
            "checks": {"recorded as expected": status in expect, "one row per run": b["rows"] == extra.get("runs", 1),
                       "books reconcile": not b["findings"], "no container left": not left}}


# -- the faults ------------------------------------------------------------------------------------

async def server_kill(root: Path, dc) -> dict:
    from mcp import Client  # noqa: PLC0415

    run_id = None
    with contextlib.suppress(BaseException):  # the client's server dies under it
        async with Client(stdio_params(root, "a"), read_timeout_seconds=600) as client:
            run_id = (await _call(client, "start_experiment", {"description": "server killed mid-run"}))["run_id"]
            await _until_training(root, run_id)
            for pid in processes_matching("server.cli", "serve", str(root), "--agent a"):
                os.kill(pid, signal.SIGKILL)
            await client.call_tool("list_experiments", {})
    assert run_id is not None, "the run did not start"
    return _report("server-kill-9", root, dc, await _wait(root, "a", run_id), {"ok"})


async def supervisor_kill(root: Path, dc) -> dict:
    from server.lab import Lab  # noqa: PLC0415

    run_id = await _start(root, "a", "supervisor killed mid-run")
    await _until_training(root, run_id)
    lab = Lab(root)
    try:
        os.kill(lab.ledger.get(run_id).owner_pid, signal.SIGKILL)
    finally:
        lab.close()
    running = len(_containers(dc, root))
    return _report("supervisor-kill-9", root, dc, await _wait(root, "a", run_id), {"interrupted"},
                   containers_while_orphaned=running)


async def dockerd_restart(root: Path, engine: PrivateEngine) -> dict:
    run_id = await _start(root, "a", "dockerd restarted mid-run")
    await _until_training(root, run_id)
    took = await asyncio.to_thread(engine.restart)
    return _report("dockerd-restart", root, engine.client(), await _wait(root, "a", run_id), {"infra-error"},
                   restart_s=round(took, 1))


async def disk_full(root: Path, dc, mount: Path) -> dict:
    run_id = await _start(root, "a", "the lab's disk fills mid-run")
    await _until_training(root, run_id)
    filler = mount / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)  # until ENOSPC
    free_mb = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize / 2**20
    from server.lab import Lab  # noqa: PLC0415

    def settled() -> bool:  # the supervisor has recorded the run, or given up and exited
        lab = Lab(root)
        try:
            rec = lab.ledger.get(run_id)
        finally:
            lab.close()
        return rec.status not in ("queued", "running") or not processes_matching("server.supervisor", str(root))

    await asyncio.to_thread(wait_for, settled, 180, "the run to end")
    refused = None
    from mcp import Client  # noqa: PLC0415

    async with Client(stdio_params(root, "a"), read_timeout_seconds=600) as client:
        res = await client.call_tool("start_experiment", {"description": "started on a full disk"})
        refused = res.content[0].text if res.is_error else f"accepted: {res.structured_content}"
    filler.unlink()
    result = await _wait(root, "a", run_id)
    report = _report("disk-full", root, dc, result, {"crash", "infra-error", "interrupted"},
                     free_mb_when_full=round(free_mb, 1), start_on_full_disk=refused)
    report["checks"]["a start on a full disk is refused"] = refused is not None and not refused.startswith("accepted")
    return report


async def oom(root: Path, dc) -> dict:
    from mcp import Client  # noqa: PLC0415

    async with Client(stdio_params(root, "a"), read_timeout_seconds=600) as client:
        text = (await _call(client, "read_train"))["text"]
        diff = "".join(__import__("difflib").unified_diff(text.splitlines(True), HOG.splitlines(True),
                                                          "a/train.py", "b/train.py"))
        await _call(client, "apply_patch", {"diff": diff})
        result = await _call(client, "run_experiment", {"description": "allocates 4 GiB past a 1 GB cap"})
    return _report("oom", root, dc, result, {"oom"})


async def ledger_locked(root: Path, dc, hold_s: float) -> dict:
    run_id = await _start(root, "a", "the ledger is locked while the run trains")
    await _until_training(root, run_id)
    db = sqlite3.connect(root / "ledger.sqlite", isolation_level=None, timeout=60, check_same_thread=False)
    db.execute("BEGIN EXCLUSIVE")
    held = threading.Event()

    def release() -> None:
        time.sleep(hold_s)
        db.execute("ROLLBACK")
        db.close()
        held.set()

    threading.Thread(target=release, daemon=True).start()
    from mcp import Client  # noqa: PLC0415

    t0 = time.monotonic()
    async with Client(stdio_params(root, "b"), read_timeout_seconds=600) as client:  # starts while locked
        res = await client.call_tool("start_experiment", {"description": "started while the ledger is locked"})
        second = res.content[0].text if res.is_error else res.structured_content["run_id"]
    start_wait = time.monotonic() - t0
    await asyncio.to_thread(held.wait)
    result = await _wait(root, "a", run_id)
    if not str(second).startswith("b-"):
        runs = 1
    else:
        await _wait(root, "b", second)
        runs = 2
    return _report("ledger-locked", root, dc, result, {"ok"}, runs=runs, hold_s=hold_s,
                   second_start=second, second_start_s=round(start_wait, 1))


async def fork_bomb(root: Path, dc, max_slowdown: float) -> dict:
    """Steps the neighbour trains alone, then beside a fork bomb (two slots, one run each)."""
    from mcp import Client  # noqa: PLC0415

    async with Client(stdio_params(root, "calm"), read_timeout_seconds=600) as calm:
        alone = await _call(calm, "run_experiment", {"description": "alone"})
        async with Client(stdio_params(root, "bomb"), read_timeout_seconds=600) as bomb:
            text = (await _call(bomb, "read_train"))["text"]
            diff = "".join(__import__("difflib").unified_diff(text.splitlines(True), BOMB.splitlines(True),
                                                              "a/train.py", "b/train.py"))
            await _call(bomb, "apply_patch", {"diff": diff})
            bomb_id = (await _call(bomb, "start_experiment", {"description": "fork bomb"}))["run_id"]
            await _until_training(root, bomb_id)  # its bomb went off before this line was printed
            await asyncio.sleep(2.0)
            beside = await _call(calm, "run_experiment", {"description": "beside a fork bomb"})
            bombed = await _call(bomb, "cancel_experiment", {"run_id": bomb_id})
    slowdown = 1 - beside["num_steps"] / alone["num_steps"]
    report = _report("fork-bomb", root, dc, beside, {"ok"}, runs=3, steps_alone=alone["num_steps"],
                     steps_beside_bomb=beside["num_steps"], slowdown=round(slowdown, 3), bomb_status=bombed["status"])
    report["checks"]["the bomb is cancelled"] = bombed["status"] == "cancelled"
    report["checks"][f"neighbour slowed by at most {max_slowdown:.0%}"] = slowdown <= max_slowdown
    return report


# -- the part ---------------------------------------------------------------------------------------

async def run_faults(work: Path, data: Path, image: str, only: set[str] | None = None,
                     max_slowdown: float = 0.10) -> dict:
    """Every fault (or those in `only`). `max_slowdown`: the fork bomb's bound on its neighbour."""
    import docker  # noqa: PLC0415

    dc = docker.from_env()
    program = write_program(work / "fault-program", budget_s=BUDGET_S)

    def lab(name: str, slots: int = 1, where: Path | None = None, base_url: str | None = None, **config) -> Path:
        return make_lab((where or work) / name, program, data, backend="docker", image=image, slots=slots,
                        base_url=base_url, progress_interval_s=2.0, **config)

    async def on_own_engine() -> dict:  # never the engine that the user's labs run on
        copied = await copying
        return {**await dockerd_restart(lab("dockerd-restart", base_url=engine.base_url), engine),
                "image_copy_s": round(copied, 1)}

    mount = work / "small-fs"
    mount.mkdir(exist_ok=True)
    steps = {
        "server-kill-9": lambda: server_kill(lab("server-kill"), dc),
        "supervisor-kill-9": lambda: supervisor_kill(lab("supervisor-kill"), dc),
        "disk-full": lambda: disk_full(lab("disk-full", where=mount), dc, mount),
        "oom": lambda: oom(lab("oom", memory_gb=1.0), dc),
        "ledger-locked": lambda: ledger_locked(lab("ledger-locked", slots=2), dc, hold_s=40.0),
        "fork-bomb": lambda: fork_bomb(lab("fork-bomb", slots=2), dc, max_slowdown),
        "dockerd-restart": on_own_engine,  # last: its engine starts and takes the image while the others run
    }
    steps = {name: step for name, step in steps.items() if not only or name in only}
    with contextlib.ExitStack() as stack:
        if "dockerd-restart" in steps:
            engine = stack.enter_context(PrivateEngine(work / "engine"))
            copying = asyncio.ensure_future(asyncio.to_thread(engine.copy_image, image))
            stack.callback(lambda: copying.done() or copying.cancel())
        reports = [await _stage(name, step, mount) for name, step in steps.items()]
    checks = {f"{r['fault']}: {k}": v for r in reports for k, v in r["checks"].items()}
    return {"part": "faults", "faults": reports, "checks": checks}


async def _stage(name: str, step, mount: Path) -> dict:
    """One fault, its report printed as it ends; a fault the suite could not even stage is a failed check."""
    if name == "disk-full":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        report = await step()
    except Exception as e:  # noqa: BLE001
        report = {"fault": name, "error": f"{type(e).__name__}: {e}", "checks": {"staged": False}}
    finally:
        if name == "disk-full":
            subprocess.run(["umount", "-l", str(mount)], check=False)
    print(json.dumps(report), file=sys.stderr, flush=True)
    return report
