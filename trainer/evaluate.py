"""Validation bits per byte: the one metric every run is judged by.

The scorer (trainer.score) calls this on the model train.py exported; train.py never sees validation
data.
Evaluation rows are packed from the validation split exactly like training rows, with a fixed
seed, at the program's fixed sequence length and token count, so every run scores the same
targets.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from trainer.audit import Audit, deep_positions, judge, routine_positions
from trainer.baseline import target_histogram, unigram_bpb_of_histogram
from trainer.config import ProgramConfig, TrainerError
from trainer.loader import BatchStream
from trainer.shards import TokenSplit, open_split
from trainer.tokenizer import load_token_bytes

EVAL_SEED = 20260311  # fixed for all programs and runs: the same rows every time


class EvaluationError(TrainerError, ValueError):
    """The submitted model cannot be evaluated (wrong output shape or dtype)."""


class NotCausalError(EvaluationError):
    """The model's prediction at a position depends on later tokens: it would score far too well."""


# ---------------------------------------------------------------------------------------------
# DO NOT CHANGE — this is the fixed metric.
# BPB = sum of per-token cross-entropy (nats) / (ln 2 * sum of target byte lengths), over a
# fixed set of validation targets; special tokens (byte length 0) are excluded from both sums.

@torch.no_grad()
def evaluate_bpb(model, rows: list[torch.Tensor], token_bytes: torch.Tensor,
                 autocast_dtype: torch.dtype | None = None, audit: Audit | None = None) -> float:
    """rows: int64 tensors (B, T+1) on the model's device; model(x) returns logits (B, T, V). The audit,
    if any, keeps the losses of its tested positions."""
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for i, row in enumerate(rows):
        x, y = row[:, :-1], row[:, 1:]
        ctx = (torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else nullcontext())
        with ctx:
            logits = model(x)
        check_logits(logits, y, token_bytes.numel())
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               reduction="none")
        if audit is not None:
            audit.record(i, loss, logits.dtype)
        b = token_bytes[y.reshape(-1)]  # 0 for special tokens
        # where, not boolean indexing: indexing waits for the GPU on every batch
        nats += torch.where(b > 0, loss.double(), 0.0).sum()
        nbytes += b.double().sum()
    return float(nats / (math.log(2) * nbytes))

# ---------------------------------------------------------------------------------------------


def check_logits(logits, y: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(logits, torch.Tensor):
        raise EvaluationError(f"model(x) must return a logits tensor, got {type(logits).__name__}")
    want = (*y.shape, vocab_size)
    if tuple(logits.shape) != want:
        raise EvaluationError(f"model(x) returned logits of shape {tuple(logits.shape)}; "
                              f"expected (batch, seq_len, vocab_size) = {want}")
    if not logits.is_floating_point():
        raise EvaluationError(f"model(x) returned {logits.dtype} logits; expected floating point")


def eval_rows_numpy(data_dir, program: ProgramConfig, val: TokenSplit | None = None) -> list[np.ndarray]:
    """The fixed evaluation batches: eval_tokens // (eval_batch_size * seq_len) of them, from the
    validation split in data_dir or the one given."""
    n_batches = program.eval_tokens // (program.eval_batch_size * program.seq_len)
    stream = BatchStream(val or open_split(data_dir, "val"), program.eval_batch_size, program.seq_len + 1,
                         seed=EVAL_SEED, prefetch=2)
    try:
        return [stream.next_array() for _ in range(n_batches)]
    finally:
        stream.close()


def evaluate_program(model, data_dir, program: ProgramConfig, device: torch.device,
                     val: TokenSplit | None = None, deep_below: float | None = None,
                     sigma: float | None = None) -> dict:
    """val_bpb of `model` and the unigram baseline on the very same targets, the causality audit's
    figures (trainer.audit; NotCausalError when it refuses the model: deep when val_bpb < deep_below,
    sized by the lab's σ), and where the time went (seconds: rows, scoring, audit)."""
    t0 = time.monotonic()
    arrays = eval_rows_numpy(data_dir, program, val)
    token_bytes = load_token_bytes(data_dir)
    counts = np.load(f"{data_dir}/train_counts.npy")
    hist = target_histogram((a[:, 1:] for a in arrays), len(token_bytes))
    baseline = unigram_bpb_of_histogram(counts, token_bytes, hist)
    bytes_per_token = float((hist * token_bytes).sum() / max(int(hist[token_bytes > 0].sum()), 1))
    routine_n = routine_positions(len(arrays), program.eval_batch_size)
    deep_n = deep_positions(sigma, bytes_per_token, len(token_bytes), len(arrays), program.eval_batch_size)
    audit = None
    if program.check_causality:
        audit = Audit(arrays, token_bytes, deep_n if deep_below is not None else routine_n)
    rows = [torch.from_numpy(a).to(device).long() for a in arrays]
    dtype = torch.bfloat16 if (device.type == "cuda" and program.autocast == "bfloat16") else None
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    t1 = time.monotonic()
    finding = None
    try:
        bpb = evaluate_bpb(model, rows, torch.from_numpy(token_bytes).to(device), dtype, audit)
        t2 = time.monotonic()
        if audit is not None:
            deep = deep_below is not None and bpb < deep_below
            scored = audit.scored_losses()
            n = min(len(scored), deep_n if deep else routine_n)
            finding = judge(audit, scored, n, model, len(token_bytes), device, dtype, deep, bytes_per_token)
    finally:
        if was_training:
            model.train()
    seconds = {"rows": t1 - t0, "scoring": t2 - t1, "audit": time.monotonic() - t2}
    if finding is not None and finding.refusal:
        raise NotCausalError(finding.refusal)
    return {"val_bpb": bpb, "unigram_bpb": baseline, "eval_tokens": int(hist.sum()), "seconds": seconds,
            "audit": None if finding is None else {"positions": finding.positions, "deep": finding.deep,
                                                   "worst_nats": round(finding.worst_nats, 6),
                                                   "mean_nats": round(finding.mean_nats, 7)}}
