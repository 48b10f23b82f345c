"""What the server hands the sandbox (RunSpec) and what it gets back (RunOutcome).

Frozen pydantic models with extra="forbid": a typo in a field name is an error, not a silent
default. No docker-py type appears here; backends translate.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RunStatus = Literal["ok", "crash", "timeout", "oom", "cancelled", "infra-error"]

# Container labels the sandbox sets itself; a RunSpec may not override them.
LABEL_PREFIX = "autoresearch-mcp."
OUTPUT_TARGET = "/out"  # where output_dir appears inside the run

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# an index ("0"), a GPU UUID ("GPU-1a2b...") or a MIG device; never "all" or a list
_GPU_ID = re.compile(r"^(\d{1,3}|GPU-[0-9a-fA-F-]{8,80}|MIG-[A-Za-z0-9/-]{8,100})$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Mount(_Frozen):
    """A host path made visible inside the run at `target`."""

    source: Path = Field(description="Absolute host path (file or folder); must exist at run time.")
    target: str = Field(description="Absolute path inside the run, e.g. /work/train.py.")
    read_only: bool = Field(default=True, description="Mount read-only (the default) or read-write.")

    @field_validator("source")
    @classmethod
    def _absolute_source(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"mount source must be an absolute host path, got {str(v)!r}")
        return v

    @field_validator("target")
    @classmethod
    def _clean_target(cls, v: str) -> str:
        if not v.startswith("/") or posixpath.normpath(v) != v or v == "/":
            raise ValueError(f"mount target must be a normalised absolute path other than /, got {v!r}")
        if v == OUTPUT_TARGET or v.startswith(OUTPUT_TARGET + "/"):
            raise ValueError(f"{OUTPUT_TARGET} is reserved for output_dir; pick another target")
        return v


class Limits(_Frozen):
    """Resource limits for one run. Docker enforces all of them; local mode the deadline and disk."""

    memory_gb: float = Field(default=32.0, gt=0, description="Host RAM cap; swap is the same (no swap).")
    pids: int = Field(default=4096, ge=16, description="Max processes+threads in the run (stops fork bombs); "
                      "threads count too, and torch.compile starts a pool of compile workers.")
    shm_gb: float = Field(default=8.0, gt=0, description="Size of /dev/shm (torch DataLoader workers use it).")
    tmpfs_gb: float = Field(default=4.0, gt=0, description="Size of the writable /tmp (RAM-backed).")
    log_cap_bytes: int = Field(
        default=16 * 1024 * 1024, ge=4096, description="Log size kept on disk: first half and last half."
    )
    disk_gb: float = Field(default=20.0, gt=0, description="How much the writable folders (/out and "
                           "read-write mounts) may grow during the run; checked every 2 s, then killed.")
    cpus: float | None = Field(default=None, gt=0, description="CPU time the run may use, in cores (a CFS "
                               "quota: bursts may still land on every core); None: no cap.")
    cpuset: str | None = Field(default=None, pattern=r"^\d+(,\d+)*$", description="The host cores the run is "
                               "pinned to, e.g. '0,1': a neighbour's fork bomb cannot run on them; None: any core.")
    nofile: int | None = Field(default=None, ge=64, description="Open-file limit (RLIMIT_NOFILE); None: the "
                               "engine's default. Must not exceed the engine's own hard limit.")


class RunSpec(_Frozen):
    """One experiment to run: what, with which files, for how long, within which limits."""

    run_id: str = Field(description="Unique id of the run (letters, digits, _.-; up to 100 chars).")
    image: str = Field(description="Docker image tag (ignored by the local backend).")
    command: list[str] = Field(min_length=1, description="argv run inside the sandbox.")
    mounts: list[Mount] = Field(default_factory=list, description="Extra mounts; output_dir is added at /out.")
    env: dict[str, str] = Field(default_factory=dict, description="The complete environment; nothing is inherited.")
    stdin: list[Path] = Field(default_factory=list, description="Host files streamed, in order, to the "
                              "run's stdin, then end-of-file; none: stdin is empty. For data the run may "
                              "read once but must not find as a file (the validation split).")
    output_dir: Path = Field(description="Host folder mounted read-write at /out (result.json, progress.jsonl).")
    log_path: Path = Field(description="Host file that receives stdout+stderr, capped.")
    gpu: str | None = Field(default=None, description="Device id of the leased GPU; None: CPU only.")
    deadline_s: float = Field(gt=0, description="Hard wall-clock limit from start; the host kills the run then.")
    limits: Limits = Field(default_factory=Limits, description="Resource limits.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra container labels (not autoresearch-mcp.*).")
    network: Literal["none", "bridge"] = Field(
        default="none", description="none (always, for an agent's code); bridge only for TRUSTED set-up steps "
        "such as prepare's data download. The local backend isolates nothing and ignores it.")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not _RUN_ID.match(v):
            raise ValueError(f"run_id must match {_RUN_ID.pattern}, got {v!r}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _ENV_KEY.match(key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if "\x00" in value:
                raise ValueError(f"environment variable {key} contains a NUL byte")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key.startswith(LABEL_PREFIX):
                raise ValueError(f"label {key!r} uses the reserved prefix {LABEL_PREFIX!r}")
        return v

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: str | None) -> str | None:
        if v is not None and not _GPU_ID.match(v):
            raise ValueError(f"gpu must be a device index or UUID, got {v!r}")
        return v

    @field_validator("output_dir", "log_path")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        if not v.is_absolute():
            raise ValueError(f"host paths must be absolute, got {str(v)!r}")
        return v

    @field_validator("stdin")
    @classmethod
    def _absolute_inputs(cls, v: list[Path]) -> list[Path]:
        for path in v:
            cls._absolute(path)
        return v

    @model_validator(mode="after")
    def _unique_targets(self) -> RunSpec:
        targets = [m.target for m in self.mounts]
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        if dupes:
            raise ValueError(f"mount targets appear more than once: {dupes}")
        # the run may replace anything in its writable folders (say, by a symlink to a host file
        # that the host would then overwrite): the log lives outside all of them
        for writable in [self.output_dir, *(m.source for m in self.mounts if not m.read_only)]:
            if self.log_path == writable or writable in self.log_path.parents:
                raise ValueError(f"log_path {self.log_path} must not be inside the writable folder {writable}")
        return self


class RunOutcome(_Frozen):
    """What happened to a run. A crash or timeout is an outcome, not an exception."""

    run_id: str
    status: RunStatus = Field(description="ok: exit 0; crash: non-zero exit; timeout: killed at the deadline; "
                              "oom: killed by the memory limit; cancelled; infra-error: the sandbox failed.")
    exit_code: int | None = Field(description="Process exit code; None when it never ran, or the host "
                                   "killed it (deadline, cancellation).")
    log_path: Path
    log_tail: str = Field(description="Last few KB of the log, for a quick look.")
    wall_s: float = Field(description="Seconds from start to exit (or kill).")
    detail: str = Field(default="", description="Human-readable explanation of the status.")
    log_truncated: bool = Field(default=False, description="True when the middle of the log was dropped.")


class Reaped(_Frozen):
    """A leftover run that the reaper killed and removed."""

    run_id: str
    reason: Literal["owner-gone", "deadline-passed", "finished-unclaimed"]
    detail: str = ""
