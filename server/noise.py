"""The keep rule (issue 23): a change is kept only when it beats the agent's best by more than the noise.

σ is the lab's spread of val_bpb over seeds, measured by `autoresearch-mcp calibrate` (the baseline
at several seeds the harness chooses). A candidate measured at n_c seeds against a best measured at
n_b seeds is judged by

    z = (mean(best) - mean(candidate)) / (σ · √(1/n_c + 1/n_b))      (positive = better)

and kept when z > keep_z (default 2: a neutral change passes about 2 % of the time). A candidate
that beats the best but not by that much (0 < z ≤ keep_z) is rerun at fresh seeds (the lab's
confirm_reruns, default 1), the best as often when it lacks those seeds, and the means decide
(`python -m server.bench reliability --parts noise` measures the rates on a program of known noise). A lab not yet calibrated uses the program's
`min_improvement` as its margin for single runs (σ = min_improvement / (keep_z·√2)); with no floor
either (0), any improvement is kept, as the original loop does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["keep", "discard", "confirm"]


@dataclass(frozen=True)
class Noise:
    """What a lab knows of its noise."""

    sigma: float | None
    """The measured spread over seeds (None: not calibrated)."""
    floor: float = 0.0
    """The program's min_improvement, the margin while not calibrated."""
    keep_z: float = 2.0
    confirm_reruns: int = 1

    @property
    def unit(self) -> float | None:
        """σ of one run as the rule uses it; None when there is no margin at all."""
        if self.sigma is not None:
            return self.sigma
        return self.floor / (self.keep_z * math.sqrt(2)) if self.floor > 0 else None

    def margin(self, n_candidate: int = 1, n_best: int = 1) -> float:
        """How much lower than the best's mean a candidate's mean must be to be kept."""
        unit = self.unit
        return 0.0 if unit is None else self.keep_z * unit * math.sqrt(1 / n_candidate + 1 / n_best)

    def rule(self) -> str:
        """The rule in one sentence, for the agent."""
        if self.sigma is not None:
            return (f"A run is kept only when its val_bpb beats your best by more than {self.keep_z:g} standard "
                    f"errors of the difference (σ = {self.sigma:.4f} over seeds: {self.margin():.4f} for single "
                    f"runs); a smaller gain is rerun at {self.confirm_reruns} fresh seed(s) and the means decide.")
        if self.floor > 0:
            return (f"A run is kept only when its val_bpb beats your best by more than {self.floor:g} (the "
                    f"program's min_improvement; the lab's noise is not measured yet); a smaller gain is rerun at "
                    f"{self.confirm_reruns} fresh seed(s) and the means decide.")
        return "A run is kept when its val_bpb is lower than your best (the lab's noise is not measured yet)."


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    delta: float | None
    """mean(candidate) - mean(best): negative = better; None for a first run."""
    sigma: float | None
    """σ of one run as used (the measured one, or the floor's)."""
    z: float | None
    """The improvement in standard errors of the difference (positive = better)."""
    significant: bool | None
    """Beyond the margin; None for a first run."""


def judge(candidate: list[float], best: list[float] | None, noise: Noise, may_confirm: bool) -> Judgement:
    """The verdict on a candidate's val_bpb at its seeds against the best's at theirs (None: no best
    yet, the first run is kept as the baseline)."""
    if not candidate:
        raise ValueError("a candidate needs at least one val_bpb")
    if not best:
        return Judgement("keep", None, noise.unit, None, None)
    delta = statistics.fmean(candidate) - statistics.fmean(best)
    unit = noise.unit
    if unit is None:
        return Judgement("keep" if delta < 0 else "discard", delta, None, None, delta < 0)
    se = unit * math.sqrt(1 / len(candidate) + 1 / len(best))
    z = -delta / se if se > 0 else (math.inf if delta < 0 else 0.0)
    if z > noise.keep_z:
        return Judgement("keep", delta, unit, z, True)
    verdict: Verdict = "confirm" if z > 0 and may_confirm and noise.confirm_reruns > 0 else "discard"
    return Judgement(verdict, delta, unit, z, False)


Measure = Callable[[int], Awaitable[float | None]]
"""Runs a train.py at a seed; its val_bpb, or None when that run did not score."""


async def decide(value: float, seed: int, best: dict[int, float], noise: Noise, fresh: list[int],
                 rerun_candidate: Measure, rerun_best: Measure) -> tuple[Judgement, dict[int, float]]:
    """The whole rule for a candidate that scored `value` at `seed`, against the best's val_bpb by
    seed ({}: no best yet). The best counts at every seed it was measured at (its own run and its
    reruns), so that one lucky run of it does not stand in the way of every later change. Judged on
    the one run; inside the band, after confirm reruns at the `fresh` seeds (the best rerun at those
    it lacks, so that it has as many), on the means. Returns the judgement and the candidate's
    val_bpb at the seeds it rests on."""
    if not best:
        return judge([value], None, noise, False), {seed: value}
    first = judge([value], list(best.values()), noise, may_confirm=True)
    if first.verdict != "confirm":
        return first, {seed: value}
    candidate, best = {seed: value}, dict(best)
    for s in [s for s in fresh if s != seed][:noise.confirm_reruns]:
        score = await rerun_candidate(s)
        if score is not None:
            candidate[s] = score
        if s not in best:
            score = await rerun_best(s)
            if score is not None:
                best[s] = score
    if len(candidate) < 2:  # the reruns did not score: the one run inside the band is not enough
        return Judgement("discard", first.delta, first.sigma, first.z, False), candidate
    return judge(list(candidate.values()), list(best.values()), noise, may_confirm=False), candidate


def spread(values: list[float]) -> float:
    """σ of val_bpb over seeds: the sample standard deviation (at least two values)."""
    if len(values) < 2:
        raise ValueError("σ needs at least two runs")
    return statistics.stdev(values)
