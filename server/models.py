"""Typed shapes of the server: the lab config, ledger rows, and every tool's input and output.

Tool outputs are pydantic models so MCP clients get a JSON schema with each result; field
descriptions are part of the agent's manual.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sandbox.config import BackendConfig, DockerBackendConfig
from sandbox.cluster import ClusterConfig
from sandbox.gpus import PoolConfig

AGENT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
"""Agent names become git branch names and file names: keep them boring."""

RunStatus = Literal["queued", "running", "ok", "crash", "timeout", "oom", "invalid", "unscorable", "cancelled",
                    "infra-error", "interrupted"]
"""ok, crash, timeout, oom: as the seed; invalid: refused by the scorer (not causal, a forbidden op or
file in the export) or for training outside the clock; unscorable: the model could not be exported
or uses an op the scorer does not know; cancelled; infra-error: the sandbox failed; interrupted:
the run's supervisor died."""
LIVE_STATUSES = ("queued", "running")
RUN_STATUSES = tuple(s for s in RunStatus.__args__ if s not in LIVE_STATUSES)  # type: ignore[attr-defined]
Decision = Literal["keep", "discard", "crash", "timeout", "oom", "invalid", "unscorable", "rerun"]
"""What was done with the commit; the seed's results.tsv `status` column. rerun: the same train.py
at the same seed as an earlier scored run of the agent: recorded, never committed, never kept."""
COMMITTED = frozenset(Decision.__args__) - {"keep", "discard", "rerun"}  # type: ignore[attr-defined]
"""Statuses other than ok whose train.py is committed to an attempt ref (the agent's code did it)."""
RunRole = Literal["experiment", "confirm", "calibration"]
"""experiment: an agent's run; confirm: a rerun at a fresh seed that the keep rule asked for (its
parent: the run it measures again); calibration: a run of the baseline by `autoresearch-mcp calibrate`."""
CALIBRATION_AGENT = "calibration"
"""The lab's own runs (calibrate) are recorded under this name; no agent may take it."""


class LabConfig(BaseModel):
    """Everything that fixes how one lab behaves. Written to `<lab>/lab.json` when the lab is made."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    program: str
    """Name of the program folder (under programs/) the lab was made from."""
    data_dir: Path | None = None
    """Prepared data folder for the program; None means `<lab>/data`."""
    backend: BackendConfig = Field(default_factory=DockerBackendConfig)
    """The sandbox backend (`type`: docker, the isolated default, or local: a bare subprocess, for
    development only); the docker config names the image."""
    pool: PoolConfig = Field(default_factory=PoolConfig)
    """The host-wide run slots (one per GPU, or CPU slots): every server on the host must share its
    state_dir so that leases stay exclusive."""
    cluster: ClusterConfig | None = None
    """A Ray cluster to run on instead of this host's slot pool (sandbox.cluster): `backend` is then
    what runs on each node, and Ray's resources are the leases."""
    memory_gb: float | None = Field(default=None, gt=0)
    """Each run's memory cap in GB (RAM, no swap); None: the run's share of this host (85 % of its
    memory over the slots)."""
    startup_allowance_s: float = 180.0
    """Seconds on top of the program's budget_s and grace_s for start-up, compile and export; the sum
    is the train phase's hard deadline, which the host enforces."""
    score_allowance_s: float = 600.0
    """The score phase's hard deadline (load, evaluation, causality audit)."""
    max_hidden_training_frac: float = 0.1
    """A run whose train phase starts its clock later, or ends later after its budget, than the lab's
    baseline runs (main's train.py: calibration runs first) by more than this fraction of the budget is
    refused as invalid."""
    min_time_slack_s: float = 5.0
    """...but never by less than this many seconds (container start-up jitters)."""
    agent_cache_gb: float = Field(default=20.0, gt=0)
    """An agent's compile cache (written by its runs) is emptied before its next run once it holds more
    than this; with a run's writable folders capped at limits.disk_gb while it runs and trimmed once it
    is recorded, this bounds each agent's share of the lab's disk."""
    min_free_mb: int = Field(default=100, ge=0)
    """A run is refused while the lab's disk has less free space than this: its record, commit and
    logs need room, and a run that cannot be recorded is lost."""
    keep_z: float = Field(default=2.0, gt=0)
    """A run is kept when it beats the agent's best by more than this many standard errors of the
    difference, σ being the lab's spread over seeds (server.noise)."""
    confirm_reruns: int = Field(default=1, ge=0, le=5)
    """Fresh seeds a result that beats the best inside the noise band is rerun at before it is decided
    (0: such a result is discarded at once)."""
    max_patch_bytes: int = 100_000
    """Largest diff apply_patch accepts."""
    max_train_bytes: int = 400_000
    """Largest train.py a patch may produce."""
    log_tail_lines: int = 60
    """Lines of the run log returned with a crash or timeout."""
    progress_interval_s: float = 10.0
    """Longest gap between two progress notifications during a run."""


