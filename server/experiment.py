"""One experiment, end to end: ledger row → slot lease → train and score phases → decide → commit → record.

Run by the run's supervisor (server.supervisor), never by an MCP server. The ledger row is written
`queued` before anything else happens; whatever ends the run (result, crash, a cancel, sandbox
failure) finishes that row exactly once. Outcomes are statuses;
only a broken lab raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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
from server.lab import Lab, check_agent, code_hash, write_results_row
from server.models import CALIBRATION_AGENT, COMMITTED, ExperimentResult, RunRecord, RunRole
from server.noise import Judgement, decide
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
    watcher: Pending | None = None
    """A confirm rerun's candidate: it shows the rerun's progress as its own."""
    label: str = ""

    def show(self, line: str) -> None:
        self.status_line = line
        if self.watcher is not None:
            self.watcher.show(f"{self.label}: {line}")


@dataclass(frozen=True)
class Decided:
    """What the keep rule made of a finished run, before it is recorded."""

    decision: str | None
    judgement: Judgement | None = None
    seeds: dict[int, float] = field(default_factory=dict)
    """The candidate's val_bpb at each seed it was measured at (when confirm reruns decided it)."""
    confirm_runs: tuple[str, ...] = ()
    note: str | None = None

    @property
    def keep(self) -> bool:
        return self.decision == "keep"


