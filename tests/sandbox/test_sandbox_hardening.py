"""The container arguments, checked one by one (no engine needed; the GPU case cannot run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from docker.types import DeviceRequest, Ulimit
from pydantic import ValidationError

from sandbox.hardening import (LABEL_DEADLINE, LABEL_OWNER_PID, LABEL_PROJECT, LABEL_RUN_ID, Owner,
                               container_kwargs)
from sandbox.models import Limits, Mount, RunSpec

OWNER = Owner(pid=4242, start="123456", host="gpu-box")
GB = 1 << 30


def spec(**kw) -> RunSpec:
    base = dict(
        run_id="r-1", image="autoresearch-sandbox:gpu",
        command=["python3", "-m", "trainer.run", "--program", "/work/program.toml"],
        mounts=[Mount(source=Path("/lab/runs/r-1/train.py"), target="/work/train.py"),
                Mount(source=Path("/lab/data"), target="/data"),
                Mount(source=Path("/lab/cache/alice"), target="/cache", read_only=False)],
        env={"PYTHONUNBUFFERED": "1", "HOME": "/tmp"},
        output_dir=Path("/lab/runs/r-1/out"), log_path=Path("/lab/runs/r-1/log.txt"),
        deadline_s=420, limits=Limits(memory_gb=48, pids=512, shm_gb=16, tmpfs_gb=2), labels={"agent": "alice"},
    )
    base.update(kw)
    return RunSpec(**base)


def test_cpu_run_is_locked_down():
    kw = container_kwargs(spec(), user="10001:10001", owner=OWNER, deadline_unix=1700000000.5)
    assert kw["network_mode"] == "none"
    assert kw["read_only"] is True
    assert kw["user"] == "10001:10001"
    assert kw["cap_drop"] == ["ALL"]
    assert "cap_add" not in kw and "privileged" not in kw
    assert kw["security_opt"] == ["no-new-privileges:true"]
    assert kw["pids_limit"] == 512
    assert kw["mem_limit"] == kw["memswap_limit"] == 48 * GB
    assert kw["shm_size"] == 16 * GB
    assert kw["ipc_mode"] == "private"
    assert "pid_mode" not in kw and "userns_mode" not in kw and "devices" not in kw
    assert kw["tmpfs"] == {"/tmp": f"rw,exec,nosuid,nodev,size={2 * GB},mode=1777"}
    assert Ulimit(name="core", soft=0, hard=0) in kw["ulimits"]
    assert kw["init"] is True
    assert kw["environment"] == {"PYTHONUNBUFFERED": "1", "HOME": "/tmp"}
    assert "device_requests" not in kw and "runtime" not in kw
    assert kw["log_config"]["Type"] == "none"
    assert kw["command"][:3] == ["python3", "-m", "trainer.run"]


def test_mounts_are_exactly_the_specs_plus_out():
    kw = container_kwargs(spec(), user="10001:10001", owner=OWNER, deadline_unix=0)
    got = {(m["Target"], m["Source"], m["ReadOnly"], m["Type"]) for m in kw["mounts"]}
    assert got == {
        ("/work/train.py", "/lab/runs/r-1/train.py", True, "bind"),
        ("/data", "/lab/data", True, "bind"),
        ("/cache", "/lab/cache/alice", False, "bind"),
        ("/out", "/lab/runs/r-1/out", False, "bind"),
    }
    assert "volumes" not in kw and "volumes_from" not in kw
    assert not any("docker.sock" in m["Source"] for m in kw["mounts"])


def test_container_names_are_unique_per_start():
    # two labs may both have a run "alice-0001" at the same time on one engine
    a, b = (container_kwargs(spec(), user="1:1", owner=OWNER, deadline_unix=0)["name"] for _ in range(2))
    assert a != b and a.startswith("autoresearch-r-1-")


def test_labels_identify_project_run_owner_and_deadline():
    kw = container_kwargs(spec(), user="1:1", owner=OWNER, deadline_unix=1700000000.5)
    lab = kw["labels"]
    assert lab[LABEL_PROJECT] == "autoresearch-mcp"
    assert lab[LABEL_RUN_ID] == "r-1"
    assert lab[LABEL_OWNER_PID] == "4242"
    assert lab[LABEL_DEADLINE] == "1700000000.500"
    assert lab["agent"] == "alice"


def test_gpu_run_gets_exactly_the_leased_device_and_the_runtime():
    kw = container_kwargs(spec(gpu="3"), user="10001:10001", owner=OWNER, deadline_unix=0, runtime="runsc")
    assert kw["device_requests"] == [DeviceRequest(device_ids=["3"], capabilities=[["gpu"]])]
    req = kw["device_requests"][0]
    assert req["DeviceIDs"] == ["3"]
    assert req["Capabilities"] == [["gpu"]]
    assert req["Count"] == 0  # never count=N: that would mean GPUs 0..N-1, not the leased one
    assert kw["runtime"] == "runsc"


def test_gpu_uuid_is_accepted_and_nonsense_is_not():
    kw = container_kwargs(spec(gpu="GPU-5f1c2a3b-aaaa-bbbb-cccc"), user="1:1", owner=OWNER, deadline_unix=0)
    assert kw["device_requests"][0]["DeviceIDs"] == ["GPU-5f1c2a3b-aaaa-bbbb-cccc"]
    with pytest.raises(ValidationError, match="gpu"):
        spec(gpu="all")
    with pytest.raises(ValidationError, match="gpu"):
        spec(gpu="0,1")


def test_optional_cpu_and_nofile_limits():
    kw = container_kwargs(spec(limits=Limits(cpus=2.5, nofile=4096)), user="1:1", owner=OWNER, deadline_unix=0)
    assert kw["nano_cpus"] == 2_500_000_000 and "cpuset_cpus" not in kw
    pinned = container_kwargs(spec(limits=Limits(cpuset="2,3")), user="1:1", owner=OWNER, deadline_unix=0)
    assert pinned["cpuset_cpus"] == "2,3" and "nano_cpus" not in pinned
    with pytest.raises(ValidationError, match="cpuset"):
        Limits(cpuset="0-3; rm")
    assert Ulimit(name="nofile", soft=4096, hard=4096) in kw["ulimits"]
