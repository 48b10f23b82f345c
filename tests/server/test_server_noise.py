"""The keep rule against the noise (issue 23): σ over seeds measured by calibrate, the harness's
seed, reruns, keeps that beat the noise, confirm reruns. Real runs use a program of known noise on
the local backend: its model is fixed (a mix of the training data's unigram and the uniform
distribution), its mixing weight the program's LEVEL plus NOISE times a draw from the harness's seed,
so that val_bpb moves with the seed and with LEVEL only.
"""

from __future__ import annotations

import math

import pytest

from server_helpers import make_diff

from server import report
from server.bench.common import make_lab, prepare_data, write_program
from server.bench.noise import run_noise
from server.lab import Lab, read_results
from server.noise import Noise, judge
from server.reconcile import reconcile
from server.runs import Runs

KNOWN_NOISE = '''\
"""known noise: a fixed model whose val_bpb is a level plus noise drawn from the harness's seed."""

import torch
import torch.nn.functional as F

import trainer

LEVEL = 0.0  # the uniform distribution's share, in logits: lower is better
NOISE = 0.3

cfg = trainer.program()
draw = torch.randn(()).item()
loader = trainer.train_loader(16)
counts = torch.ones(cfg.vocab_size)
for _ in range(8):
    x, _ = next(loader)
    counts += torch.bincount(x.flatten(), minlength=cfg.vocab_size)
share = torch.sigmoid(torch.tensor(LEVEL + NOISE * draw))
probs = (1 - share) * counts / counts.sum() + share / cfg.vocab_size


class Fixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(probs.log())

    def forward(self, x):
        return self.logits.expand(x.shape[0], x.shape[1], cfg.vocab_size)


model = Fixed()
while True:
    x, y = next(loader)
    if not trainer.step(F.cross_entropy(model(x).flatten(0, 1), y.flatten())):
        break
trainer.submit(model)
'''


@pytest.fixture(scope="module")
def noise_program(tmp_path_factory):
    root = tmp_path_factory.mktemp("known-noise")
    program = write_program(root / "program", budget_s=0.3, train=KNOWN_NOISE)
    return program, prepare_data(program, root / "data")


def test_judge_is_z_against_the_margin():
    noise = Noise(sigma=0.01, keep_z=2.0)
    se = 0.01 * math.sqrt(2)
    kept = judge([1.0 - 2.5 * se], [1.0], noise, may_confirm=True)
    assert kept.verdict == "keep" and kept.significant and kept.z == pytest.approx(2.5)
    band = judge([1.0 - 1.0 * se], [1.0], noise, may_confirm=True)
    assert band.verdict == "confirm" and band.significant is False and band.delta == pytest.approx(-se)
    assert judge([1.0 - 1.0 * se], [1.0], noise, may_confirm=False).verdict == "discard"
    assert judge([1.01], [1.0], noise, may_confirm=True).verdict == "discard"  # worse: never confirmed
    means = judge([0.99, 0.99], [1.0, 1.0], noise, may_confirm=False)  # se shrinks with the seeds
    assert means.z == pytest.approx(0.01 / 0.01) and means.verdict == "discard"
    floor = Noise(sigma=None, floor=0.02)  # not calibrated: min_improvement is the single runs' margin
    assert floor.margin() == pytest.approx(0.02)
    assert judge([0.975], [1.0], floor, True).verdict == "keep" and judge([0.99], [1.0], floor, True).verdict == "confirm"
    bare = Noise(sigma=None)  # neither: any improvement, as the original loop
    assert judge([0.9999], [1.0], bare, True).verdict == "keep" and judge([1.0], [1.0], bare, True).verdict == "discard"
    assert judge([1.2], None, noise, True).verdict == "keep"  # the baseline


@pytest.mark.anyio
async def test_neutral_changes_and_5_sigma_improvements_on_known_noise():
    """The lab's decision code (server.noise.decide) over 2000 neutral changes and 2000 real 5σ gains
    (at least 200 of each; 2000 pins the neutral rate to ±0.5 %)."""
    report = await run_noise(2000)
    assert report["neutral_keep_rate"] <= 0.05, report
    assert report["improvements_5sigma_keep_rate"] >= 0.95, report


