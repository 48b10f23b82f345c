"""The benchmark commands print their figures (speed goals are read from them, not asserted)."""

import json
import re
import subprocess

from trainer_testlib import PYTHON, REPO, TINY_TOML

TINY_TRAIN = REPO / "programs" / "tiny-stdlib" / "train.py"


def bench(*args: str) -> str:
    proc = subprocess.run([PYTHON, "-m", "trainer.bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def figure(text: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}\s+(.+)$", text, re.M)
    assert match, f"no {label!r} row in:\n{text}"
    return match.group(1).strip()


def test_bench_run_prints_cold_and_warm_figures_and_the_loader(tmp_path, tiny_data):
    out = bench("run", "--program", str(TINY_TOML), "--data", str(tiny_data), "--train", str(TINY_TRAIN),
                "--budget-s", "3", "--out", str(tmp_path))
    assert figure(out, "status (cold / warm)") == "ok / ok"
    assert float(figure(out, "tokens/s, warm (M)")) > 0
    p10, p50, p90 = (float(v) for v in figure(out, "step s p10 / p50 / p90").split(" / "))
    assert 0 < p10 <= p50 <= p90
    cold, warm = (float(v) for v in figure(out, "val_bpb cold / warm").split(" / "))
    assert 0 < cold < 20 and 0 < warm < 20
    rate = re.search(r"loader \(pack \+ gather, background thread\): ([\d.]+) M tokens/s", out)
    assert rate and float(rate.group(1)) > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [c["warm"]["status"] for c in saved] == ["ok"]


def test_bench_profile_shows_where_step_time_goes(tmp_path, tiny_data):
    out = bench("profile", "--program", str(TINY_TOML), "--data", str(tiny_data), "--train", str(TINY_TRAIN),
                "--budget-s", "4", "--skip", "4", "--steps", "2", "--out", str(tmp_path))
    head = re.search(r"profiled steps 4\.\.5: ([\d.]+) ms per step wall, ([\d.]+) ms of CPU operators", out)
    assert head, out
    wall, busy = float(head.group(1)), float(head.group(2))
    assert wall > 0 and 0 < busy
    assert re.search(r"^\s+matmul\s+[\d.]+ ms/step", out, re.M), out  # the tiny GPT's linears
    assert "compile phases" in out
