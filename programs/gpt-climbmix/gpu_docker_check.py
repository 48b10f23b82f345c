"""Issue 24's first check on a GPU host with the engine of gpu_docker_engine.sh running: a hardened
container in the docker backend's own GPU mode (no toolkit), on an image imported from nothing with
the host's /usr, /lib, /etc and /opt mounted read-only (the probe's shortcut, until the sandbox image
is built there), sees exactly its leased GPU; the same container without a lease sees none.
    python3 programs/gpt-climbmix/gpu_docker_check.py OUT_DIR [GPU]      (DOCKER_HOST set)
"""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from sandbox.config import DockerBackendConfig
from sandbox.docker_backend import DockerBackend
from sandbox.models import Limits, Mount, RunSpec
from sandbox.nvidia import choose_mode, gpus

PROBE = ("import json, os, sys, torch; n = torch.cuda.device_count(); json.dump({'count': n, 'names': "
         "[torch.cuda.get_device_name(i) for i in range(n)], 'uuids': ['GPU-' + str(torch.cuda.get_device_properties(i)"
         ".uuid) for i in range(n)], 'dev': sorted(d for d in os.listdir('/dev') if d.startswith('nvidia'))}, "
         "open('/out/result.json', 'w'))")


async def main(out: Path, gpu: str | None) -> None:
    subprocess.run("tar -cf - --files-from /dev/null | docker import - autoresearch-empty:probe", shell=True,
                   check=True, capture_output=True)
    backend = DockerBackend(DockerBackendConfig(image="autoresearch-empty:probe", base_url=os.environ["DOCKER_HOST"]))
    print("mode:", backend.gpu_mode(), "gpus:", gpus())
    mounts = [Mount(source=Path(p), target=p) for p in ("/usr", "/lib", "/lib64", "/bin", "/etc", "/opt")
              if Path(p).exists()]
    py = sys.executable  # a venv's python finds its packages through its own path
    for name, lease in (("leased", gpu), ("no-lease", None)):
        folder = out / name
        folder.mkdir(parents=True)
        spec = RunSpec(run_id=f"gpu-check-{name}", image="autoresearch-empty:probe", command=[py, "-c", PROBE],
                       mounts=mounts, env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"}, output_dir=folder / "out",
                       log_path=folder / "log.txt", gpu=lease, deadline_s=120,
                       limits=Limits(memory_gb=16, pids=1024))
        outcome = await backend.run(spec)
        result = (folder / "out" / "result.json").read_text() if (folder / "out" / "result.json").exists() else None
        print(name, outcome.status, outcome.wall_s, result or outcome.log_tail[-1500:])
    info = backend.client.info()
    print("security options:", json.dumps(info.get("SecurityOptions")), "runtimes:", sorted(info.get("Runtimes", {})))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "0"))