class Experiments:
    """Runs experiments of a lab on a sandbox backend, one slot lease per run."""

    def __init__(self, lab: Lab, backend: Backend, pool: SlotPool, image: str) -> None:
        self.lab = lab
        self.backend = backend
        self.pool = pool
        self.phases = Phases(lab, backend, image, slots=len(pool.slots))
        self.cancel_detail: str | None = None  # set by the supervisor when asked to cancel: the row's detail

    # -- the two halves of a run -----------------------------------------------------------------

    async def begin(self, agent: str, description: str, role: RunRole = "experiment",
                    seed: int | None = None) -> Pending:
        """Take the agent's lock, write the ledger row (`queued`) and snapshot train.py. A calibration
        run (role `calibration`, the lab's own agent) runs the baseline on `main` and takes no lock."""
        description = check_description(description)
        self._check_ready()
        seed = self.lab.program().seed if seed is None else seed
        stack = contextlib.ExitStack()
        try:
            if role == "calibration":
                agent = CALIBRATION_AGENT
                self.lab.cache_dir(agent).mkdir(parents=True, exist_ok=True)
                head = await self.lab.git(self.lab.history.main_commit)
                snapshot = await self.lab.git(self.lab.history.train_at, head)
            else:
                check_agent(agent)
                await self.lab.ensure_agent(agent)
                stack.enter_context(self.lab.agent_lock(agent))
                head = await self.lab.git(self.lab.history.head, agent)
                snapshot = await self.lab.git(self.lab.history.read_train, agent)
            record = self.lab.ledger.create_run(agent, description, head, seed=seed, code_hash=code_hash(snapshot),
                                                role=role)
        except BaseException:
            stack.close()
            raise
        pending = Pending(record, snapshot, stack)
        logger.info("run_queued", run_id=record.run_id, agent=agent, description=description, seed=seed, role=role)
        return pending

    def _check_ready(self) -> None:
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
                await asyncio.to_thread(self.lab.bound_cache, pending.record.agent)
                outcome = await self._run_in_sandbox(pending)
                decided = await self._decide(pending, outcome)  # confirm reruns: cancellable like the run
            except asyncio.CancelledError:
                self.lab.ledger.finish(run_id, "cancelled", detail=self.cancel_detail or "cancelled by the client")
                logger.info("run_cancelled", run_id=run_id)
                raise
            except Exception as e:
                logger.exception("run_infra_error", run_id=run_id)
                self.lab.ledger.finish(run_id, "infra-error", detail=f"{type(e).__name__}: {e}")
                raise
            # The run is over: a cancellation now must not leave a half-recorded run behind.
            pending.show(f"finishing: recording the {outcome.status} result")
            return await finish_despite_cancel(asyncio.ensure_future(self._record_or_fail(pending, outcome, decided)))
        finally:
            try:  # recorded (or given up): its folder keeps only what the books read
                freed = self.lab.trim_run(run_id)
                if freed > 2**30:
                    logger.info("run_folder_trimmed", run_id=run_id, gb=round(freed / 2**30, 2))
            except OSError:
                logger.exception("run_folder_trim_failed", run_id=run_id)
            pending.lock.close()

    async def _record_or_fail(self, pending: Pending, outcome: Attempt, decided: Decided) -> ExperimentResult:
        try:
            return await self._record(pending, outcome, decided)
        except Exception as e:
            logger.exception("record_failed", run_id=pending.record.run_id)
            self.lab.ledger.finish(pending.record.run_id, "infra-error",
                                   detail=f"recording the {outcome.status} result failed: {type(e).__name__}: {e}")
            raise

    # -- inside ----------------------------------------------------------------------------------

    async def _run_in_sandbox(self, pending: Pending) -> Attempt:
        run_id = pending.record.run_id

        def on_position(ahead: int) -> None:
            pending.show("queued: waiting for a run slot: " + (
                "every slot is busy and this run is next" if ahead == 0 else f"{ahead} run(s) ahead of this one"))

        def on_progress(p: dict[str, Any]) -> None:
            pending.show("running: " + progress_line(p))

        async with self.pool.acquire(on_position=on_position, holder=run_id) as lease:
            self.lab.ledger.mark_running(run_id, lease.gpu, lease.slot)
            pending.show("running: starting the sandbox")
            return await self.phases.run(run_id, pending.record.agent, pending.snapshot, lease, pending.show,
                                         on_progress, seed=pending.record.seed, deep_below=self._deep_below(pending))

    def _deep_below(self, pending: Pending) -> float | None:
        """Below what val_bpb the run could be kept, so its causality audit goes deep: its agent's best
        (any score when it has none); every confirm rerun; never a calibration run (main's baseline)."""
        rec = pending.record
        if rec.role == "calibration":
            return None
        best = self.lab.ledger.best(rec.agent) if rec.role == "experiment" else None
        return best.val_bpb if best is not None and best.val_bpb is not None else math.inf

    # -- decide, commit, record ----------------------------------------------------------------

    async def _decide(self, pending: Pending, attempt: Attempt) -> Decided:
        """The keep rule (server.noise) on a finished run; runs its confirm reruns when it asks for them."""
        rec = pending.record
        status, val, _ = outcome_of(attempt)
        if rec.role != "experiment":
            return Decided(None)
        earlier = self.lab.ledger.scores(rec.agent, rec.code_hash, exclude=rec.run_id)
        if rec.seed in earlier:
            first = earlier[rec.seed]
            return Decided("rerun" if status == "ok" else None, note=(
                f"a rerun: the same train.py at the same seed ({rec.seed}) as {first.run_id} (val_bpb "
                f"{first.val_bpb:.6f}); recorded, never kept or committed. Change the code to try something new"))
        if status != "ok" or val is None:
            return Decided(status if status in COMMITTED else None)
        noise = self.lab.noise()
        best = self.lab.ledger.best(rec.agent)
        best_scores = self._scores_of(best) if best is not None and best.val_bpb is not None else {}
        confirms: list[str] = []
        best_code: list[str] = []
        program_seed = self.lab.program().seed
        fresh = list(range(program_seed + 1, program_seed + 2 + noise.confirm_reruns))

        async def rerun_candidate(seed: int) -> float | None:
            return await self._confirm(pending, pending.snapshot, seed, rec.run_id, confirms,
                                       f"confirm rerun at seed {seed}")

        async def rerun_best(seed: int) -> float | None:
            assert best is not None and best.commit is not None
            if not best_code:
                best_code.append(await self.lab.git(self.lab.history.train_at, best.commit))
            return await self._confirm(pending, best_code[0], seed, best.run_id, confirms,
                                       f"the best's ({best.run_id}) rerun at seed {seed}")

        verdict, seeds = await decide(val, rec.seed, best_scores, noise, fresh, rerun_candidate, rerun_best)
        return Decided(verdict.verdict, verdict, seeds=seeds, confirm_runs=tuple(confirms))

    def _scores_of(self, rec: RunRecord) -> dict[int, float]:
        """A run's val_bpb by seed: its own, and every scored run of its train.py (its confirm reruns)."""
        scores = {s: r.val_bpb for s, r in self.lab.ledger.scores(rec.agent, rec.code_hash).items()
                  if r.val_bpb is not None}
        if rec.val_bpb is not None:
            scores.setdefault(rec.seed if rec.seed is not None else self.lab.program().seed, rec.val_bpb)
        return scores

    async def _confirm(self, candidate: Pending, code: str, seed: int, parent: str, made: list[str],
                       label: str) -> float | None:
        """One confirm rerun, recorded as a run of its own (role confirm, its parent named, its id added
        to `made`); its val_bpb when it scored. The candidate's row stays `running` meanwhile and
        shows the rerun's progress."""
        rec = candidate.record
        child = self.lab.ledger.create_run(rec.agent, f"confirm rerun of {parent} at seed {seed}", rec.base_commit,
                                           seed=seed, code_hash=code_hash(code), role="confirm", parent=parent)
        made.append(child.run_id)
        logger.info("confirm_rerun", run_id=child.run_id, parent=parent, seed=seed, candidate=rec.run_id)
        try:
            result = await self.execute(Pending(child, code, contextlib.ExitStack(), watcher=candidate,
                                                label=f"{label} ({child.run_id})"))
        except Exception:  # noqa: BLE001 — recorded as infra-error by execute; the decision goes on without it
            return None
        return result.val_bpb if result.status == "ok" else None

    async def _record(self, pending: Pending, attempt: Attempt, decided: Decided) -> ExperimentResult:
        rec = pending.record
        status, val, reason = outcome_of(attempt)
        j, decision, keep = decided.judgement, decided.decision, decided.keep
        commit = None
        if decision is not None and decision != "rerun":
            trailers = {"Run-Id": rec.run_id, "Val-BPB": f"{val:.6f}" if val is not None else "none", "Status": decision,
                        "Seed": str(rec.seed)}
            if j is not None and j.delta is not None:
                trailers["Delta"] = f"{j.delta:.6f}"
            if j is not None and j.z is not None:
                trailers["Z"] = f"{j.z:.2f}"
            if decided.confirm_runs:
                trailers["Confirm-Runs"] = ", ".join(decided.confirm_runs)
            if status == "ok" and not attempt.verified:
                trailers["Verified"] = "no (scored in train.py's own process)"
            commit = await self.lab.git(self.lab.history.commit_attempt, rec.agent, rec.run_id, pending.snapshot,
                                        rec.description, trailers, keep)
        elif decision == "rerun":  # as a discard would: train.py returns to the best
            await self.lab.git(self.lab.history.restore_train, rec.agent, rec.base_commit)
        mean = None
        if len(decided.seeds) > 1:
            mean = round(sum(decided.seeds.values()) / len(decided.seeds), 6)
        fields = dict(decision=decision, val_bpb=val, delta=j.delta if j else None, kept=keep, commit=commit,
                      detail=reason or decided.note, verified=attempt.verified if val is not None else None,
                      startup_seconds=attempt.startup_s, train_phase_seconds=attempt.train_phase_s,
                      score_phase_seconds=attempt.score_phase_s, sigma=j.sigma if j else None, z=j.z if j else None,
                      significant=j.significant if j else None, mean_val_bpb=mean,
                      seeds_in_mean=len(decided.seeds) if mean is not None else None,
                      confirm_runs=",".join(decided.confirm_runs) or None, **measured_fields(attempt.train))
        fields["total_seconds"] = fields["total_seconds"] or attempt.train_phase_s
        if not self.lab.ledger.finish(rec.run_id, status, **fields):
            logger.warning("run_already_final", run_id=rec.run_id)
        if commit is not None:
            write_results_row(self.lab.results_path(rec.agent), commit, val, fields["peak_memory_mb"], decision,
                              rec.description, verified=attempt.verified, seed=rec.seed, z=fields["z"])
        logger.info("run_recorded", run_id=rec.run_id, status=status, val_bpb=val, kept=keep, commit=commit,
                    decision=decision, z=fields["z"])
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


