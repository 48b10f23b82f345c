"""The container arguments for one run: every isolation decision in one pure, testable function.

Protected: network (none), the image (read-only root), the host's files (only the spec's mounts),
the host's environment (explicit env), privileges (non-root, no capabilities, no-new-privileges),
host resources (memory = memory+swap, pids, shm, tmpfs, core dumps off), other GPUs (one device
id). Not protected: the GPU driver and kernel attack surface, unless a runtime such as gVisor
`runsc` is configured; disk use inside the read-write mounts (/out, /cache).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from sandbox.models import LABEL_PREFIX, OUTPUT_TARGET, RunSpec
from sandbox.nvidia import LIB_TARGET, GpuAccess

PROJECT = "autoresearch-mcp"
LABEL_PROJECT = LABEL_PREFIX + "project"  # the marker the reaper and the tests filter on
LABEL_RUN_ID = LABEL_PREFIX + "run-id"
LABEL_OWNER_PID = LABEL_PREFIX + "owner-pid"
LABEL_OWNER_START = LABEL_PREFIX + "owner-start"  # guards against pid reuse
LABEL_OWNER_HOST = LABEL_PREFIX + "owner-host"
LABEL_DEADLINE = LABEL_PREFIX + "deadline"  # unix seconds


@dataclass(frozen=True)
class Owner:
    """The process that owns a run; the reaper kills runs whose owner is gone."""

    pid: int
    start: str  # /proc/<pid>/stat start time; "" where unknown
    host: str


def _gb(x: float) -> int:
    return int(x * (1 << 30))


def container_name(run_id: str) -> str:
    """A readable, host-unique name: run ids are unique only within a lab, and several labs (and
    test sessions) share one engine. The run id proper is in the labels."""
    return f"autoresearch-{run_id}-{secrets.token_hex(4)}"


def container_kwargs(
    spec: RunSpec,
    *,
    user: str,
    owner: Owner,
    deadline_unix: float,
    runtime: str | None = None,
    gpu_access: GpuAccess | None = None,
) -> dict[str, Any]:
    """The keyword arguments for docker-py `containers.run` that start `spec` hardened.

    `user` is "uid:gid" (numeric, so no /etc/passwd entry is needed). The docker socket is never
    mounted; only the spec's mounts plus output_dir at /out.
    """
    lim = spec.limits
    mounts = [Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
              for m in spec.mounts]
    mounts.append(Mount(target=OUTPUT_TARGET, source=str(spec.output_dir), type="bind", read_only=False))
    labels = {
        **spec.labels,
        LABEL_PROJECT: PROJECT,
        LABEL_RUN_ID: spec.run_id,
        LABEL_OWNER_PID: str(owner.pid),
        LABEL_OWNER_START: owner.start,
        LABEL_OWNER_HOST: owner.host,
        LABEL_DEADLINE: f"{deadline_unix:.3f}",
    }
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.command),
        "name": container_name(spec.run_id),
        "detach": True,
        "user": user,
        "environment": dict(spec.env),  # the whole environment: nothing from the host
        "working_dir": OUTPUT_TARGET,
        "hostname": "sandbox",
        "labels": labels,
        "mounts": mounts,
        "network_mode": spec.network,  # "none" but for trusted set-up steps
        "read_only": True,
        # exec: torch/triton load compiled helpers from temp dirs; noexec would only break them
        "tmpfs": {"/tmp": f"rw,exec,nosuid,nodev,size={_gb(lim.tmpfs_gb)},mode=1777"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "pids_limit": lim.pids,
        "mem_limit": _gb(lim.memory_gb),
        "memswap_limit": _gb(lim.memory_gb),  # equal to mem_limit: no swap to hide in
        "shm_size": _gb(lim.shm_gb),
        "ipc_mode": "private",  # its own IPC namespace and /dev/shm, never the host's or a neighbour's
        "ulimits": [Ulimit(name="core", soft=0, hard=0)],
        "oom_score_adj": 500,  # if the host itself runs short, the run goes before the server
        "init": True,  # an init as PID 1 reaps zombies and dies (taking everything) on kill
        "stdin_open": bool(spec.stdin),  # the backend streams spec.stdin, then closes it
        "tty": False,
        # no engine-side copy of stdout: the backend attaches before start and keeps a capped one;
        # the json-file driver with rotation also loses the follow stream at the first rotation
        "log_config": LogConfig(type="none"),
    }
    if lim.nofile is not None:
        kwargs["ulimits"].append(Ulimit(name="nofile", soft=lim.nofile, hard=lim.nofile))
    if lim.cpus is not None:
        kwargs["nano_cpus"] = int(lim.cpus * 1e9)
    if lim.cpuset is not None:
        kwargs["cpuset_cpus"] = lim.cpuset
    if spec.gpu is not None and gpu_access is not None:  # no toolkit: the GPU's nodes and the driver's libraries
        kwargs["devices"] = list(gpu_access.devices)
        mounts += [Mount(target=f"{LIB_TARGET}/{lib.name}", source=str(lib), type="bind", read_only=True)
                   for lib in gpu_access.libs]
        path = kwargs["environment"].get("LD_LIBRARY_PATH")
        kwargs["environment"]["LD_LIBRARY_PATH"] = LIB_TARGET + (f":{path}" if path else "")
    elif spec.gpu is not None:
        # device_ids, never count=N: count=1 always means GPU 0, whatever was leased
        kwargs["device_requests"] = [DeviceRequest(device_ids=[spec.gpu], capabilities=[["gpu"]])]
    if runtime:
        kwargs["runtime"] = runtime
    return kwargs
