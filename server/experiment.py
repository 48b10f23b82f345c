"""One experiment, end to end: ledger row → slot lease → train and score phases → decide → commit → record.

Run by the run's supervisor (server.supervisor), never by an MCP server. The ledger row is written
`queued` before anything else happens; whatever ends the run (result, crash, a cancel, sandbox
failure) finishes that row exactly once. Outcomes are statuses;
only a broken lab raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from sandbox.base import Backend, finish_despite_cancel
from sandbox.gpus import SlotPool
from trainer.contract import TrainResult

from server import log
from server.errors import InvalidArgumentError, LabStateError
from server.lab import Lab, check_agent, write_results_row
from server.models import COMMITTED, ExperimentResult, RunRecord
from server.phases import Attempt, Phases
from server.text import TAIL_CHARS, printable

MAX_DESCRIPTION = 500

logger = log.get("experiment")


def check_description(description: str) -> str:
    if not isinstance(description, str) or not description.strip():
        raise InvalidArgumentError("description is empty; say in a few words what this experiment changes")
    clean = printable(description, MAX_DESCRIPTION)
    if len(description) > MAX_DESCRIPTION or clean != description.replace("\r\n", "\n"):
        raise InvalidArgumentError(f"description must be at most {MAX_DESCRIPTION} characters of printable text "
                                   "(no control characters or invalid Unicode)")
    return " ".join(description.split())


def progress_line(p: dict[str, Any]) -> str:
    """A progress.jsonl record as one line an agent can read."""
    parts = [f"phase {p.get('phase', '?')}"]
    for key, fmt in (("step", "step {}"), ("loss", "loss {:.4f}"), ("tokens_per_s", "{:.0f} tok/s"),
                     ("remaining_s", "{:.0f} s left")):
        value = p.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(fmt.format(value))
    return ", ".join(parts)


@dataclass
class Pending:
    """A run whose ledger row exists; holds the agent's lock until the run is recorded."""

    record: RunRecord
    snapshot: str
    lock: contextlib.ExitStack
    status_line: str = "queued"
    started: float = field(default_factory=time.monotonic)