@pytest.mark.anyio
async def test_calibrate_reruns_reseeding_and_a_5_sigma_keep(noise_program, tmp_path):
    program, data = noise_program
    root = make_lab(tmp_path / "lab", program, data, backend="local", slots=2, min_time_slack_s=60)
    lab = Lab(root)
    try:
        runs = Runs(lab)
        calibration = await runs.calibrate(3)
        values = [r.val_bpb for r in calibration.runs]
        assert [r.seed for r in calibration.runs] == [42, 43, 44] and len(set(values)) == 3  # the seed moves it
        assert calibration.sigma == pytest.approx(__import__("statistics").stdev(values)) and calibration.sigma > 0
        shown = lab.read_program().noise
        assert shown.sigma == calibration.sigma and [r.run_id for r in shown.calibration_runs] == [
            "calibration-0001", "calibration-0002", "calibration-0003"]
        assert shown.margin == pytest.approx(2 * math.sqrt(2) * calibration.sigma, rel=1e-4)
        assert "standard errors" in shown.rule and lab.best("alice").noise.sigma == calibration.sigma

        base = await runs.run("alice", "baseline")
        assert base.status == "ok" and base.kept and base.seed == 42
        assert base.val_bpb == pytest.approx(calibration.runs[0].val_bpb)  # same code, same seed, same number

        again = await runs.run("alice", "the same file again")
        assert again.status == "ok" and again.decision == "rerun" and not again.kept and again.commit is None
        assert again.val_bpb == pytest.approx(base.val_bpb) and "alice-0001" in again.reason

        text = (await lab.read_train("alice")).text
        await lab.apply_patch("alice", make_diff(text, "cfg = trainer.program()",
                                                 "cfg = trainer.program(); torch.manual_seed(1234)"))
        reseeded = await runs.run("alice", "a seed of my own")
        assert reseeded.status == "invalid" and "seed" in reseeded.reason and not reseeded.kept

        text = (await lab.read_train("alice")).text
        await lab.apply_patch("alice", make_diff(text, "LEVEL = 0.0", "LEVEL = -4.0"))
        better = await runs.run("alice", "less of the uniform distribution")
        assert base.val_bpb - better.val_bpb > 5 * calibration.sigma  # a real 5σ improvement, and more
        assert better.kept and better.significant and better.z > 2 and better.sigma == calibration.sigma
        assert better.delta == pytest.approx(better.val_bpb - base.val_bpb)

        rows = read_results(lab.results_path("alice"))
        assert [r["status"] for r in rows] == ["keep", "invalid", "keep"]  # no row for the rerun
        assert [r["seed"] for r in rows] == ["42", "42", "42"] and float(rows[2]["z"]) == pytest.approx(better.z, abs=0.01)
        assert reconcile(lab) == []
        table = report.table(lab)
        assert f"σ = {calibration.sigma:.6f} over 3 seeds" in table and "# alice" in table and "# calibration" not in table
        assert report.plot(lab, tmp_path / "progress.png").stat().st_size > 10_000  # with alice's noise band
    finally:
        lab.close()


@pytest.mark.anyio
async def test_a_gain_inside_the_band_is_confirmed_at_fresh_seeds(noise_program, tmp_path):
    """An uncalibrated lab whose program sets min_improvement far above any gain: every improvement
    is inside the band, so it is rerun at seed 43, the best too, and the means decide."""
    program, data = noise_program
    toml = program / "program.toml"
    floor = tmp_path / "floor-program"
    floor.mkdir()
    for f in program.iterdir():
        (floor / f.name).write_bytes(f.read_bytes())
    (floor / "program.toml").write_text(toml.read_text().replace("seed = 42\n", "seed = 42\nmin_improvement = 10.0\n"))
    root = make_lab(tmp_path / "lab", floor, data, backend="local", slots=1, min_time_slack_s=60)
    lab = Lab(root)
    try:
        runs = Runs(lab)
        base = await runs.run("bob", "baseline")
        text = (await lab.read_train("bob")).text
        await lab.apply_patch("bob", make_diff(text, "LEVEL = 0.0", "LEVEL = -1.0"))
        cand = await runs.run("bob", "a little less uniform")
        assert cand.status == "ok" and cand.val_bpb < base.val_bpb
        assert cand.confirm_runs == ["bob-0003", "bob-0004"] and cand.decision == "discard" and not cand.kept
        assert cand.seeds_in_mean == 2 and cand.significant is False and 0 < cand.z <= 2
        mine, best = lab.ledger.get("bob-0003"), lab.ledger.get("bob-0004")
        assert (mine.role, mine.parent, mine.seed, mine.status) == ("confirm", "bob-0002", 43, "ok")
        assert (best.role, best.parent, best.seed, best.status) == ("confirm", "bob-0001", 43, "ok")
        assert mine.commit is None and best.commit is None
        assert cand.mean_val_bpb == pytest.approx((cand.val_bpb + mine.val_bpb) / 2, abs=1e-6)
        assert lab.noise().rule().startswith("A run is kept only when its val_bpb beats your best by more than 10")
        assert reconcile(lab) == []
    finally:
        lab.close()
