"""`python -m server.bench cluster`: issue 21's figures. The same runs (A agents x R runs of the
trivial program, on the docker backend) on one host with as many slots as the cluster has, then on a
Ray cluster of a head and two workers (one slot each) on this machine, in a network namespace of
its own. Prints each run's lease time (its row written to its slot granted), the time from the
phase's submission to the harness's clock (container start, imports), the scheduling overhead that
the cluster adds, and both wall times.

NetnsCluster is that cluster; the cluster tests start theirs with it too.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
NODES = {"head": 1, "worker-1": 1, "worker-2": 1}  # one run slot each: a node is a slot
PORT = 6379  # inside the namespace: no other cluster can be there
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


class NetnsCluster:
    """The namespace and its Ray nodes, started with the `ray` CLI as an admin would. Ray's temp folder is a
    short one of its own under /tmp: its socket paths must stay under 107 bytes (a pytest-xdist tmp path
    did not)."""

    def __init__(self) -> None:
        self.ns, self.temp = f"artest-{os.getpid()}", Path(tempfile.mkdtemp(prefix="ar-ray-", dir="/tmp"))
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.exec("ip", "link", "set", "lo", "up")
        self.own = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.inside = os.open(f"/var/run/netns/{self.ns}", os.O_RDONLY)

    def enter(self) -> None:
        """Move the calling thread (and what it starts from then on: supervisors, drivers) inside."""
        _setns(self.inside)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], check=check, capture_output=True, text=True,
                              env=self.env, timeout=120)

    def start(self, name: str) -> None:
        """Start a node; a worker that fails to join (seen once on a loaded 2-core box) is tried again."""
        where = ["--head", f"--port={PORT}", "--include-dashboard=false", f"--temp-dir={self.temp}"] \
            if name == "head" else [f"--address=127.0.0.1:{PORT}"]
        for attempt in range(1 if name == "head" else 3):
            if attempt:
                time.sleep(5)
            done = self.exec(str(RAY), "start", *where, "--node-ip-address=127.0.0.1", f"--node-name={name}",
                             "--num-cpus=1", f"--resources={json.dumps({'autoresearch_slot': NODES[name]})}",
                             "--disable-usage-stats", check=False)
            if done.returncode == 0:
                return
        raise RuntimeError(f"`ray start` of {name} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")

    def raylet(self, name: str) -> int | None:
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"/raylet") and f"--node-name={name}".encode() in argv:
                return int(proc.name)
        return None

    def kill(self, name: str) -> None:
        """SIGKILL a node's raylet and every process under it (its workers, its agents)."""
        root = self.raylet(name)
        assert root is not None, f"no raylet of {name}"
        family, found = {root}, True
        while found:
            found = False
            for proc in Path("/proc").iterdir():
                try:
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid in family and int(proc.name) not in family:
                    family.add(int(proc.name))
                    found = True
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def listeners(self) -> list[tuple[str, str]]:
        """(local address, process) of every TCP listener in the namespace."""
        out = self.exec("ss", "-ltnpH").stdout
        return [(line.split()[3], line.split()[-1]) for line in out.splitlines() if line.strip()]

    def on_host(self, *argv: str) -> str:
        """argv's output, run from the host's own network namespace."""
        _setns(self.own)
        try:
            return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        finally:
            _setns(self.inside)

    def close(self) -> None:
        """Back to the host's namespace; the nodes stopped, the namespace gone."""
        _setns(self.own)
        self.exec(str(RAY), "stop", "--force", check=False)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        os.close(self.own)
        os.close(self.inside)
        shutil.rmtree(self.temp, ignore_errors=True)




async def _agents(root: Path, agents: int, runs: int) -> float:
    from server.lab import Lab  # noqa: PLC0415
    from server.runs import Runs  # noqa: PLC0415

    lab = Lab(root)
    try:
        t0 = time.monotonic()

        async def agent(i: int) -> None:
            for n in range(runs):
                await Runs(lab).run(f"agent{i}", f"run {n}")

        await asyncio.gather(*(agent(i) for i in range(agents)))
        return time.monotonic() - t0
    finally:
        lab.close()


def _figures(root: Path, wall_s: float) -> dict:
    from server.lab import Lab  # noqa: PLC0415

    lab = Lab(root)
    try:
        rows = lab.ledger.runs()
    finally:
        lab.close()
    ok = [r for r in rows if r.status == "ok"]
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    return {"runs": len(rows), "ok": len(ok), "wall_s": round(wall_s, 1),
            "lease_s_median": med([r.started_at - r.created_at for r in ok if r.started_at]),
            "submit_to_clock_s_median": med([r.startup_seconds for r in ok if r.startup_seconds is not None]),
            "slots": sorted({r.slot for r in rows if r.slot})}


def run_cluster_bench(work: Path, image: str, agents: int, runs: int, budget_s: float) -> dict:
    from server.bench.common import make_lab, prepare_data, write_program  # noqa: PLC0415

    program = write_program(work / "program", budget_s=budget_s)
    data = prepare_data(program, work / "data")
    host = make_lab(work / "host", program, data, backend="docker", slots=len(NODES), image=image)
    host_wall = asyncio.run(_agents(host, agents, runs))
    report = {"part": "cluster", "agents": agents, "runs_each": runs, "budget_s": budget_s,
              "host": _figures(host, host_wall)}
    cluster = NetnsCluster()
    try:
        for name in NODES:
            cluster.start(name)
        cluster.enter()
        lab = make_lab(work / "cluster", program, data, backend="docker", slots=1, image=image,
                       cluster={"address": f"127.0.0.1:{PORT}", "node_root": str(work / "nodes")})
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import ray; ray.init(address='127.0.0.1:%d', "
                        "logging_level='ERROR')" % PORT], check=True, capture_output=True)
        connect_s = time.monotonic() - t0
        wall = asyncio.run(_agents(lab, agents, runs))
        report["cluster"] = {**_figures(lab, wall), "driver_connect_s": round(connect_s, 2)}
    finally:
        cluster.close()
    h, c = report["host"], report["cluster"]
    report["scheduling_overhead_s"] = round((c["lease_s_median"] - h["lease_s_median"])
                                            + (c["submit_to_clock_s_median"] - h["submit_to_clock_s_median"]), 3)
    report["wall_ratio"] = round(c["wall_s"] / h["wall_s"], 3)
    report["checks"] = {"every run ok": h["ok"] == h["runs"] == c["ok"] == c["runs"] == agents * runs,
                        "runs on both workers": {"worker-1/slot", "worker-2/slot"} <= set(c["slots"])}
    return report
