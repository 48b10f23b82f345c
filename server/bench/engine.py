"""A Docker engine of the benchmark's own, for the faults that restart the engine (issue 33): its own
data root, exec root (so its own containerd), pid file, config file and unix socket, its own network
namespace and no iptables rules. Restarting or killing it touches neither the host's engine nor a
container of anyone else. Needs root and dockerd on PATH (Debian's docker.io); the sandbox image is copied into it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from server.bench.common import wait_for


class PrivateEngine:
    """`with PrivateEngine(folder) as engine:` a started engine at `engine.base_url`, removed after."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = data_root
        # unix socket paths are capped at 108 bytes (containerd's own sockets live under the exec root)
        self.exec_root = Path(tempfile.mkdtemp(prefix="ar-engine-", dir="/run"))
        self.socket = self.exec_root / "docker.sock"
        self.base_url = f"unix://{self.socket}"
        self.log_path = data_root.parent / f"{data_root.name}.log"
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        config = self.exec_root / "daemon.json"  # never the host's /etc/docker/daemon.json
        config.write_text("{}")
        # a network namespace of its own: its default bridge and rules live there, never beside the host
        # engine's docker0 (`--bridge none` would not do: dockerd then deletes docker0, the host's bridge)
        return ["unshare", "--net", "dockerd", "--config-file", str(config), "--data-root", str(self.data_root),
                "--exec-root", str(self.exec_root / "exec"), "--pidfile", str(self.exec_root / "dockerd.pid"),
                "-H", self.base_url, "--iptables=false", "--ip-masq=false",
                "--storage-driver", "overlay2", "--log-level", "warn"]

    def start(self) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, start_new_session=True)
        try:
            wait_for(self.ping, 90, "the private Docker engine to answer", poll_s=0.3)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; its log: {self.log_tail()}") from e

    def stop(self) -> None:
        """SIGTERM to the engine this object started (it stops its containers and its containerd)."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> float:
        """Stop it and start it again, as an engine restart does; the seconds it took."""
        t0 = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - t0

    def ping(self) -> bool:
        import docker  # noqa: PLC0415

        try:
            return self.client().ping()
        except docker.errors.DockerException:
            return False

    def client(self):
        import docker  # noqa: PLC0415

        return docker.DockerClient(base_url=self.base_url, timeout=60)

    def copy_image(self, tag: str) -> float:
        """`docker save TAG | docker load` from the host's engine into this one; the seconds it took."""
        t0 = time.monotonic()
        with subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE) as save:
            subprocess.run(["docker", "-H", self.base_url, "load", "-q"], stdin=save.stdout, check=True,
                           stdout=subprocess.DEVNULL)
        if save.returncode:
            raise RuntimeError(f"docker save {tag} failed (exit {save.returncode})")
        return time.monotonic() - t0

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> PrivateEngine:
        if os.geteuid() != 0 or shutil.which("dockerd") is None:
            raise RuntimeError("a private Docker engine needs root and dockerd on PATH (Debian: docker.io)")
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.exec_root, ignore_errors=True)
        shutil.rmtree(self.data_root, ignore_errors=True)
