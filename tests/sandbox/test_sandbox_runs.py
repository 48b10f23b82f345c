"""Deadline and outcome behaviour, the same for the docker and the local backend."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from sandbox.models import Limits, Mount
from sandbox.runio import read_output
from sandbox_testlib import pid_alive, result_of

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120, func_only=True)]  # a broken deadline fails fast

KILL_SLACK_S = 2.0  # the bound: killed within 2 s of the deadline


async def test_normal_run_returns_ok_with_result_log_and_progress(backend, make_spec):
    spec = make_spec("""
        import json, sys, time
        out = sys.argv[1]
        print("hello from the run")
        with open(f"{out}/progress.jsonl", "a") as f:
            for step in range(3):
                f.write(json.dumps({"phase": "train", "step": step, "loss": 3.0 - step}) + "\\n")
                f.flush()
                time.sleep(0.3)
            f.write('not json\\n[1, 2]\\n')  # garbage lines are skipped, not fatal
        json.dump({"status": "ok", "val_bpb": 1.25}, open(f"{out}/result.json", "w"))
        print("bye", file=sys.stderr)
    """)
    seen: list[dict] = []
    outcome = await backend.run(spec, on_progress=seen.append)
    assert outcome.status == "ok", outcome
    assert outcome.exit_code == 0
    assert result_of(outcome) == {"status": "ok", "val_bpb": 1.25}
    log = spec.log_path.read_text()
    assert "hello from the run" in log and "bye" in log
    assert "bye" in outcome.log_tail
    assert [p["step"] for p in seen] == [0, 1, 2]
    assert not outcome.log_truncated


async def test_crash_reports_exit_code_and_traceback(backend, make_spec):
    spec = make_spec("""
        import sys
        print("about to fail")
        raise SystemExit(3)
    """)
    outcome = await backend.run(spec)
    assert outcome.status == "crash"
    assert outcome.exit_code == 3
    assert result_of(outcome) is None
    assert "about to fail" in outcome.log_tail


async def test_sleep_forever_is_killed_at_the_deadline(backend, make_spec, request):
    spec = make_spec("""
        import time
        print("sleeping", flush=True)
        time.sleep(10_000)
    """, deadline_s=3)
    t0 = time.monotonic()
    outcome = await backend.run(spec)
    elapsed = time.monotonic() - t0
    assert outcome.status == "timeout"
    assert outcome.exit_code is None
    assert spec.deadline_s <= outcome.wall_s <= spec.deadline_s + KILL_SLACK_S
    # incl. container start and removal, which a 2-core box running other tests beside may slow
    assert elapsed <= spec.deadline_s + KILL_SLACK_S + 10.0
    assert "sleeping" in outcome.log_tail
    if backend.name == "docker":
        assert request.getfixturevalue("no_leftovers")(spec.run_id) == []


async def test_sigterm_ignoring_parent_with_forked_children_is_killed(backend, make_spec, request):
    spec = make_spec("""
        import os, signal, sys, time
        out = sys.argv[1]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    time.sleep(0.1)
            kids.append(pid)
        with open(f"{out}/pids.txt", "w") as f:
            f.write(" ".join(str(p) for p in [os.getpid(), *kids]))
        print("forked", kids, flush=True)
        while True:
            time.sleep(0.1)
    """, deadline_s=3)
    outcome = await backend.run(spec)
    assert outcome.status == "timeout"
    assert outcome.wall_s <= spec.deadline_s + KILL_SLACK_S
    assert "forked" in outcome.log_tail
    pids = [int(p) for p in (spec.output_dir / "pids.txt").read_text().split()]
    assert len(pids) == 4
    if backend.name == "docker":
        assert request.getfixturevalue("no_leftovers")(spec.run_id) == []
    else:
        await asyncio.sleep(0.2)
        assert [p for p in pids if pid_alive(p)] == []


async def test_cancelling_the_task_kills_the_run_then_reraises(backend, make_spec, request):
    spec = make_spec("""
        import json, os, sys, time
        out = sys.argv[1]
        open(f"{out}/pid.txt", "w").write(str(os.getpid()))
        with open(f"{out}/progress.jsonl", "a") as f:
            f.write(json.dumps({"phase": "startup"}) + "\\n")
        time.sleep(10_000)
    """, deadline_s=60)
    started = asyncio.Event()
    task = asyncio.create_task(backend.run(spec, on_progress=lambda p: started.set()))
    await asyncio.wait_for(started.wait(), timeout=20)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < spec.deadline_s / 4  # killed at once, not left to its 60-s deadline
    if backend.name == "docker":
        assert request.getfixturevalue("no_leftovers")(spec.run_id) == []
    else:
        assert not pid_alive(int((spec.output_dir / "pid.txt").read_text()))


async def test_bad_result_file_is_the_runs_business_not_an_error(backend, make_spec):
    """The sandbox hands back what the run wrote, bounded; judging it is the server's (trainer.contract)."""
    spec = make_spec("""
        import sys
        open(f"{sys.argv[1]}/result.json", "w").write("{not json")
    """)
    outcome = await backend.run(spec)
    assert outcome.status == "ok"
    assert result_of(outcome) is None
    assert read_output(spec.output_dir, "result.json") == (b"{not json", "")


