"""The causality audit (issue 34): reading ahead cannot improve the score a model gets.

The scorer scores every position of the evaluation rows with one forward per batch, which shows the
model each row whole; a forward that looks at the token after position t (a lost attention mask, or a
wrapper written to cheat) would predict it for free. So, at positions the scorer draws from OS
randomness (never from a seed that the train phase could compute), the audit compares the target's
loss in the scored forward itself with its loss in a probe: the same row up to t, uniform random
tokens after it (each one other than the real one), in a batch of rows drawn from all over the
evaluation set (so no row has its own continuation beside it, as it may in the scored batch). A
causal model computes position t from tokens 0..t alone: both losses are the same number (bit for
bit in fp32 on the CPU). A model that reads ahead gains exactly where it does so. With d = probe loss
- scored loss (nats; > 0 is what seeing the later tokens was worth), the model is refused when

- d at any tested position exceeds the position slack: reading ahead anywhere it is tested;
- the mean of d over the tested positions exceeds the mean slack: a small gain at every position.

The loaded graph is a pure function of its tokens (trainer.artifact refuses state and random ops),
so the probes question the very model that was scored.

Depth: the stakes decide it. A model that reads ahead at a fraction f of positions escapes n tested
positions with probability (1 - f)^n, and gains at most f * g per token, where g, what one position
can gain, is at most the loss of a causal prediction there; we take g = ln V (a uniform guess: an
honest model trained for the budget does better than that at almost every position).
- Routine: a tenth of the scoring's forwards (at least one batch of probes): gpt-climbmix tests 1,024
  positions (f = 1 % escapes with p = 3.4e-5), for +10 % of its forwards.
- Deep, for a run that would beat its agent's best (the only runs that can be kept, or lead the
  lab): sized so that reading ahead worth a quarter of the lab's σ (in val_bpb) escapes with
  probability at most 1e-3: f_min = (σ/4) ln2 · bytes_per_token / ln V, n = ln(1000) / f_min, at most
  DEEP_MAX_COST times the scoring's forwards (DEEP_DEFAULT_POSITIONS while σ is not known).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ROUTINE_COST = 0.1  # a routine audit's probe forwards, as a share of the scoring's
DEEP_ESCAPE = 1e-3
DEEP_DEFAULT_POSITIONS = 8192  # a lab whose noise is not known yet
DEEP_MAX_COST = 4  # a deep audit's probe forwards: at most this many times the scoring's
# (position, mean) slack in nats. fp32: a causal model gives the same loss bit for bit; half
# precision: bf16 logits are quantised at 1/16 near |logit| 16, and GPU kernels may sum in
# another order for another batch.
SLACK_FP32 = (1e-3, 1e-4)
SLACK_HALF = (0.25, 2e-3)


class Audit:
    """Draws the tested positions, records their scored losses, then probes them."""

    def __init__(self, arrays: list[np.ndarray], token_bytes: np.ndarray, positions: int) -> None:
        self.rows = np.stack(arrays)  # (batches, B, T+1)
        self.rng = np.random.default_rng()  # OS entropy: nothing train.py ran can know it
        batches, B, width = self.rows.shape
        self.T = width - 1
        counted = token_bytes[self.rows[:, :, 1:]].reshape(-1) > 0  # targets that count in val_bpb
        pick = self.rng.choice(counted.size, size=min(counted.size, 2 * positions + 64), replace=False)
        pick = pick[counted[pick]]
        if len(pick) < positions:  # mostly special tokens: draw from all that count
            pick = self.rng.permutation(np.flatnonzero(counted))
        self.batch, rest = np.divmod(pick[:positions], B * self.T)
        self.row, self.t = np.divmod(rest, self.T)
        self.scored: list[tuple[np.ndarray, torch.Tensor]] = []
        self.logits_dtype = torch.float32
        self._by_batch = {int(b): np.flatnonzero(self.batch == b) for b in np.unique(self.batch)}

    # -- during scoring --------------------------------------------------------------------------

    def record(self, batch: int, losses: torch.Tensor, logits_dtype: torch.dtype) -> None:
        """The scored forward's per-position losses of one batch, (rows * T,): keep the tested ones."""
        self.logits_dtype = logits_dtype
        which = self._by_batch.get(batch)
        if which is None:
            return
        flat = torch.from_numpy(self.row[which] * self.T + self.t[which]).to(losses.device)
        self.scored.append((which, losses[flat]))

    # -- after scoring ---------------------------------------------------------------------------

    def scored_losses(self) -> np.ndarray:
        out = np.full(len(self.batch), np.nan)
        for which, values in self.scored:
            out[which] = values.double().cpu().numpy()
        return out

    @torch.no_grad()
    def probe(self, model, n: int, vocab_size: int, device: torch.device, autocast_dtype: torch.dtype | None,
              scored: np.ndarray, stop_above: float) -> np.ndarray:
        """The target's loss at the first n tested positions (or fewer: it stops after the batch of probes
        where one gained more than `stop_above` over its scored loss), with the row's later tokens replaced."""
        from trainer.evaluate import check_logits  # noqa: PLC0415 — evaluate imports this module

        B, T = self.rows.shape[1], self.T
        losses = np.empty(n)
        cols = np.arange(T + 1)[None, :]
        for start in range(0, n, B):
            idx = np.arange(start, min(start + B, n))
            idx = np.concatenate([idx, np.full(B - len(idx), idx[0])])  # a whole batch: one graph shape
            rows = self.rows[self.batch[idx], self.row[idx]].astype(np.int64)
            t = self.t[idx]
            noise = self.rng.integers(0, vocab_size, size=rows.shape)
            noise = np.where(noise == rows, (noise + 1) % vocab_size, noise)  # never the real token
            probe_rows = np.where(cols > t[:, None], noise, rows)
            # laid out as the scored inputs are (a view of (B, T+1) rows): a compiled model keeps one graph
            x = torch.from_numpy(probe_rows).to(device)[:, :-1]
            targets = torch.from_numpy(rows[np.arange(B), t + 1]).to(device)
            with (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                  else nullcontext()):
                logits = model(x)
            check_logits(logits, x, vocab_size)
            at_t = logits[torch.arange(B, device=device), torch.from_numpy(t).to(device)].float()
            got = F.cross_entropy(at_t, targets, reduction="none")
            losses[start:start + B] = got.double().cpu().numpy()[:min(B, n - start)]
            done = min(start + B, n)
            if not np.all(losses[start:done] - scored[start:done] <= stop_above):  # NaN counts as a gain
                return losses[:done]
        return losses


