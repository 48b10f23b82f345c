"""What the docker sandbox keeps the run's code from doing (real engine, real containers)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from sandbox_testlib import result_of

from sandbox.models import Limits, Mount
from sandbox.runio import read_output

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120, func_only=True)]  # a broken deadline fails fast


@pytest.fixture()
def host_listener():
    """A TCP server on the host's 127.0.0.1 that records whether anyone connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    hits: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            hits.append(addr[0])
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


NET_PROBE = """
    import json, socket, sys
    out, port = sys.argv[1], int(sys.argv[2])
    results = {}
    for name, addr in {"host_loopback": ("127.0.0.1", port), "public_ip": ("1.1.1.1", 53),
                       "docker_gateway": ("172.17.0.1", port), "dns": ("example.com", 80)}.items():
        try:
            s = socket.create_connection(addr, timeout=2)
            s.close()
            results[name] = "connected"
        except OSError as e:
            results[name] = type(e).__name__ + ": " + str(e)
    results["interfaces"] = [name for _, name in socket.if_nameindex()]
    json.dump(results, open(f"{out}/result.json", "w"))
"""


async def test_no_network_not_even_the_host_loopback(docker_backend, make_spec, host_listener):
    port, hits = host_listener
    outcome = await docker_backend.run(make_spec(NET_PROBE, args=[str(port)]))
    assert outcome.status == "ok", outcome.log_tail
    r = result_of(outcome)
    for name in ("host_loopback", "public_ip", "docker_gateway", "dns"):
        assert r[name] != "connected", (name, r)
    assert r["interfaces"] == ["lo"]
    assert hits == []


async def test_the_probe_itself_can_connect_when_not_isolated(local_backend, make_spec, host_listener):
    """Control for the test above: the same probe, unisolated, reaches the host listener."""
    port, hits = host_listener
    outcome = await local_backend.run(make_spec(NET_PROBE, args=[str(port)]))
    assert result_of(outcome)["host_loopback"] == "connected"
    assert hits == ["127.0.0.1"]


