"""Benchmarks of the trusted parts, printing figures (speed goals are checked here, not in tests).

Usage:
    python -m trainer.bench loader --data DIR [--batch 128 --seq 2048 --seconds 10]
    python -m trainer.bench loader --synthetic [--mean-doc 700]   # web-like document lengths
    python -m trainer.bench run --program P.toml --data DIR --train A.py [--train B.py] [--budget-s 60]

`loader` prints tokens/s of the packer+gather (numpy batches) and, with --device, of the full
loader (pinned copy to the device included). `run` trains each train.py through the harness
twice, back to back — cold (empty compile cache) then warm (the same cache) — and prints one
column per file: tokens/s, step-time spread, MFU, overhead cold and warm, eval seconds, peak
memory and val_bpb, so ratios are measured side by side on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer.loader import BatchStream, TrainLoader
from trainer.shards import META_FILE, open_split

BOS_ID = 8188


def synthetic_split(folder: Path, tokens: int, mean_doc: int, vocab: int = 8192) -> None:
    """Random tokens in documents of exponential length (web text is roughly that shape)."""
    rng = np.random.default_rng(0)
    lengths = np.maximum(rng.exponential(mean_doc, size=tokens // mean_doc + 1).astype(np.int64), 2)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = rng.integers(0, BOS_ID, size=int(offsets[-1]), dtype=np.uint16)
    data[offsets[:-1]] = BOS_ID
    data.tofile(folder / "train.bin")
    np.save(folder / "train.idx.npy", offsets)
    (folder / META_FILE).write_text(json.dumps({"token_dtype": "uint16", "vocab_size": vocab,
                                                "bos_id": BOS_ID}))


def rate(next_batch, tokens_per_batch: int, seconds: float) -> float:
    next_batch()  # warm-up: the first batch includes thread start and buffer fill
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next_batch()
        n += tokens_per_batch
    return n / (time.perf_counter() - t0)


def bench_loader(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            synthetic_split(data, args.synthetic_tokens, args.mean_doc)
        split = open_split(data, "train")
        docs = np.diff(split.offsets)
        print(f"data: {data if args.data else 'synthetic'}: {split.num_docs:,} documents, "
              f"{len(split.tokens):,} tokens, mean document {docs.mean():.0f} tokens")
        per_batch = args.batch * args.seq
        stream = BatchStream(split, args.batch, args.seq + 1, seed=0)
        r = rate(stream.next_array, per_batch, args.seconds)
        stream.close()
        print(f"loader (pack + gather, background thread): {r / 1e6:.2f} M tokens/s "
              f"(batch {args.batch} x {args.seq})")
        if args.device:
            import torch

            loader = TrainLoader(split, args.batch, args.seq, seed=0, device=args.device)

            def step():
                x, y = next(loader)
                if x.is_cuda:
                    torch.cuda.synchronize()

            r = rate(step, per_batch, args.seconds)
            loader.close()
            print(f"loader to {args.device} (pinned, non-blocking): {r / 1e6:.2f} M tokens/s")


def harness_run(program: Path, train: Path, data: Path, out: Path, cache: Path) -> dict:
    """One `python -m trainer.run` in a fresh process; the result plus its whole wall clock."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TRITON_CACHE_DIR": str(cache / "triton"), "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, "-m", "trainer.run", "--program", str(program), "--train",
                        str(train), "--data", str(data), "--out", str(out)],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    result = json.loads((out / "result.json").read_text())
    result["wall_seconds"] = round(time.monotonic() - t0, 2)
    # Everything that is not charged training: process start, imports, compile, the untimed
    # warm-up steps, evaluation and exit (issue 5's "non-training overhead").
    result["overhead_seconds"] = round(result["wall_seconds"] - result["training_seconds"], 2)
    return result


