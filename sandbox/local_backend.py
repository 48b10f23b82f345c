"""Run one experiment as a plain subprocess in its own process group. NO ISOLATION.

The code runs as the server's user with the server's file system and network. Only the deadline
(the whole process group is killed), the outcome statuses, the capped log and progress lines match
the docker backend; memory/pids limits, the read-only root and the network cut do not exist here.
A child that calls setsid() leaves the group and escapes the kill. For development and for hosts
without Docker only.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import structlog

from sandbox.base import Backend, ProgressCallback, oom_kills, oom_since
from sandbox.config import LocalBackendConfig
from sandbox.errors import SpecError
from sandbox.models import OUTPUT_TARGET, Reaped, RunOutcome, RunSpec, RunStatus
from sandbox.reaper import current_owner, judge, process_start
from sandbox.runio import CappedLog, DiskWatch, ProgressFollower, make_outcome, stream_files, writable_folders

log = structlog.get_logger("sandbox")

REPO_ROOT = Path(__file__).resolve().parent.parent
STRAGGLER_DRAIN_S = 5.0  # after the group is killed, how long stdout may stay open


class LocalBackend(Backend):
    name = "local"

    def __init__(self, config: LocalBackendConfig | None = None) -> None:
        self.config = config or LocalBackendConfig()
        self.python = str(self.config.python or sys.executable)
        self.pythonpath = [str(p) for p in self.config.pythonpath] or [
            str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        self.owner = current_owner()
        log.warning("local_backend_no_isolation",
                    message="LOCAL BACKEND: experiments run as this user with full access to files, network "
                            "and environment of this host. Use the docker backend for untrusted code.")

    def check(self) -> None:
        if not os.access(self.python, os.X_OK):
            raise SpecError(f"interpreter {self.python} is not executable; set `python` in the local config")
        self.config.state_dir.mkdir(parents=True, exist_ok=True)

    # -- path mapping (the container layout, replayed on the host) --------------------------------

    def _views(self, spec: RunSpec) -> dict[str, Path]:
        """Host folders of links standing in for container folders that exist only through file
        mounts (/data/train.bin and /data/meta.json, but no /data), so that `/data` maps too."""
        targets = {m.target for m in spec.mounts}
        parents = sorted({posixpath.dirname(m.target) for m in spec.mounts if m.source.is_file()} - targets)
        root = self.config.state_dir / f"{spec.run_id}-views"
        return {parent: root / str(i) for i, parent in enumerate(parents) if parent != "/"}

    def _make_views(self, spec: RunSpec) -> None:
        for parent, folder in self._views(spec).items():
            folder.mkdir(parents=True, exist_ok=True)
            for m in spec.mounts:
                if posixpath.dirname(m.target) == parent:
                    (folder / posixpath.basename(m.target)).symlink_to(m.source)

    def _table(self, spec: RunSpec) -> list[tuple[str, str]]:
        table = [(m.target, str(m.source)) for m in spec.mounts] + [(OUTPUT_TARGET, str(spec.output_dir))]
        table += [(parent, str(folder)) for parent, folder in self._views(spec).items()]
        return sorted(table, key=lambda t: -len(t[0]))  # longest container path first

    @staticmethod
    def _map(value: str, table: list[tuple[str, str]]) -> str:
        for target, host in table:
            if value == target or value.startswith(target + "/"):
                return host + value[len(target):]
        return value

    def command_and_env(self, spec: RunSpec) -> tuple[list[str], dict[str, str]]:
        """The host argv and environment for `spec` (public so the mapping can be inspected)."""
        table = self._table(spec)
        argv = [self._map(a, table) for a in spec.command]
        if argv[0] in ("python3", "python"):
            argv[0] = self.python
        env = {k: self._map(v, table) for k, v in spec.env.items()}
        env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
        # Bytecode for the host's packages, kept between runs: a read-only or byte-code-less
        # install would otherwise recompile torch's sources in every run (~10 s on an H100 host;
        # the docker image ships compiled bytecode instead). No isolation here to protect.
        env.setdefault("PYTHONPYCACHEPREFIX", str(self.config.state_dir / "pycache"))
        env.setdefault("PATH", os.pathsep.join([str(Path(self.python).parent), os.defpath.lstrip(":")]))
        # no leased GPU: hide them all rather than let the run grab GPU 0; PCI order makes CUDA's
        # indices match nvidia-smi's, which the leases use
        env["CUDA_VISIBLE_DEVICES"] = spec.gpu if spec.gpu is not None else ""
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return argv, env

    # -- run -----------------------------------------------------------------------------------

    async def run(self, spec: RunSpec, on_progress: ProgressCallback | None = None) -> RunOutcome:
        for m in spec.mounts:
            if not m.source.exists():
                raise SpecError(f"mount source {m.source} (for {m.target}) does not exist")
        for path in spec.stdin:
            if not path.is_file():
                raise SpecError(f"stdin file {path} does not exist")
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        views = self.config.state_dir / f"{spec.run_id}-views"
        shutil.rmtree(views, ignore_errors=True)
        self._make_views(spec)
        disk = DiskWatch(writable_folders(spec), spec.limits.disk_gb)
        await asyncio.to_thread(disk.baseline)
        argv, env = self.command_and_env(spec)
        runlog = CappedLog(spec.log_path, spec.limits.log_cap_bytes)
        follower = ProgressFollower(spec.output_dir / "progress.jsonl", on_progress)
        log.warning("local_run_unisolated", run_id=spec.run_id)
        t0 = time.monotonic()
        stdin_r, stdin_w = os.pipe() if spec.stdin else (asyncio.subprocess.DEVNULL, None)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=stdin_r, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, cwd=spec.output_dir, env=env, start_new_session=True)
        except OSError as e:
            if stdin_w is not None:
                os.close(stdin_w)
            runlog.write(f"[sandbox] could not start {argv[0]}: {e}\n".encode())
            runlog.close()
            shutil.rmtree(views, ignore_errors=True)
            return make_outcome(spec, runlog, "infra-error", None, time.monotonic() - t0, str(e))
        finally:
            if stdin_w is not None:
                os.close(stdin_r)  # the run holds its own copy
        if stdin_w is not None:
            threading.Thread(target=_feed, args=(stdin_w, spec.stdin), daemon=True, name="stdin-feed").start()
        _no_core_dumps(proc.pid)
        state = self._record(spec, proc.pid)
        follow_task = asyncio.create_task(follower.follow())
        disk_task = asyncio.create_task(disk.watch(lambda: _killpg(proc.pid)))
        pump = asyncio.create_task(_pump(proc, runlog))
        try:
            status, code, detail = await self._supervise(proc, spec, t0)
            wall = time.monotonic() - t0
            disk_task.cancel()
            if disk.tripped or await asyncio.to_thread(disk.over):
                status, detail = "crash", disk.detail
            _killpg(proc.pid)  # stragglers the leader left running: the group ends with the run
            await _settle(proc, pump)
        except asyncio.CancelledError:
            _killpg(proc.pid)
            await asyncio.shield(_exited(proc, STRAGGLER_DRAIN_S))
            await asyncio.shield(_settle(proc, pump))
            raise
        finally:
            follow_task.cancel()
            disk_task.cancel()
            runlog.close()
            state.unlink(missing_ok=True)
            shutil.rmtree(views, ignore_errors=True)
        follower.drain()
        return make_outcome(spec, runlog, status, code, wall, detail)

    async def _supervise(self, proc, spec: RunSpec, t0: float) -> tuple[RunStatus, int | None, str]:
        ooms = oom_kills()
        rc = await _exited(proc, spec.deadline_s - (time.monotonic() - t0))
        if rc is None:
            _killpg(proc.pid)
            await _exited(proc, STRAGGLER_DRAIN_S)
            return "timeout", None, f"killed by the host at the {spec.deadline_s:g} s deadline"
        if rc == 0:
            return "ok", 0, "exit code 0"
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            if rc == -signal.SIGKILL and oom_since(ooms):
                return "oom", 128 - rc, "killed by the kernel's OOM killer (the host ran short of memory)"
            return "crash", 128 - rc, f"killed by {sig}"
        return "crash", rc, f"exit code {rc}"


    # -- bookkeeping for the reaper ----------------------------------------------------------------

    def _record(self, spec: RunSpec, pid: int) -> Path:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.config.state_dir / f"{spec.run_id}-{pid}.json"  # run ids repeat across labs
        path.write_text(json.dumps({
            "run_id": spec.run_id, "pgid": pid, "leader_start": process_start(pid),
            "owner_pid": self.owner.pid, "owner_start": self.owner.start, "owner_host": self.owner.host,
            "deadline": time.time() + spec.deadline_s}))
        return path

    def reap(self) -> list[Reaped]:
        reaped = []
        for path in sorted(self.config.state_dir.glob("*.json")) if self.config.state_dir.is_dir() else []:
            try:
                rec = json.loads(path.read_text())
                pgid = int(rec["pgid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            reason = judge(rec["owner_pid"], rec["owner_start"], rec["owner_host"], rec["deadline"], True)
            if reason is None:
                continue
            leader_now = process_start(pgid)
            # a live leader with another start time means the pgid was reused: not ours to kill
            if not leader_now or leader_now == rec["leader_start"]:
                _killpg(pgid)
            path.unlink(missing_ok=True)
            reaped.append(Reaped(run_id=rec["run_id"], reason=reason, detail=f"process group {pgid}"))
        return reaped


def _feed(fd: int, paths: list[Path]) -> None:
    """Stream the files into the run's stdin pipe, then close it (end-of-file)."""
    try:
        with open(fd, "wb") as pipe:
            stream_files(paths, pipe.write)
    except BrokenPipeError:
        pass  # the run exited without reading it all: its outcome says why


async def _pump(proc, runlog: CappedLog) -> None:
    while chunk := await proc.stdout.read(1 << 16):
        runlog.write(chunk)


async def _exited(proc, timeout_s: float) -> int | None:
    """The leader's exit code once it exits, or None after `timeout_s`.

    Not proc.wait(): that also waits for stdout to close, which a straggler can hold open forever.
    """
    end = time.monotonic() + max(0.0, timeout_s)
    while proc.returncode is None:
        left = end - time.monotonic()
        if left <= 0:
            return None
        await asyncio.sleep(min(0.05, left))
    return proc.returncode


async def _settle(proc, pump: asyncio.Task) -> None:
    """Wait for stdout EOF; a process that escaped the group may hold it open, so bound the wait."""
    try:
        await asyncio.wait_for(asyncio.shield(pump), timeout=STRAGGLER_DRAIN_S)
    except TimeoutError:
        log.warning("local_run_left_stdout_open", hint="a child left the process group (setsid)")
        pump.cancel()
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()  # drop our end of the pipe; the straggler gets EPIPE


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _no_core_dumps(pid: int) -> None:
    try:
        resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError):
        pass