async def test_writes_only_to_out_and_tmp(docker_backend, make_spec, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.bin").write_bytes(b"\0" * 16)
    spec = make_spec("""
        import json, sys
        out = sys.argv[1]
        targets = ["/out/ok.txt", "/tmp/ok.txt", "/etc/evil", "/usr/evil", "/evil", "/work/script.py",
                   "/data/train.bin", "/data/new.bin", "/opt/autoresearch/trainer/__init__.py",
                   "/opt/autoresearch/trainer/evil.py", "/opt/venv/lib/evil.py"]
        res = {}
        for t in targets:
            try:
                with open(t, "a") as f:
                    f.write("x")
                res[t] = "written"
            except OSError as e:
                res[t] = type(e).__name__
        json.dump(res, open(f"{out}/result.json", "w"))
    """, mounts=[Mount(source=data, target="/data")])
    script_before = spec.mounts[0].source.read_text()
    outcome = await docker_backend.run(spec)
    r = result_of(outcome)
    assert r.pop("/out/ok.txt") == "written"
    assert r.pop("/tmp/ok.txt") == "written"
    assert all(v in ("OSError", "PermissionError") for v in r.values()), r  # EROFS / EACCES
    assert (data / "train.bin").read_bytes() == b"\0" * 16
    assert spec.mounts[0].source.read_text() == script_before
    assert sorted(p.name for p in data.iterdir()) == ["train.bin"]


async def test_host_paths_and_environment_are_invisible(docker_backend, make_spec, tmp_path, monkeypatch):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("s3cret")
    monkeypatch.setenv("AUTORESEARCH_HOST_SECRET", "leaked-if-you-see-this")
    spec = make_spec("""
        import json, os, sys
        out, secret = sys.argv[1], sys.argv[2]
        def can_read(p):
            try:
                open(p, "rb").read(1)
                return True
            except OSError:
                return False
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines()
                      if ":\\t" in line)
        json.dump({"env": dict(os.environ), "uid": os.getuid(), "gid": os.getgid(),
                   "secret": can_read(secret), "docker_sock": os.path.exists("/var/run/docker.sock"),
                   "run_docker_sock": os.path.exists("/run/docker.sock"),
                   "host_root": can_read("/root/.bashrc"), "cap_eff": status["CapEff"].strip(),
                   "shm_bytes": os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize,
                   "tmp_bytes": os.statvfs("/tmp").f_blocks * os.statvfs("/tmp").f_frsize,
                   "pid1": open("/proc/1/cmdline").read().split(chr(0))[0],
                   "no_new_privs": status["NoNewPrivs"].strip()},
                  open(f"{out}/result.json", "w"))
    """, args=[str(secret)], env={"VISIBLE": "yes"})
    outcome = await docker_backend.run(spec)
    r = result_of(outcome)
    assert r is not None, outcome.log_tail
    assert "AUTORESEARCH_HOST_SECRET" not in r["env"]
    assert not any("leaked-if-you-see-this" in v for v in r["env"].values())
    assert r["env"]["VISIBLE"] == "yes"
    image_env = {"PATH", "HOSTNAME", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "HF_HUB_OFFLINE",
                 "HOME", "NVIDIA_DRIVER_CAPABILITIES", "DEBIAN_FRONTEND", "LANG", "LC_CTYPE", "USER", "LOGNAME"}
    assert set(r["env"]) <= set(spec.env) | image_env, set(r["env"]) - set(spec.env) - image_env
    assert r["secret"] is False and r["host_root"] is False
    assert r["docker_sock"] is False and r["run_docker_sock"] is False
    assert r["uid"] != 0 and r["gid"] != 0
    assert int(r["cap_eff"], 16) == 0
    assert r["no_new_privs"] == "1"
    assert r["shm_bytes"] == spec.limits.shm_gb * (1 << 30)
    assert r["tmp_bytes"] == spec.limits.tmpfs_gb * (1 << 30)
    assert "init" in r["pid1"]  # docker-init as PID 1, our script below it


async def test_docker_socket_is_never_mounted(docker_backend, make_spec):
    from sandbox.errors import SpecError

    sock = Path("/var/run/docker.sock")
    assert sock.exists()  # the engine under test listens there
    for source, target in ((sock, "/sock"), (sock.parent, "/hostrun")):
        with pytest.raises(SpecError, match="socket"):
            await docker_backend.run(make_spec("print(1)", mounts=[Mount(source=source, target=target)]))


def _host_latency_probe(stop: threading.Event, worst: list[float]) -> None:
    """Time a tiny unit of host work every 50 ms; the worst delay says how responsive the host was."""
    while not stop.is_set():
        t = time.monotonic()
        os.stat("/")
        sum(range(1000))
        time.sleep(0.05)
        worst.append(time.monotonic() - t - 0.05)


async def test_fork_bomb_is_stopped_by_the_pids_limit(docker_backend, make_spec):
    spec = make_spec("""
        import json, os, sys, time
        out = sys.argv[1]
        root, fails, forks, t0 = os.getpid(), 0, 0, time.time()
        while time.time() - t0 < 4:
            try:
                if os.fork() == 0:
                    forks, fails = 0, 0  # every child forks too: a real bomb
                    continue
                forks += 1
            except OSError:
                fails += 1
                time.sleep(0.001)
        if os.getpid() == root:
            json.dump({"forks": forks, "fork_failures": fails}, open(f"{out}/result.json", "w"))
            os._exit(0)
        time.sleep(30)
    """, deadline_s=20, limits=Limits(memory_gb=1, pids=64, shm_gb=0.1, tmpfs_gb=0.1, log_cap_bytes=1 << 16))
    stop, worst = threading.Event(), []
    probe = threading.Thread(target=_host_latency_probe, args=(stop, worst), daemon=True)
    probe.start()
    outcome = await docker_backend.run(spec)
    stop.set()
    probe.join()
    assert outcome.status == "ok", (outcome.status, outcome.log_tail)
    assert result_of(outcome)["fork_failures"] > 0  # the limit said no
    assert result_of(outcome)["forks"] < 64
    assert outcome.wall_s < 15  # the parent's exit ended the whole container
    assert max(worst) < 2.0, max(worst)  # an uncontained bomb stalls the host far longer (or forks fail here)


async def test_memory_hog_ends_as_oom(docker_backend, make_spec):
    spec = make_spec("""
        hog = []
        for i in range(400):
            hog.append(bytearray(10 * 1024 * 1024))  # 10 MB each, touched (zero-filled)
            print("allocated", (i + 1) * 10, "MB", flush=True)
    """, limits=Limits(memory_gb=0.25, pids=64, shm_gb=0.1, tmpfs_gb=0.1, log_cap_bytes=1 << 16))
    outcome = await docker_backend.run(spec)
    assert outcome.status == "oom", (outcome.status, outcome.detail, outcome.log_tail[-300:])
    assert "memory" in outcome.detail
    assert "allocated 4000 MB" not in outcome.log_tail


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_100mb_of_stdout_leaves_a_capped_log_and_flat_memory(docker_backend, make_spec):
    cap = 1 << 20
    spec = make_spec("""
        import sys
        line = ("x" * 99 + "\\n").encode()
        block = line * 10_000  # 1 MB
        sys.stdout.buffer.write(b"FIRST LINE\\n")
        for _ in range(100):
            sys.stdout.buffer.write(block)
        sys.stdout.buffer.write(b"LAST LINE\\n")
        sys.stdout.flush()
    """, deadline_s=120, limits=Limits(memory_gb=1, pids=64, shm_gb=0.1, tmpfs_gb=0.1, log_cap_bytes=cap))
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss_mb())
            time.sleep(0.05)

    base = _rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    outcome = await docker_backend.run(spec)
    took = time.monotonic() - t0
    stop.set()
    sampler.join()
    assert outcome.status == "ok"
    size = spec.log_path.stat().st_size
    assert cap <= size <= cap + 200, size
    text = spec.log_path.read_bytes()
    assert text.startswith(b"FIRST LINE\n")
    assert text.endswith(b"LAST LINE\n")
    assert b"bytes of log omitted" in text
    assert outcome.log_truncated
    assert "LAST LINE" in outcome.log_tail
    assert max(samples) - base < 40, (base, max(samples))
    print(f"100 MB of stdout: {took:.1f} s, host RSS {base:.0f} -> peak {max(samples):.0f} MB, log {size} B")


