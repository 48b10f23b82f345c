"""What a run leaves on the host: the capped log, the progress lines, the result file, the
disk space its writable folders take.

The run's output folder is written by untrusted code, so everything here reads with size bounds
and tolerates garbage: a bad progress line is skipped, a bad result.json is None.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import structlog

from sandbox.models import RunOutcome, RunSpec, RunStatus

log = structlog.get_logger("sandbox")

RESULT_MAX_BYTES = 1 << 20  # result.json is a small summary; anything larger is not ours
PROGRESS_MAX_LINE = 64 * 1024
PROGRESS_MAX_READ = 1 << 20  # per poll: a run spamming progress.jsonl cannot stall the host
TAIL_CHARS = 4000


class CappedLog:
    """Stream bytes to a file keeping the first and last `cap_bytes / 2`, never more in memory.

    Bytes go straight to disk until the head is full; after that only a bounded tail is kept in
    memory and written, after an omission marker, on close.
    """

    def __init__(self, path: Path, cap_bytes: int) -> None:
        self.path = path
        self.head_cap = cap_bytes // 2
        self.tail_cap = cap_bytes - self.head_cap
        self.total = 0
        self._head_written = 0
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: never write through a symlink someone planted where the log goes
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self._f = os.fdopen(fd, "wb")
        self.closed = False
        self._lock = threading.Lock()  # a pump thread writes while the run's task may close

    def write(self, data: bytes) -> None:
        with self._lock:
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.total += len(data)
        room = self.head_cap - self._head_written
        if room > 0:
            self._f.write(data[:room])
            self._f.flush()
            self._head_written += min(room, len(data))
            data = data[room:]
        if data:
            self._tail.append(data[-self.tail_cap:])
            self._tail_len += len(self._tail[-1])
            while self._tail_len - len(self._tail[0]) >= self.tail_cap:
                self._tail_len -= len(self._tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > self.head_cap + self.tail_cap

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self.closed:
            return
        tail = b"".join(self._tail)[-self.tail_cap:]
        omitted = self.total - self._head_written - len(tail)
        if omitted > 0:
            self._f.write(f"\n[... {omitted} bytes of log omitted (cap {self.head_cap + self.tail_cap}) ...]\n"
                          .encode())
        self._f.write(tail)
        self._f.close()
        self._tail.clear()
        self.closed = True

    def tail_text(self, chars: int = TAIL_CHARS) -> str:
        """The last `chars` characters of what was written (works before and after close)."""
        if self._tail:
            data = b"".join(self._tail)[-chars * 4:]
        else:
            data = read_tail_bytes(self.path, chars * 4)
        return data.decode("utf-8", errors="replace")[-chars:]


def read_tail_bytes(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read()
    except OSError:
        return b""


def open_regular(path: Path):
    """Open a file the run wrote, for reading, only if it is a regular file.

    The run controls its output folder: a symlink there would make the host read one of its own
    files (and hand it to the agent), and a FIFO would block the reader forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


class ProgressFollower:
    """Follow output_dir/progress.jsonl and hand each parsed JSON object to a callback."""

    def __init__(self, path: Path, on_progress: Callable[[dict], None] | None, poll_s: float = 0.25) -> None:
        self.path = path
        self.on_progress = on_progress
        self.poll_s = poll_s
        self._offset = 0
        self._partial = b""
        self.lines = 0

    async def follow(self) -> None:
        """Poll until cancelled; call drain() once more after the run has exited."""
        while True:
            self.drain()
            await asyncio.sleep(self.poll_s)

    def drain(self) -> None:
        if self.on_progress is None:
            return
        f = open_regular(self.path)
        if f is None:
            return  # not written yet (or not a regular file): nothing to report
        try:
            with f:
                f.seek(self._offset)
                data = f.read(PROGRESS_MAX_READ)
        except OSError:
            return
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if len(self._partial) > PROGRESS_MAX_LINE:
            self._partial = b""
        for raw in chunks:
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        if not raw.strip() or len(raw) > PROGRESS_MAX_LINE:
            return
        try:
            item = json.loads(raw)
        except ValueError:
            return
        if not isinstance(item, dict):
            return
        self.lines += 1
        try:
            self.on_progress(item)  # type: ignore[misc]
        except Exception:  # a broken callback must not break the run
            log.exception("progress_callback_failed", path=str(self.path))


