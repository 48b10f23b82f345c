"""The unigram baseline: what a model that ignores context scores, for comparison with val_bpb.

Token frequencies come from the training split (add-one smoothed over text tokens); special
tokens are excluded exactly as in evaluate_bpb.
"""

from __future__ import annotations

import math

import numpy as np


def unigram_logprobs(train_counts: np.ndarray, token_bytes: np.ndarray) -> np.ndarray:
    """Natural-log probability per token id; special tokens (byte length 0) get -inf."""
    text = token_bytes > 0
    counts = np.where(text, train_counts + 1, 0).astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def unigram_bpb(train_counts: np.ndarray, token_bytes: np.ndarray, targets: np.ndarray) -> float:
    """Bits per byte of the unigram model on `targets` (any shape of token ids)."""
    logp = unigram_logprobs(train_counts, token_bytes)
    targets = np.asarray(targets).reshape(-1)
    nbytes = token_bytes[targets]
    keep = nbytes > 0
    nats = -logp[targets[keep]].sum()
    return float(nats / (math.log(2) * nbytes[keep].sum()))
