"""The run harness, the train phase's entrypoint: run train.py under the program, export its model.

Usage:
    python -m trainer.run --program /work/program.toml --train /work/train.py --data /data --out /out

Writes /out/result.json (trainer.contract.TrainResult), /out/progress.jsonl and, at
trainer.submit, the exported model (/out/model/, trainer.artifact), prints a summary block, exits
0 when the status is ok and 1 otherwise. train.py runs in this process (runpy), so nothing here is
trusted by the host but as a record of training: val_bpb comes from the score phase
(trainer.score), in a process that alone sees validation data. A program with
scoring = "in-process" is scored here instead (--val-stdin), and its runs are marked unverified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import runpy
import statistics
import sys
import time
import traceback
from pathlib import Path

from trainer import api
from trainer.config import ProgramConfig, ProgramConfigError, load_program
from trainer.contract import MODEL_DIR, RESULT_FILE, TrainResult

TRACEBACK_CHARS = 4000


class Crash(Exception):
    """Internal: ends the run with status crash (or `status`)."""

    def __init__(self, reason: str, tb: str | None = None, status: str = "crash"):
        super().__init__(reason)
        self.reason, self.tb, self.status = reason, tb, status


def tail(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return text[-TRACEBACK_CHARS:]


def setup_torch(program: ProgramConfig, t0: float):
    import torch

    print(f"harness: torch imported {time.monotonic() - t0:.2f} s after start", flush=True)
    if program.device == "cuda" and not torch.cuda.is_available():
        raise Crash("this program needs a CUDA GPU but none is visible")
    if program.cpu_threads:
        torch.set_num_threads(program.cpu_threads)
    torch.manual_seed(program.seed)
    if program.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        print(f"harness: CUDA ready {time.monotonic() - t0:.2f} s after start", flush=True)
    return torch.device(program.device)


def check_seed(program: ProgramConfig) -> None:
    """train.py must not seed the generator itself (issue 23): the harness seeded it, and a seed of
    train.py's choosing would make seed search look like research."""
    import torch

    if torch.initial_seed() != program.seed:
        raise Crash(f"train.py set its own random seed (torch's seed is {torch.initial_seed()}, the harness "
                    f"seeded {program.seed}): the harness owns the seed, read it as cfg.seed and remove the "
                    "manual_seed call; a seed search is not research", status="invalid")


def run_train(path: Path) -> None:
    """Execute train.py as __main__; anything it raises ends the run as a crash."""
    argv = sys.argv
    sys.argv = [str(path)]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise Crash(f"train.py exited with status {e.code}") from e
    except BaseException as e:  # noqa: BLE001 — every failure of train.py is a crash result
        reason = (api.current() and api.current().crash_reason) or f"{type(e).__name__}: {e}"
        raise Crash(reason.splitlines()[0] if reason else type(e).__name__, tail(e)) from e
    finally:
        sys.argv = argv


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (RSS)


def measure(run: api.Run, device, result: dict) -> None:
    """Fill the training figures: time, steps, tokens, throughput, MFU."""
    from trainer.flops import count_params, flops_per_token, mfu_percent, peak_flops

    program = run.program
    if run.model is None:
        raise Crash("train.py finished without calling trainer.submit(model)")
    if run.last_step is None or run.clock_start is None:
        raise Crash(f"train.py made {run.steps} trainer.step() call(s); the training clock needs at "
                    f"least {max(program.untimed_steps, 1)}: call trainer.step(loss) every step")
    idle = time.monotonic() - run.last_step
    if idle > program.grace_s:
        raise Crash(f"train.py ran {idle:.0f}s after its last trainer.step(), more than the "
                    f"{program.grace_s:g}s grace: all training must be inside the stepped loop")
    training = run.last_step - run.clock_start
    total_params, non_embedding = count_params(run.model)
    result.update(training_seconds=round(training, 2), num_steps=run.steps,
                  num_params=total_params, total_tokens=run.tokens,
                  startup_seconds=round(run.clock_start - run.started, 2))
    report_epochs(run, result)
    name = __import__("torch").cuda.get_device_name(device) if device.type == "cuda" else None
    fpt = flops_per_token(non_embedding, run.attention, program.seq_len)
    mfu = mfu_percent(fpt, run.tokens - run.tokens_at_clock_start, training, peak_flops(name))
    result["mfu_percent"] = float(f"{mfu:.4g}") if mfu is not None else None  # a tiny model: not 0.0
    result["tokens_per_s"] = round((run.tokens - run.tokens_at_clock_start) / max(training, 1e-9), 1)
    if len(run.step_seconds) >= 2:  # host time between timed steps: the step-time spread
        deciles = statistics.quantiles(run.step_seconds, n=10)
        result["step_seconds"] = {"p10": round(deciles[0], 4), "p50": round(deciles[4], 4),
                                  "p90": round(deciles[8], 4)}
    result["loss_spike"] = largest_spike(run.losses)


