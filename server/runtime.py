"""The lab's link to the sandbox: which backend runs experiments, which slot pool leases them, and
start-up recovery of runs a dead server left behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server import log
from server.lab import Lab
from server.ledger import owner_alive

logger = log.get("runtime")


def make_runtime(lab: Lab) -> tuple[Any, Any]:
    """The sandbox backend and the host-wide slot pool for this lab's config."""
    from sandbox import gpus  # noqa: PLC0415
    from sandbox.config import make_backend  # noqa: PLC0415

    backend = make_backend(lab.config.backend)
    backend.check()  # engine, image, runtime: say what is missing now, not at the first run
    pool = gpus.SlotPool(lab.config.pool)
    return backend, pool


def image_of(lab: Lab) -> str:
    """The image RunSpecs name (the local backend ignores it)."""
    return getattr(lab.config.backend, "image", "none")


async def recover(lab: Lab, backend: Any) -> list[str]:
    """Reap orphaned containers, then mark live rows of dead servers `interrupted`; returns their ids.

    A row stays untouched while the server that wrote it runs (another agent's process); a row whose
    owner is gone is finished once, here, and never recorded again.
    """
    reaped = await asyncio.to_thread(backend.reap)
    for item in reaped:
        logger.info("container_reaped", run_id=getattr(item, "run_id", item), reason=getattr(item, "reason", None))
    reaped_ids = {getattr(item, "run_id", None) for item in reaped}  # sandbox ids: see Lab.sandbox_id
    interrupted = []
    for rec in lab.ledger.live():
        if owner_alive(rec.owner_pid, rec.owner_start):
            continue
        reaped_note = "; its container was reaped" if lab.sandbox_id(rec.run_id) in reaped_ids else ""
        note = "the server stopped during the run" + reaped_note
        if lab.ledger.finish(rec.run_id, "interrupted", detail=note):
            interrupted.append(rec.run_id)
            logger.warning("run_interrupted", run_id=rec.run_id, agent=rec.agent)
    return interrupted
