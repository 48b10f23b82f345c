"""A research program's fixed settings, read from its program.toml.

Imported by the host server as well as the in-container harness, so it must stay free of
torch and numpy: only the standard library and pydantic.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, ValidationInfo

CLIMBMIX_BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542  # the seed's pinned validation shard


class TrainerError(Exception):
    """Root of every error the trainer package raises on purpose."""


class ProgramConfigError(TrainerError, ValueError):
    """program.toml is missing, unreadable or has a bad field; names the file and the field."""

    def __init__(self, path: Path | str, message: str, field: str | None = None):
        self.path = str(path)
        self.field = field
        where = f"{self.path}: field '{field}'" if field else self.path
        super().__init__(f"{where}: {message}")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClimbmixSource(_Frozen):
    """The seed's corpus: parquet shards of karpathy/climbmix-400b-shuffle, fetched over HTTP."""

    kind: Literal["climbmix"] = "climbmix"
    num_train_shards: int = Field(10, ge=1, le=6542)
    """How many shards (shard_00000 …) make the training split."""
    val_shard: int = Field(CLIMBMIX_VAL_SHARD, ge=0)
    """The shard that alone makes the validation split (pinned, never trained on)."""
    base_url: str = CLIMBMIX_BASE_URL
    """Where shard_NNNNN.parquet files live; tests point it at a local HTTP server."""
    text_column: str = "text"
    retries: int = Field(5, ge=0)
    """Attempts after the first one, per shard, with exponential backoff."""
    backoff_s: float = Field(2.0, ge=0)
    """First wait between attempts; doubles each retry."""
    timeout_s: float = Field(60.0, gt=0)
    """Socket timeout of one HTTP request."""
    max_val_docs: int | None = Field(None, ge=1)
    """Use only the first N documents of the validation shard (None: all of them)."""


class LocalSource(_Frozen):
    """Documents from local folders: text files by glob, .jsonl lines or .parquet rows."""

    kind: Literal["local"] = "local"
    paths: list[str] = Field(default_factory=list)
    """Folders (or single files) to read; `prepare --path` adds to / replaces these."""
    globs: list[str] = Field(default_factory=lambda: ["**/*.txt", "**/*.md", "**/*.py", "**/*.jsonl",
                                                      "**/*.parquet"])
    """File patterns relative to each folder: .jsonl and .parquet files hold many documents, any
    other match is one document; `prepare --glob` replaces these."""
    text_field: str = "text"
    """JSON key (.jsonl) or column (.parquet) holding a document's text."""
    val_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of documents (by content hash) that go to validation."""
    max_bytes: int | None = Field(None, ge=1)
    """Stop reading after this many bytes of text (files in sorted order)."""


class PythonStdlibSource(_Frozen):
    """The running interpreter's standard-library sources: works offline on any machine."""

    kind: Literal["python-stdlib"] = "python-stdlib"
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_bytes: int | None = Field(None, ge=1)
    """Cap on the bytes read (files in sorted order), so CPU prepare stays quick."""


DataSource = Annotated[
    ClimbmixSource | LocalSource | PythonStdlibSource, Field(discriminator="kind")
]