class Experiments:
    """Runs experiments of a lab on a sandbox backend, one slot lease per run."""

    def __init__(self, lab: Lab, backend: Backend, pool: SlotPool, image: str) -> None:
        self.lab = lab
        self.backend = backend
        self.pool = pool
        self.phases = Phases(lab, backend, image, slots=len(pool.slots))
        self.cancel_detail: str | None = None  # set by the supervisor when asked to cancel: the row's detail

    # -- the two halves of a run -----------------------------------------------------------------

    async def begin(self, agent: str, description: str) -> Pending:
        """Take the agent's lock, write the ledger row (`queued`) and snapshot train.py."""
        check_agent(agent)
        description = check_description(description)
        if not (self.lab.data_dir / "meta.json").is_file():
            raise LabStateError(
                f"no prepared data in {self.lab.data_dir}; the lab's owner must run "
                f"`autoresearch-mcp prepare {self.lab.config.program} --lab {self.lab.root}`"
            )
        free_mb = shutil.disk_usage(self.lab.root).free / 2**20
        if free_mb < self.lab.config.min_free_mb:
            raise LabStateError(f"the lab's disk is nearly full ({free_mb:.0f} MB free under {self.lab.root}, "
                                f"{self.lab.config.min_free_mb} MB needed to record a run); free space there, then "
                                "start the run again")
        await self.lab.ensure_agent(agent)
        stack = contextlib.ExitStack()
        stack.enter_context(self.lab.agent_lock(agent))
        try:
            head = await self.lab.git(self.lab.history.head, agent)
            snapshot = await self.lab.git(self.lab.history.read_train, agent)
            record = self.lab.ledger.create_run(agent, description, head)
        except BaseException:
            stack.close()
            raise
        pending = Pending(record, snapshot, stack)
        logger.info("run_queued", run_id=record.run_id, agent=agent, description=description)
        return pending

    async def execute(self, pending: Pending) -> ExperimentResult:
        """Run a begun experiment to its recorded end; cancellation records `cancelled` and re-raises.

        Releases the agent's lock however it ends.
        """
        with structlog.contextvars.bound_contextvars(run_id=pending.record.run_id, agent=pending.record.agent):
            return await self._execute(pending)

    async def _execute(self, pending: Pending) -> ExperimentResult:
        run_id = pending.record.run_id
        try:
            try:
                outcome = await self._run_in_sandbox(pending)
            except asyncio.CancelledError:
                self.lab.ledger.finish(run_id, "cancelled", detail=self.cancel_detail or "cancelled by the client")
                logger.info("run_cancelled", run_id=run_id)
                raise
            except Exception as e:
                logger.exception("run_infra_error", run_id=run_id)
                self.lab.ledger.finish(run_id, "infra-error", detail=f"{type(e).__name__}: {e}")
                raise
            # The run is over: a cancellation now must not leave a half-recorded run behind.
            pending.status_line = f"finishing: recording the {outcome.status} result"
            return await finish_despite_cancel(asyncio.ensure_future(self._record_or_fail(pending, outcome)))
        finally:
            pending.lock.close()

    async def _record_or_fail(self, pending: Pending, outcome: Attempt) -> ExperimentResult:
        try:
            return await self._record(pending, outcome)
        except Exception as e:
            logger.exception("record_failed", run_id=pending.record.run_id)
            self.lab.ledger.finish(pending.record.run_id, "infra-error",
                                   detail=f"recording the {outcome.status} result failed: {type(e).__name__}: {e}")
            raise

    # -- inside ----------------------------------------------------------------------------------

    async def _run_in_sandbox(self, pending: Pending) -> Attempt:
        run_id = pending.record.run_id

        def on_position(ahead: int) -> None:
            pending.status_line = f"queued: waiting for a run slot, {ahead} run(s) ahead"

        def on_status(line: str) -> None:
            pending.status_line = line

        def on_progress(p: dict[str, Any]) -> None:
            pending.status_line = "running: " + progress_line(p)

        async with self.pool.acquire(on_position=on_position, holder=run_id) as lease:
            self.lab.ledger.mark_running(run_id, lease.gpu)
            pending.status_line = "running: starting the sandbox"
            return await self.phases.run(run_id, pending.record.agent, pending.snapshot, lease, on_status, on_progress)

    # -- decide, commit, record ----------------------------------------------------------------

    async def _record(self, pending: Pending, attempt: Attempt) -> ExperimentResult:
        rec = pending.record
        status, val = attempt.status, attempt.val_bpb if attempt.status == "ok" else None
        reason = attempt.reason
        if status == "ok" and val is None:
            status, reason = "crash", "the run ended ok but without a val_bpb"
        delta, keep = self.lab.ledger.judge(rec.agent, val)
        decision = ("keep" if keep else "discard") if status == "ok" else status if status in COMMITTED else None
        commit = None
        if decision is not None:
            trailers = {"Run-Id": rec.run_id, "Val-BPB": f"{val:.6f}" if val is not None else "none", "Status": decision}
            if status == "ok" and not attempt.verified:
                trailers["Verified"] = "no (scored in train.py's process)"
            commit = await self.lab.git(self.lab.history.commit_attempt, rec.agent, rec.run_id, pending.snapshot,
                                        rec.description, trailers, keep)
        fields = dict(decision=decision, val_bpb=val, delta=delta, kept=keep, commit=commit, detail=reason,
                      verified=attempt.verified if val is not None else None, startup_seconds=attempt.startup_s,
                      train_phase_seconds=attempt.train_phase_s, score_phase_seconds=attempt.score_phase_s,
                      **measured_fields(attempt.train))
        fields["total_seconds"] = fields["total_seconds"] or attempt.train_phase_s
        if not self.lab.ledger.finish(rec.run_id, status, **fields):
            logger.warning("run_already_final", run_id=rec.run_id)
        if commit is not None:
            write_results_row(self.lab.results_path(rec.agent), commit, val, fields["peak_memory_mb"], decision,
                              rec.description, verified=attempt.verified)
        logger.info("run_recorded", run_id=rec.run_id, status=status, val_bpb=val, kept=keep, commit=commit)
        return to_result(self.lab.ledger.get(rec.run_id), self._tail(rec.run_id, attempt, status))

    def _tail(self, run_id: str, attempt: Attempt, status: str) -> str | None:
        """The end of the log of the phase that decided the run, and the train phase's traceback."""
        if status == "ok":
            return None
        scored = attempt.score_phase_s is not None
        path = self.lab.run_dir(run_id) / ("score-log.txt" if scored else "log.txt")
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else attempt.log_tail
        tail = "\n".join(text.splitlines()[-self.lab.config.log_tail_lines:])
        tb = None if scored or attempt.train is None else attempt.train.traceback_tail
        if tb and tb.strip() and tb.strip() not in tail:
            tail = f"{tail}\n--- traceback ---\n{tb}"
        return printable(tail, TAIL_CHARS)


def to_result(rec: RunRecord, log_tail: str | None = None) -> ExperimentResult:
    return ExperimentResult(
        run_id=rec.run_id, status=rec.status, description=rec.description, val_bpb=rec.val_bpb, delta=rec.delta,
        kept=rec.kept, decision=rec.decision, commit=rec.commit, training_seconds=rec.training_seconds,
        total_seconds=rec.total_seconds, verified=rec.verified, score_seconds=rec.score_phase_seconds,
        peak_memory_mb=rec.peak_memory_mb, num_steps=rec.num_steps, epochs=rec.epochs,
        reason=rec.detail if rec.status != "ok" else None, log_tail=log_tail,
    )


def measured_fields(train: TrainResult | None) -> dict:
    """The ledger's measurement columns from the train phase's result (None: all unknown)."""
    if train is None:
        return dict(training_seconds=None, total_seconds=None, peak_memory_mb=None, num_steps=None, epochs=None)
    return dict(training_seconds=train.training_seconds, total_seconds=train.total_seconds,
                peak_memory_mb=train.peak_memory_mb, num_steps=train.num_steps, epochs=train.epochs)