SPIKE_AFTER_STEP, SPIKE_WINDOW = 40, 50


def largest_spike(losses: list[float]) -> dict | None:
    """The step (1-based) whose loss stands highest over the median of the SPIKE_WINDOW steps before
    it, among the steps after SPIKE_AFTER_STEP; None for a run that short. Early losses fall fast, so
    the first steps are no baseline."""
    best = None
    for i in range(SPIKE_AFTER_STEP, len(losses)):
        median = statistics.median(losses[max(0, i - SPIKE_WINDOW):i])
        if median <= 0:
            continue
        ratio = losses[i] / median
        if best is None or ratio > best["ratio"]:
            best = {"step": i + 1, "loss": round(losses[i], 4), "ratio": round(ratio, 3)}
    return best


def autocast_of(program: ProgramConfig, device):
    import torch

    on = device.type == "cuda" and program.autocast == "bfloat16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def export(run: api.Run, device, out_dir: Path, result: dict) -> None:
    """Export the submitted model for the score phase; a model that cannot be exported is unscorable."""
    import torch

    from trainer.artifact import HINT, ExportFailed, export_model

    program = run.program
    run.log.emit("export")
    t0 = time.monotonic()
    example = torch.zeros((program.eval_batch_size, program.seq_len), dtype=torch.long, device=device)
    try:
        with autocast_of(program, device):  # traced as the scorer runs it; the graph holds no autocast
            export_model(run.model, example, out_dir / MODEL_DIR)
    except ExportFailed as e:
        raise Crash(f"{e}; {HINT}", tail(e.__cause__ or e), status="unscorable") from e
    result["export_seconds"] = round(time.monotonic() - t0, 2)
    print(f"harness: model exported in {result['export_seconds']:.2f} s", flush=True)


def score_in_process(run: api.Run, device, result: dict, val) -> None:
    """scoring = "in-process" only: evaluate here, in train.py's process (the result is unverified)."""
    from trainer.evaluate import evaluate_program

    program = run.program
    run.log.emit("eval", eval_tokens=program.eval_tokens)
    t0 = time.monotonic()
    try:
        scores = evaluate_program(run.model, run.data_dir, program, device, val)
    except Exception as e:  # noqa: BLE001 — a model that cannot be scored is the run's crash
        raise Crash(f"evaluation failed: {type(e).__name__}: {e}".splitlines()[0], tail(e)) from e
    result["eval_seconds"] = round(time.monotonic() - t0, 2)
    result["eval_parts_seconds"] = {k: round(v, 2) for k, v in scores["seconds"].items()}
    print("harness: eval s: " + ", ".join(f"{k} {v:.2f}" for k, v in scores["seconds"].items()), flush=True)
    if not math.isfinite(scores["val_bpb"]):
        raise Crash(f"evaluation gave val_bpb {scores['val_bpb']}: the model's logits are not finite")
    result.update(val_bpb=round(scores["val_bpb"], 6), unigram_bpb=round(scores["unigram_bpb"], 6))


def report_epochs(run: api.Run, result: dict) -> None:
    """How many times the run went through its training split. Past one, val_bpb rewards memorising
    that split as much as modelling the text, and a faster train.py can score worse for it."""
    from trainer.shards import read_meta

    train_tokens = read_meta(run.data_dir)["splits"]["train"]["tokens"]
    result["epochs"] = round(run.tokens / train_tokens, 3)
    if result["epochs"] > 1:
        print(f"harness: this run saw its {train_tokens:,}-token training split {result['epochs']:.2f} times; "
              "past one epoch val_bpb also measures memorisation, so compare runs on a bigger corpus",
              flush=True)


