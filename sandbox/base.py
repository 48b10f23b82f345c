"""The backend interface: run one RunSpec to a RunOutcome; reap what dead owners left behind.

Both backends follow output_dir/progress.jsonl while the run is alive, enforce the deadline from
outside, and on cancellation kill the run, wait until it is gone, then re-raise.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from sandbox.models import Reaped, RunOutcome, RunSpec

T = TypeVar("T")
ProgressCallback = Callable[[dict], None]


def oom_kills() -> int:
    """The kernel's count of processes its OOM killer ended since boot, whichever cgroup asked
    (/proc/vmstat `oom_kill`); -1 where it is not readable. A run that died of SIGKILL while this
    count rose was killed for memory, even when its own cgroup never reached its cap (issue 19)."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def oom_since(before: int) -> bool:
    return before >= 0 and oom_kills() > before


class Backend(ABC):
    """Runs experiments. Only infrastructure problems raise; run outcomes are statuses."""

    name: str = "backend"

    @abstractmethod
    async def run(self, spec: RunSpec, on_progress: ProgressCallback | None = None) -> RunOutcome:
        """Run `spec` to completion, timeout or cancellation.

        Raises SpecError for a spec that cannot run (nothing started) and CancelledError when the
        awaiting task is cancelled (after the run is gone); everything else is a RunOutcome.
        """

    @abstractmethod
    def reap(self) -> list[Reaped]:
        """Kill and remove runs whose owner process is gone or whose deadline has passed.

        Synchronous (call it through a worker thread from async code); returns what it removed.
        """

    @abstractmethod
    def check(self) -> None:
        """Raise a SandboxError subclass saying what to fix if this backend cannot run anything."""


def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run a blocking call on a dedicated daemon thread and return an awaitable future.

    Not the loop's default executor: long blocking calls (log streams, waits) from several runs
    at once would exhaust its few threads (min(32, cores+4)) and starve the kill calls.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            ok, value = False, e
        else:
            ok = True
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # loop closed: nobody is waiting any more

    threading.Thread(target=target, name=f"sandbox-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return fut


async def finish_despite_cancel(fut: asyncio.Future[T]) -> T:
    """Await `fut` to the end even if cancelled meanwhile (cleanup must complete), then re-raise
    the cancellation if there was one."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return fut.result()
