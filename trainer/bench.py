"""Benchmarks of the trusted parts, printing figures (speed goals are checked here, not in tests).

Usage:
    python -m trainer.bench loader --data DIR [--batch 128 --seq 2048 --seconds 10]
    python -m trainer.bench loader --synthetic [--mean-doc 700]   # web-like document lengths

Prints tokens/s of the packer+gather (numpy batches) and, with --device, of the full loader
(pinned copy to the device included).
"""

from __future__ import annotations

import argparse
import json
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
    args = ap.parse_args(argv)
    bench_loader(args)


if __name__ == "__main__":
    main()
