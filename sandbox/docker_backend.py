"""Run one experiment in a hardened Docker container (see hardening.py for what is protected).

docker-py is synchronous: every call runs on a worker thread. The deadline is enforced here, from
outside the container: at `deadline_s` after start the container is killed whatever runs inside.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
import structlog

from sandbox.base import Backend, ProgressCallback, finish_despite_cancel, in_thread, oom_kills, oom_since
from sandbox.config import DockerBackendConfig
from sandbox.errors import ContainerError, EngineUnavailableError, ImageNotFoundError, SpecError
from sandbox.hardening import (LABEL_DEADLINE, LABEL_OWNER_HOST, LABEL_OWNER_PID, LABEL_OWNER_START,
                               LABEL_PROJECT, LABEL_RUN_ID, container_kwargs)
from sandbox.models import Reaped, RunOutcome, RunSpec, RunStatus
from sandbox.nvidia import GpuAccess, choose_mode, devices_for
from sandbox.reaper import current_owner, judge
from sandbox.runio import (CappedLog, DiskWatch, ProgressFollower, make_outcome, stream_files,
                           writable_folders)

log = structlog.get_logger("sandbox")

SANDBOX_USER = "10001:10001"  # the image's non-root user (Dockerfile.gpu)
WAIT_POLL_S = 30.0  # one container.wait request; re-issued until the container exits
LOG_DRAIN_S = 120.0  # after exit, how long the log stream may take to catch up


class DockerBackend(Backend):
    name = "docker"

    def __init__(self, config: DockerBackendConfig | None = None) -> None:
        self.config = config or DockerBackendConfig()
        try:
            self.client = (docker.DockerClient(base_url=self.config.base_url) if self.config.base_url
                           else docker.from_env())
            self.client.ping()
        except docker.errors.DockerException as e:
            raise EngineUnavailableError(
                f"cannot reach the Docker engine ({e}); start dockerd, or use the local backend") from e
        self.user = self.config.user or (f"{os.getuid()}:{os.getgid()}" if os.getuid() != 0 else SANDBOX_USER)
        self.owner = current_owner()

    # -- checks --------------------------------------------------------------------------------

    def check(self) -> None:
        try:
            self.client.ping()
            self.client.images.get(self.config.image)
            runtimes = self.client.info().get("Runtimes", {})
        except docker.errors.ImageNotFound as e:
            raise ImageNotFoundError(self.config.image) from e
        except docker.errors.DockerException as e:
            raise EngineUnavailableError(f"the Docker engine does not answer: {e}") from e
        if self.config.runtime and self.config.runtime not in runtimes:
            raise SpecError(f"runtime {self.config.runtime!r} is not installed in the engine "
                            f"(have: {sorted(runtimes)}); install it or unset `runtime`")

    def gpu_mode(self) -> tuple[str | None, str]:
        """Which way this engine and host give a run its GPU, and why (sandbox.nvidia)."""
        try:
            runtimes = self.client.info().get("Runtimes", {})
        except docker.errors.DockerException as e:
            raise EngineUnavailableError(f"the Docker engine does not answer: {e}") from e
        return choose_mode(runtimes, self.config.nvidia_dev_dir, self.config.nvidia_proc_dir, self.config.gpu_mode)

    def _gpu_access(self, spec: RunSpec) -> GpuAccess | None:
        """None for a CPU run or the toolkit's way; the nodes and libraries of the devices mode;
        SpecError (nothing started) when the host cannot give the run its GPU."""
        if spec.gpu is None:
            return None
        mode, why = self.gpu_mode()
        if mode is None:
            raise SpecError(f"this run leased GPU {spec.gpu}, but {why}")
        if mode == "toolkit":
            return None
        try:
            return devices_for(spec.gpu, self.config.nvidia_dev_dir, self.config.driver_lib_dir,
                               self.config.nvidia_proc_dir)
        except (LookupError, ValueError) as e:
            raise SpecError(f"this run leased GPU {spec.gpu}, but {e}") from None

    def _prepare(self, spec: RunSpec) -> None:
        """Check the mounts and make the writable folders writable by the container user."""
        for m in spec.mounts:
            if not m.source.exists():
                raise SpecError(f"mount source {m.source} (for {m.target}) does not exist")
            _refuse_sockets(m.source)
        for path in spec.stdin:
            if not path.is_file():
                raise SpecError(f"stdin file {path} does not exist")
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        uid, gid = (int(x) for x in self.user.split(":"))
        for path in [spec.output_dir, *(m.source for m in spec.mounts if not m.read_only and m.source.is_dir())]:
            _hand_over(path, uid, gid)

    # -- run -----------------------------------------------------------------------------------

    async def run(self, spec: RunSpec, on_progress: ProgressCallback | None = None) -> RunOutcome:
        if spec.network != "none":  # trusted set-up steps only (prepare's download): same hardening otherwise
            log.warning("run_with_network", run_id=spec.run_id, network=spec.network)
        await asyncio.to_thread(self._prepare, spec)  # may walk a big cache folder: not on the loop
        disk = DiskWatch(writable_folders(spec), spec.limits.disk_gb)
        await asyncio.to_thread(disk.baseline)
        runlog = CappedLog(spec.log_path, spec.limits.log_cap_bytes)
        follower = ProgressFollower(spec.output_dir / "progress.jsonl", on_progress)
        kwargs = container_kwargs(spec, user=self.user, owner=self.owner, runtime=self.config.runtime,
                                  deadline_unix=time.time() + spec.deadline_s, gpu_access=self._gpu_access(spec))
        t0 = time.monotonic()
        start = in_thread(self._start, kwargs, spec.stdin)
        follow_task: asyncio.Task | None = None
        disk_task: asyncio.Task | None = None
        try:
            try:
                container, output = await asyncio.shield(start)
            except ContainerError as e:
                runlog.write(f"[sandbox] could not start the container: {e}\n".encode())
                return make_outcome(spec, runlog, "infra-error", None, time.monotonic() - t0, str(e))
            log.info("container_started", run_id=spec.run_id, gpu=spec.gpu, container=container.short_id)
            follow_task = asyncio.create_task(follower.follow())
            disk_task = asyncio.create_task(disk.watch(lambda: in_thread(_kill, container)))
            pump = in_thread(_pump, output, runlog)
            try:
                status, code, detail = await self._supervise(container, spec, t0)
            except ContainerError as e:
                status, code, detail = "infra-error", None, str(e)
            wall = time.monotonic() - t0
            disk_task.cancel()
            if status != "infra-error" and (disk.tripped or await asyncio.to_thread(disk.over)):
                status, detail = "crash", disk.detail
            await self._drain(pump, spec.run_id)
            await finish_despite_cancel(in_thread(_remove, container))
        except asyncio.CancelledError:
            log.info("run_cancelled", run_id=spec.run_id)
            await _quietly(self._destroy_after_cancel(start))
            raise
        finally:
            for task in (follow_task, disk_task):
                if task is not None:
                    task.cancel()
            runlog.close()
        follower.drain()
        return make_outcome(spec, runlog, status, code, wall, detail)

    def _start(self, kwargs: dict, stdin: list[Path]) -> tuple[docker.models.containers.Container, Iterator[bytes]]:
        """Create, attach to stdout/stderr (and stdin), start, then feed stdin from a thread.
        Attaching first means no output is missed."""
        create = {k: v for k, v in kwargs.items() if k != "detach"}
        try:
            # create + start, not run(): run() would try to pull a missing image from a registry
            container = self.client.containers.create(**create)
        except docker.errors.ImageNotFound as e:
            raise ContainerError(f"image {kwargs['image']!r} is not on this host; build it with "
                                 "`python -m sandbox.image build`") from e
        except docker.errors.DockerException as e:
            raise ContainerError(f"creating the container failed: {e}") from e
        try:
            output = container.attach(stdout=True, stderr=True, stream=True, logs=False)
            feed = container.attach_socket(params={"stdin": 1, "stream": 1}) if stdin else None
            container.start()
        except docker.errors.DockerException as e:
            _remove(container)
            raise ContainerError(f"starting the container failed: {e}") from e
        if feed is not None:
            threading.Thread(target=_feed, args=(feed, stdin), daemon=True, name="stdin-feed").start()
        return container, output

    async def _supervise(self, container, spec: RunSpec, t0: float) -> tuple[RunStatus, int | None, str]:
        ooms = oom_kills()
        exit_fut = in_thread(_wait_exit, container)
        remaining = spec.deadline_s - (time.monotonic() - t0)
        try:
            code = await asyncio.wait_for(asyncio.shield(exit_fut), timeout=max(0.0, remaining))
        except TimeoutError:
            await in_thread(_kill, container)
            await exit_fut
            return "timeout", None, f"killed by the host at the {spec.deadline_s:g} s deadline"
        except asyncio.CancelledError:
            await _quietly(in_thread(_kill, container))
            await _quietly(exit_fut)
            raise
        state = await in_thread(_state, container)
        if state.get("OOMKilled"):
            return "oom", code, f"killed by the memory limit ({spec.limits.memory_gb:g} GB)"
        if code == 128 + signal.SIGKILL and oom_since(ooms):  # the host's OOM killer, not the cgroup's
            return "oom", code, "killed by the kernel's OOM killer (the host ran short of memory)"
        if code == 128 + signal.SIGTERM:  # never sent by this backend (it kills); the engine stops containers so
            return "infra-error", code, ("the container was stopped from outside the run (SIGTERM: the Docker engine "
                                         "shutting down or restarting, or `docker stop`); start the run again")
        if code == 0:
            return "ok", 0, "exit code 0"
        return "crash", code, f"exit code {code}"

    async def _drain(self, pump: asyncio.Future, run_id: str) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(pump), timeout=LOG_DRAIN_S)
        except TimeoutError:
            log.warning("log_drain_timeout", run_id=run_id)
        except Exception as e:  # a broken log stream loses log lines, not the outcome
            log.warning("log_stream_failed", run_id=run_id, error=str(e))

    async def _destroy_after_cancel(self, start: asyncio.Future) -> None:
        """Kill and remove the container, waiting for the start call if it is still in flight."""
        try:
            container, _ = await finish_despite_cancel(start)
        except ContainerError:
            return
        await finish_despite_cancel(in_thread(_kill, container))
        await finish_despite_cancel(in_thread(_remove, container))


    # -- reaping -------------------------------------------------------------------------------

    def reap(self) -> list[Reaped]:
        try:
            # a container of another lab may go between the listing and its inspection (issue 33)
            containers = self.client.containers.list(all=True, filters={"label": LABEL_PROJECT},
                                                     ignore_removed=True)
        except docker.errors.DockerException as e:
            raise EngineUnavailableError(f"listing containers failed: {e}") from e
        reaped = []
        for c in containers:
            lab = c.labels
            try:
                pid, deadline = int(lab.get(LABEL_OWNER_PID, "0")), float(lab.get(LABEL_DEADLINE, "inf"))
            except ValueError:
                continue  # not written by us
            running = c.status in ("created", "running", "restarting", "paused")
            reason = judge(pid, lab.get(LABEL_OWNER_START, ""), lab.get(LABEL_OWNER_HOST, ""), deadline, running)
            if reason is None:
                continue
            _remove(c)
            reaped.append(Reaped(run_id=lab.get(LABEL_RUN_ID, c.name), reason=reason,
                                 detail=f"container {c.name} ({c.status}), owner pid {pid}"))
        return reaped


# -- blocking helpers (run on worker threads) ------------------------------------------------------

ENGINE_GONE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
"""docker-py lets transport errors through: the engine stopped, restarted or hung."""

DOCKER_SOCKETS = (Path("/var/run/docker.sock"), Path("/run/docker.sock"))


def _refuse_sockets(source: Path) -> None:
    """Never hand a run a unix socket, least of all the engine's (that is root on the host)."""
    real = source.resolve()
    if stat.S_ISSOCK(real.stat().st_mode):
        raise SpecError(f"mount source {source} is a socket; sockets are never mounted into a run")
    for sock in DOCKER_SOCKETS:
        sock = sock.resolve()
        if real.is_dir() and (real == sock.parent or real in sock.parents):
            raise SpecError(f"mount source {source} contains the docker socket {sock}; refused")



