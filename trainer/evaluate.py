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

from trainer.baseline import target_histogram, unigram_bpb_of_histogram
from trainer.config import ProgramConfig, TrainerError
from trainer.loader import BatchStream
from trainer.shards import TokenSplit, open_split
from trainer.tokenizer import load_token_bytes

EVAL_SEED = 20260311  # fixed for all programs and runs: the same rows every time


class EvaluationError(TrainerError, ValueError):
    """The submitted model cannot be evaluated (wrong output shape or dtype)."""


class NotCausalError(EvaluationError):
    """The model's logits at a position depend on later tokens: it would score far too well."""


# ---------------------------------------------------------------------------------------------
# DO NOT CHANGE — this is the fixed metric.
# BPB = sum of per-token cross-entropy (nats) / (ln 2 * sum of target byte lengths), over a
# fixed set of validation targets; special tokens (byte length 0) are excluded from both sums.

@torch.no_grad()
def evaluate_bpb(model, rows: list[torch.Tensor], token_bytes: torch.Tensor,
                 autocast_dtype: torch.dtype | None = None) -> float:
    """rows: int64 tensors (B, T+1) on the model's device; model(x) returns logits (B, T, V)."""
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    nbytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for row in rows:
        x, y = row[:, :-1], row[:, 1:]
        ctx = (torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
               if autocast_dtype is not None else nullcontext())
        with ctx:
            logits = model(x)
        check_logits(logits, y, token_bytes.numel())
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                               reduction="none")
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


# A causal model gives the same prefix logits bit for bit (masked keys add exactly zero); the slack
# is many ulps of the precision the forward runs in: bf16's 0.0625 at |logit| < 16 under autocast,
# fp32's ~1e-6 without. A model that reads ahead moves them by units once trained, but by far less
# after a few seconds of training (seen under load: 4-s runs of a lost causal mask passed the bf16
# slack on the CPU), hence the fp32 slack where nothing runs in bf16.
CAUSALITY_ATOL, CAUSALITY_RTOL = 1.0, 0.05  # under autocast (bf16/fp16)
CAUSALITY_ATOL_FP32, CAUSALITY_RTOL_FP32 = 1e-3, 1e-3


@torch.no_grad()
def check_causality(model, row: torch.Tensor, vocab_size: int, autocast_dtype: torch.dtype | None = None,
                    seed: int = EVAL_SEED) -> None:
    """Raise EvaluationError if the model's logits at a position depend on later tokens.

    Every row of one evaluation batch is cut at a random position and its tokens after the cut
    replaced by other tokens (another row's, shifted); the logits up to the cut must not move. A
    model that peeks ahead (an attention mask lost in an edit, a shifted input) would score far too
    well; this catches it before it is scored. Sealed, it runs in the scorer on the exported graph, out
    of reach of train.py's code.
    """
    x = row[:, :-1]
    B, T = x.shape
    if T < 2:
        return
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, T - 1, (B,), generator=g).to(x.device)  # keep positions 0..cut
    later = torch.arange(T, device=x.device)[None, :] > cuts[:, None]
    # the probe is laid out as x is (a view of a (B, T+1) row): with other strides a compiled model
    # would compile a second eval graph for it
    probe = torch.empty_like(row)[:, :-1]
    torch.where(later, x.roll((1, 7), dims=(0, 1)), x, out=probe)  # other tokens, even with one row
    ctx = (torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
           if autocast_dtype is not None else nullcontext())
    with ctx:
        a, b = model(x), model(probe)
    for logits in (a, b):
        check_logits(logits, x, vocab_size)
    half = autocast_dtype is not None or a.dtype in (torch.bfloat16, torch.float16)
    atol, rtol = (CAUSALITY_ATOL, CAUSALITY_RTOL) if half else (CAUSALITY_ATOL_FP32, CAUSALITY_RTOL_FP32)
    for i in torch.nonzero((probe != x).any(dim=1)).flatten().tolist():  # rows whose future differs
        n = int(cuts[i]) + 1  # one row's prefix at a time: full-batch float logits can be many GB
        ai, bi = a[i, :n].float(), b[i, :n].float()
        excess = ((ai - bi).abs() - atol - rtol * ai.abs()).amax(dim=-1)
        if float(excess.max()) <= 0:  # NaN counts as moved
            continue
        t = int(excess.nan_to_num(float("inf")).argmax())
        worst = float((ai[t] - bi[t]).abs().max())
        raise NotCausalError(
            f"the model is not causal: its logits at position {t} of a row moved by {worst:.3g} when "
            f"only tokens after position {int(cuts[i])} changed; a language model may look only at "
            f"earlier tokens (check the attention mask and that inputs are not shifted)")


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
                     val: TokenSplit | None = None) -> dict:
    """val_bpb of `model` and the unigram baseline on the very same targets, and where the time went
    (seconds: rows, the causality check, which includes compiling the model's eval graph, scoring)."""
    t0 = time.monotonic()
    arrays = eval_rows_numpy(data_dir, program, val)
    token_bytes = load_token_bytes(data_dir)
    counts = np.load(f"{data_dir}/train_counts.npy")
    hist = target_histogram((a[:, 1:] for a in arrays), len(token_bytes))
    baseline = unigram_bpb_of_histogram(counts, token_bytes, hist)
    rows = [torch.from_numpy(a).to(device).long() for a in arrays]
    dtype = torch.bfloat16 if (device.type == "cuda" and program.autocast == "bfloat16") else None
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    t1 = time.monotonic()
    try:
        if program.check_causality:
            check_causality(model, rows[0], len(token_bytes), dtype)
        t2 = time.monotonic()
        bpb = evaluate_bpb(model, rows, torch.from_numpy(token_bytes).to(device), dtype)
    finally:
        if was_training:
            model.train()
    seconds = {"rows": t1 - t0, "causality": t2 - t1, "scoring": time.monotonic() - t2}
    return {"val_bpb": bpb, "unigram_bpb": baseline, "eval_tokens": int(hist.sum()), "seconds": seconds}
