"""The time bound's reference (issue 34): the lab's baseline runs, never the agent's own drift. An
agent whose every run starts its clock a little later than the last cannot widen its allowance;
a run that compiles into its cache is judged against the baseline's cold start. (Through the
run path, on the docker backend: test_server_sealed.py's ratchet.)"""

from __future__ import annotations

from server.lab import Lab
from server.models import CALIBRATION_AGENT
from server.phases import Phases, time_reference

BUDGET = 4.0
BASE = "b" * 16


def ran(lab: Lab, agent: str, code: str, startup: float, tail: float, role: str = "experiment") -> None:
    rec = lab.ledger.create_run(agent, "a run", None, code_hash=code, role=role)
    lab.ledger.finish(rec.run_id, "ok", startup_seconds=startup, train_phase_seconds=startup + BUDGET + tail)


def test_the_reference_is_the_lab_s_baseline_and_an_agent_s_drift_moves_it_nowhere(make_lab):
    lab = Lab(make_lab(min_time_slack_s=5.0))
    try:
        phases = Phases(lab, backend=None, image="unused")
        assert time_reference(lab, BASE, BUDGET) is None  # the baseline has not run: the fixed allowances
        ran(lab, "alice", BASE, 6.0, 2.0)  # an agent's run of the unmodified train.py
        assert time_reference(lab, BASE, BUDGET).startup_s == 6.0
        ran(lab, CALIBRATION_AGENT, BASE, 5.0, 2.0, role="calibration")  # calibration runs come first
        for k in range(1, 11):  # alice's changes, each starting 1.2 s later: all recorded ok, as if they passed
            ran(lab, "alice", f"change-{k}", 5.0 + 1.2 * k, 2.0)
        ref = time_reference(lab, BASE, BUDGET)
        assert (ref.startup_s, ref.cold_startup_s, ref.tail_s, ref.runs) == (5.0, 5.0, 2.0, 1)
        late = {"startup_s": 5.0 + 12.0, "train_phase_s": 5.0 + 12.0 + BUDGET + 2.0}
        why = phases._time_check(BUDGET, late, ref, cold=False)
        assert why and "12.0 s of training outside the clock" in why and "baseline" in why, why
        within = {"startup_s": 9.5, "train_phase_s": 9.5 + BUDGET + 2.5}
        assert phases._time_check(BUDGET, within, ref, cold=False) is None  # 4.5 + 0.5 s: under 5 s

        ran(lab, CALIBRATION_AGENT, BASE, 30.0, 2.0, role="calibration")  # the cold start of an empty cache
        ref = time_reference(lab, BASE, BUDGET)
        assert ref.cold_startup_s == 30.0 and ref.startup_s == 17.5  # median of 5.0 and 30.0
        compiled = {"startup_s": 33.0, "train_phase_s": 33.0 + BUDGET + 2.0}
        assert phases._time_check(BUDGET, compiled, ref, cold=True) is None
        warm = phases._time_check(BUDGET, compiled, ref, cold=False)  # the same start without compiling: refused
        assert warm and "warm start" in warm, warm
    finally:
        lab.close()