ROWS = [  # (label, how to read it from the cold and warm results)
    ("status (cold / warm)", lambda c, w: f"{c['status']} / {w['status']}"),
    ("tokens/s, warm (M)", lambda c, w: _f(w.get("tokens_per_s"), 1e-6, ".3f")),
    ("step s p10 / p50 / p90", lambda c, w: " / ".join(_f((w.get("step_seconds") or {}).get(k), 1, ".3f")
                                                       for k in ("p10", "p50", "p90"))),
    ("MFU %, warm", lambda c, w: _f(w.get("mfu_percent"), 1, ".1f")),
    ("startup s cold / warm", lambda c, w: f"{c['startup_seconds']:.1f} / {w['startup_seconds']:.1f}"),
    ("eval s cold / warm", lambda c, w: f"{c['eval_seconds']:.1f} / {w['eval_seconds']:.1f}"),
    ("overhead s cold / warm", lambda c, w: f"{c['overhead_seconds']:.1f} / {w['overhead_seconds']:.1f}"),
    ("peak memory MB", lambda c, w: f"{w['peak_memory_mb']:,.0f}"),
    ("steps, warm", lambda c, w: str(w["num_steps"])),
    ("val_bpb cold / warm", lambda c, w: f"{_f(c.get('val_bpb'), 1, '.4f')} / {_f(w.get('val_bpb'), 1, '.4f')}"),
]


def _f(value, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def bench_run(args: argparse.Namespace) -> None:
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-"))
    out.mkdir(parents=True, exist_ok=True)
    program = out / "program.toml"
    text = Path(args.program).read_text()
    if args.budget_s is not None:
        text = re.sub(r"(?m)^budget_s\s*=.*$", f"budget_s = {args.budget_s}", text)
    program.write_text(text)
    names = [Path(t).name for t in args.train]
    if len(set(names)) < len(names):  # two files called train.py: tell them apart by path
        names = list(args.train)
    columns = []
    for i, train in enumerate(args.train):
        cache = out / f"cache-{i}"  # one cache per file, as each agent has its own
        runs = [harness_run(program, Path(train), Path(args.data), out / f"{i}-{kind}", cache)
                for kind in ("cold", "warm")]
        columns.append((names[i], *runs))
        print(f"{train}: cold {runs[0]['status']}, warm {runs[1]['status']}", flush=True)
    (out / "bench.json").write_text(json.dumps(
        [{"train": name, "cold": c, "warm": w} for name, c, w in columns], indent=2))
    width = max(24, *(len(name) + 2 for name, _, _ in columns))
    print(f"\n{'':24}" + "".join(f"{name:>{width}}" for name, _, _ in columns))
    for label, read in ROWS:
        print(f"{label:24}" + "".join(f"{read(c, w):>{width}}" for _, c, w in columns))
    print(f"(budget {args.budget_s or 'as the program says'} s; logs and results in {out})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench")
    sub = ap.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loader", help="tokens/s of the packed loader")
    lo.add_argument("--data", help="a prepared data folder (default: synthetic data)")
    lo.add_argument("--synthetic-tokens", type=int, default=50_000_000)
    lo.add_argument("--mean-doc", type=int, default=700, help="synthetic mean document tokens")
    lo.add_argument("--batch", type=int, default=128)
    lo.add_argument("--seq", type=int, default=2048)
    lo.add_argument("--seconds", type=float, default=5.0)
    lo.add_argument("--device", help="also time the full loader onto this device (cpu, cuda)")
    ru = sub.add_parser("run", help="train.py files through the harness, cold and warm, side by side")
    ru.add_argument("--program", required=True, help="program.toml")
    ru.add_argument("--data", required=True, help="the prepared data folder")
    ru.add_argument("--train", required=True, action="append", help="a train.py (repeat to compare)")
    ru.add_argument("--budget-s", type=float, help="override the program's training budget")
    ru.add_argument("--out", help="folder for logs and bench.json (default: a new temp folder)")
    args = ap.parse_args(argv)
    (bench_loader if args.what == "loader" else bench_run)(args)


if __name__ == "__main__":
    main()
