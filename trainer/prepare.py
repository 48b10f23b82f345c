"""Prepare a program's data folder: fetch documents, train the tokenizer, pre-tokenize both splits.

Usage:
    python -m trainer.prepare --program programs/tiny-stdlib/program.toml --data-dir .data/tiny
    python -m trainer.prepare --program programs/gpt-climbmix/program.toml --data-dir /data \\
        --source local --path /usr/lib/python3.12

The only step allowed network (climbmix). Writes tokenizer.pkl, token_bytes.npy,
{train,val}.bin + .idx.npy, train_counts.npy and, last, meta.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trainer.baseline import unigram_bpb
from trainer.config import (ClimbmixSource, LocalSource, ProgramConfig, PythonStdlibSource,
                            TrainerError, load_program)
from trainer.shards import META_FILE, SplitWriter, read_meta, token_dtype
from trainer.sources import SourceError, fetch_climbmix, iter_docs
from trainer.tokenizer import (BOS, TOKENIZER_FILE, capped, encode_docs, save_tokenizer,
                               train_tokenizer)

ENCODE_BATCH_CHARS = 8_000_000  # documents are tokenized in batches of about this much text


def resolve_source(program: ProgramConfig, args: argparse.Namespace):
    """The program's source, or the one named on the command line, with CLI options applied."""
    kind = args.source or program.data.kind
    base = program.data if program.data.kind == kind else None
    if kind == "local":
        src = base or LocalSource()
        updates = {"paths": args.path} if args.path else {}
        if args.glob:
            updates["globs"] = args.glob
    elif kind == "python-stdlib":
        src, updates = base or PythonStdlibSource(), {}
    else:
        src = base or ClimbmixSource()
        updates = {k: v for k, v in (("base_url", args.base_url),
                                     ("num_train_shards", args.num_train_shards)) if v is not None}
    if args.max_bytes is not None and kind != "climbmix":
        updates["max_bytes"] = args.max_bytes
    if (args.path or args.glob) and kind != "local":
        raise SourceError(f"--path and --glob apply to the local source only (source is {kind})")
    return type(src).model_validate({**src.model_dump(), **updates})


def fingerprint(program: ProgramConfig, src) -> dict:
    return {"vocab_size": program.vocab_size, "source": src.model_dump(),
            "tokenizer_train_chars": program.tokenizer_train_chars,
            "tokenizer_doc_chars": program.tokenizer_doc_chars}


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_split(enc, src, split: str, data_dir: Path, raw_dir: Path, vocab: int) -> dict:
    writer = SplitWriter(data_dir, split, vocab)
    nbytes, t0 = 0, time.monotonic()
    for batch in _batches(iter_docs(src, split, raw_dir)):
        nbytes += sum(len(d.encode("utf-8")) for d in batch)
        writer.write(encode_docs(enc, batch, threads=os.cpu_count() or 1))
    stats = writer.close()
    if split == "train":
        np.save(data_dir / "train_counts.npy", writer.counts)
    stats["bytes"] = nbytes
    print(f"  {split}: {stats['documents']:,} documents, {stats['tokens']:,} tokens, "
          f"{nbytes / 1e6:.1f} MB in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    if stats["documents"] == 0:
        raise SourceError(f"the {split} split is empty: add data or change val_fraction/max_bytes")
    return stats


def prepare(program: ProgramConfig, src, data_dir: Path, raw_dir: Path | None = None,
            force: bool = False) -> dict:
    """Build the data folder unless it already holds the same preparation; returns meta."""
    data_dir.mkdir(parents=True, exist_ok=True)
    raw_dir = raw_dir or data_dir / "raw"
    fp = fingerprint(program, src)
    if not force and (data_dir / META_FILE).exists():
        meta = read_meta(data_dir)
        if meta.get("fingerprint") == fp:
            print(f"{data_dir} is already prepared for this program and source", file=sys.stderr)
            return meta
    (data_dir / META_FILE).unlink(missing_ok=True)  # meta.json is the "complete" marker
    t0 = time.monotonic()
    if isinstance(src, ClimbmixSource):
        fetch_climbmix(src, raw_dir)
    print(f"training a {program.vocab_size}-token BPE on the train split", file=sys.stderr)
    train_text = capped(iter_docs(src, "train", raw_dir), program.tokenizer_train_chars,
                        program.tokenizer_doc_chars)
    enc = train_tokenizer(train_text, program.vocab_size)
    save_tokenizer(enc, data_dir)
    splits = {s: tokenize_split(enc, src, s, data_dir, raw_dir, program.vocab_size) for s in ("train", "val")}
    token_bytes = np.load(data_dir / "token_bytes.npy")
    val = np.memmap(data_dir / "val.bin", dtype=token_dtype(program.vocab_size), mode="r")
    meta = {
        "program": program.name,
        "vocab_size": program.vocab_size,
        "bos_id": enc._special_tokens[BOS],
        "token_dtype": token_dtype(program.vocab_size).name,
        "splits": splits,
        "unigram_bpb": unigram_bpb(np.load(data_dir / "train_counts.npy"), token_bytes, val),
        "tokenizer_sha256": hashlib.sha256((data_dir / TOKENIZER_FILE).read_bytes()).hexdigest(),
        "prepare_seconds": round(time.monotonic() - t0, 1),
        "fingerprint": fp,
    }
    (data_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--program", required=True, help="path of the program's program.toml")
    ap.add_argument("--data-dir", required=True, help="folder to write the prepared data to")
    ap.add_argument("--source", choices=["climbmix", "local", "python-stdlib"],
                    help="override the program's data source")
    ap.add_argument("--path", action="append", help="folder or file for the local source (repeatable)")
    ap.add_argument("--glob", action="append", help="local: file pattern such as '**/*.py' (repeatable)")
    ap.add_argument("--max-bytes", type=int, help="cap on text bytes read (local, python-stdlib)")
    ap.add_argument("--base-url", help="climbmix: where shard_NNNNN.parquet files are served")
    ap.add_argument("--num-train-shards", type=int, help="climbmix: training shards to use")
    ap.add_argument("--raw-dir", help="climbmix: download folder (default DATA_DIR/raw)")
    ap.add_argument("--force", action="store_true", help="prepare again even if up to date")
    args = ap.parse_args(argv)
    try:
        program = load_program(args.program)
        src = resolve_source(program, args)
        meta = prepare(program, src, Path(args.data_dir), Path(args.raw_dir) if args.raw_dir else None,
                       force=args.force)
    except (TrainerError, ValueError) as e:
        print(f"prepare failed: {e}", file=sys.stderr)
        return 2
    s = meta["splits"]
    print(f"prepared {args.data_dir}: train {s['train']['tokens']:,} tokens, val {s['val']['tokens']:,} "
          f"tokens, unigram_bpb {meta['unigram_bpb']:.4f}, {meta['prepare_seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
