"""Where documents come from at prepare time: climbmix shards, local files, the Python stdlib.

Each source yields the documents of a split ("train" or "val") as strings, in a deterministic
order. Local sources split by a hash of each document's content, so the split does not depend
on file order and duplicate documents can never straddle train and val.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from trainer.config import ClimbmixSource, LocalSource, PythonStdlibSource, TrainerError
from trainer.download import download

SPLITS = ("train", "val")


class SourceError(TrainerError, ValueError):
    """A data source cannot produce documents (missing folder, no files, bad field)."""


def is_val(text: str, val_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of BLAKE2b of the text, as a fraction of 2**64."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h < val_fraction * 2**64


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def parquet_texts(path: Path, column: str) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"{path}: not a readable parquet file ({e})") from e
    if column not in pf.schema_arrow.names:
        raise SourceError(f"{path}: no column '{column}' (columns: {pf.schema_arrow.names})")
    for i in range(pf.num_row_groups):
        for text in pf.read_row_group(i, columns=[column]).column(0).to_pylist():
            if text and text.strip():
                yield text


def climbmix_docs(src: ClimbmixSource, split: str, raw_dir: Path) -> Iterator[str]:
    """Download (if needed) and read the shards of one split."""
    shards = range(src.num_train_shards) if split == "train" else [src.val_shard]
    for index in shards:
        path = download(f"{src.base_url.rstrip('/')}/{shard_name(index)}", raw_dir / shard_name(index),
                        retries=src.retries, backoff_s=src.backoff_s, timeout_s=src.timeout_s)
        for n, text in enumerate(parquet_texts(path, src.text_column)):
            if split == "val" and src.max_val_docs is not None and n >= src.max_val_docs:
                break
            yield text


def fetch_climbmix(src: ClimbmixSource, raw_dir: Path) -> None:
    """Download every shard up front so a network failure happens before any work."""
    for index in [*range(src.num_train_shards), src.val_shard]:
        download(f"{src.base_url.rstrip('/')}/{shard_name(index)}", raw_dir / shard_name(index),
                 retries=src.retries, backoff_s=src.backoff_s, timeout_s=src.timeout_s)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def local_files(src: LocalSource) -> list[Path]:
    """All matching files under the source's paths, sorted, hidden folders skipped."""
    if not src.paths:
        raise SourceError("the local source needs at least one folder: pass --path DIR")
    files: set[Path] = set()
    for root in map(Path, src.paths):
        if root.is_file():
            files.add(root)
            continue
        if not root.is_dir():
            raise SourceError(f"{root}: no such folder for the local source")
        for pattern in src.globs:
            files.update(p for p in root.glob(pattern) if p.is_file() and not _hidden(p, root))
    if not files:
        raise SourceError(f"no files matching {src.globs} under {src.paths}")
    return sorted(files)


def file_texts(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file: a .jsonl line, a .parquet row, or the whole text file."""
    if path.suffix == ".parquet":
        yield from parquet_texts(path, text_field)
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SourceError(f"{path}:{lineno}: expected a JSON object with a '{text_field}' "
                                      f"string ({e!r})") from e
                if isinstance(text, str) and text.strip():
                    yield text
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return  # binary or unreadable files are not documents
        if text.strip():
            yield text


def _capped_split(texts: Iterator[str], split: str, val_fraction: float,
                  max_bytes: int | None) -> Iterator[str]:
    seen = 0
    for text in texts:
        seen += len(text.encode("utf-8"))
        if max_bytes is not None and seen > max_bytes:
            return
        if is_val(text, val_fraction) == (split == "val"):
            yield text


def local_docs(src: LocalSource, split: str) -> Iterator[str]:
    texts = (t for path in local_files(src) for t in file_texts(path, src.text_field))
    return _capped_split(texts, split, src.val_fraction, src.max_bytes)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def stdlib_docs(src: PythonStdlibSource, split: str) -> Iterator[str]:
    texts = (t for path in stdlib_files() for t in file_texts(path, "text"))
    return _capped_split(texts, split, src.val_fraction, src.max_bytes)


def iter_docs(src, split: str, raw_dir: Path) -> Iterator[str]:
    """The documents of `split` from any configured source."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if isinstance(src, ClimbmixSource):
        return climbmix_docs(src, split, raw_dir)
    if isinstance(src, LocalSource):
        return local_docs(src, split)
    if isinstance(src, PythonStdlibSource):
        return stdlib_docs(src, split)
    raise SourceError(f"unknown source {src!r}")
