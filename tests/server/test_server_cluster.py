"""Runs on a real Ray cluster (issue 21): a head and two worker nodes on this machine, one run slot
each, in a network namespace this module makes. Ray binds its GCS and raylets to every address and
its agents to the machine's outward one whatever --node-ip-address says, so loopback alone cannot
hold it; the namespace holds only `lo`. The supervisors that drive the runs are started from inside
it (this module's main thread enters it), and the nodes run the docker backend: every run is two
hardened containers on this host's engine, reached through its socket."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from server_helpers import ledger_rows, open_dir, wait_until

from server.lab import Lab
from server.runs import Runs

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

RAY = Path(sys.executable).with_name("ray")
NODES = {"head": 1, "worker-1": 1, "worker-2": 1}  # one run slot each: a node is a slot
PORT = 6379  # inside the namespace: no other cluster can be there
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


class Cluster:
    """The namespace and its Ray nodes, started with the `ray` CLI as an admin would."""

    def __init__(self, temp: Path) -> None:
        self.ns, self.temp = f"artest-{os.getpid()}", temp
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.exec("ip", "link", "set", "lo", "up")

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], check=check, capture_output=True, text=True,
                              env=self.env, timeout=120)

    def start(self, name: str) -> None:
        where = ["--head", f"--port={PORT}", "--include-dashboard=false", f"--temp-dir={self.temp}"] \
            if name == "head" else [f"--address=127.0.0.1:{PORT}"]
        self.exec(str(RAY), "start", *where, "--node-ip-address=127.0.0.1", f"--node-name={name}", "--num-cpus=1",
                  f"--resources={json.dumps({'autoresearch_slot': NODES[name]})}", "--disable-usage-stats")

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
        self.exec(str(RAY), "stop", "--force", check=False)
        subprocess.run(["ip", "netns", "del", self.ns], check=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ray"))
    own = c.own = os.open("/proc/self/ns/net", os.O_RDONLY)
    inside = c.inside = os.open(f"/var/run/netns/{c.ns}", os.O_RDONLY)
    try:
        for name in NODES:
            c.start(name)
        _setns(inside)  # this thread (and what it starts: supervisors, drivers) is in the namespace
        yield c
    finally:
        _setns(own)
        os.close(own)
        os.close(inside)
        c.close()


@pytest.fixture
def cluster_lab(make_lab, tiny_data, tmp_path, cluster):
    def make(**config):
        return make_lab(backend="docker", data_dir=open_dir(tiny_data), cluster={
            "address": f"127.0.0.1:{PORT}", "node_root": str(tmp_path / "nodes")}, **config)
    return make


def _windows(root: Path, rows) -> dict[str, list[tuple[float, float, str]]]:
    """Per slot, the training windows (harness timestamps) of the runs it held."""
    out: dict[str, list] = {}
    for r in rows:
        times = [json.loads(ln)["t"] for ln in (root / "runs" / r.run_id / "out" / "progress.jsonl")
                 .read_text().splitlines() if ln.strip()]
        out.setdefault(r.slot, []).append((min(times), max(times), r.run_id))
    return {slot: sorted(w) for slot, w in out.items()}


async def test_the_cluster_listens_on_loopback_only(cluster):
    listeners = cluster.listeners()
    assert any("gcs_server" in proc for _, proc in listeners) and any("raylet" in p for _, p in listeners)
    for address, proc in listeners:
        host = address.rsplit(":", 1)[0].strip("[]")
        assert host in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), f"{proc} listens on {address}"
    links = cluster.exec("ip", "-o", "link").stdout.splitlines()
    assert [ln.split(":")[1].strip() for ln in links] == ["lo"]
    outside = cluster.on_host("ss", "-ltnpH")  # the host's own namespace: no Ray process listens there
    assert "raylet" not in outside and "gcs_server" not in outside


async def test_two_agents_share_the_cluster_s_slots(cluster_lab, lab_containers):
    root = cluster_lab()
    lab = Lab(root)
    runs = Runs(lab)
    try:
        results: dict[str, list] = {"alice": [], "bob": []}

        async def agent(name: str) -> None:
            for i in range(6):
                results[name].append(await runs.run(name, f"{name} run {i}"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent, "alice")
            tg.start_soon(agent, "bob")
    finally:
        lab.close()
    rows = ledger_rows(root)
    assert len(rows) == 12 and len({r.run_id for r in rows}) == 12
    assert [r.status for r in rows] == ["ok"] * 12, [(r.run_id, r.status, r.detail) for r in rows]
    assert sorted(r.run_id for rs in results.values() for r in rs) == sorted(r.run_id for r in rows)
    nodes = {r.slot.split("/")[0] for r in rows}
    assert {"worker-1", "worker-2"} <= nodes, nodes
    for slot, windows in _windows(root, rows).items():
        for (s0, e0, a), (s1, e1, b) in zip(windows, windows[1:]):
            assert e0 < s1, f"{a} and {b} overlapped on {slot}"
    assert lab_containers() == []


async def test_a_killed_worker_node_is_an_infra_error_naming_it(cluster_lab, cluster, lab_containers):
    root = cluster_lab(budget_s=30)
    lab = Lab(root)
    runs = Runs(lab)
    try:
        started = {name: await runs.start(name, f"{name}'s run") for name in ("alice", "bob")}

        def placed():
            rows = {r.agent: r for r in ledger_rows(root)}
            return rows if all(r.slot for r in rows.values()) and len(lab_containers()) == 2 else None

        rows = await wait_until(placed, 120, "both runs on their nodes with their containers")
        victim = next(a for a in ("alice", "bob") if rows[a].slot.startswith("worker-"))
        other = "bob" if victim == "alice" else "alice"
        node = rows[victim].slot.split("/")[0]
        orphan = [c.name for c in lab_containers() if c.labels["autoresearch.agent"] == victim]
        cluster.kill(node)
        lost = await runs.wait(started[victim].run_id)
        assert lost.status == "infra-error" and node in (lost.reason or ""), lost
        survived = await runs.wait(started[other].run_id)
        assert survived.status == "ok", survived
        cluster.start(node)  # the node comes back: its next lease reaps what the dead worker left
        after = [await runs.run(victim, f"{victim}'s next run")]
        assert after[0].status == "ok", after[0]
        assert not [c for c in lab_containers() if c.name in orphan]
    finally:
        lab.close()
    assert len(ledger_rows(root)) == 3


async def test_a_cancel_reaches_the_remote_container(cluster_lab, lab_containers):
    root = cluster_lab(budget_s=120)
    lab = Lab(root)
    runs = Runs(lab)
    try:
        rec = await runs.start("alice", "to be cancelled")
        await wait_until(lambda: [c for c in lab_containers() if c.status == "running"], 120, "the run's container")
        t0 = time.monotonic()
        result = await runs.cancel(rec.run_id)
        await wait_until(lambda: lab_containers() == [], 5, "the container to be gone")
        gone_s = time.monotonic() - t0
        assert result.status == "cancelled", result
        assert gone_s < 5
    finally:
        lab.close()