def summary(result: dict) -> str:
    """The seed-style block. Sealed, val_bpb is the scorer's: this block shows the training figures."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = ["---", f"status:           {result['status']}"]
    if result.get("val_bpb") is not None:  # in-process scoring only
        lines += [f"val_bpb:          {fmt(result['val_bpb'], '.6f')}  (in-process: unverified)",
                  f"unigram_bpb:      {fmt(result['unigram_bpb'], '.6f')}"]
    lines += [
        f"training_seconds: {result['training_seconds']:.1f}",
        f"total_seconds:    {result['total_seconds']:.1f}",
        f"startup_seconds:  {result['startup_seconds']:.1f}",
        f"export_seconds:   {fmt(result.get('export_seconds'), '.1f')}",
        f"peak_memory_mb:   {result['peak_memory_mb']:.1f}",
        f"mfu_percent:      {fmt(result['mfu_percent'], '.2f')}",
        f"total_tokens_M:   {result['total_tokens'] / 1e6:.1f}",
        f"epochs:           {fmt(result['epochs'], '.2f')}",
        f"num_steps:        {result['num_steps']}",
        f"loss_spike:       {spike_text(result.get('loss_spike'))}",
        f"num_params_M:     {result['num_params'] / 1e6:.1f}",
    ]
    if result["reason"]:
        lines.append(f"reason:           {result['reason']}")
    return "\n".join(lines)


def spike_text(spike: dict | None) -> str:
    if not spike:
        return "-"
    return f"{spike['ratio']:.2f}x the running median (loss {spike['loss']:.3f} at step {spike['step']})"


def execute(program_path: Path, train_path: Path, data_dir: Path, out_dir: Path, val_stdin: bool = False) -> dict:
    """The whole train phase; returns the result (a TrainResult's fields, also in out_dir/result.json).

    Sealed (the default), the model is exported to out_dir/model for the scorer. With val_stdin
    (scoring = "in-process") the validation split is read from stdin before train.py starts and
    the model is scored here.
    """
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = api.ProgressLog(out_dir / "progress.jsonl")
    log.emit("startup", train=str(train_path))
    result: dict = {"status": "crash"}
    device = None
    try:
        try:
            program = load_program(program_path)
        except ProgramConfigError as e:
            raise Crash(str(e)) from e
        if not train_path.is_file():
            raise Crash(f"{train_path}: train.py not found")
        if not (data_dir / "meta.json").is_file():
            raise Crash(f"{data_dir} holds no prepared data (no meta.json): run trainer.prepare first")
        in_process = program.scoring == "in-process"
        if val_stdin != in_process:
            raise Crash(f"the program's scoring is {program.scoring!r} but the harness was started "
                        f"{'with' if val_stdin else 'without'} --val-stdin: the host and the program disagree")
        val = None
        if val_stdin:
            from trainer.shards import read_split_stream

            try:
                val = read_split_stream(sys.stdin.buffer, data_dir)
            except ValueError as e:
                raise Crash(f"the validation split on stdin is unreadable: {e}") from e
            sys.stdin.close()
        device = setup_torch(program, t0)
        result["gpu_uuid"] = gpu_uuid(device)
        run = api.begin(program, data_dir, log)
        run.started = t0
        run_train(train_path)
        try:
            api.check_last_loss(run)
        except api.TrainingDiverged:
            pass  # crash_reason is set
        if not run.crash_reason:
            api.check_free_steps(run)
        if run.crash_reason:  # a check failed (maybe train.py caught our exception and carried on)
            raise Crash(run.crash_reason)
        check_seed(program)
        measure(run, device, result)
        if in_process:
            score_in_process(run, device, result, val)
        else:
            export(run, device, out_dir, result)
        result.update(status="ok")
    except Crash as e:
        result.update(status=e.status, reason=e.reason, traceback_tail=e.tb, val_bpb=None)
    finally:
        run = api.current()
        if run is not None and not result.get("num_steps"):
            result.update(num_steps=run.steps, total_tokens=run.tokens)
        api.end()
    if device is not None:
        result["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    result["total_seconds"] = round(time.monotonic() - t0, 2)
    result = TrainResult.model_validate(result).model_dump()
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    log.emit("done", status=result["status"], reason=result["reason"])
    log.close()
    return result


def gpu_uuid(device) -> str | None:
    """The UUID of the GPU this run sees (nvidia-smi's GPU-... form), for the host to check its lease."""
    if device.type != "cuda":
        return None
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return None if uuid is None else f"GPU-{uuid}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.split("\n")[0])
    ap.add_argument("--program", required=True, type=Path, help="program.toml")
    ap.add_argument("--train", required=True, type=Path, help="the train.py to run")
    ap.add_argument("--data", required=True, type=Path, help="the prepared data folder")
    ap.add_argument("--out", required=True, type=Path, help="folder for result.json, progress.jsonl")
    ap.add_argument("--val-stdin", action="store_true",
                    help="scoring = \"in-process\" only: read the validation split from stdin and score here")
    args = ap.parse_args(argv)
    result = execute(args.program, args.train, args.data, args.out, args.val_stdin)
    if result["traceback_tail"]:
        print(result["traceback_tail"], file=sys.stderr)
    print(summary(result), flush=True)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # result.json and progress.jsonl are written and closed: skip the interpreter's teardown
    # (CUDA context, compile workers, tens of GB of cached blocks), which is not the run's work
    os._exit(code)