def _hand_over(path: Path, uid: int, gid: int) -> None:
    """Let the container user write `path` (chown when we may, else open it up)."""
    st = path.stat()
    if (st.st_uid, st.st_gid) == (uid, gid):
        return
    if os.geteuid() == 0:
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(name, uid, gid)
    elif uid != os.getuid():
        path.chmod(0o777)  # not ours to chown: configured user differs from the server's


def _wait_exit(container) -> int:
    failures = 0
    while True:
        t = time.monotonic()
        try:
            return int(container.wait(timeout=WAIT_POLL_S)["StatusCode"])
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as e:
            if time.monotonic() - t >= WAIT_POLL_S * 0.5:
                continue  # the poll timed out; the container still runs
            failures += 1
            if failures > 3:
                raise ContainerError(f"the Docker engine stopped answering during the run (stopped or restarted: "
                                     f"its containers are gone with it); start the run again: {e}") from e
            time.sleep(0.5)
        except docker.errors.DockerException as e:
            raise ContainerError(f"waiting for the container failed: {e}") from e


def _feed(feed, paths: list[Path]) -> None:
    """Stream the files into the container's stdin, then close it (end-of-file for the run)."""
    sock = feed._sock  # docker-py hands back a SocketIO over the hijacked connection
    try:
        stream_files(paths, sock.sendall)
        sock.shutdown(socket.SHUT_WR)
    except OSError as e:  # the run exited without reading it all: its outcome says why
        log.info("stdin_feed_stopped", error=str(e))
    finally:
        feed.close()


