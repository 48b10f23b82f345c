"""A lab that is not the suite's (issue 33): a user's, on the same engine and the same host, with its own
folder outside every test's, a run of its own training in a container with the project's labels, and a
held lease in the host-wide default lease folder. The suite must leave all of it alone: `untouched()`
says what changed, `finish()` lets its run end and returns the result that its lab recorded.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import anyio
from server_helpers import IMAGE, ledger_rows, stdio_params

from sandbox.gpus import PoolConfig, SlotPool
from server.bench.common import TRIVIAL_TRAIN, prepare_data, write_program
from server.lab import create_lab

RELEASE = "release"  # the file in the run's own output folder (/out) that ends its training

# trains slowly (a step every half second, little CPU) until the test writes /out/release
FOREIGN_TRAIN = TRIVIAL_TRAIN.replace("import time\n", "import os\nimport time\n", 1).replace(
    "while True:", f"while not os.path.exists('/out/{RELEASE}'):\n    time.sleep(0.5)", 1)


def engine_pids() -> list[int]:
    """The pids of the dockerd processes that this suite did not start (its own sockets live in ar-engine-*).
    dockerd re-executes itself for archive work (argv[0] docker-untar, docker-applyLayer...): not engines."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(proc, "exe").resolve().name == "dockerd":
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if Path(argv[0].decode(errors="replace")).name == "dockerd" and b"ar-engine-" not in b" ".join(argv):
                    pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def _ifindex(name: str) -> str | None:
    path = Path("/sys/class/net", name, "ifindex")
    return path.read_text().strip() if path.exists() else None


class ForeignLab:
    def __init__(self, docker_client) -> None:
        self.docker = docker_client
        self.home = Path(tempfile.mkdtemp(prefix="autoresearch-user-", dir="/var/tmp"))
        self.home.chmod(0o755)
        program = write_program(self.home / "program", budget_s=3600, train=FOREIGN_TRAIN)
        data = prepare_data(program, self.home / "data")
        self.root = self.home / "lab"
        # no lease folder given: the lease is taken in the host-wide default, as a user's lab takes it
        # (of 4 slots, so that a real lab of the user's on the usual slot cpu-0 does not hold it up)
        pool = PoolConfig(gpus=[], cpu_slots=4)
        create_lab(self.root, str(program), data_dir=data, backend={"type": "docker", "image": IMAGE},
                   pool=pool.model_dump(mode="json", exclude={"state_dir"}))
        self.pool = SlotPool(pool)
        self.run_id = ""
        self.seen: dict = {}

    async def _call(self, tool: str, args: dict) -> dict:
        from mcp import Client  # noqa: PLC0415

        async with Client(stdio_params(self.root, "user"), read_timeout_seconds=900) as client:
            res = await client.call_tool(tool, args)
            assert not res.is_error, res.content[0].text
            return res.structured_content

    def start(self) -> None:
        """Start the user's run and wait until it trains; remember its container and the engine."""
        self.run_id = anyio.run(self._call, "start_experiment", {"description": "the user's own run"})["run_id"]
        log = self.root / "runs" / self.run_id / "log.txt"
        for _ in range(600):
            if log.exists() and "window-start" in log.read_text(errors="replace"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the foreign run never started training: {self.state()}")
        self.seen = self.state()
        assert self.seen["containers"] and self.seen["lease"], self.seen

    def state(self) -> dict:
        found = self.docker.containers.list(all=True, filters={"label": f"autoresearch.lab={self.root}"},
                                            ignore_removed=True)
        return {"containers": sorted((c.id, c.status, c.attrs["State"]["StartedAt"], c.attrs["RestartCount"])
                                     for c in found),
                "lease": [h for h in self.pool.holders().values() if h and h.get("holder") == self.run_id],
                "engine_pids": engine_pids(),
                "host_bridge": _ifindex("docker0"),  # the host engine's network, which its runs' builds use
                "ledger": [(r.run_id, r.status) for r in ledger_rows(self.root)]}

    def untouched(self) -> dict:
        """What differs from when its run started training ({} when nothing does)."""
        now = self.state()
        return {k: {"then": self.seen[k], "now": now[k]} for k in self.seen if now[k] != self.seen[k]}

    def finish(self) -> dict:
        (self.root / "runs" / self.run_id / "out" / RELEASE).write_text("")
        result = anyio.run(self._call, "wait_experiment", {"run_id": self.run_id})
        self.run_id = ""
        return result

    def remove(self) -> None:
        if self.run_id:  # the test failed before its end: the run must not hold the user's lease on
            with contextlib.suppress(Exception):
                anyio.run(self._call, "cancel_experiment", {"run_id": self.run_id})
        for c in self.docker.containers.list(all=True, filters={"label": f"autoresearch.lab={self.root}"},
                                             ignore_removed=True):
            c.remove(force=True)
        shutil.rmtree(self.home, ignore_errors=True)
