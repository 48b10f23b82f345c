"""The `autoresearch-mcp` command line as `make demo` uses it: prepare (in the sandbox image), doctor,
one experiment from the shell, report. Real Docker, real git."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
from server_helpers import PROGRAM, REPO, ledger_rows, wait_until


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.docker
def test_prepare_doctor_run_report(tmp_path, docker_client, lab_containers):
    lab = tmp_path / "lab"
    done = cli("prepare", PROGRAM, "--lab", str(lab), "--budget-s", "4", "--max-bytes", "3000000")
    assert done.returncode == 0, done.stderr
    assert json.loads((lab / "data" / "meta.json").read_text())
    config = json.loads((lab / "lab.json").read_text())
    assert config["backend"]["type"] == "docker"
    # the lab's leases in a folder of the test's own, never the host-wide one a user's labs share
    (lab / "lab.json").write_text(json.dumps({**config, "pool": {**config["pool"], "state_dir": str(tmp_path)}}))

    doctor = cli("doctor", "--lab", str(lab))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "[ok ] prepared data" in doctor.stdout and "[ok ] sandbox image" in doctor.stdout

    run = cli("run", "--lab", str(lab), "--agent", "demo", "--description", "baseline")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["status"] == "ok" and result["kept"] and result["val_bpb"] > 0
    assert re.search(r"^\[\s*[\d.]+s\] (queued|running|scoring)", run.stderr, re.M), run.stderr  # progress on stderr

    report = cli("report", "--lab", str(lab))
    assert report.returncode == 0, report.stderr
    assert "commit\tval_bpb\tmemory_gb\tstatus\tdescription" in report.stdout
    assert result["commit"][:7] in report.stdout
    assert (lab / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lab_containers() == []


def test_doctor_and_serve_say_what_is_missing(tmp_path):
    doctor = cli("doctor", "--lab", str(tmp_path / "nowhere"))
    assert doctor.returncode == 1
    assert "fix: autoresearch-mcp prepare" in doctor.stdout
    serve = cli("serve", "--lab", str(tmp_path / "nowhere"), timeout=60)
    assert serve.returncode == 2 and "--agent" in serve.stderr
    http = cli("serve", "--lab", str(tmp_path / "nowhere"), "--transport", "http", timeout=60)
    assert http.returncode == 2 and "--tokens" in http.stderr
    prepare = cli("prepare", "no-such-program", "--lab", str(tmp_path / "x"), timeout=60)
    assert prepare.returncode == 2 and "bundled programs" in prepare.stderr


@pytest.mark.docker
def test_serve_refuses_to_start_without_its_image(make_lab, docker_client):
    root = make_lab(backend="docker")
    cfg = json.loads((root / "lab.json").read_text())
    cfg["backend"]["image"] = "autoresearch-sandbox:no-such-tag"
    (root / "lab.json").write_text(json.dumps(cfg))
    serve = cli("serve", "--lab", str(root), "--agent", "alice", timeout=60)
    assert serve.returncode == 2
    assert "no-such-tag" in serve.stderr and "build" in serve.stderr


@pytest.mark.docker
def test_prepare_downloads_climbmix_in_the_sandbox_image(tmp_path, docker_client, lab_containers):
    """The one step with network: climbmix shards fetched from inside the container (from a local
    HTTP server on the docker bridge, standing in for the Hugging Face hub)."""
    import http.server  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415
    import sysconfig  # noqa: PLC0415
    import threading  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    served = tmp_path / "served"
    served.mkdir()
    docs = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:600]]
    for index, chunk in [(0, docs[:250]), (1, docs[250:500]), (6542, docs[500:])]:
        pq.write_table(pa.table({"text": chunk}), served / f"shard_{index:05d}.parquet")
    clients: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *args):
            clients.append(self.client_address[0])

    ipam = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    gateway = ipam.get("Gateway") or str(ipaddress.ip_network(ipam["Subnet"])[1])  # the host, seen from containers
    server = http.server.ThreadingHTTPServer((gateway, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lab = tmp_path / "lab"
        done = cli("prepare", PROGRAM, "--lab", str(lab), "--source", "climbmix", "--num-train-shards", "2",
                   "--base-url", f"http://{gateway}:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    meta = json.loads((lab / "data" / "meta.json").read_text())
    assert meta
    assert len(clients) == 3 and gateway not in clients  # fetched by the container, not the host
    assert lab_containers() == []


@pytest.mark.anyio
async def test_sigterm_to_a_shell_run_cancels_and_records_it(make_lab, tiny_data):
    root = make_lab(data_dir=tiny_data, budget_s=60)  # local backend: the run is a process group
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "--lab", str(root), "--agent", "demo",
                             "--description", "stopped from the shell"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        await wait_until(lambda: [r.status for r in ledger_rows(root)] == ["running"], 60, "the run to start")
        run_dir = root / "runs" / ledger_rows(root)[0].run_id
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM: the run was cancelled and recorded" in err
    [row] = ledger_rows(root)
    assert (row.status, row.detail) == ("cancelled", "cancelled: stopped by SIGTERM")
    alive = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert alive == [], f"the run's processes outlived the command: {alive}"


def test_prepare_on_host_reads_only_the_files_the_glob_names(tmp_path):
    """A local corpus from a folder that also holds data files (site-packages has .parquet tests); the
    same prepare command may run again on the lab a failed one made, other settings are refused."""
    import sysconfig
    from pathlib import Path

    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
    for i in range(30):  # distinct texts: the split is by content hash
        for src in sources:
            (corpus / "pkg" / f"{i}_{src.name}").write_text(f"# copy {i}\n{src.read_text()}")
    (corpus / "pkg" / "table.parquet").write_bytes(b"PAR1 not a text corpus")
    lab = tmp_path / "lab"
    args = ("prepare", PROGRAM, "--lab", str(lab), "--backend", "local", "--on-host", "--source", "local",
            "--path", str(corpus))
    unfiltered = cli(*args)
    assert unfiltered.returncode != 0
    assert "table.parquet: not a readable parquet file" in unfiltered.stderr  # names the file
    done = cli(*args, "--glob", "**/*.py")  # the same command again, on the lab the first one made
    assert done.returncode == 0, done.stdout + done.stderr
    meta = json.loads((lab / "data" / "meta.json").read_text())
    assert meta["fingerprint"]["source"]["globs"] == ["**/*.py"]
    assert meta["splits"]["train"]["documents"] > 100
    other = cli("prepare", PROGRAM, "--lab", str(lab), "--backend", "docker", "--budget-s", "7")
    assert other.returncode == 2
    assert "--backend docker (the lab has local); --budget-s 7.0 (the lab has" in other.stderr
    assert json.loads((lab / "lab.json").read_text())["backend"]["type"] == "local"  # unchanged
