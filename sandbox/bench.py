"""Sandbox speed figures: python -m sandbox.bench [--backend docker|local] [--image TAG] [--repeat N]

Prints the overhead of one trivial run (start to outcome), how far past its deadline a run that
ignores SIGTERM is killed, stdout throughput into the capped log, and the slot hand-over delay.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from sandbox.config import DockerBackendConfig, LocalBackendConfig, make_backend
from sandbox.gpus import PoolConfig, SlotPool
from sandbox.models import Limits, Mount, RunSpec

SCRIPTS = {
    "trivial": "print('hi')",
    "stubborn": "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1e9)",
    "chatty": "import sys\nb = (b'x' * 99 + b'\\n') * 10_000\nfor _ in range(100):\n    sys.stdout.buffer.write(b)",
}


def _spec(root: Path, name: str, n: int, image: str, deadline_s: float) -> RunSpec:
    work = root / f"{name}{n}"
    work.mkdir()
    (work / "s.py").write_text(SCRIPTS[name])
    return RunSpec(run_id=f"bench-{name}-{n}", image=image, command=["python3", "/work/s.py"],
                   mounts=[Mount(source=work / "s.py", target="/work/s.py")], env={"HOME": "/tmp"},
                   output_dir=work / "out", log_path=work / "log.txt", deadline_s=deadline_s,
                   limits=Limits(memory_gb=1, pids=128, shm_gb=0.1, tmpfs_gb=0.1, log_cap_bytes=1 << 20))


async def _handover(root: Path) -> float:
    """Seconds from one holder's release to the waiter holding the slot."""
    pool = SlotPool(PoolConfig(state_dir=root / "leases", gpus=[], poll_s=0.05))
    released = 0.0

    async def waiter() -> float:
        async with pool.acquire():
            return time.monotonic() - released

    async with pool.acquire():
        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.3)
        released = time.monotonic()
    return await task


async def main(backend_name: str, image: str, repeat: int) -> None:
    config = DockerBackendConfig(image=image) if backend_name == "docker" else LocalBackendConfig()
    backend = make_backend(config)
    backend.check()
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        root = Path(tmp)
        walls = []
        for i in range(repeat):
            t = time.monotonic()
            out = await backend.run(_spec(root, "trivial", i, image, 60))
            assert out.status == "ok", out.detail
            walls.append(time.monotonic() - t)
        print(f"trivial run, start to outcome:   median {statistics.median(walls):.3f} s  (n={repeat})")
        late = []
        for i in range(min(repeat, 3)):
            out = await backend.run(_spec(root, "stubborn", i, image, 2.0))
            assert out.status == "timeout", out.detail
            late.append(out.wall_s - 2.0)
        print(f"kill past the deadline:           max {max(late):.3f} s  (SIGTERM ignored, n={len(late)})")
        t = time.monotonic()
        out = await backend.run(_spec(root, "chatty", 0, image, 120))
        took = time.monotonic() - t
        size = (root / "chatty0" / "log.txt").stat().st_size
        print(f"100 MB of stdout:                 {took:.2f} s ({100 / took:.0f} MB/s), log kept {size} B")
        print(f"slot hand-over, release to held:  {await _handover(root):.3f} s (poll 0.05 s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["docker", "local"], default="docker")
    p.add_argument("--image", default="autoresearch-sandbox:cpu")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    asyncio.run(main(a.backend, a.image, a.repeat))