def routine_positions(scored_forwards: int, batch_size: int) -> int:
    return max(1, math.ceil(ROUTINE_COST * scored_forwards)) * batch_size


def deep_positions(sigma: float | None, bytes_per_token: float, vocab_size: int, scored_forwards: int,
                   batch_size: int) -> int:
    """How many positions a deep audit tests (see the module's docstring)."""
    cap = DEEP_MAX_COST * scored_forwards * batch_size
    floor = routine_positions(scored_forwards, batch_size)
    if sigma is None or sigma <= 0:
        return max(floor, min(DEEP_DEFAULT_POSITIONS, cap))
    f_min = (sigma / 4) * math.log(2) * bytes_per_token / math.log(vocab_size)
    return max(floor, min(math.ceil(math.log(1 / DEEP_ESCAPE) / f_min), cap))


@dataclass(frozen=True)
class Finding:
    """What the audit measured; `refusal` is the reason the model is refused, or None."""

    positions: int
    deep: bool
    worst_nats: float
    mean_nats: float
    refusal: str | None


def judge(audit: Audit, scored: np.ndarray, n: int, model, vocab_size: int, device: torch.device,
          autocast_dtype: torch.dtype | None, deep: bool, bytes_per_token: float) -> Finding:
    """Probe the first n tested positions and judge; the slack is half precision's unless the scored
    forward ran in fp32 throughout (no autocast, float32 logits)."""
    half = autocast_dtype is not None or audit.logits_dtype in (torch.bfloat16, torch.float16)
    pos_slack, mean_slack = SLACK_HALF if half else SLACK_FP32
    probed = audit.probe(model, n, vocab_size, device, autocast_dtype, scored, pos_slack)
    n = len(probed)
    d = probed - scored[:n]
    d = np.where(np.isnan(d), np.inf, d)  # a NaN moved as far as it could
    k = int(np.argmax(d))
    worst, mean = float(d[k]), float(d.mean())
    refusal = None
    if worst > pos_slack:
        refusal = (f"the model is not causal: at position {int(audit.t[k])} of evaluation row "
                   f"{int(audit.row[k])} (batch {int(audit.batch[k])}), a position drawn at random, its loss on the "
                   f"next token was {scored[k]:.4g} nats with the row's later tokens in its input and {probed[k]:.4g} "
                   f"with them replaced: seeing them was worth {worst:.3g} nats (a causal model gives the same number "
                   f"both times; {pos_slack:g} allowed). A language model may look only at earlier tokens: check the "
                   "attention mask and that inputs are not shifted")
    elif mean > mean_slack:
        refusal = (f"the model is not causal: over {n} positions drawn at random, its loss on the next token was "
                   f"{mean:.3g} nats lower on average with the rows' later tokens in its input than with them "
                   f"replaced (worth {mean / (math.log(2) * bytes_per_token):.3g} val_bpb; a causal model gains "
                   f"nothing, {mean_slack:g} nats allowed). A language model may look only at earlier tokens")
    return Finding(n, deep, worst, mean, refusal)
