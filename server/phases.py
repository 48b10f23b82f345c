"""The two containers of one experiment, on the run's one slot lease: train, then score (issue 18).

The train phase runs the agent's train.py and exports its model; nothing in it holds validation
tokens. The score phase runs trusted code only, on a host-made copy of that export, with the
validation split on its stdin, and answers on its stdout. The val_bpb of a sealed run comes only
from that answer. The host also times the train phase from outside (the container's start, the
harness's clock line as it arrives, the container's exit): training hidden outside the clock can
gain at most a tenth of the budget before the run is refused as `invalid`, judged against the lab's
baseline runs, never the agent's own (time_reference).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from sandbox.base import Backend
from sandbox.gpus import Lease
from sandbox.models import Limits, Mount, RunOutcome, RunSpec
from sandbox.runio import copy_output, read_output, read_tail_bytes
from trainer import contract
from trainer.config import set_top_level
from trainer.contract import ContractError, ScoreResult, TrainResult

from server import log
from server.lab import Lab, code_hash

logger = log.get("phases")

MAX_ARTIFACT_BYTES = 16e9
SCORE_TAIL_BYTES = 256 * 1024  # the answer is the scorer's last line; the log is ours (trusted code)


class Attempt(BaseModel):
    """What one experiment came to, before the keep/discard decision."""

    model_config = ConfigDict(frozen=True)

    status: str
    """ok, crash, timeout, oom, invalid, unscorable or infra-error."""
    reason: str | None = None
    val_bpb: float | None = None
    verified: bool = True
    """False when scored in train.py's own process (scoring = "in-process")."""
    train: TrainResult | None = None
    score: ScoreResult | None = None
    startup_s: float | None = None
    """Host-measured: the train container's start to the harness's clock line."""
    train_phase_s: float | None = None
    """Host-measured wall time of the train container."""
    score_phase_s: float | None = None
    log_tail: str = ""


@dataclass(frozen=True)
class TimeReference:
    """How long the lab's baseline runs took to start their clock (warm: the median of the recent ones;
    cold: the slowest, a start that compiled into an empty cache) and past their budget to exit."""

    startup_s: float
    cold_startup_s: float
    tail_s: float
    runs: int


def time_reference(lab: Lab, baseline: str, budget_s: float, recent: int = 5) -> TimeReference | None:
    """From the lab's ok runs of its baseline train.py (main's, hash `baseline`): its calibration runs
    when it has any, else any agent's. Never the agent's own changes: an agent that starts its clock a
    little later each run cannot widen its own allowance. None before the baseline has run."""
    rows = [r for r in lab.ledger.runs(status="ok", code_hash=baseline)
            if r.startup_seconds is not None and r.train_phase_seconds is not None]
    rows = [r for r in rows if r.role == "calibration"] or rows
    if not rows:
        return None
    latest = rows[:recent]
    return TimeReference(statistics.median(r.startup_seconds for r in latest),
                         max(r.startup_seconds for r in rows),
                         statistics.median(r.train_phase_seconds - r.startup_seconds - budget_s for r in latest),
                         len(latest))


def cache_files(folder: Path) -> set[str]:
    """The files of an agent's compile cache: one that gains files compiled into it (a cold start)."""
    try:
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    except OSError:
        return set()


def host_share(slots: int, index: int = 0) -> Limits:
    """Slot `index`'s share of this host: memory under what the host has (else the host's OOM
    killer, not the run's cgroup, ends a memory hog: a `crash`, not an `oom`), and with several slots
    cores of its own (a cpuset), so that one run's fork bomb or thread storm cannot take a
    neighbour's cores; a quota of cores when there are more slots than cores."""
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    memory_gb = min(Limits().memory_gb, round(0.85 * host_gb / max(slots, 1), 1))
    cores = sorted(os.sched_getaffinity(0))
    if slots <= 1:
        return Limits(memory_gb=memory_gb)
    if len(cores) < slots:
        return Limits(memory_gb=memory_gb, cpus=round(len(cores) / slots, 2))
    per = len(cores) // slots
    return Limits(memory_gb=memory_gb, cpuset=",".join(map(str, cores[index * per:(index + 1) * per])))