def outcome_of(attempt: Attempt) -> tuple[str, float | None, str | None]:
    """(status, val_bpb, reason) of an attempt; an ok run without a val_bpb is a crash."""
    if attempt.status == "ok" and attempt.val_bpb is None:
        return "crash", None, "the run ended ok but without a val_bpb"
    return attempt.status, attempt.val_bpb if attempt.status == "ok" else None, attempt.reason


def to_result(rec: RunRecord, log_tail: str | None = None) -> ExperimentResult:
    return ExperimentResult(
        run_id=rec.run_id, status=rec.status, description=rec.description, val_bpb=rec.val_bpb, delta=rec.delta,
        kept=rec.kept, decision=rec.decision, commit=rec.commit, training_seconds=rec.training_seconds,
        total_seconds=rec.total_seconds, verified=rec.verified, score_seconds=rec.score_phase_seconds,
        peak_memory_mb=rec.peak_memory_mb, num_steps=rec.num_steps, epochs=rec.epochs,
        reason=rec.detail if rec.status != "ok" or rec.decision == "rerun" else None, log_tail=log_tail,
        seed=rec.seed, sigma=rec.sigma, z=rec.z, significant=rec.significant, mean_val_bpb=rec.mean_val_bpb,
        seeds_in_mean=rec.seeds_in_mean, confirm_runs=rec.confirm_runs.split(",") if rec.confirm_runs else [],
        role=rec.role, parent=rec.parent,
    )


def measured_fields(train: TrainResult | None) -> dict:
    """The ledger's measurement columns from the train phase's result (None: all unknown)."""
    if train is None:
        return dict(training_seconds=None, total_seconds=None, peak_memory_mb=None, num_steps=None, epochs=None)
    return dict(training_seconds=train.training_seconds, total_seconds=train.total_seconds,
                peak_memory_mb=train.peak_memory_mb, num_steps=train.num_steps, epochs=train.epochs)