async def test_missing_mount_source_is_a_spec_error_and_starts_nothing(backend, make_spec, tmp_path):
    from sandbox.errors import SpecError
    from sandbox.models import Mount

    spec = make_spec("print('never')", mounts=[Mount(source=tmp_path / "nope", target="/data")])
    with pytest.raises(SpecError, match="does not exist"):
        await backend.run(spec)
    assert not spec.log_path.exists()


def test_local_backend_maps_container_paths_to_host_paths(local_backend, make_spec):
    spec = make_spec("print(1)", env={"TORCHINDUCTOR_CACHE_DIR": "/out/inductor", "DATABASE": "/database"})
    argv, env = local_backend.command_and_env(spec)
    assert argv[0] == local_backend.python
    assert argv[1] == str(spec.mounts[0].source)
    assert argv[2] == str(spec.output_dir)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == f"{spec.output_dir}/inductor"
    assert env["DATABASE"] == "/database"  # only whole path components are mapped
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PYTHONPYCACHEPREFIX"] == str(local_backend.config.state_dir / "pycache")  # kept between runs
    assert json.dumps(env)  # plain strings only


async def test_local_runs_keep_bytecode_between_runs(local_backend, make_spec):
    """A host install without bytecode would recompile its sources (torch: ~10 s) in every run."""
    prefix = local_backend.config.state_dir / "pycache"
    spec = make_spec("import json, sys; print(sys.pycache_prefix, json.dumps([1]))")
    outcome = await local_backend.run(spec)
    assert outcome.status == "ok", outcome.detail
    assert str(prefix) in spec.log_path.read_text()
    assert list(prefix.rglob("json/__init__.*.pyc"))  # the prefix mirrors the source tree


async def test_two_labs_may_run_the_same_run_id_at_once(docker_backend, make_spec):
    """Run ids are unique per lab only; one engine serves several labs."""
    a = make_spec("import time; time.sleep(1); print('a')")
    b = make_spec("import time; time.sleep(1); print('b')").model_copy(update={"run_id": a.run_id})
    out_a, out_b = await asyncio.gather(docker_backend.run(a), docker_backend.run(b))
    assert (out_a.status, out_b.status) == ("ok", "ok"), (out_a.detail, out_b.detail)


async def test_filling_the_disk_through_out_is_killed(backend, make_spec):
    """/out is a bind mount with no quota: the host measures it and stops a run that floods it."""
    spec = make_spec("""
        import os, sys, time
        chunk = os.urandom(1 << 20)
        with open(f"{sys.argv[1]}/junk.bin", "wb") as f:
            for i in range(100_000):
                f.write(chunk * 4)  # 4 MB every 0.05 s: ~80 MB/s, forever
                f.flush()
                time.sleep(0.05)
    """, deadline_s=60, limits=Limits(memory_gb=1, pids=64, shm_gb=0.1, tmpfs_gb=0.1, log_cap_bytes=1 << 16,
                                      disk_gb=0.05))
    outcome = await backend.run(spec)
    assert outcome.status == "crash", (outcome.status, outcome.detail)
    assert "more than the 0.05 GB allowed" in outcome.detail and "/out" in outcome.detail
    assert outcome.wall_s < 15  # first check after ~2 s, not the 60-s deadline
    assert (spec.output_dir / "junk.bin").stat().st_size < 1e9


