"""The harness: the tiny program learns and its export beats unigram; every way train.py fails is a crash
result; an export that fails is unscorable."""

import json
import math
import subprocess

import pytest

from trainer import run as harness
from trainer_testlib import (PROGRAMS, PYTHON, REPO, RESULT_KEYS, TINY_TOML, derive_program, mini, scaled_climbmix,
                             score_export)

def run_in_process(tmp_path, tiny_data, source: str, **overrides):
    program = derive_program(TINY_TOML, tmp_path / "program.toml",
                             **{"budget_s": 3, "untimed_steps": 1, "grace_s": 2, **overrides})
    train = tmp_path / "train.py"
    train.write_text(source)
    out = tmp_path / "out"
    result = harness.execute(program, train, tiny_data, out)
    assert json.loads((out / "result.json").read_text()) == result
    assert set(result) >= RESULT_KEYS
    return result, out


def phases(out):
    return [json.loads(line)["phase"] for line in (out / "progress.jsonl").read_text().splitlines()]


def test_tiny_program_learns_and_beats_unigram(tmp_path, tiny_data):
    program = derive_program(TINY_TOML, tmp_path / "program.toml", budget_s=20)
    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, "-m", "trainer.run", "--program", str(program), "--train",
                           str(PROGRAMS / "tiny-stdlib" / "train.py"), "--data", str(tiny_data),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert set(result) >= RESULT_KEYS and result["status"] == "ok" and result["reason"] is None
    assert result["val_bpb"] is None and result["export_seconds"] > 0  # sealed: scored elsewhere
    scores = score_export(out, program, tiny_data)
    print(f"tiny-stdlib 20 s: val_bpb {scores['val_bpb']:.4f}, unigram {scores['unigram_bpb']:.4f}, "
          f"{result['num_steps']} steps, export {result['export_seconds']:.1f} s, scorer load "
          f"{scores['load_seconds']:.1f} s, eval {scores['eval_seconds']:.1f} s")
    # learned, not just frequencies (0.8 of the unigram's on an idle box; other tests beside it cost steps)
    assert scores["status"] == "ok" and scores["val_bpb"] < 0.9 * scores["unigram_bpb"]
    assert 19.5 <= result["training_seconds"] <= 30 and result["num_steps"] > 20
    assert result["total_tokens"] > 0 and result["num_params"] > 100_000
    assert result["mfu_percent"] is None  # no known GPU
    block = proc.stdout[proc.stdout.rindex("---"):]
    assert "val_bpb:" not in block and f"export_seconds:   {result['export_seconds']:.1f}" in block
    train_tokens = json.loads((tiny_data / "meta.json").read_text())["splits"]["train"]["tokens"]
    assert result["epochs"] == pytest.approx(result["total_tokens"] / train_tokens, abs=1e-3)
    assert f"epochs:           {result['epochs']:.2f}" in block
    assert ("times; past one epoch val_bpb also measures memorisation" in proc.stdout) == (result["epochs"] > 1)
    lines = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["phase"] == "train"]
    assert phases(out)[0] == "startup" and phases(out)[-2:] == ["export", "done"] and "clock" in phases(out)
    assert {"step", "loss", "tokens_per_s", "remaining_s", "t"} <= set(train[-1])
    assert train[-1]["loss"] < train[0]["loss"]


def test_raising_train_py_is_a_crash_with_reason_and_traceback(tmp_path, tiny_data):
    result, out = run_in_process(tmp_path, tiny_data, mini("""
        if step == 3:
            raise RuntimeError("boom at step three")
        trainer.step(loss)
    """))
    assert result["status"] == "crash" and result["val_bpb"] is None
    assert result["reason"] == "RuntimeError: boom at step three"
    assert "train.py" in result["traceback_tail"] and "boom at step three" in result["traceback_tail"]
    assert result["num_steps"] == 2 and phases(out)[-1] == "done"


