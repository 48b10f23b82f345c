"""The prepared data folder's token files: one flat token file and a document index per split.

`<split>.bin` holds every document's tokens back to back (each starting with BOS), as uint16
when the vocabulary fits, else uint32; `<split>.idx.npy` holds the document start offsets
plus a final end offset. `meta.json` describes the folder and is written last.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class SplitWriter:
    """Streams documents' token lists into <split>.bin and records their offsets."""

    def __init__(self, data_dir: Path, split: str, vocab_size: int):
        self.dtype = token_dtype(vocab_size)
        self.bin_path = data_dir / f"{split}.bin"
        self.idx_path = data_dir / f"{split}.idx.npy"
        self.file = open(self.bin_path, "wb")
        self.offsets = [0]
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def write(self, docs: list[list[int]]) -> None:
        if not docs:
            return
        flat = np.concatenate([np.asarray(d, dtype=self.dtype) for d in docs])
        self.file.write(flat.tobytes())
        self.counts += np.bincount(flat, minlength=len(self.counts))
        for d in docs:
            self.offsets.append(self.offsets[-1] + len(d))

    def close(self) -> dict:
        self.file.close()
        np.save(self.idx_path, np.asarray(self.offsets, dtype=np.int64))
        return {"documents": len(self.offsets) - 1, "tokens": self.offsets[-1]}


@dataclass(frozen=True)
class TokenSplit:
    """A memory-mapped split: tokens[offsets[i]:offsets[i+1]] is document i."""

    tokens: np.ndarray
    offsets: np.ndarray

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def read_meta(data_dir: Path | str) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: prepare the data first "
                                "(python -m trainer.prepare --program P.toml --data-dir DIR)")
    return json.loads(path.read_text())


def open_split(data_dir: Path | str, split: str) -> TokenSplit:
    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    tokens = np.memmap(data_dir / f"{split}.bin", dtype=np.dtype(meta["token_dtype"]), mode="r")
    offsets = np.load(data_dir / f"{split}.idx.npy")
    return TokenSplit(tokens=tokens, offsets=offsets)


def read_split_stream(stream: BinaryIO, data_dir: Path | str) -> TokenSplit:
    """A split handed over a stream instead of a folder (the validation split, on the run's stdin,
    so that train.py never finds it as a file): one JSON line naming the byte sizes of
    `<split>.bin` and `<split>.idx.npy`, then those files' bytes in that order."""
    line = stream.readline(4096)
    try:
        header = json.loads(line)
    except ValueError:
        raise ValueError(f"split stream: the first line is not a JSON header: {line[:80]!r}") from None
    if (not isinstance(header, dict) or len(header) != 2
            or not all(isinstance(n, int) and n >= 0 for n in header.values())):
        raise ValueError(f"split stream: bad header {header!r}")
    parts = {}
    for name, size in header.items():
        data = stream.read(size)
        if len(data) != size:
            raise ValueError(f"split stream: {name} ended after {len(data)} of {size} bytes")
        parts["idx" if name.endswith(".idx.npy") else "bin"] = data
    if set(parts) != {"bin", "idx"}:
        raise ValueError(f"split stream: expected a .bin and an .idx.npy, got {sorted(header)}")
    meta = read_meta(data_dir)
    tokens = np.frombuffer(parts["bin"], dtype=np.dtype(meta["token_dtype"]))
    return TokenSplit(tokens=tokens, offsets=np.load(io.BytesIO(parts["idx"])))
