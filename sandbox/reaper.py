"""Find and remove runs left behind by server processes that died (or overran their deadline).

Every container carries its owner's pid, the pid's start time (so a reused pid does not count as
alive) and host name. Runs of another host are reaped only once their deadline has passed.
Assumes owner and reaper share the host's PID namespace (servers are not themselves containerised).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

import structlog

from sandbox.base import Backend
from sandbox.hardening import Owner
from sandbox.models import Reaped

log = structlog.get_logger("sandbox")

DEADLINE_GRACE_S = 30.0  # the owner kills at the deadline; the reaper steps in only well after


def process_start(pid: int) -> str:
    """The start time of `pid` in clock ticks since boot, or "" when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return ""
    # the command name (field 2) may contain spaces and parentheses: split after the last ")"
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has finished; only its exit status remains
        return ""
    return fields[19]


def current_owner() -> Owner:
    pid = os.getpid()
    return Owner(pid=pid, start=process_start(pid), host=socket.gethostname())


def owner_alive(pid: int, start: str, host: str) -> bool | None:
    """True/False for an owner on this host; None when it lives on another host (unknowable)."""
    if host and host != socket.gethostname():
        return None
    now = process_start(pid)
    return bool(now) and (not start or now == start)


def judge(pid: int, start: str, host: str, deadline_unix: float, running: bool,
          now: float | None = None) -> str | None:
    """The reaping reason for one run, or None to leave it alone."""
    alive = owner_alive(pid, start, host)
    now = time.time() if now is None else now
    if alive is False:
        return "owner-gone" if running else "finished-unclaimed"
    if now > deadline_unix + DEADLINE_GRACE_S:
        return "deadline-passed"
    return None


async def reap_periodically(backend: Backend, interval_s: float = 60.0,
                            on_reaped: Callable[[Reaped], None] | None = None) -> None:
    """Reap now and every `interval_s` until cancelled; failures are logged, never raised."""
    while True:
        try:
            for item in await asyncio.to_thread(backend.reap):
                log.warning("run_reaped", run_id=item.run_id, reason=item.reason, detail=item.detail)
                if on_reaped is not None:
                    on_reaped(item)
        except Exception:
            log.exception("reap_failed", backend=backend.name)
        await asyncio.sleep(interval_s)
