"""On a real NVIDIA host (run with `-m gpu`): slots come from nvidia-smi and a run sees exactly its GPU.

These cannot run on the CPU-only CI machine; the docker-py GPU arguments are unit-tested in
test_hardening.py. Here the local backend is used, since GPU hosts may lack Docker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sandbox_testlib import result_of

from sandbox.config import LocalBackendConfig
from sandbox.gpus import PoolConfig, SlotPool, discover_gpus
from sandbox.local_backend import LocalBackend
from sandbox.models import Limits, Mount, RunSpec

pytestmark = [pytest.mark.gpu, pytest.mark.anyio]

PROBE = """
import json, os, sys, torch
x = torch.ones(1024, 1024, device="cuda")
json.dump({"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "count": torch.cuda.device_count(),
           "name": torch.cuda.get_device_name(0), "sum": float((x @ x).sum())},
          open(os.path.join(sys.argv[1], "result.json"), "w"))
"""


def test_nvidia_smi_discovery_gives_gpu_slots(tmp_path):
    gpus = discover_gpus()
    assert gpus and all(g.isdigit() for g in gpus)
    pool = SlotPool(PoolConfig(state_dir=tmp_path / "leases"))
    assert [gpu for _, gpu in pool.slots] == gpus


async def test_local_run_sees_only_the_leased_gpu(tmp_path: Path):
    pool = SlotPool(PoolConfig(state_dir=tmp_path / "leases"))
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    backend = LocalBackend(LocalBackendConfig(state_dir=tmp_path / "state"))
    async with pool.acquire() as lease:
        spec = RunSpec(run_id="gpu-probe", image="unused", command=["python3", "/work/probe.py", "/out"],
                       mounts=[Mount(source=script, target="/work/probe.py")], env={"HOME": "/tmp"},
                       output_dir=tmp_path / "out", log_path=tmp_path / "log.txt", gpu=lease.gpu,
                       deadline_s=120, limits=Limits())
        outcome = await backend.run(spec)
    assert outcome.status == "ok", outcome.log_tail
    assert result_of(outcome)["visible"] == lease.gpu
    assert result_of(outcome)["count"] == 1
    assert result_of(outcome)["sum"] == 1024.0 ** 3
    print(f"GPU run on {lease.slot} ({result_of(outcome)['name']}): wall {outcome.wall_s:.2f} s")


async def test_a_second_run_waits_for_the_gpu(tmp_path: Path):
    gpus = discover_gpus()
    pool = SlotPool(PoolConfig(state_dir=tmp_path / "leases", gpus=gpus[:1], poll_s=0.05))
    seen: list[int] = []
    async with pool.acquire():
        waiter = asyncio.create_task(_take(pool, seen))
        await asyncio.sleep(0.3)
        assert not waiter.done() and seen == [0]
    assert await asyncio.wait_for(waiter, 5) == gpus[0]


async def _take(pool: SlotPool, seen: list[int]) -> str | None:
    async with pool.acquire(on_position=seen.append) as lease:
        return lease.gpu