async def test_a_run_within_its_disk_allowance_is_ok(backend, make_spec):
    spec = make_spec("""
        import os, sys
        open(f"{sys.argv[1]}/small.bin", "wb").write(os.urandom(10 << 20))  # 10 MB of a 50 MB allowance
    """, limits=Limits(memory_gb=1, pids=64, shm_gb=0.1, tmpfs_gb=0.1, log_cap_bytes=1 << 16, disk_gb=0.05))
    outcome = await backend.run(spec)
    assert outcome.status == "ok", (outcome.status, outcome.detail, outcome.log_tail)


async def test_stdin_files_are_streamed_in_order_then_closed(backend, make_spec, tmp_path):
    import hashlib
    import os

    parts = [tmp_path / "a.bin", tmp_path / "b.bin"]
    parts[0].write_bytes(os.urandom(3 << 20))
    parts[1].write_bytes(b"tail")
    spec = make_spec("""
        import hashlib, json, sys
        data = sys.stdin.buffer.read()  # returns only at end-of-file
        json.dump({"n": len(data), "sha": hashlib.sha256(data).hexdigest()}, open(f"{sys.argv[1]}/result.json", "w"))
    """).model_copy(update={"stdin": parts})
    outcome = await backend.run(spec)
    assert outcome.status == "ok", (outcome.detail, outcome.log_tail)
    whole = parts[0].read_bytes() + parts[1].read_bytes()
    assert result_of(outcome) == {"n": len(whole), "sha": hashlib.sha256(whole).hexdigest()}


async def test_file_mounts_make_their_folder(backend, make_spec, tmp_path):
    """Mounting files one by one shows a folder with exactly those files (the data without val)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (data / name).write_text(name)
    spec = make_spec("""
        import json, os, sys
        names = sorted(os.listdir(sys.argv[2]))
        json.dump({"names": names, "train": open(f"{sys.argv[2]}/train.bin").read()},
                  open(f"{sys.argv[1]}/result.json", "w"))
    """, mounts=[Mount(source=data / n, target=f"/data/{n}") for n in ("meta.json", "train.bin")], args=["/data"])
    outcome = await backend.run(spec)
    assert outcome.status == "ok", (outcome.detail, outcome.log_tail)
    assert result_of(outcome) == {"names": ["meta.json", "train.bin"], "train": "train.bin"}


def memory_cgroup(tmp_name: str, limit_bytes: int):
    """A memory cgroup of this test's own (v2 with the memory controller, else v1), or None."""
    from pathlib import Path  # noqa: PLC0415

    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        group = v2 / tmp_name
        group.mkdir()
        (group / "memory.max").write_text(str(limit_bytes))
        (group / "memory.swap.max").write_text("0")
        return group, group / "cgroup.procs"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "tasks").exists():
        group = v1 / tmp_name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return group, group / "tasks"
    return None


async def test_a_sigkill_from_the_kernels_oom_killer_is_an_oom_however_it_came(local_backend, make_spec):
    """Not only the run's own cap: a run the kernel's OOM killer ends (here through a memory cgroup
    the test made, as the host's own OOM killer would) is `oom`; a plain SIGKILL stays a crash."""
    import os  # noqa: PLC0415

    made = memory_cgroup(f"autoresearch-test-{os.getpid()}", 64 << 20)
    assert made is not None, "no writable memory cgroup on this host (the test runs as root)"
    group, procs = made
    try:
        hog = make_spec(f"""
            import os
            open({str(procs)!r}, "w").write(str(os.getpid()))
            hog = [bytearray(1 << 20) for _ in range(512)]
        """)
        outcome = await local_backend.run(hog)
        assert (outcome.status, outcome.exit_code) == ("oom", 137), outcome
        assert "OOM killer" in outcome.detail
        killed = make_spec("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
        outcome = await local_backend.run(killed)
        assert (outcome.status, outcome.detail) == ("crash", "killed by SIGKILL"), outcome
    finally:
        group.rmdir()