class RunRecord(BaseModel):
    """One row of the ledger: one experiment of one agent."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    agent: str
    seq: int
    description: str
    status: RunStatus
    decision: Decision | None = None
    val_bpb: float | None = None
    delta: float | None = None
    kept: bool = False
    commit: str | None = None
    base_commit: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    training_seconds: float | None = None
    total_seconds: float | None = None
    peak_memory_mb: float | None = None
    num_steps: int | None = None
    epochs: float | None = None
    gpu: str | None = None
    slot: str | None = None
    """The slot its lease held: cpu-0, gpu-1, or on a cluster its node's name and slot (worker-1/slot)."""
    detail: str | None = None
    owner_pid: int
    owner_start: str
    verified: bool | None = None
    """True: scored sealed; False: scored in train.py's process (in-process programs); None: not scored."""
    startup_seconds: float | None = None
    """Host-measured: the train container's start to the harness's clock line."""
    train_phase_seconds: float | None = None
    score_phase_seconds: float | None = None
    seed: int | None = None
    """The seed the harness gave the run (None: rows from before seeds were recorded)."""
    code_hash: str | None = None
    """sha256 of the train.py the run ran."""
    role: RunRole = "experiment"
    parent: str | None = None
    """A confirm rerun's run: the candidate or best it measured again."""
    sigma: float | None = None
    z: float | None = None
    significant: bool | None = None
    mean_val_bpb: float | None = None
    """The candidate's mean over its seeds when confirm reruns decided it."""
    seeds_in_mean: int | None = None
    confirm_runs: str | None = None
    """Comma-separated run ids of the confirm reruns this run's decision waited for."""


class CalibrationRun(BaseModel):
    run_id: str
    seed: int
    val_bpb: float


class Calibration(BaseModel):
    """The lab's measured noise: the baseline's val_bpb at several seeds (autoresearch-mcp calibrate)."""

    sigma: float = Field(description="Standard deviation of val_bpb over the seeds.")
    commit: str = Field(description="The baseline commit that was run.")
    created_at: float
    runs: list[CalibrationRun]


class NoiseInfo(BaseModel):
    """How big a change must be to be kept."""

    sigma: float | None = Field(description="The lab's spread of val_bpb over seeds; null until calibrated.")
    margin: float = Field(description="How much lower than your best a single run's val_bpb must be to be kept "
                          "outright (0: any improvement).")
    rule: str = Field(description="The keep rule in one sentence.")
    calibration_runs: list[CalibrationRun] = Field(default_factory=list, description="The runs σ rests on.")


# ---------------------------------------------------------------------------------------------
# Tool outputs


class ProgramText(BaseModel):
    """The research program: the human's instructions to the agent."""

    program: str = Field(description="Program name, e.g. tiny-stdlib.")
    text: str = Field(description="program.md, verbatim.")
    budget_s: float = Field(description="Training budget of every experiment, in seconds of wall clock.")
    noise: NoiseInfo


class TrainFile(BaseModel):
    """The agent's current train.py."""

    agent: str
    text: str = Field(description="train.py as it stands in the agent's worktree.")
    line_count: int
    base_commit: str = Field(description="Commit the agent's branch points at (its best so far).")
    modified: bool = Field(description="True when train.py differs from base_commit (patches not yet run).")


class PatchResult(BaseModel):
    """A patch that was applied to train.py."""

    line_count: int = Field(description="Lines in train.py after the patch.")
    lines_added: int
    lines_removed: int
    diffstat: str = Field(description="git's --stat summary of the change against base_commit.")


