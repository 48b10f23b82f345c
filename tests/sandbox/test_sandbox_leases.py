"""GPU/CPU slot leases: exclusive across processes, first come first served, freed when the holder dies."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from sandbox.errors import LeaseError
from sandbox.gpus import PoolConfig, SlotPool

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120, func_only=True)]  # a broken deadline fails fast


def _pool(tmp_path, **kw) -> SlotPool:
    return SlotPool(PoolConfig(state_dir=tmp_path / "leases", poll_s=0.05, **kw))


HOLDER = """
import asyncio, sys
from pathlib import Path
from sandbox.gpus import PoolConfig, SlotPool
async def main():
    pool = SlotPool(PoolConfig(state_dir=Path(sys.argv[1]), gpus=[], poll_s=0.05))
    async with pool.acquire(on_position=lambda n: print("WAITING", n, flush=True), holder="child") as lease:
        print("HELD", lease.slot, flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


def _holder(state_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state_dir)], stdout=subprocess.PIPE, text=True)
    return proc


def _read_until(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"holder exited without printing {prefix!r}")


async def test_two_runs_against_one_slot_never_overlap(docker_backend, make_spec, tmp_path):
    pool = _pool(tmp_path, gpus=[])
    assert pool.size == 1
    spans: dict[str, tuple[float, float]] = {}
    positions: dict[str, list[int]] = {"first": [], "second": []}

    async def job(name: str) -> None:
        spec = make_spec("import time; time.sleep(1.5); print('done')")
        async with pool.acquire(on_position=positions[name].append, holder=name) as lease:
            assert lease.gpu is None and lease.slot == "cpu-0"
            t0 = time.monotonic()
            outcome = await docker_backend.run(spec)
            spans[name] = (t0, time.monotonic())
            assert outcome.status == "ok"

    first = asyncio.create_task(job("first"))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(job("second"))
    await asyncio.gather(first, second)
    (a0, a1), (b0, b1) = spans["first"], spans["second"]
    assert a1 <= b0, spans  # one after the other
    assert positions["first"] == [0]
    assert positions["second"] == [0]  # reported while it waited: nobody else ahead, the slot busy


async def test_queue_position_counts_down_first_come_first_served(tmp_path):
    pool = _pool(tmp_path, gpus=[])
    order: list[int] = []
    positions: dict[int, list[int]] = {i: [] for i in range(4)}
    release = asyncio.Event()

    async def job(i: int) -> None:
        async with pool.acquire(on_position=positions[i].append):
            order.append(i)
            if i == 0:
                await release.wait()
            await asyncio.sleep(0.05)

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(job(i)))
        await asyncio.sleep(0.1)
    assert positions[3] == [2]  # jobs 1 and 2 are waiting ahead of it
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert positions[3] == [2, 1, 0]


async def test_lease_is_exclusive_across_processes_and_freed_when_the_holder_dies(tmp_path):
    state = tmp_path / "leases"
    holder = _holder(state)
    try:
        assert _read_until(holder, "HELD") == "HELD cpu-0"
        pool = SlotPool(PoolConfig(state_dir=state, gpus=[], poll_s=0.05))
        assert pool.holders()["cpu-0"]["holder"] == "child"
        waiter = asyncio.create_task(_acquire_and_hold(pool, 0))
        await asyncio.sleep(0.5)
        assert not waiter.done()  # the other process holds the only slot
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        slot = await asyncio.wait_for(waiter, timeout=5)  # a lock of a live holder would never be handed on
        assert slot == "cpu-0"
    finally:
        holder.kill()
        holder.wait()


async def test_a_dead_waiter_leaves_the_queue(tmp_path):
    state = tmp_path / "leases"
    pool = SlotPool(PoolConfig(state_dir=state, gpus=[], poll_s=0.05))
    positions: list[int] = []
    release = asyncio.Event()
    first = asyncio.create_task(_acquire_and_hold(pool, 0, release))
    await asyncio.sleep(0.2)
    other = _holder(state)  # queues behind `first` in another process
    try:
        assert _read_until(other, "WAITING") == "WAITING 0"
        mine = asyncio.create_task(_acquire_and_hold(pool, 0, on_position=positions.append))
        await asyncio.sleep(0.3)
        assert positions == [1]  # the other process is ahead of us
        other.send_signal(signal.SIGKILL)
        other.wait()
        await asyncio.sleep(0.3)
        assert positions == [1, 0]  # its ticket was recognised as dead
        release.set()
        assert await asyncio.wait_for(mine, timeout=5) == "cpu-0"
        await first
    finally:
        other.kill()
        other.wait()


async def _acquire_and_hold(pool: SlotPool, hold_s: float, release: asyncio.Event | None = None,
                            on_position=None) -> str:
    async with pool.acquire(on_position=on_position) as lease:
        if release is not None:
            await release.wait()
        await asyncio.sleep(hold_s)
        return lease.slot


async def test_gpu_slots_hand_out_distinct_device_ids(tmp_path):
    pool = _pool(tmp_path, gpus=["0", "3"])
    assert pool.size == 2
    async with pool.acquire() as a, pool.acquire() as b:
        assert {a.gpu, b.gpu} == {"0", "3"}
        third = asyncio.create_task(_acquire_and_hold(pool, 0))
        await asyncio.sleep(0.3)
        assert not third.done()
    assert await asyncio.wait_for(third, timeout=5) in ("gpu-0", "gpu-3")


async def test_cpu_slots_when_no_gpu(tmp_path):
    pool = _pool(tmp_path, gpus=[], cpu_slots=3)
    assert [s for s, _ in pool.slots] == ["cpu-0", "cpu-1", "cpu-2"]


def test_unusable_state_dir_is_a_lease_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LeaseError, match="state folder"):
        SlotPool(PoolConfig(state_dir=blocker / "leases", gpus=[]))
