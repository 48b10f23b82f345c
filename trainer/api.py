"""What train.py may call: the program's constants, a training loader, the clock, the hand-off.

    cfg = trainer.program()                 # budget_s, seq_len, vocab_size, device, seed, ...
    loader = trainer.train_loader(B, T)     # (x, y) int64 (B, T) on cfg.device, train split only
    while trainer.step(loss):               # after each optimizer step; False once budget is spent
        lr = schedule(trainer.progress())   # fraction of the budget used, 0..1
    trainer.submit(model)                   # the trained model; exported, then scored elsewhere

The harness (trainer.run) owns the clock and exports the submitted model; a separate trusted
process (trainer.score) computes val_bpb. train.py gets no path to validation data.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ProgramConfig, TrainerError

PROGRESS_EVERY_S = 1.0  # progress lines (file and stdout) at most this often, plus the first steps


class NotInHarnessError(TrainerError, RuntimeError):
    """trainer's API was used outside `python -m trainer.run`."""


class TrainingDiverged(TrainerError, ArithmeticError):
    """The training loss went NaN, infinite or above the program's max_loss."""


class BudgetExceeded(TrainerError, TimeoutError):
    """train.py kept training past its budget plus grace."""


class SubmitError(TrainerError, RuntimeError):
    """trainer.submit was misused (called twice, or with something that is not a model)."""


class ProgressLog:
    """progress.jsonl: one JSON object per line, flushed at once so the host can follow it."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def emit(self, phase: str, **fields) -> None:
        self.file.write(json.dumps({"phase": phase, **fields, "t": round(time.time(), 3)}) + "\n")

    def close(self) -> None:
        self.file.close()


@dataclass
class Run:
    """State of the one run in this process; only the harness creates it."""

    program: ProgramConfig
    data_dir: Path
    log: ProgressLog
    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    clock_start: float | None = None  # when the charged training time began
    tokens_at_clock_start: int = 0
    last_step: float | None = None
    tokens_at_last_step: int = 0
    max_timed_step_tokens: int = 0  # the largest step inside the clock: bounds the free steps
    last_report: float = 0.0
    tokens_at_report: int = 0
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)  # every step's loss, in step order
    pending_loss: object = None  # the last CUDA loss, read at the next step
    step_seconds: list[float] = field(default_factory=list)  # host time between timed steps
    crash_reason: str | None = None
    loaders: list = field(default_factory=list)
    model: object = None
    attention: list[tuple[int, int]] | None = None
    submitted_at: float | None = None

    @property
    def tokens(self) -> int:
        return sum(loader.tokens_served for loader in self.loaders)

    def elapsed(self) -> float:
        """Charged training seconds so far."""
        return 0.0 if self.clock_start is None else time.monotonic() - self.clock_start

    def start_clock(self) -> None:
        self.clock_start = time.monotonic()
        self.tokens_at_clock_start = self.tokens
        # the host timestamps this line as it arrives and bounds the run's time from it (issue 18)
        self.log.emit("clock", budget_s=self.program.budget_s)


_RUN: Run | None = None


def _run() -> Run:
    if _RUN is None:
        raise NotInHarnessError("train.py must be run by the harness: python -m trainer.run "
                                "--program P.toml --train train.py --data DIR --out DIR")
    return _RUN


def begin(program: ProgramConfig, data_dir: Path, log: ProgressLog) -> Run:
    """Harness only: make the run that train.py's calls act on."""
    global _RUN
    _RUN = Run(program=program, data_dir=data_dir, log=log)
    return _RUN


def current() -> Run | None:
    """Harness only: the run in progress, if any."""
    return _RUN


def end() -> None:
    global _RUN
    if _RUN is not None:
        for loader in _RUN.loaders:
            loader.close()
    _RUN = None


def program() -> ProgramConfig:
    """The program's fixed settings (frozen): budget_s, seq_len, vocab_size, device, seed, ..."""
    return _run().program


def train_loader(batch_size: int, seq_len: int | None = None):
    """An endless iterator of (inputs, targets), int64 (batch_size, seq_len), on the device.

    Rows are packed from the training split only, each starting with BOS, deterministic for the
    program's seed. seq_len defaults to the program's (evaluation always uses the program's).
    """
    from trainer.loader import TrainLoader
    from trainer.shards import open_split

    run = _run()
    if batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    loader = TrainLoader(open_split(run.data_dir, "train"), batch_size, seq_len or run.program.seq_len,
                         seed=run.program.seed + len(run.loaders), device=run.program.device)
    run.loaders.append(loader)
    if run.program.untimed_steps == 0 and run.clock_start is None:
        run.start_clock()
    return loader


