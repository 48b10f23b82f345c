"""What a run's container sees on a GPU host, through the docker backend itself (issue 24): with a
lease of GPU `GPU` and without one, in the sandbox image IMAGE, with the backend's own hardening and
its GPU mode (`auto`: devices where the engine has no NVIDIA runtime). Each prints what torch sees
(count, names, UUIDs), the NVIDIA nodes in /dev, whether the network and the root can be reached,
and the user; result.json files land in OUT_DIR/<leased|no-lease>/out.
    python3 programs/gpt-climbmix/gpu_docker_check.py OUT_DIR IMAGE [GPU]      (DOCKER_HOST set)
"""

import asyncio
import json
import os
import sys
from pathlib import Path

from sandbox.config import DockerBackendConfig
from sandbox.docker_backend import DockerBackend
from sandbox.gpus import uuid_of
from sandbox.models import Limits, RunSpec
from sandbox.nvidia import gpus

PROBE = """
import json, os, socket, torch
def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close(); return "reached"
    except OSError as e:
        return type(e).__name__ + ": " + str(e)
try:
    open("/usr/probe", "w"); root = "writable"
except OSError as e:
    root = "read-only (" + e.strerror + ")"
n = torch.cuda.device_count()
json.dump({"count": n, "names": [torch.cuda.get_device_name(i) for i in range(n)],
           "uuids": ["GPU-" + str(torch.cuda.get_device_properties(i).uuid) for i in range(n)],
           "dev": sorted(d for d in os.listdir("/dev") if d.startswith("nvidia")),
           "net_outside": reach("1.1.1.1", 53), "net_loopback": reach("127.0.0.1", 22), "root": root,
           "uid": os.getuid(), "torch": torch.__version__}, open("/out/result.json", "w"))
"""


async def main(out: Path, image: str, gpu: str | None) -> None:
    backend = DockerBackend(DockerBackendConfig(image=image))
    print("mode:", backend.gpu_mode(), "driver lists:", gpus(), "lease's UUID:", uuid_of(gpu))
    for name, lease in (("leased", gpu), ("no-lease", None)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        spec = RunSpec(run_id=f"gpu-check-{name}-{os.getpid()}", image=image, command=["python3", "-c", PROBE],
                       env={"HOME": "/tmp"}, output_dir=folder / "out", log_path=folder / "log.txt", gpu=lease,
                       deadline_s=120, limits=Limits(memory_gb=16, pids=1024))
        outcome = await backend.run(spec)
        result = folder / "out" / "result.json"
        print(name, outcome.status, f"{outcome.wall_s:.1f} s",
              result.read_text() if result.exists() else outcome.log_tail[-1500:])
    info = backend.client.info()
    print("security options:", json.dumps(info.get("SecurityOptions")), "runtimes:", sorted(info.get("Runtimes", {})))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "0"))