ENTRY_BYTES = 4096  # what an inode costs at least: millions of empty files are not free


def disk_usage(folders: list[Path]) -> int:
    """Bytes allocated on disk under `folders`, each inode once and at least ENTRY_BYTES; symlinks
    are not followed.

    The folders belong to the run, so entries may vanish or change type while we walk: those are
    skipped, never an error.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [str(f) for f in folders]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += max(st.st_blocks * 512, ENTRY_BYTES)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return total


class DiskWatch:
    """Kill a run once its writable folders have grown by more than `cap_gb` since it started.

    A bind mount has no quota of its own, so a run could otherwise fill the host's disk through
    /out or its cache. Checked every `poll_s` seconds and once more at exit: a burst between two
    checks can overshoot the cap by what the run writes in that time.
    """

    def __init__(self, folders: list[Path], cap_gb: float, poll_s: float = 2.0) -> None:
        self.folders, self.cap_bytes, self.poll_s = folders, int(cap_gb * 1e9), poll_s
        self.start_bytes = 0
        self.grown = 0
        self.tripped = False

    def baseline(self) -> None:
        self.start_bytes = disk_usage(self.folders)

    def over(self) -> bool:
        self.grown = disk_usage(self.folders) - self.start_bytes
        self.tripped = self.tripped or self.grown > self.cap_bytes
        return self.tripped

    async def watch(self, kill: Callable[[], object]) -> None:
        """Poll until cancelled; call `kill` (sync or async) once when over the cap."""
        while not await asyncio.to_thread(self.over):
            await asyncio.sleep(self.poll_s)
        log.warning("run_over_disk_cap", grown_bytes=self.grown, cap_bytes=self.cap_bytes)
        result = kill()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            await result

    @property
    def detail(self) -> str:
        return (f"killed by the host: the run wrote {self.grown / 1e9:.2f} GB to its writable folders "
                f"(/out and its cache), more than the {self.cap_bytes / 1e9:g} GB allowed")


STDIN_CHUNK = 1 << 20


def stream_files(paths: list[Path], write: Callable[[bytes], object]) -> None:
    """Hand the files' bytes, in order and in chunks, to `write` (a run's stdin)."""
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(STDIN_CHUNK):
                write(chunk)


def writable_folders(spec: RunSpec) -> list[Path]:
    return [spec.output_dir, *(m.source for m in spec.mounts if not m.read_only)]


def read_output(output_dir: Path, name: str, max_bytes: int = RESULT_MAX_BYTES) -> tuple[bytes | None, str]:
    """A small file the run wrote to its output folder, as bytes, or None with the reason."""
    path = output_dir / name
    if not os.path.lexists(path):
        return None, f"no {name}"
    f = open_regular(path)
    if f is None:
        return None, f"{name} is not a regular file (symlinks and pipes are refused)"
    try:
        with f:
            if os.fstat(f.fileno()).st_size > max_bytes:
                return None, f"{name} larger than {max_bytes} bytes"
            return f.read(max_bytes + 1), ""
    except OSError as e:
        return None, f"{name} unreadable: {e}"


def copy_output(source: Path, dest: Path, names: tuple[str, ...], max_bytes: int) -> str:
    """Copy regular files `names` the run wrote under `source` to a host folder `dest` it cannot
    reach, at most `max_bytes` in all; "" when done, else why not (nothing half-copied is used)."""
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in names:
        f = open_regular(source / name)
        if f is None:
            return f"{name} is missing or not a regular file"
        with f, open(dest / name, "wb") as out:
            while chunk := f.read(STDIN_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    return f"the export is larger than {max_bytes / 1e9:g} GB"
                out.write(chunk)
    return ""


def make_outcome(spec: RunSpec, runlog: CappedLog, status: RunStatus, code: int | None, wall: float,
                 detail: str) -> RunOutcome:
    """The RunOutcome of a finished run (both backends): the status, the log tail."""
    log.info("run_finished", run_id=spec.run_id, status=status, exit_code=code, wall_s=round(wall, 3))
    return RunOutcome(run_id=spec.run_id, status=status, exit_code=code, log_path=spec.log_path,
                      log_tail=runlog.tail_text(), wall_s=wall, detail=detail, log_truncated=runlog.truncated)