def step(loss) -> bool:
    """Report one finished optimizer step; True while training budget remains.

    Call it once per optimizer step with the step's loss (a float or a scalar tensor). A NaN,
    infinite or exploding loss raises TrainingDiverged (the run ends as a crash); training on
    past the budget plus grace raises BudgetExceeded. A CUDA loss is read one step late, so the
    GPU never idles while the host waits for it (issue 5: CPU-GPU overlap).
    """
    run = _run()
    pending, run.pending_loss = run.pending_loss, loss.detach() if hasattr(loss, "detach") else loss
    run.steps += 1
    now = time.monotonic()
    tokens = run.tokens
    if run.last_step is not None and run.clock_start is not None:
        run.step_seconds.append(now - run.last_step)
        run.max_timed_step_tokens = max(run.max_timed_step_tokens, tokens - run.tokens_at_last_step)
    run.tokens_at_last_step = tokens
    run.last_step = now
    if pending is not None:
        _check_loss(run, pending, run.steps - 1)
    if not getattr(run.pending_loss, "is_cuda", False):
        _check_loss(run, run.pending_loss, run.steps)
        run.pending_loss = None
    if run.clock_start is None and run.steps >= run.program.untimed_steps:
        run.start_clock()
        _report(run, now, force=True)
        return True
    elapsed = run.elapsed()
    budget = run.program.budget_s
    if elapsed > budget + run.program.grace_s:
        run.crash_reason = (f"train.py trained {elapsed:.1f}s, past its budget of {budget:g}s plus "
                            f"{run.program.grace_s:g}s grace: stop when trainer.step() returns False")
        raise BudgetExceeded(run.crash_reason)
    if elapsed >= budget and run.pending_loss is not None:  # the last step: wait for it and check it
        _check_loss(run, run.pending_loss, run.steps)
        run.pending_loss, run.last_step = None, time.monotonic()
    _report(run, now, force=run.steps <= 3 or elapsed >= budget)
    return elapsed < budget


def _check_loss(run: Run, loss, step_number: int) -> None:
    value = float(loss.float().item() if hasattr(loss, "item") else loss)
    run.last_loss = value
    run.losses.append(value)
    if not math.isfinite(value) or value > run.program.max_loss:
        run.crash_reason = (f"training diverged: loss is {value} at step {step_number} "
                            f"(limit {run.program.max_loss:g})")
        run.log.emit("train", step=step_number, loss=value, remaining_s=None)
        raise TrainingDiverged(run.crash_reason)


def _report(run: Run, now: float, force: bool = False) -> None:
    if not force and now - run.last_report < PROGRESS_EVERY_S:
        return
    tokens = run.tokens
    rate = (tokens - run.tokens_at_report) / max(now - run.last_report, 1e-9) if run.last_report else None
    run.last_report, run.tokens_at_report = now, tokens
    remaining = max(run.program.budget_s - run.elapsed(), 0.0) if run.clock_start else run.program.budget_s
    loss = None if run.last_loss is None else round(run.last_loss, 6)
    run.log.emit("train", step=run.steps, loss=loss,
                 tokens_per_s=round(rate, 1) if rate else None, remaining_s=round(remaining, 1))
    done = 100 * min(run.elapsed() / run.program.budget_s, 1.0)
    rate_s = f"{rate:,.0f}" if rate else "-"
    loss_s = "-" if loss is None else f"{loss:.6f}"
    print(f"step {run.steps:05d} ({done:5.1f}%) | loss {loss_s} | tok/s {rate_s} "
          f"| remaining {remaining:.0f}s", flush=True)


def check_free_steps(run: Run) -> None:
    """Harness only: the untimed steps may not train on more data than as many timed steps.

    The first `untimed_steps` steps are free so that compilation is not charged; training done
    there (or before the first step) on more tokens than that many of the largest timed steps is
    training outside the clock. Counts the tokens drawn from trainer.train_loader.
    """
    n = run.program.untimed_steps
    if n == 0 or run.clock_start is None or run.max_timed_step_tokens == 0:
        return
    allowed = n * run.max_timed_step_tokens
    if run.tokens_at_clock_start > allowed:
        run.crash_reason = (
            f"train.py drew {run.tokens_at_clock_start:,} training tokens before the clock started, more "
            f"than its {n} free steps allow ({n} x {run.max_timed_step_tokens:,}, its largest timed step): "
            f"draw batches inside the clock (training or preloading data beyond the free steps is charged)")


def check_last_loss(run: Run) -> None:
    """Harness only: check the loss still held back when train.py stopped stepping."""
    if run.pending_loss is not None:
        pending, run.pending_loss = run.pending_loss, None
        _check_loss(run, pending, run.steps)


def progress() -> float:
    """Fraction of the training budget used so far, 0..1 (0 during the untimed steps)."""
    run = _run()
    return min(run.elapsed() / run.program.budget_s, 1.0)


def submit(model, attention: list[tuple[int, int]] | None = None) -> None:
    """Hand the trained model to the harness, which exports it after train.py returns.

    model(x) with x int64 (B, T) must return logits (B, T, vocab_size), and be exportable with
    torch.export (tensor ops and trainer.ops; no branches on tensor values). attention, optional,
    lists (heads x head_dim, window) per attention layer, for the MFU estimate only.
    """
    run = _run()
    if run.model is not None:
        raise SubmitError("trainer.submit() was already called: submit the model once")
    import torch

    if not isinstance(model, torch.nn.Module):  # a module can later be exported and scored elsewhere
        raise SubmitError(f"trainer.submit() needs the model as a torch.nn.Module, got {type(model).__name__}")
    run.model, run.attention, run.submitted_at = model, attention, time.monotonic()
