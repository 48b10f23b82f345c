"""The benchmark commands print their figures (speed goals are read from them, not asserted)."""

import json
import re
import subprocess

from trainer import bench as bench_module
from trainer_testlib import PYTHON, REPO, TINY_TOML, derive_program

TINY_TRAIN = REPO / "programs" / "tiny-stdlib" / "train.py"


def bench(*args: str) -> str:
    proc = subprocess.run([PYTHON, "-m", "trainer.bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def figures(text: str, label: str) -> list[str]:
    """One table row's cells, a column per train.py."""
    match = re.search(rf"^{re.escape(label)}\s+(.+)$", text, re.M)
    assert match, f"no {label!r} row in:\n{text}"
    return re.split(r"\s{2,}", match.group(1).strip())


def test_bench_run_prints_cold_and_warm_figures_side_by_side_and_the_loader(tmp_path, tiny_data):
    other = tmp_path / "other.py"
    other.write_text(TINY_TRAIN.read_text())
    out = bench("run", "--program", str(TINY_TOML), "--data", str(tiny_data), "--train", str(TINY_TRAIN),
                "--train", str(other), "--budget-s", "3", "--out", str(tmp_path / "bench"))
    assert figures(out, "status (cold / warm)") == ["ok / ok", "ok / ok"]
    ratio = re.search(r"^other\.py / train\.py, warm: tokens/s x([\d.]+), MFU -, overhead x([\d.]+)", out, re.M)
    assert ratio and float(ratio.group(1)) > 0 and float(ratio.group(2)) > 0, out
    for column in range(2):
        assert float(figures(out, "tokens/s, warm (M)")[column]) > 0
        p10, p50, p90 = (float(v) for v in figures(out, "step s p10 / p50 / p90")[column].split(" / "))
        assert 0 < p10 <= p50 <= p90
        cold, warm = (float(v) for v in figures(out, "val_bpb cold / warm")[column].split(" / "))
        assert 0 < cold < 20 and 0 < warm < 20
    rate = re.search(r"loader \(pack \+ gather, background thread\): ([\d.]+) M tokens/s", out)
    assert rate and float(rate.group(1)) > 0
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [c["warm"]["status"] for c in saved] == ["ok", "ok"]


def test_bench_profile_shows_where_step_time_goes(tmp_path, tiny_data):
    out = bench("profile", "--program", str(TINY_TOML), "--data", str(tiny_data), "--train", str(TINY_TRAIN),
                "--budget-s", "4", "--skip", "4", "--steps", "2", "--out", str(tmp_path))
    head = re.search(r"profiled steps 4\.\.5: ([\d.]+) ms per step wall, ([\d.]+) ms of CPU operators", out)
    assert head, out
    wall, busy = float(head.group(1)), float(head.group(2))
    assert wall > 0 and 0 < busy
    assert re.search(r"^\s+matmul\s+[\d.]+ ms/step", out, re.M), out  # the tiny GPT's linears
    assert "compile phases" in out


def test_bench_edits_runs_the_base_cold_then_warm_then_each_edit_on_one_cache(tmp_path, tiny_data):
    edit = tmp_path / "deeper.py"
    edit.write_text(TINY_TRAIN.read_text().replace("DEPTH = 3 ", "DEPTH = 2 "))
    out = bench("edits", "--program", str(TINY_TOML), "--data", str(tiny_data), "--train", str(TINY_TRAIN),
                "--train", str(edit), "--budget-s", "2", "--out", str(tmp_path / "edits"))
    rows = re.findall(r"^(\S+ \((?:empty cache|warm|edit)\))\s+(\S+)" + r"\s+([\d.]+)" * 7 + "$", out, re.M)
    assert [r[:2] for r in rows] == [("train.py (empty cache)", "ok"), ("train.py (warm)", "ok"),
                                     ("deeper.py (edit)", "ok")], out
    for _, _, overhead, startup, export, score, load, eval_s, rate in rows:
        assert float(overhead) > float(startup) > 0 and float(rate) > 0
        assert float(export) > 0 and float(score) > float(load) + float(eval_s) > 0  # the sealed score process
    saved = json.loads((tmp_path / "edits" / "edits.json").read_text())
    assert [r["path"] for r in saved] == [str(TINY_TRAIN), str(TINY_TRAIN), str(edit)]
    assert saved[2]["num_params"] < saved[0]["num_params"]  # the edited file is the one that ran
    assert [p.name for p in (tmp_path / "edits").glob("cache*")] == ["cache"]  # one cache for all


def test_bench_quality_runs_each_file_per_seed_and_summarises_the_spread(tmp_path, tiny_data):
    other = tmp_path / "other.py"
    other.write_text(TINY_TRAIN.read_text())
    out_dir = tmp_path / "quality"
    common = ["quality", "--program", str(TINY_TOML), "--data", str(tiny_data), "--train", str(TINY_TRAIN),
              "--train", str(other), "--budget-s", "1", "--out", str(out_dir)]
    bench(*common, "--seeds", "7,8")
    rows = [json.loads(line) for line in (out_dir / "quality.jsonl").read_text().splitlines()]
    # seed 7: train.py first; seed 8: the order turned round
    assert [(r["seed"], r["train"]) for r in rows] == [(7, "train.py"), (7, "other.py"),
                                                       (8, "other.py"), (8, "train.py")]
    assert all(r["status"] == "ok" and 0 < r["val_bpb"] < 20 for r in rows), rows
    assert "seed = 8\n" in (out_dir / "program-seed8.toml").read_text()
    assert "budget_s = 1.0\n" in (out_dir / "program-seed8.toml").read_text()

    # a later call into the same folder, one file only, adds its run to the summary
    text = bench("quality", "--program", str(TINY_TOML), "--data", str(tiny_data), "--train", str(other),
                 "--budget-s", "1", "--out", str(out_dir), "--seeds", "9")
    rows = [json.loads(line) for line in (out_dir / "quality.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[-1]["path"] == str(other)
    runs = sorted(p.name for p in out_dir.glob("*-seed*") if p.is_dir())
    assert runs == ["other.py-seed7", "other.py-seed8", "other.py-seed9", "train.py-seed7", "train.py-seed8"]
    assert figures(text, "runs ok / all") == ["2 / 2", "3 / 3"]  # train.py ran first: the baseline
    score = {(r["train"], r["seed"]): r["val_bpb"] for r in rows}
    for column, (name, seeds) in enumerate((("train.py", (7, 8)), ("other.py", (7, 8, 9)))):
        values = [score[name, s] for s in seeds]
        assert float(figures(text, "val_bpb mean")[column]) == round(sum(values) / len(values), 4)
        assert figures(text, "val_bpb min / max")[column] == f"{min(values):.4f} / {max(values):.4f}"
        epochs = [r["epochs"] for r in rows if r["train"] == name]
        assert all(e > 0 for e in epochs) and float(figures(text, "epochs mean")[column]) == round(
            sum(epochs) / len(epochs), 2)
    diffs = [score["other.py", s] - score["train.py", s] for s in (7, 8)]
    paired = re.search(r"^other\.py - train\.py, paired by seed \(2: 7, 8\): mean ([+-][\d.]+), sd ([\d.]+), "
                       r"higher at (\d), lower at (\d) \(sign test p ([\d.]+)\)$", text, re.M)
    assert paired and float(paired.group(1)) == round(sum(diffs) / 2, 4), text
    higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    assert paired.group(3, 4) == (str(higher), str(lower))
    assert float(paired.group(5)) == round(bench_module.sign_test_p(higher, lower), 3)


def test_sign_test_p_values():
    assert bench_module.sign_test_p(7, 0) == bench_module.sign_test_p(0, 7) == 2 / 128
    assert bench_module.sign_test_p(5, 1) == 2 * 7 / 64
    assert bench_module.sign_test_p(1, 1) == bench_module.sign_test_p(0, 0) == 1.0


def test_bench_quality_refuses_a_bad_seed_list_before_any_run(tmp_path, tiny_data):
    proc = subprocess.run([PYTHON, "-m", "trainer.bench", "quality", "--program", str(TINY_TOML), "--data",
                           str(tiny_data), "--train", str(TINY_TRAIN), "--seeds", "7,x", "--out",
                           str(tmp_path / "q")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "expected comma-separated integers, like 42,43,44; got '7,x'" in proc.stderr
    assert not (tmp_path / "q").exists()


def test_quality_summary_counts_every_rerun_of_a_seed():
    """Two ok runs at seed 42 are two runs (issue 20): the mean, sd and range are over both."""
    from trainer.bench import quality_summary  # noqa: PLC0415

    rows = [{"train": "a.py", "seed": 42, "status": "ok", "val_bpb": v, "num_steps": 10, "epochs": 1.0}
            for v in (0.60, 0.64)]
    rows.append({"train": "b.py", "seed": 42, "status": "ok", "val_bpb": 0.61, "num_steps": 10, "epochs": 1.0})
    text = "\n".join(quality_summary(rows))
    assert "2 / 2" in text and "0.6200" in text and "0.0283" in text, text  # mean 0.62, sd of the two
    assert "mean -0.0100" in text, text  # b minus a at seed 42: against a's mean there


def test_bench_audit_prints_false_refusals_the_honest_spread_and_the_cost(tmp_path, tiny_data):
    program = derive_program(TINY_TOML, tmp_path / "program.toml", eval_tokens=4 * 32 * 256)  # 4 forwards
    out = bench("audit", "--program", str(program), "--data", str(tiny_data), "--train", str(TINY_TRAIN),
                "--seeds", "7", "--audits", "2", "--budget-s", "1", "--out", str(tmp_path / "audit"))
    assert "honest models: 1 of 1 trained; audits: 2, false refusals: 0" in out, out
    assert "worst position 0, mean over positions in [0, 0]" in out  # fp32 on the CPU: bit for bit
    assert re.search(r"^routine audit, warm: 32 positions, [\d.]+ s against scoring [\d.]+ s", out, re.M), out
    assert re.search(r"^deep audit, warm: 512 positions", out, re.M), out  # 4x the scoring's forwards
    assert re.search(r"^seed 7, cold score process [\d.]+ s: routine audit [\d.]+ s \(\+[\d.]+ % of the rest\)",
                     out, re.M), out
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert [len(r["audits"]) for r in saved] == [2] and saved[0]["audits"][1]["deep"]