@pytest.mark.parametrize("bad", ["float('nan')", "float('inf')", "1e6"])
def test_nan_or_exploding_loss_stops_the_run_quickly(tmp_path, tiny_data, bad):
    result, _ = run_in_process(tmp_path, tiny_data, mini(f"""
        if not trainer.step(loss if step < 4 else torch.tensor({bad})):
            break
    """) + "trainer.submit(model)\n", budget_s=60)
    assert result["status"] == "crash" and "training diverged" in result["reason"]
    assert "at step 4" in result["reason"] and result["total_seconds"] < 30
    assert result["num_steps"] == 4


def test_swallowing_the_divergence_does_not_help(tmp_path, tiny_data):
    result, _ = run_in_process(tmp_path, tiny_data, mini("""
        try:
            ok = trainer.step(torch.tensor(float('nan')) if step == 2 else loss)
        except ArithmeticError:
            ok = False
        if not ok:
            break
    """) + "trainer.submit(model)\n")
    assert result["status"] == "crash" and "loss is nan at step 2" in result["reason"]


def test_training_before_the_clock_beyond_the_free_steps_is_a_crash(tmp_path, tiny_data):
    """The untimed steps are for compiling; a long warm-up before them is training off the clock."""
    cheat = mini("""
        if not trainer.step(loss):
            break
    """).replace("step = 0\n", "step = 0\nfor _ in range(40):  # 'pre-training', no trainer.step()\n    next(loader)\n")
    result, _ = run_in_process(tmp_path, tiny_data, cheat + "trainer.submit(model)\n", untimed_steps=2)
    assert result["status"] == "crash" and result["val_bpb"] is None
    assert "before the clock started" in result["reason"] and "2 free steps" in result["reason"]


def test_big_early_steps_are_not_taken_for_training_off_the_clock(tmp_path, tiny_data):
    """A batch-size schedule that starts large stays legal: the bound is the largest timed step."""
    result, _ = run_in_process(tmp_path, tiny_data, mini("""
        if step <= 3:  # two micro-batches a step at first, one later
            x, y = next(loader)
            torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.step(); opt.zero_grad()
        if not trainer.step(loss):
            break
    """) + "trainer.submit(model)\n", untimed_steps=2)
    assert result["status"] == "ok", result["reason"]


def test_a_run_past_one_epoch_says_so(tmp_path, tiny_data, capsys):
    """val_bpb past one epoch also measures memorisation: the result counts the epochs and warns."""
    result, _ = run_in_process(tmp_path, tiny_data, mini("""
        for _ in range(200):  # a data-hungry step: many more rows than it trains on
            next(loader)
        if not trainer.step(loss):
            break
    """) + "trainer.submit(model)\n")
    train_tokens = json.loads((tiny_data / "meta.json").read_text())["splits"]["train"]["tokens"]
    assert result["status"] == "ok" and result["epochs"] > 1, result
    assert result["epochs"] == pytest.approx(result["total_tokens"] / train_tokens, abs=1e-3)
    assert (f"saw its {train_tokens:,}-token training split {result['epochs']:.2f} times; past one epoch"
            in capsys.readouterr().out)


def test_missing_submit_is_a_crash(tmp_path, tiny_data):
    result, _ = run_in_process(tmp_path, tiny_data, mini("""
        if not trainer.step(loss):
            break
    """))
    assert result["status"] == "crash" and "without calling trainer.submit" in result["reason"]


def test_training_past_the_budget_is_a_crash(tmp_path, tiny_data):
    result, _ = run_in_process(tmp_path, tiny_data, mini("""
        trainer.step(loss)  # ignores the False that says the budget is spent
    """), budget_s=1, grace_s=1)
    assert result["status"] == "crash" and "past its budget" in result["reason"]