async def test_image_has_the_trainer_and_its_dependencies(docker_backend, make_spec):
    spec = make_spec("""
        import importlib, json, os, stat, sys
        out = sys.argv[1]
        mods = {}
        for m in ["torch", "numpy", "tiktoken", "rustbpe", "pyarrow", "pydantic", "trainer"]:
            try:
                mods[m] = getattr(importlib.import_module(m), "__file__", "") or "ok"
            except Exception as e:
                mods[m] = "ERROR " + repr(e)
        st = os.stat("/opt/autoresearch/trainer")
        writable = [p for p, _, fs in os.walk("/opt/autoresearch") for p in [p, *fs] if os.access(p, os.W_OK)]
        import torch
        json.dump({"mods": mods, "torch": torch.__version__, "trainer_uid": st.st_uid,
                   "trainer_mode": oct(st.st_mode & 0o777), "writable": writable,
                   "hf_offline": os.environ.get("HF_HUB_OFFLINE"), "uid": os.getuid(),
                   "python": sys.version.split()[0], "pythonpath": os.environ.get("PYTHONPATH")},
                  open(f"{out}/result.json", "w"))
    """, env={})
    outcome = await docker_backend.run(spec)
    r = result_of(outcome)
    assert r is not None, outcome.log_tail
    assert not [m for m, v in r["mods"].items() if v.startswith("ERROR")], r["mods"]
    assert r["mods"]["trainer"].startswith("/opt/autoresearch/trainer/")
    assert r["torch"].startswith("2.13.0")
    assert r["trainer_uid"] == 0 and r["writable"] == []
    assert r["hf_offline"] == "1"  # from the image, not from the run's env (empty here)
    assert r["uid"] != 0
    assert r["pythonpath"] == "/opt/autoresearch"


async def test_a_bridge_network_spec_is_the_one_networked_path(docker_backend, make_spec, host_listener):
    """Trusted set-up steps may use the bridge network; the rest of the hardening still holds."""
    spec = make_spec(NET_PROBE, args=["1"]).model_copy(update={"network": "bridge"})
    outcome = await docker_backend.run(spec)
    r = result_of(outcome)
    assert outcome.status == "ok"
    assert sorted(r["interfaces"]) == ["eth0", "lo"]
    assert r["docker_gateway"] != "connected"  # nothing listens there on port 1


async def test_links_and_pipes_in_out_cannot_make_the_host_read_its_own_files(docker_backend, make_spec, tmp_path):
    """The run owns /out: a symlink there must not leak a host file into progress or result."""
    host_file = tmp_path / "host-only.jsonl"
    host_file.write_text('{"secret": "host data"}\n')
    spec = make_spec("""
        import os, sys
        out, target = sys.argv[1], sys.argv[2]
        os.symlink(target, f"{out}/progress.jsonl")
        os.mkfifo(f"{out}/result.json")
        print("planted", flush=True)
    """, args=[str(host_file)])
    seen: list[dict] = []
    outcome = await asyncio.wait_for(docker_backend.run(spec, on_progress=seen.append), timeout=30)
    assert (spec.output_dir / "progress.jsonl").is_symlink()  # the trap was really set
    assert seen == []
    assert result_of(outcome) is None
    assert "not a regular file" in read_output(spec.output_dir, "result.json")[1]


async def test_configured_user_without_passwd_entry_can_write_out_and_cache(sandbox_image, make_spec, tmp_path):
    """The run's uid need not exist in the image (a non-root server runs it as its own uid)."""
    from sandbox.config import DockerBackendConfig
    from sandbox.docker_backend import DockerBackend

    cache = tmp_path / "cache"
    (cache / "inductor").mkdir(parents=True)  # made by the server, as root
    spec = make_spec("""
        import getpass, json, os, sys
        out = sys.argv[1]
        open("/cache/inductor/k.bin", "w").write("x")
        json.dump({"uid": os.getuid(), "user": getpass.getuser()}, open(f"{out}/result.json", "w"))
    """, mounts=[Mount(source=cache, target="/cache", read_only=False)])
    backend = DockerBackend(DockerBackendConfig(image=sandbox_image, user="4321:4321"))
    outcome = await backend.run(spec)
    assert outcome.status == "ok", outcome.log_tail
    assert result_of(outcome) == {"uid": 4321, "user": "sandbox"}
    assert (spec.output_dir / "result.json").stat().st_uid == 4321
    assert (cache / "inductor" / "k.bin").exists()
