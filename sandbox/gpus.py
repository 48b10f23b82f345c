"""Exclusive leases on a whole GPU (or a CPU slot) per run, shared by every process on the host.

Kernel file locks (flock) under a host-wide state folder make a lease exclusive across server
processes and release it when its holder dies, however it dies. Waiters queue first come, first
served: each holds a locked ticket file numbered from a shared counter; a waiter may take a free
slot only when fewer waiters are ahead of it than slots are free, and its position (waiters
ahead) is reported while it waits. Not protected: a process that ignores the lease protocol.
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sandbox.config import DEFAULT_STATE_DIR
from sandbox.errors import LeaseError
from sandbox.models import Limits

PositionCallback = Callable[[int], object]


class PoolConfig(BaseModel):
    """Which slots exist and where their locks live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state_dir: Path = Field(default=DEFAULT_STATE_DIR / "leases",
                            description="Host-wide folder for lock files; every server on the host must share it.")
    gpus: list[str] | None = Field(default=None,
                                   description="GPU device ids to lease; None: discover with nvidia-smi.")
    cpu_slots: int = Field(default=1, ge=1, description="Concurrent runs on a host without GPUs.")
    poll_s: float = Field(default=0.2, gt=0, description="How often a waiter looks for a free slot.")


@dataclass(frozen=True)
class Lease:
    """A slot held exclusively until the `acquire` block ends."""

    slot: str  # "gpu-0", "cpu-1"
    gpu: str | None  # device id to pass to the backend; None for a CPU slot
    waited_s: float = 0.0
    index: int = 0  # the slot's place in the pool (which share of the host's cores it gets)
    runner: Any = None  # the Backend that runs specs on this lease (a cluster node's); None: the lab's
    limits: Limits | None = None  # the lease's share of its host, where the pool knows it (a cluster node)
    gpu_uuid: str | None = None  # the leased GPU's UUID where the driver lists it: a GPU run must report it


def uuid_of(gpu: str | None, proc: Path | None = None) -> str | None:
    """The UUID of the GPU a lease names (an index or a UUID) on this host, from the driver's
    listing; None for a CPU slot or where the driver does not list it."""
    if gpu is None:
        return None
    if gpu.upper().startswith("GPU-"):
        return gpu
    from sandbox.nvidia import PROC_GPUS, find_gpu  # noqa: PLC0415

    try:
        return find_gpu(gpu, proc or PROC_GPUS).uuid
    except LookupError:
        return None


def discover_gpus(timeout_s: float = 15.0) -> list[str]:
    """GPU indices from nvidia-smi (PCI bus order), or [] when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def _open_shared(path: Path) -> int:
    """Open (creating) a lock file that servers of every user on the host can lock too."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o666)  # the umask would have taken write access from the others
    except OSError:
        pass
    return fd


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path`, or None when someone else holds it."""
    fd = _open_shared(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class SlotPool:
    """The host's slots; `async with pool.acquire(on_position=cb) as lease:` holds one."""

    def __init__(self, config: PoolConfig | None = None) -> None:
        self.config = config or PoolConfig()
        gpus = self.config.gpus if self.config.gpus is not None else discover_gpus()
        if gpus:
            self.slots: list[tuple[str, str | None]] = [(f"gpu-{g}", g) for g in gpus]
        else:
            self.slots = [(f"cpu-{i}", None) for i in range(self.config.cpu_slots)]
        self.root = self.config.state_dir
        self.tickets = self.root / "queue"
        try:
            self.tickets.mkdir(parents=True, exist_ok=True)
            for d in (self.root, self.tickets):
                if d.stat().st_uid == os.getuid():
                    d.chmod(0o1777)  # host-wide: servers of other users share the same locks
        except OSError as e:
            raise LeaseError(f"lease state folder {self.root} is unusable ({e}); set `state_dir`") from e

    @property
    def size(self) -> int:
        return len(self.slots)

    # -- queue ---------------------------------------------------------------------------------

    def _take_ticket(self) -> tuple[int, int, Path]:
        fd = _open_shared(self.root / "counter")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                seq = int(os.read(fd, 32) or b"0") + 1
            except ValueError:  # a torn write long ago: restart above every ticket in the queue
                seq = 1 + max((int(p.name.split("-", 1)[0]) for p in self.tickets.glob("*.ticket")), default=0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, str(seq).encode())
        finally:
            _unlock(fd)
        # lock under a temporary name, then rename: a ticket is never visible unlocked
        tmp = self.tickets / f".{seq}-{os.getpid()}.tmp"
        ticket_fd = _try_lock(tmp)
        if ticket_fd is None:
            raise LeaseError(f"cannot lock a fresh ticket {tmp}")
        path = self.tickets / f"{seq:012d}-{os.getpid()}.ticket"
        os.rename(tmp, path)
        return seq, ticket_fd, path

    def _ahead(self, seq: int) -> int:
        """Live waiters with a lower ticket; tickets of dead waiters are removed on the way."""
        ahead = 0
        for path in self.tickets.glob("*.ticket"):
            try:
                other = int(path.name.split("-", 1)[0])
            except ValueError:
                continue
            if other >= seq:
                continue
            fd = _try_lock(path)
            if fd is None:
                ahead += 1
            else:  # its waiter died without cleaning up
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass  # another user's ticket in a sticky folder: ignored, it counts for nothing
                _unlock(fd)
        return ahead

    # -- slots ---------------------------------------------------------------------------------

    def _slot_path(self, slot: str) -> Path:
        return self.root / f"{slot}.lock"

    def _free_slots(self) -> list[tuple[str, str | None]]:
        free = []
        for slot, gpu in self.slots:
            fd = _try_lock(self._slot_path(slot))
            if fd is not None:
                _unlock(fd)
                free.append((slot, gpu))
        return free

    def _grab(self, holder: str) -> tuple[int, str, str | None] | None:
        for slot, gpu in self._free_slots():
            fd = _try_lock(self._slot_path(slot))
            if fd is not None:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"pid": os.getpid(), "holder": holder, "since": time.time()}).encode())
                return fd, slot, gpu
        return None

    def holders(self) -> dict[str, dict | None]:
        """Each slot's current holder ({pid, holder, since}) or None when free."""
        out: dict[str, dict | None] = {}
        for slot, _ in self.slots:
            path = self._slot_path(slot)
            fd = _try_lock(path)
            if fd is not None:
                _unlock(fd)
                out[slot] = None
                continue
            try:
                out[slot] = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                out[slot] = {}
        return out

    @asynccontextmanager
    async def acquire(self, on_position: PositionCallback | None = None, holder: str = "") -> AsyncIterator[Lease]:
        """Wait (first come, first served) for a slot and hold it for the block.

        on_position(n) is called with the number of waiters ahead whenever it changes (0: next).
        """
        t0 = time.monotonic()
        seq, ticket_fd, ticket = self._take_ticket()
        got = None
        try:
            last = -1
            while got is None:
                ahead = self._ahead(seq)
                if ahead != last and on_position is not None:
                    res = on_position(ahead)
                    if inspect.isawaitable(res):
                        await res
                last = ahead
                if ahead < len(self._free_slots()):
                    got = self._grab(holder)
                if got is None:
                    await asyncio.sleep(self.config.poll_s)
        finally:
            ticket.unlink(missing_ok=True)
            _unlock(ticket_fd)
        fd, slot, gpu = got
        try:
            yield Lease(slot=slot, gpu=gpu, waited_s=time.monotonic() - t0, index=[s for s, _ in self.slots].index(slot),
                        gpu_uuid=uuid_of(gpu))
        finally:
            _unlock(fd)
