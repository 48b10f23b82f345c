"""The reliability suite (issue 19) at its small size: load through real stdio servers, the faults
on a real Docker engine (an engine of the bench's own is restarted once), hypothesis fuzzing of every
tool, all while a user's lab trains beside it on the host's engine and must not notice (issue 33). The
full size (`python -m server.bench reliability`) is a benchmark; its figures are in the issue notes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from foreign_lab import ForeignLab
from server_helpers import IMAGE, REPO

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]


@pytest.fixture
def foreign_lab(docker_client):
    lab = ForeignLab(docker_client)
    try:
        lab.start()
        yield lab
    finally:
        lab.remove()


def test_the_reliability_suite_passes_at_its_small_size(tmp_path, foreign_lab):
    proc = subprocess.run([sys.executable, "-m", "server.bench", "reliability", "--size", "small",
                           "--image", IMAGE, "--work", str(tmp_path / "bench")],
                          cwd=REPO, capture_output=True, text=True, timeout=1400)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_part = {r.get("part", "summary"): r for r in reports}
    assert set(by_part) == {"load", "faults", "fuzz", "noise", "summary"}, proc.stderr[-3000:]
    failed = {part: {k: v for k, v in r["checks"].items() if not v} for part, r in by_part.items() if "checks" in r}
    assert not any(failed.values()), json.dumps({"failed": failed, "reports": reports})[:6000]
    assert proc.returncode == 0 and by_part["summary"]["summary"] == "ok"
    load = by_part["load"]
    assert load["ledger"]["rows"] == load["runs"] == 2 * 4 and load["max_concurrent_training"] <= 2
    faults = {f["fault"]: f for f in by_part["faults"]["faults"]}
    assert faults["supervisor-kill-9"]["ledger_says"] == "interrupted"
    assert faults["oom"]["ledger_says"] == "oom"
    assert by_part["fuzz"]["cases"] >= 270 and by_part["fuzz"].get("unhandled", 0) == 0
    assert faults["dockerd-restart"]["ledger_says"] == "infra-error" and faults["dockerd-restart"]["rows"] == 1
    # the user's lab beside it: the same container still training, its lease held, the host's engine not restarted
    assert foreign_lab.untouched() == {}
    user = foreign_lab.finish()
    assert user["status"] == "ok" and user["val_bpb"] > 0, user
