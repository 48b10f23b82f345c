"""The lab's link to the sandbox: which backend runs experiments, which slot pool leases them, and
start-up recovery of runs a dead server left behind.
"""

from __future__ import annotations

import asyncio

from sandbox.base import Backend
from sandbox.gpus import SlotPool
from sandbox.reaper import owner_alive
from trainer.contract import ContractError, parse_train_result

from server import log
from server.experiment import measured_fields
from server.lab import Lab, write_results_row
from server.models import RunRecord

logger = log.get("runtime")


def make_runtime(lab: Lab) -> tuple[Backend, SlotPool]:
    """The sandbox backend and the host-wide slot pool for this lab's config; on a cluster lab, the
    cluster's backend and its Ray leases (each lease runs the lab's backend on its node)."""
    from sandbox import gpus  # noqa: PLC0415
    from sandbox.config import make_backend  # noqa: PLC0415

    if lab.config.cluster is not None:
        from sandbox.cluster import ClusterBackend, RayPool  # noqa: PLC0415

        backend: Backend = ClusterBackend(lab.config.cluster, lab.config.backend)
        backend.check()  # reachable, with slots: say so now, not at the first run
        return backend, RayPool(lab.config.cluster, lab.config.backend, lab.data_dir,  # type: ignore[return-value]
                                lab.root / "logs" / "data-digests.json")
    backend = make_backend(lab.config.backend)
    backend.check()  # engine, image, runtime: say what is missing now, not at the first run
    pool = gpus.SlotPool(lab.config.pool)
    return backend, pool


def image_of(lab: Lab) -> str:
    """The image RunSpecs name (the local backend ignores it)."""
    return getattr(lab.config.backend, "image", "none")


async def recover(lab: Lab, backend: Backend) -> list[str]:
    """Reap orphaned containers, then mark live rows of dead supervisors `interrupted`; returns their ids.

    A row stays untouched while the supervisor that owns it runs; a row whose owner is gone is
    finished once, here, and never recorded again.
    """
    reaped = await asyncio.to_thread(backend.reap)
    for item in reaped:
        logger.info("container_reaped", run_id=item.run_id, reason=item.reason)
    reaped_ids = {item.run_id.removesuffix("-score") for item in reaped}  # sandbox ids: see Lab.sandbox_id
    interrupted = []
    for rec in lab.ledger.live():
        if owner_alive(rec.owner_pid, rec.owner_start, host=""):  # "": this host (a zombie is gone)
            continue
        reaped_note = "; its container was reaped" if lab.sandbox_id(rec.run_id) in reaped_ids else ""
        if await finish_orphan(lab, rec, "the run's supervisor stopped during the run" + reaped_note):
            interrupted.append(rec.run_id)
    return interrupted


async def finish_orphan(lab: Lab, rec: RunRecord, note: str) -> bool:
    """Finish the live row of a dead supervisor: from its commit if it made one, else `interrupted`.
    True when it was marked interrupted here."""
    if await lab.git(_finish_from_commit, lab, rec):
        return False
    log_file = lab.root / "logs" / f"supervisor-{rec.run_id}.log"
    if log_file.exists():
        note += f" (its log: {log_file})"
    if lab.ledger.finish(rec.run_id, "interrupted", detail=note):
        logger.warning("run_interrupted", run_id=rec.run_id, agent=rec.agent)
        return True
    return False


def _finish_from_commit(lab: Lab, rec: RunRecord) -> bool:
    """A server that died after committing a run had already decided it: the commit's trailers are
    the decision. Finish the row from them and the run's result.json, complete a discard's reset,
    and write the results row, so git, ledger and results.tsv agree. False if nothing was committed.
    """
    from sandbox.runio import read_output  # noqa: PLC0415

    sha = lab.history.committed_attempt(rec.agent, rec.run_id)
    if sha is None:
        return False
    trailers = lab.history.log(sha)[0].trailers
    decision = trailers.get("Status", "crash")
    val = None if trailers.get("Val-BPB", "none") == "none" else float(trailers["Val-BPB"])
    keep = decision == "keep"
    if not keep:
        lab.history.drop_attempt(rec.agent, sha)
    try:
        train = parse_train_result(read_output(lab.run_dir(rec.run_id) / "out", "result.json")[0])
    except ContractError:
        train = None
    number = lambda key: float(trailers[key]) if key in trailers else None  # noqa: E731
    fields = measured_fields(train)
    status = "ok" if decision in ("keep", "discard") else decision
    verified = None if val is None else "Verified" not in trailers
    z, delta = number("Z"), number("Delta")
    if delta is None and val is not None:  # a commit from before the Delta trailer: against the best now
        best = lab.ledger.best(rec.agent)
        delta = val - best.val_bpb if best is not None and best.val_bpb is not None else None
    if lab.ledger.finish(rec.run_id, status, decision=decision, val_bpb=val, delta=delta, kept=keep,
                         commit=sha, verified=verified, z=z, confirm_runs=trailers.get("Confirm-Runs", "").replace(" ", "") or None,
                         detail="recorded from its commit: the supervisor stopped after committing this run", **fields):
        write_results_row(lab.results_path(rec.agent), sha, val, fields["peak_memory_mb"], decision,
                          rec.description, verified=verified is not False, seed=rec.seed, z=z)
        logger.warning("run_recovered_from_commit", run_id=rec.run_id, decision=decision, commit=sha)
    return True