def test_wrong_model_output_is_a_crash(tmp_path, tiny_data):
    result, _ = run_in_process(tmp_path, tiny_data, mini("""
        if not trainer.step(loss):
            break
    """) + "trainer.submit(torch.nn.Identity())\n", budget_s=1)
    assert result["status"] == "ok"  # it exports (tokens in, tokens out): the scorer says what is wrong
    scores = score_export(tmp_path / "out", tmp_path / "program.toml", tiny_data)
    assert scores["status"] == "unscorable" and "expected (batch, seq_len, vocab_size)" in scores["reason"]


def test_submitting_something_else_than_a_module_is_a_crash(tmp_path, tiny_data):
    result, _ = run_in_process(tmp_path, tiny_data, mini("""
        if not trainer.step(loss):
            break
    """) + "trainer.submit(lambda x: model(x))\n", budget_s=1)
    assert result["status"] == "crash" and "SubmitError" in result["reason"]
    assert "torch.nn.Module" in result["reason"]


def test_ok_run_in_process_and_exit_codes(tmp_path, tiny_data):
    source = mini("""
        if not trainer.step(loss):
            break
    """) + "trainer.submit(model)\n"
    result, out = run_in_process(tmp_path, tiny_data, source, budget_s=1)
    assert result["status"] == "ok" and 0 < score_export(out, tmp_path / "program.toml", tiny_data)["val_bpb"] < 20
    crash = tmp_path / "crash.py"
    crash.write_text("import sys\nsys.exit(3)\n")
    proc = subprocess.run([PYTHON, "-m", "trainer.run", "--program", str(TINY_TOML), "--train",
                           str(crash), "--data", str(tiny_data), "--out", str(tmp_path / "o2")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "reason:           train.py exited with status 3" in proc.stdout


def test_missing_data_or_program_is_a_crash_result(tmp_path, tiny_data):
    train = tmp_path / "train.py"
    train.write_text("import trainer\n")
    result = harness.execute(tmp_path / "nope.toml", train, tiny_data, tmp_path / "o1")
    assert result["status"] == "crash" and "file not found" in result["reason"]
    result = harness.execute(TINY_TOML, train, tmp_path / "empty", tmp_path / "o2")
    assert result["status"] == "crash" and "no prepared data" in result["reason"]


def test_train_py_outside_the_harness_says_how_to_run_it():
    proc = subprocess.run([PYTHON, str(PROGRAMS / "tiny-stdlib" / "train.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "python -m trainer.run" in proc.stderr


def test_gpt_climbmix_train_py_trains_scaled_down_on_cpu(tmp_path, tiny_data):
    """The shipped GPU baseline, its sizes cut to fit a CPU, trains and is scored by the harness
    (its model, Muon, the soft-capped cross-entropy's backward and the CPU attention path)."""
    train = scaled_climbmix(tmp_path / "train.py", DEPTH=2, TOTAL_BATCH_TOKENS=2048, DEVICE_BATCH_SIZE=4)
    # ~1.4 s a step on a busy 2-core box (other tests beside it): 8 s gives a few steps even then
    program = derive_program(TINY_TOML, tmp_path / "program.toml", budget_s=8, untimed_steps=1)
    out = tmp_path / "out"
    proc = subprocess.run([PYTHON, "-m", "trainer.run", "--program", str(program), "--train", str(train),
                           "--data", str(tiny_data), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    result = json.loads((out / "result.json").read_text())
    assert proc.returncode == 0 and result["status"] == "ok", result["traceback_tail"] or proc.stderr[-3000:]
    assert "depth 2, dim 128, heads 1" in proc.stdout and "2 x 4 x 256 = 2,048 tokens/step" in proc.stdout
    lines = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["phase"] == "train"]
    assert len(train_lines) >= 3 and train_lines[-1]["loss"] < train_lines[0]["loss"]
    scores = score_export(out, program, tiny_data)  # its trainer.ops attention exported and scored
    print(f"gpt-climbmix scaled down, {result['num_steps']} steps: val_bpb {scores['val_bpb']:.4f}, "
          f"unigram {scores['unigram_bpb']:.4f}")
    assert math.isfinite(scores["val_bpb"]) and scores["val_bpb"] < scores["unigram_bpb"]
