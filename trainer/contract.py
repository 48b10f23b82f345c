"""The run contract: how the host starts the two phases of an experiment and what each answers.

An experiment is two containers on one GPU lease (issue 18, sealed scoring):
  1. train: the agent's train.py under the harness (trainer.run); writes result.json (TrainResult,
     training figures only) and, at trainer.submit, the exported model (ARTIFACT_FILES) to /out.
  2. score: trusted code only (trainer.score); loads the exported model, checks it, computes
     val_bpb on the validation split streamed to its stdin, and prints one SCORE_MARKER line
     (ScoreResult) on its stdout, which the host reads. Nothing the train phase wrote is read
     there but the artifact.
Imported by the host as well as the container, so it stays free of torch and numpy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

# -- the container layout, both phases ---------------------------------------------------------------

WORK = "/work"
TRAIN_PY = f"{WORK}/train.py"
PROGRAM_TOML = f"{WORK}/program.toml"
DATA = "/data"
OUT = "/out"
CACHE = "/cache"  # the agent's compile cache (train phase only)
ARTIFACT = "/artifact"  # the score phase's read-only copy of the train phase's export
MODEL_DIR = "model"  # the train phase writes its export to /out/model
ARTIFACT_FILES = ("model.json", "weights.safetensors")  # the export: graph (JSON), tensors (no pickle)
VAL_FILES = ("val.bin", "val.idx.npy")  # the validation split: streamed on stdin, never mounted
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.jsonl"
SCORE_MARKER = "autoresearch-score: "  # the scorer's answer: this prefix, then ScoreResult as JSON

TRAIN_ARGV = ["python3", "-m", "trainer.run", "--program", PROGRAM_TOML, "--train", TRAIN_PY,
              "--data", DATA, "--out", OUT]
IN_PROCESS_ARGV = [*TRAIN_ARGV, "--val-stdin"]  # scoring = "in-process": the harness scores too
SCORE_ARGV = ["python3", "-m", "trainer.score", "--program", PROGRAM_TOML, "--artifact", ARTIFACT,
              "--data", DATA, "--val-stdin"]


def base_env() -> dict[str, str]:
    """A phase's whole environment: nothing of the host's is inherited."""
    return {"PYTHONUNBUFFERED": "1", "HOME": "/tmp", "HF_HUB_OFFLINE": "1",
            "TORCHINDUCTOR_CACHE_DIR": f"{CACHE}/inductor", "TRITON_CACHE_DIR": f"{CACHE}/triton"}


# -- what each phase answers -----------------------------------------------------------------------

TrainStatus = Literal["ok", "crash", "unscorable", "invalid"]
ScoreStatus = Literal["ok", "invalid", "unscorable", "crash"]


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("reason", "traceback_tail", mode="before", check_fields=False)
    @classmethod
    def _encodable(cls, v: object) -> object:
        """An error's text comes from train.py: a lone surrogate in it would make the JSON unreadable."""
        return v.encode("utf-8", "replace").decode("utf-8") if isinstance(v, str) else v


class StepSeconds(_Result):
    p10: float
    p50: float
    p90: float


class LossSpike(_Result):
    """The run's largest training loss against the median of the 50 steps before it, over the steps
    after the 40th (trainer.run.largest_spike): near 1 is a smooth run; 1.5 or more is a loss spike."""

    step: int
    loss: float
    ratio: float


class TrainResult(_Result):
    """The train phase's result.json. Written by the harness inside the agent's process, so it is
    taken for training figures only: no score comes from it unless the program opted into
    in-process scoring (then val_bpb is set and the run is marked unverified)."""

    status: TrainStatus = "crash"
    """ok: trained and exported; crash: train.py failed; unscorable: the export failed."""
    reason: str | None = None
    training_seconds: float = 0.0
    total_seconds: float = 0.0
    startup_seconds: float = 0.0
    export_seconds: float | None = None
    peak_memory_mb: float = 0.0
    mfu_percent: float | None = None
    total_tokens: int = 0
    epochs: float | None = None
    num_steps: int = 0
    num_params: int = 0
    tokens_per_s: float | None = None
    step_seconds: StepSeconds | None = None
    loss_spike: LossSpike | None = None
    gpu_uuid: str | None = None
    traceback_tail: str | None = None
    val_bpb: float | None = None
    """Only with in-process scoring (unverified); None in a sealed run."""
    unigram_bpb: float | None = None
    eval_seconds: float | None = None
    eval_parts_seconds: dict[str, float] | None = None


class ScoreResult(_Result):
    """The score phase's answer, printed after SCORE_MARKER on its stdout: the only source of the
    val_bpb that the ledger, git, results.tsv and the tools show for a sealed run."""

    status: ScoreStatus = "crash"
    """ok; invalid: the artifact is refused (pickle, a forbidden op, not causal); unscorable: it
    uses an op the scorer does not know, or cannot be loaded; crash: scoring itself failed."""
    reason: str | None = None
    val_bpb: float | None = None
    unigram_bpb: float | None = None
    load_seconds: float = 0.0
    eval_seconds: float = 0.0
    eval_parts_seconds: dict[str, float] | None = None
    audit: dict[str, float | int | bool] | None = None
    """The causality audit: positions tested, deep or not, the worst and mean advantage (nats) of
    seeing later tokens (trainer.audit)."""
    total_seconds: float = 0.0
    traceback_tail: str | None = None


class ContractError(ValueError):
    """A phase's answer does not follow the contract (missing, malformed, or with unknown fields)."""


def parse_train_result(raw: bytes | None, why_missing: str = "no result.json") -> TrainResult:
    if raw is None:
        raise ContractError(f"the train phase left no valid {RESULT_FILE} ({why_missing})")
    try:
        return TrainResult.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ContractError(f"the train phase's {RESULT_FILE} is not the harness's: {where}: {first['msg']}") from None


def parse_score_output(text: str) -> ScoreResult:
    """The scorer's answer: the last SCORE_MARKER line of its output."""
    for line in reversed(text.splitlines()):
        if line.startswith(SCORE_MARKER):
            try:
                return ScoreResult.model_validate_json(line[len(SCORE_MARKER):])
            except ValidationError as e:
                raise ContractError(f"the scorer's answer is malformed: {e.errors()[0]['msg']}") from None
    raise ContractError("the scorer printed no answer line")


__all__ = ["ARTIFACT", "ARTIFACT_FILES", "CACHE", "DATA", "IN_PROCESS_ARGV", "MODEL_DIR", "OUT", "PROGRAM_TOML", "RESULT_FILE",
           "SCORE_ARGV", "SCORE_MARKER", "TRAIN_ARGV", "TRAIN_PY", "VAL_FILES", "ContractError", "LossSpike", "ScoreResult",
           "TrainResult", "base_env", "parse_score_output", "parse_train_result"]