class ProgramConfig(_Frozen):
    """Everything fixed about a research program; train.py may read it, never change it."""

    name: str = Field(min_length=1)
    description: str = ""
    budget_s: float = Field(300.0, gt=0)
    """Seconds of training wall clock (untimed warm-up steps excluded)."""
    untimed_steps: int = Field(10, ge=0)
    """The first N optimizer steps (compilation, warm-up) are not charged to the budget."""
    grace_s: float = Field(30.0, ge=0)
    """How far past its budget a run may go before the harness stops it as a crash."""
    seq_len: int = Field(gt=1)
    """Tokens per row for training and evaluation."""
    vocab_size: int = Field(ge=264, le=1 << 20)
    """Tokenizer size, special tokens included."""
    eval_batch_size: int = Field(8, ge=1)
    """Rows per evaluation forward pass."""
    eval_tokens: int = Field(gt=0)
    """Validation tokens scored per run (rounded down to whole eval batches)."""
    device: Literal["cuda", "cpu"] = "cuda"
    autocast: Literal["bfloat16", "none"] = "bfloat16"
    """Precision the harness evaluates under (on CUDA); the seed evaluates in bf16 autocast."""
    check_causality: bool = True
    """Audit causality and refuse a model whose predictions depend on later tokens (trainer.audit)."""
    scoring: Literal["sealed", "in-process"] = "sealed"
    """sealed: the exported model is scored in a separate trusted process; in-process: scored inside
    train.py's process, so its runs are marked unverified and never the lab's best over a sealed one."""
    seed: int = 42
    """The harness seeds torch with it before train.py starts; the lab sets it per run (a confirm
    rerun or a calibration run gets another). train.py reads it as cfg.seed and never seeds itself."""
    min_improvement: float = Field(0.0, ge=0)
    """While the lab has no measured noise (autoresearch-mcp calibrate), a run is kept only when it
    beats the best by more than this much val_bpb (0: any improvement)."""
    cpu_threads: int | None = Field(None, ge=1)
    """torch threads on CPU programs (None: torch's default)."""
    max_loss: float = Field(100.0, gt=0)
    """A training loss above this (or NaN/inf) ends the run as a crash."""
    tokenizer_train_chars: int = Field(2_000_000_000, ge=1)
    """At most this many characters of the training split train the tokenizer."""
    tokenizer_doc_chars: int = Field(10_000, ge=1)
    """Each document contributes at most this many characters to tokenizer training."""
    data: DataSource
    """The default data source; `prepare --source` can override it."""

    @field_validator("eval_tokens")
    @classmethod
    def _one_eval_batch(cls, value: int, info: ValidationInfo) -> int:
        rows, seq = info.data.get("eval_batch_size"), info.data.get("seq_len")
        if rows and seq and value < rows * seq:
            raise ValueError(f"must cover at least one eval batch of eval_batch_size x seq_len "
                             f"= {rows * seq} tokens")
        return value


def load_program(path: Path | str) -> ProgramConfig:
    """Read and validate a program.toml; raise ProgramConfigError naming file and field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ProgramConfigError(path, "file not found; give the path of a program.toml") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ProgramConfigError(path, f"cannot read file: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ProgramConfigError(path, f"not valid TOML: {e}") from e
    return parse_program(raw, path)


def parse_program(raw: dict, path: Path | str = "<program.toml>") -> ProgramConfig:
    """Validate an already-parsed program table (see load_program)."""
    try:
        return ProgramConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        # pydantic puts the union tag into the location (data.local.max_bytes); drop it.
        if len(loc) > 1 and loc[0] == "data" and loc[1] in ("climbmix", "local", "python-stdlib"):
            loc = (loc[0],) + loc[2:]
        field = ".".join(str(p) for p in loc) or None
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against trainer/config.py"
        raise ProgramConfigError(path, f"{msg}{more}", field=field) from e


def set_top_level(toml_text: str, **settings: object) -> str:
    """program.toml's text with top-level settings replaced, or added before the first table when
    absent (None: left as it is). Comments and layout elsewhere are kept; a key of the same name
    inside a table is not touched."""
    import re  # noqa: PLC0415

    table = re.search(r"(?m)^\s*\[", toml_text)
    head, rest = (toml_text[:table.start()], toml_text[table.start():]) if table else (toml_text, "")
    for key, value in settings.items():
        if value is None:
            continue
        line = f"{key} = {_toml_value(value)}"
        head, n = re.subn(rf"(?m)^{re.escape(key)}\s*=[^\n]*$", line.replace("\\", r"\\"), head, count=1)
        if not n:
            head = f"{line}\n{head}"
    return head + rest


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"no TOML form for {type(value).__name__}")
