"""`python -m server.bench reliability --parts noise`: the keep rule (server.noise.decide, the code
the lab runs) on a program of known noise: each run's val_bpb is the change's true level plus
Gaussian noise of σ drawn from its seed. Prints how often a neutral change is kept (each against a
fresh best, and in a row, where a kept one becomes the best), how often a real 5σ improvement is,
and what the confirm reruns cost in a stream of changes that keeps about 15 % (15 % of them real 5σ
gains): extra runs per kept change, and experiments per hour of a 300-s program (40 s of start-up,
export and scoring each) with confirm reruns on and off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from server.noise import Noise, decide

SIGMA = 0.01
BASELINE = 1.0


@dataclass
class Lineage:
    """One agent's runs: the best's true level and its val_bpb by seed, and what the rule cost."""

    noise: Noise
    rng: random.Random
    best_level: float = BASELINE
    best: dict[int, float] = field(default_factory=dict)
    runs: int = 0
    kept: int = 0
    seed: int = 42

    def measure(self, level: float) -> float:
        self.runs += 1
        return level + self.rng.gauss(0.0, SIGMA)

    async def try_change(self, level: float) -> bool:
        """One experiment of a train.py whose true val_bpb is `level`; True when kept."""
        if not self.best:
            self.best = {self.seed: self.measure(self.best_level)}
        fresh = list(range(self.seed + 1, self.seed + 2 + self.noise.confirm_reruns))
        best = dict(self.best)

        async def rerun(seed: int) -> float:
            return self.measure(level)

        async def rerun_best(seed: int) -> float:
            best[seed] = self.measure(self.best_level)
            return best[seed]

        verdict, seeds = await decide(self.measure(level), self.seed, self.best, self.noise, fresh, rerun, rerun_best)
        self.best.update({s: v for s, v in best.items() if s not in self.best})  # the best's reruns are kept
        if verdict.verdict == "keep":
            self.best_level, self.best, self.kept = level, dict(seeds), self.kept + 1
        return verdict.verdict == "keep"


async def keep_rate(noise: Noise, gain_sigmas: float, changes: int, rng: random.Random) -> float:
    """The fraction kept of `changes` changes, each `gain_sigmas` σ better than a fresh best."""
    kept = 0
    for _ in range(changes):
        lineage = Lineage(noise, rng)
        kept += await lineage.try_change(BASELINE - gain_sigmas * SIGMA)
    return kept / changes


async def neutral_keeps(noise: Noise, changes: int, rng: random.Random) -> int:
    """How many of `changes` neutral changes one agent keeps in a row (a kept one becomes the best)."""
    lineage = Lineage(noise, rng)
    for _ in range(changes):
        await lineage.try_change(lineage.best_level)
    return lineage.kept


async def stream(noise: Noise, changes: int, rng: random.Random, real_fraction: float, gain_sigmas: float) -> Lineage:
    """An agent's stream of changes: `real_fraction` of them gain `gain_sigmas` σ, the rest are neutral."""
    lineage = Lineage(noise, rng)
    for _ in range(changes):
        real = rng.random() < real_fraction
        await lineage.try_change(lineage.best_level - (gain_sigmas * SIGMA if real else 0.0))
    return lineage


async def run_noise(changes: int, budget_s: float = 300.0, overhead_s: float = 40.0, seed: int = 0) -> dict:
    """The figures, and whether they meet issue 23's aims (≤ 5 % of neutral changes kept, ≥ 95 % of
    5σ improvements kept)."""
    rng = random.Random(seed)
    on, off = Noise(SIGMA, confirm_reruns=1), Noise(SIGMA, confirm_reruns=0)

    async def figures() -> dict:
        neutral = await keep_rate(on, 0.0, changes, rng)
        in_a_row = await neutral_keeps(on, changes, rng)
        five = await keep_rate(on, 5.0, changes, rng)
        per_hour = 3600 / (budget_s + overhead_s)
        streams = {}
        n = 20 * changes
        for name, noise in (("confirm_on", on), ("confirm_off", off)):
            s = await stream(noise, n, rng, real_fraction=0.15, gain_sigmas=5.0)
            streams[name] = {"experiments": n, "runs": s.runs, "kept": s.kept, "keep_rate": round(s.kept / n, 3),
                             "extra_runs_per_kept_change": round((s.runs - n) / max(s.kept, 1), 2),
                             "experiments_per_hour": round(per_hour * n / s.runs, 2)}
        return {"neutral_changes": changes, "neutral_keep_rate": neutral, "neutral_kept_in_a_row": in_a_row,
                "improvements_5sigma_keep_rate": five, "stream_15pct_5sigma_gains": streams,
                "run_seconds": budget_s + overhead_s}

    report = await figures()
    report["part"] = "noise"
    report["checks"] = {"at most 5% of neutral changes kept": report["neutral_keep_rate"] <= 0.05,
                        "at least 95% of 5-sigma improvements kept": report["improvements_5sigma_keep_rate"] >= 0.95}
    return report
