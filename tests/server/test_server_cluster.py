"""Runs on a real Ray cluster (issue 21): a head and two worker nodes on this machine, one run slot
each, in a network namespace this module makes. Ray binds its GCS and raylets to every address and
its agents to the machine's outward one whatever --node-ip-address says, so loopback alone cannot
hold it; the namespace holds only `lo`. The supervisors that drive the runs are started from inside
it (this module's main thread enters it), and the nodes run the docker backend: every run is two
hardened containers on this host's engine, reached through its socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from server_helpers import ledger_rows, open_dir, wait_until

from server.bench.cluster import NODES, PORT, NetnsCluster
from server.lab import Lab
from server.runs import Runs

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


@pytest.fixture(scope="module")
def cluster():
    c = NetnsCluster()
    try:
        for name in NODES:
            c.start(name)
        c.enter()
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster_lab(make_lab, tiny_data, tmp_path, cluster):
    def make(**config):
        # connect_timeout_s: the product's 20 s was passed once with fork bombs of other tests beside
        return make_lab(backend="docker", data_dir=open_dir(tiny_data), cluster={
            "address": f"127.0.0.1:{PORT}", "node_root": str(tmp_path / "nodes"), "connect_timeout_s": 120},
            **config)
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


async def test_three_agents_share_the_cluster_s_slots(cluster_lab, lab_containers):
    """As many agents as slots, two runs each: their first runs are submitted together, so Ray must spread
    them over the three nodes; the second ones show a slot handed from one run to the next."""
    root = cluster_lab()
    lab = Lab(root)
    runs = Runs(lab)
    agents = ("alice", "bob", "carol")
    try:
        results: dict[str, list] = {name: [] for name in agents}

        async def agent(name: str) -> None:
            for i in range(2):
                results[name].append(await runs.run(name, f"{name} run {i}"))

        async with anyio.create_task_group() as tg:
            for name in agents:
                tg.start_soon(agent, name)
    finally:
        lab.close()
    rows = ledger_rows(root)
    assert len(rows) == 6 and len({r.run_id for r in rows}) == 6
    assert [r.status for r in rows] == ["ok"] * 6, [(r.run_id, r.status, r.detail) for r in rows]
    assert sorted(r.run_id for rs in results.values() for r in rs) == sorted(r.run_id for r in rows)
    nodes = {r.slot.split("/")[0] for r in rows}
    assert nodes == set(NODES), nodes
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
        result = await runs.cancel(rec.run_id)
        # killed at the cancel, not left to its 120-s budget
        await wait_until(lambda: lab_containers() == [], 30, "the container to be gone")
        assert result.status == "cancelled", result
    finally:
        lab.close()


async def test_doctor_checks_each_node_and_an_unreachable_cluster_is_said(cluster_lab, make_lab, tiny_data, tmp_path):
    root = cluster_lab()
    done = subprocess.run([sys.executable, "-m", "server.cli", "doctor", "--lab", str(root)], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in NODES:
        assert f"[ok ] node {name}: 127.0.0.1, 1 slot(s), 0 GPU(s); docker backend ready, the lab's data present" \
            in done.stdout, done.stdout
    assert "[ok ] run slots: 3 on the cluster" in done.stdout
    gone = make_lab(name="unreachable", backend="docker", data_dir=open_dir(tiny_data), cluster={
        "address": "127.0.0.1:1", "connect_timeout_s": 5, "node_root": str(tmp_path / "nodes")})
    done = subprocess.run([sys.executable, "-m", "server.cli", "doctor", "--lab", str(gone)], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 1 and "[MISSING] ray cluster:" in done.stdout, done.stdout
    lab = Lab(gone)
    try:
        result = await Runs(lab).run("alice", "no cluster")
    finally:
        lab.close()
    assert result.status == "infra-error" and "Ray cluster at 127.0.0.1:1" in (result.reason or ""), result


async def test_a_run_waits_in_ray_s_queue_when_every_slot_is_busy(cluster_lab):
    root = cluster_lab(budget_s=15)
    lab = Lab(root)
    runs = Runs(lab)
    try:
        agents = ("alice", "bob", "carol", "dave")
        started = [await runs.start(a, f"{a}'s run") for a in agents]
        lines: dict[str, set] = {r.run_id: set() for r in started}

        def all_done() -> bool:
            for r in started:
                line = runs.progress_of(r.run_id)
                if line:
                    lines[r.run_id].add(line)
            return all(runs.progress_of(r.run_id) is None for r in started)

        # first runs of four agents: each one's causality audit is deep (nothing to beat yet)
        await wait_until(all_done, 600, "the four runs to finish", poll_s=0.1)
    finally:
        lab.close()
    rows = ledger_rows(root)
    assert [r.status for r in rows] == ["ok"] * 4, [(r.run_id, r.status, r.detail) for r in rows]
    waited = [run_id for run_id, seen in lines.items()
              if "queued: waiting for a run slot: every slot is busy and this run is next" in seen]
    assert len(waited) >= 1, lines  # three slots, four runs: one waited in Ray's queue and was told so