class ExperimentResult(BaseModel):
    """The outcome of one experiment. val_bpb: validation bits per byte, lower is better."""

    run_id: str
    status: RunStatus = Field(
        description="ok | crash | timeout | oom | invalid | unscorable | cancelled | infra-error | interrupted "
        "(| queued | running from get_experiment while in flight). invalid: refused (not causal, training "
        "outside the clock, a forbidden op); unscorable: the submitted model could not be exported or scored."
    )
    description: str
    val_bpb: float | None = Field(description="Validation bits per byte (lower is better); null unless ok.")
    verified: bool | None = Field(default=None, description="True: scored sealed, by trusted code on the exported "
                                  "model; false: scored in train.py's own process (unverified).")
    delta: float | None = Field(
        description="val_bpb minus the agent's best before this run (negative = better); null for the baseline."
    )
    kept: bool = Field(description="True when the change was committed to the agent's branch as its new best.")
    decision: Decision | None = Field(description="keep | discard | crash | timeout | oom | invalid | unscorable | "
                                      "rerun (the same train.py and seed as an earlier run: never kept); null when "
                                      "not committed.")
    seed: int | None = Field(default=None, description="The seed the harness gave the run.")
    sigma: float | None = Field(default=None, description="σ of one run that the keep rule used (null: no margin).")
    z: float | None = Field(default=None, description="The improvement over your best in standard errors "
                            "(positive = better); kept when above the lab's keep_z.")
    significant: bool | None = Field(default=None, description="True when the change beats the noise.")
    mean_val_bpb: float | None = Field(default=None, description="Mean over seeds when confirm reruns decided it.")
    seeds_in_mean: int | None = None
    confirm_runs: list[str] = Field(default_factory=list, description="The confirm reruns that decided this run.")
    role: RunRole = Field(default="experiment", description="experiment, or confirm: a rerun the keep rule asked for.")
    parent: str | None = Field(default=None, description="A confirm rerun's run.")
    commit: str | None = Field(description="Commit of this attempt (on the branch if kept, else on an attempt ref).")
    training_seconds: float | None = None
    total_seconds: float | None = None
    score_seconds: float | None = Field(default=None, description="Wall time of the score phase (load, check, eval).")
    peak_memory_mb: float | None = None
    num_steps: int | None = None
    epochs: float | None = Field(
        default=None, description="How many times the run read its training data; past 1, val_bpb also rewards "
        "memorising that data, so a faster train.py can score worse for it.")
    reason: str | None = Field(default=None, description="Why it failed, in one line, when it did.")
    log_tail: str | None = Field(default=None, description="Last lines of the run log on crash/timeout/oom.")


class RunStarted(BaseModel):
    """An experiment started in the background; poll get_experiment(run_id)."""

    run_id: str
    status: RunStatus


class ExperimentState(BaseModel):
    """Where a run stands: the result when finished, the latest progress while in flight."""

    result: ExperimentResult
    progress: str | None = Field(default=None, description="Latest progress line while queued or running.")
    finished: bool


class BestEntry(BaseModel):
    """One best result."""

    agent: str
    run_id: str
    val_bpb: float = Field(description="Validation bits per byte, lower is better.")
    verified: bool | None = Field(default=None, description="False: scored in train.py's process (unverified).")
    commit: str
    description: str
    improvement_over_baseline: float | None = Field(
        description="That agent's baseline val_bpb minus this one (positive = better)."
    )


class BestResults(BaseModel):
    """The agent's own best and the best of the whole lab (all agents)."""

    agent_best: BestEntry | None
    agent_baseline_val_bpb: float | None
    lab_best: BestEntry | None
    noise: NoiseInfo


class RunSummary(BaseModel):
    """One compact line of the run history."""

    run_id: str
    agent: str
    status: RunStatus
    decision: Decision | None
    val_bpb: float | None
    verified: bool | None = None
    delta: float | None
    kept: bool
    commit: str | None
    description: str
    seed: int | None = None
    z: float | None = None
    role: RunRole = "experiment"


class RunList(BaseModel):
    """Runs, newest first."""

    runs: list[RunSummary]
    total: int = Field(description="Number of runs matching the filter (before the limit).")


class LogText(BaseModel):
    """The end of one run's log."""

    run_id: str
    status: RunStatus
    text: str
    truncated: bool = Field(description="True when earlier lines were left out.")


class ResetResult(BaseModel):
    """train.py after a reset."""

    target: Literal["best", "baseline"]
    commit: str
    line_count: int