def _pump(output: Iterator[bytes], runlog: CappedLog) -> None:
    for chunk in output:  # ends when the container's stdout and stderr close
        runlog.write(chunk)


def _kill_once(container) -> None:
    try:
        container.kill()
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if e.status_code != 409:  # 409: not running any more
            raise ContainerError(f"killing the container failed: {e}") from e
    except ENGINE_GONE as e:
        raise ContainerError(f"killing the container failed: the Docker engine is not answering ({e})") from e


def _kill(container, tries: int = 5) -> None:
    """Kill, and again: an engine killing thousands of processes (a fork bomb at its pids cap) may
    answer "did not receive an exit event" before they are all gone."""
    for i in range(tries):
        try:
            return _kill_once(container)
        except ContainerError as e:
            if i == tries - 1:
                raise
            log.warning("container_kill_retry", container=container.name, error=str(e))
            time.sleep(2.0)


def _state(container) -> dict:
    try:
        container.reload()
    except (docker.errors.DockerException, *ENGINE_GONE) as e:
        raise ContainerError(f"inspecting the container failed: {e}") from e
    return container.attrs.get("State", {})


def _remove(container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if e.status_code != 409:  # 409: removal already in progress
            log.warning("container_remove_failed", container=container.name, error=str(e))
    except ENGINE_GONE as e:  # the reaper removes it once the engine is back
        log.warning("container_remove_failed", container=container.name, error=str(e))


async def _quietly(fut) -> None:
    try:
        await finish_despite_cancel(fut if isinstance(fut, asyncio.Future) else asyncio.ensure_future(fut))
    except asyncio.CancelledError:
        pass
    except Exception as e:
        log.warning("cleanup_failed", error=str(e))
