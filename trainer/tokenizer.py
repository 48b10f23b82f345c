"""BPE tokenizer: trained with rustbpe on the training split, used through tiktoken.

Saved as a pickle of the tiktoken encoding's parts (pattern, mergeable ranks, special tokens)
so loading needs no training library, plus a per-token byte-length table for BPB.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

# GPT-4's split pattern with digit runs of at most 2 (not 3): with small vocabularies the
# 3-digit groups waste slots (the seed made the same change for its 8K vocabulary).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS = "<|bos|>"
# Reserved so programs can grow (chat, fill-in-the-middle) without a new tokenizer.
SPECIAL_TOKENS = [BOS, "<|eos|>", "<|pad|>", "<|reserved_0|>"]
TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.npy"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Train BPE on `texts`; the last len(SPECIAL_TOKENS) ids are the special tokens."""
    n_merge_vocab = vocab_size - len(SPECIAL_TOKENS)
    if n_merge_vocab < 256:
        raise ValueError(f"vocab_size {vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), n_merge_vocab, pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    if len(ranks) < n_merge_vocab:  # every pair merged before the vocabulary was full
        raise ValueError(f"the tokenizer's training text is too small for a {vocab_size}-token vocabulary: "
                         f"BPE ran out of pairs to merge at {len(ranks) + len(SPECIAL_TOKENS)} tokens; "
                         "add text or lower vocab_size")
    return build_encoding(SPLIT_PATTERN, ranks)


def build_encoding(pattern: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """A tiktoken Encoding with our special tokens appended after the mergeable ranks."""
    first = len(ranks)
    special = {tok: first + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="autoresearch", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=special)


def save_tokenizer(enc: tiktoken.Encoding, data_dir: Path) -> None:
    """Write tokenizer.pkl and token_bytes.npy (byte length per id; 0 for special tokens)."""
    ranks = enc._mergeable_ranks  # tiktoken has no public getter; the parts are what we built
    parts = {"pattern": enc._pat_str, "mergeable_ranks": ranks, "special_tokens": enc._special_tokens}
    with open(data_dir / TOKENIZER_FILE, "wb") as f:
        pickle.dump(parts, f)
    np.save(data_dir / TOKEN_BYTES_FILE, token_byte_lengths(enc))


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    lengths = np.zeros(enc.n_vocab, dtype=np.int32)
    for tok, rank in enc._mergeable_ranks.items():
        lengths[rank] = len(tok)
    return lengths  # special ids stay 0: they carry no text and are excluded from BPB


def load_tokenizer(data_dir: Path | str) -> tiktoken.Encoding:
    with open(Path(data_dir) / TOKENIZER_FILE, "rb") as f:
        parts = pickle.load(f)
    enc = tiktoken.Encoding(name="autoresearch", pat_str=parts["pattern"],
                            mergeable_ranks=parts["mergeable_ranks"],
                            special_tokens=parts["special_tokens"])
    return enc


def load_token_bytes(data_dir: Path | str) -> np.ndarray:
    return np.load(Path(data_dir) / TOKEN_BYTES_FILE)


def encode_docs(enc: tiktoken.Encoding, docs: list[str], threads: int = 8) -> list[list[int]]:
    """Encode documents, each prefixed with BOS (documents never contain special tokens)."""
    bos = enc._special_tokens[BOS]
    return [[bos, *ids] for ids in enc.encode_ordinary_batch(docs, num_threads=threads)]


def capped(texts: Iterable[str], max_chars: int, doc_chars: int) -> Iterator[str]:
    """Training text for the tokenizer: documents cut to doc_chars, max_chars in all."""
    total = 0
    for text in texts:
        text = text[:doc_chars]
        total += len(text)
        yield text
        if total >= max_chars:
            return
