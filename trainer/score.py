"""The scorer, the score phase's entrypoint: val_bpb of an exported model, by trusted code only.

Usage:
    python -m trainer.score --program /work/program.toml --artifact /artifact --data /data --val-stdin

Reads the validation split from stdin, checks and loads the artifact (trainer.artifact: no pickle,
no code of train.py, only known ops, a pure function of its tokens), scores it with the fixed metric
(trainer.evaluate), audits its causality (trainer.audit: deeply when --deep-below says the run could
be kept) and prints one line, SCORE_MARKER + ScoreResult as JSON, on stdout: the host reads that line
and nothing else. Nothing the train phase wrote is read but the artifact.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

from trainer.config import ProgramConfigError, load_program
from trainer.contract import SCORE_MARKER, ScoreResult

TRACEBACK_CHARS = 4000


def score(program_path: Path, artifact: Path, data_dir: Path, val_stdin: bool, deep_below: float | None = None,
          sigma: float | None = None) -> ScoreResult:
    t0 = time.monotonic()
    fields: dict = {}
    try:
        program = load_program(program_path)
        val = None
        if val_stdin:
            from trainer.shards import read_split_stream

            val = read_split_stream(sys.stdin.buffer, data_dir)
            sys.stdin.close()
        import torch

        from trainer import ops
        from trainer.artifact import ArtifactInvalid, ArtifactUnscorable, load_model
        from trainer.evaluate import EvaluationError, NotCausalError, evaluate_program

        if program.device == "cuda" and not torch.cuda.is_available():
            return ScoreResult(status="crash", reason="this program is scored on a CUDA GPU but none is visible",
                               total_seconds=round(time.monotonic() - t0, 2))
        if program.cpu_threads:
            torch.set_num_threads(program.cpu_threads)
        device = torch.device(program.device)
        t1 = time.monotonic()
        try:
            model = load_model(artifact, device, ops.trusted_ops())
        except ArtifactInvalid as e:
            return ScoreResult(status="invalid", reason=str(e), total_seconds=round(time.monotonic() - t0, 2))
        except ArtifactUnscorable as e:
            return ScoreResult(status="unscorable", reason=str(e), total_seconds=round(time.monotonic() - t0, 2))
        # eager: compiling the loaded graph (with a warm cache of the scorer's own) measured slower on an
        # H200 at gpt-climbmix's size, 9.3 s against 7.7 s for the whole score process (GPU_RUNS.md)
        fields["load_seconds"] = round(time.monotonic() - t1, 2)
        print(f"scorer: artifact loaded in {fields['load_seconds']:.2f} s", flush=True)
        t2 = time.monotonic()
        try:
            scores = evaluate_program(model, data_dir, program, device, val, deep_below=deep_below, sigma=sigma)
        except NotCausalError as e:
            return ScoreResult(status="invalid", reason=str(e), **fields, total_seconds=round(time.monotonic() - t0, 2))
        except EvaluationError as e:
            return ScoreResult(status="unscorable", reason=str(e), **fields,
                               total_seconds=round(time.monotonic() - t0, 2))
        fields["eval_seconds"] = round(time.monotonic() - t2, 2)
        fields["eval_parts_seconds"] = {k: round(v, 2) for k, v in scores["seconds"].items()}
        fields["audit"] = scores["audit"]
        if not math.isfinite(scores["val_bpb"]):
            return ScoreResult(status="crash", reason=f"evaluation gave val_bpb {scores['val_bpb']}: the model's "
                               "logits are not finite", **fields, total_seconds=round(time.monotonic() - t0, 2))
        return ScoreResult(status="ok", val_bpb=round(scores["val_bpb"], 6), unigram_bpb=round(scores["unigram_bpb"], 6),
                           **fields, total_seconds=round(time.monotonic() - t0, 2))
    except ProgramConfigError as e:
        return ScoreResult(status="crash", reason=str(e), total_seconds=round(time.monotonic() - t0, 2))
    except Exception as e:  # noqa: BLE001 — the scorer always answers
        tb = "".join(traceback.format_exception(e))[-TRACEBACK_CHARS:]
        return ScoreResult(status="crash", reason=f"scoring failed: {type(e).__name__}: {e}".splitlines()[0],
                           traceback_tail=tb, **fields, total_seconds=round(time.monotonic() - t0, 2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.score", description=__doc__.split("\n")[0])
    ap.add_argument("--program", required=True, type=Path, help="program.toml")
    ap.add_argument("--artifact", required=True, type=Path, help="the exported model's folder")
    ap.add_argument("--data", required=True, type=Path, help="the prepared data folder")
    ap.add_argument("--val-stdin", action="store_true", help="read the validation split from stdin")
    ap.add_argument("--deep-below", type=float, help="audit causality deeply when val_bpb is below this "
                    "(the agent's best: a run that could be kept)")
    ap.add_argument("--noise-sigma", type=float, help="the lab's σ of val_bpb over seeds: sizes the deep audit")
    args = ap.parse_args(argv)
    result = score(args.program, args.artifact, args.data, args.val_stdin, args.deep_below, args.noise_sigma)
    if result.traceback_tail:
        print(result.traceback_tail, file=sys.stderr, flush=True)
    print(f"scorer: {result.status}" + (f", val_bpb {result.val_bpb:.6f}" if result.val_bpb is not None else "")
          + (f" ({result.reason})" if result.reason else ""), flush=True)
    print(SCORE_MARKER + result.model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's teardown (CUDA context, cached blocks): not the run's work