def gpu_mismatch(leased: str | None, seen: str | None) -> str | None:
    """Why a run that saw GPU `seen` did not run on its lease's GPU `leased` (both UUIDs), or None.
    A run that reports none (a CPU program, or a host whose driver does not list its GPUs) passes."""
    if leased is None or seen is None or leased.lower() == seen.lower():
        return None
    return (f"the run saw GPU {seen}, but its lease is GPU {leased}: the sandbox did not give it its own GPU "
            "(a host problem, not the code's)")


class Phases:
    """Builds and runs the two phases of a lab's experiments on a backend."""

    def __init__(self, lab: Lab, backend: Backend, image: str, slots: int = 1) -> None:
        self.lab, self.backend, self.image, self.slots = lab, backend, image, slots

    def limits(self, lease: Lease) -> Limits:
        limits = lease.limits or host_share(self.slots, lease.index)
        if self.lab.config.memory_gb is not None:
            limits = limits.model_copy(update={"memory_gb": self.lab.config.memory_gb})
        return limits

    # -- layout --------------------------------------------------------------------------------

    def _data(self, run_dir: Path) -> tuple[list[Mount], list[Path]]:
        """/data without the validation split (and no sub-folders: raw downloads hold validation text
        too), and the stdin stream that carries that split (a JSON header of sizes, then the files)."""
        data = self.lab.data_dir.resolve()
        mounts = [Mount(source=f, target=f"{contract.DATA}/{f.name}") for f in sorted(data.iterdir())
                  if f.is_file() and f.name not in contract.VAL_FILES]
        val = [data / name for name in contract.VAL_FILES]
        header = run_dir / "val-stream.json"
        header.write_text(json.dumps({f.name: f.stat().st_size for f in val}) + "\n")
        return mounts, [header, *val]

    def _labels(self, run_id: str, agent: str, phase: str) -> dict[str, str]:
        return {"autoresearch.agent": agent, "autoresearch.lab": str(self.lab.root),
                "autoresearch.run-id": run_id, "autoresearch.phase": phase}

    def train_spec(self, run_id: str, agent: str, snapshot: str, lease: Lease, seed: int | None = None) -> RunSpec:
        """The train container; the run's copy of program.toml carries its seed (the harness seeds
        torch and the loaders from it before train.py starts)."""
        run_dir = self.lab.run_dir(run_id)
        out = run_dir / "out"
        out.mkdir(parents=True, exist_ok=True)
        (run_dir / "train.py").write_text(snapshot, encoding="utf-8")
        (run_dir / "program.toml").write_text(set_top_level(self.lab.program_toml.read_text(encoding="utf-8"),
                                                            seed=seed), encoding="utf-8")
        program = self.lab.program()
        data_mounts, val_stream = self._data(run_dir)
        in_process = program.scoring == "in-process"
        return RunSpec(
            run_id=self.lab.sandbox_id(run_id), image=self.image,
            command=list(contract.IN_PROCESS_ARGV if in_process else contract.TRAIN_ARGV),
            mounts=[Mount(source=run_dir / "train.py", target=contract.TRAIN_PY),
                    Mount(source=run_dir / "program.toml", target=contract.PROGRAM_TOML), *data_mounts,
                    Mount(source=self.lab.cache_dir(agent), target=contract.CACHE, read_only=False)],
            stdin=val_stream if in_process else [], env=contract.base_env(), output_dir=out,
            log_path=run_dir / "log.txt", gpu=lease.gpu, limits=self.limits(lease),
            deadline_s=program.budget_s + program.grace_s + self.lab.config.startup_allowance_s,
            labels=self._labels(run_id, agent, "train"))

    def score_spec(self, run_id: str, agent: str, lease: Lease, deep_below: float | None = None) -> RunSpec:
        """The score container; its causality audit is deep when val_bpb < deep_below (trainer.audit)."""
        run_dir = self.lab.run_dir(run_id)
        data_mounts, val_stream = self._data(run_dir)
        env = {k: v for k, v in contract.base_env().items() if not v.startswith(contract.CACHE)}
        return RunSpec(
            run_id=self.lab.sandbox_id(run_id) + "-score", image=self.image,
            command=[*contract.SCORE_ARGV, *self._audit_args(deep_below)],
            mounts=[Mount(source=run_dir / "program.toml", target=contract.PROGRAM_TOML),
                    Mount(source=run_dir / "artifact", target=contract.ARTIFACT), *data_mounts],
            stdin=val_stream, env=env, output_dir=run_dir / "score-out", log_path=run_dir / "score-log.txt",
            gpu=lease.gpu, limits=self.limits(lease), deadline_s=self.lab.config.score_allowance_s,
            labels=self._labels(run_id, agent, "score"))

    def _audit_args(self, deep_below: float | None) -> list[str]:
        if deep_below is None:
            return []
        sigma = self.lab.noise().unit
        return ["--deep-below", repr(deep_below), *(["--noise-sigma", repr(sigma)] if sigma else [])]

    # -- the experiment ------------------------------------------------------------------------

    async def run(self, run_id: str, agent: str, snapshot: str, lease: Lease,
                  on_status: Callable[[str], None], on_progress: Callable[[dict[str, Any]], None],
                  seed: int | None = None, deep_below: float | None = None) -> Attempt:
        """Train, then score; the score phase audits causality deeply when val_bpb < deep_below."""
        program = self.lab.program()
        main = await self.lab.git(self.lab.history.main_commit)
        baseline = code_hash(await self.lab.git(self.lab.history.train_at, main))
        reference = time_reference(self.lab, baseline, program.budget_s)
        cached = cache_files(self.lab.cache_dir(agent))
        clock: list[float] = []

        def progress(p: dict[str, Any]) -> None:
            if p.get("phase") == "clock" and not clock:
                clock.append(time.monotonic())
            on_progress(p)

        spec = self.train_spec(run_id, agent, snapshot, lease, seed)
        logger.info("train_phase_started", run_id=run_id, gpu=lease.gpu, cores=spec.limits.cpuset,
                    deadline_s=spec.deadline_s)
        t0 = time.monotonic()
        backend = lease.runner or self.backend  # a cluster lease runs on its node
        outcome = await backend.run(spec, progress)
        timing = dict(train_phase_s=round(time.monotonic() - t0, 3),
                      startup_s=round(clock[0] - t0, 3) if clock else None)
        # a cluster node keeps the agent's cache on its own disk, out of sight: judged as a cold start
        cold = lease.runner is not None or bool(cache_files(self.lab.cache_dir(agent)) - cached)
        train, attempt = self._train_attempt(spec, outcome, timing)
        if attempt is not None:
            return attempt
        assert train is not None
        wrong = gpu_mismatch(lease.gpu_uuid, train.gpu_uuid)
        if wrong:
            return Attempt(status="infra-error", reason=wrong, train=train, log_tail=outcome.log_tail, **timing)
        refused = self._time_check(program.budget_s, timing, reference, cold)
        if refused:
            return Attempt(status="invalid", reason=refused, train=train, log_tail=outcome.log_tail, **timing)
        if program.scoring == "in-process":
            return Attempt(status="ok", val_bpb=train.val_bpb, verified=False, train=train,
                           log_tail=outcome.log_tail, **timing)
        why = copy_output(spec.output_dir / contract.MODEL_DIR, self.lab.run_dir(run_id) / "artifact",
                          contract.ARTIFACT_FILES, int(MAX_ARTIFACT_BYTES))
        if why:
            return Attempt(status="unscorable", reason=f"the train phase's export is unusable: {why}", train=train,
                           log_tail=outcome.log_tail, **timing)
        on_status("scoring: the exported model, in a separate container")
        score_spec = self.score_spec(run_id, agent, lease, deep_below)
        t1 = time.monotonic()
        scored = await backend.run(score_spec)
        timing["score_phase_s"] = round(time.monotonic() - t1, 3)
        return self._score_attempt(score_spec, scored, train, timing)

    def _train_attempt(self, spec: RunSpec, outcome: RunOutcome, timing: dict) -> tuple[TrainResult | None,
                                                                                         Attempt | None]:
        """The train phase's result, or the Attempt it already ends in."""
        raw, why = read_output(spec.output_dir, contract.RESULT_FILE)
        try:
            train = contract.parse_train_result(raw, why)
        except ContractError as e:
            train, bad = None, str(e)
        else:
            bad = None
        tail = outcome.log_tail
        if outcome.status in ("timeout", "oom", "infra-error", "cancelled"):
            return train, Attempt(status=outcome.status, reason=outcome.detail, train=train, log_tail=tail, **timing)
        if train is None:
            return None, Attempt(status="crash", reason=f"{outcome.detail}; {bad}", log_tail=tail, **timing)
        if outcome.status == "ok" and train.status == "ok":
            return train, None
        status = train.status if train.status != "ok" else "crash"
        reason = train.reason or outcome.detail
        return train, Attempt(status=status, reason=reason, train=train, log_tail=tail, **timing)

    def _time_check(self, budget_s: float, timing: dict, ref: TimeReference | None, cold: bool) -> str | None:
        """Why the run is refused for time spent outside its clock, or None. Judged against the lab's
        baseline runs (time_reference); a run that compiled into its cache (cold) against the baseline's
        cold start. Before the baseline has run: the lab's fixed allowances."""
        if timing["startup_s"] is None:
            return "the train phase never reported its clock start (the harness's 'clock' progress line)"
        config = self.lab.config
        startup, tail = timing["startup_s"], timing["train_phase_s"] - timing["startup_s"] - budget_s
        if ref is None:  # the lab's fixed allowances: the deadline's start-up share; the budget or the grace
            ref_startup, ref_tail = config.startup_allowance_s, max(budget_s, self.lab.program().grace_s)
        else:
            ref_startup, ref_tail = (ref.cold_startup_s if cold else ref.startup_s), ref.tail_s
        gain = max(0.0, startup - ref_startup) + max(0.0, tail - ref_tail)
        allowed = max(config.max_hidden_training_frac * budget_s, config.min_time_slack_s)
        if gain <= allowed:
            return None
        usual = (f"the lab's baseline train.py took {ref_startup:.1f} s ({'cold' if cold else 'warm'} start, "
                 f"{ref.runs} recent run(s)) and {ref_tail:.1f} s" if ref else "the lab's allowances")
        return (f"the train phase took {startup:.1f} s to start its clock and ended {tail:.1f} s past its "
                f"{budget_s:g}-s budget ({usual}): up to {gain:.1f} s of training outside the clock, more than "
                f"the {allowed:.1f} s allowed. Do no training before the first trainer.step() or after the last; "
                f"if this change truly starts slower (a bigger compile), make that cost smaller")

    def _score_attempt(self, spec: RunSpec, outcome: RunOutcome, train: TrainResult, timing: dict) -> Attempt:
        text = read_tail_bytes(spec.log_path, SCORE_TAIL_BYTES).decode("utf-8", errors="replace")
        try:
            score = contract.parse_score_output(text)
        except ContractError as e:
            status = outcome.status if outcome.status in ("timeout", "oom", "infra-error", "cancelled") else "crash"
            reason = f"scoring failed ({outcome.detail}): {e}"
            if outcome.status == "timeout":
                reason = f"scoring took longer than {spec.deadline_s:g} s (score_allowance_s): {outcome.detail}"
            return Attempt(status=status, reason=reason, train=train, log_tail=outcome.log_tail, **timing)
        log_tail = outcome.log_tail if score.status != "ok" else ""
        return Attempt(status=score.status, reason=score.reason, val_bpb=score.val_bpb, train=train, score=score,
                       log_tail=log_tail, **timing)
