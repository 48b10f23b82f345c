"""Loader invariants: BOS-led rows of T+1, no padding, train documents only, deterministic."""

import numpy as np
import pytest
import torch

from trainer.loader import BatchStream, TrainLoader, make_pieces
from trainer.shards import open_split, read_meta
from trainer.tokenizer import load_tokenizer

T = 64


@pytest.fixture(scope="module")
def split(corpus_data):
    return open_split(corpus_data, "train")


@pytest.fixture(scope="module")
def batches(split):
    stream = BatchStream(split, rows=8, row_len=T + 1, seed=3)
    try:  # well over one epoch of the training split
        n = 3 * len(split.tokens) // (8 * T) + 1
        return [stream.next_array() for _ in range(n)]
    finally:
        stream.close()


def segments(row: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(row == bos)
    return [row[a + 1:b] for a, b in zip(starts, [*starts[1:], len(row)])]


def test_rows_start_with_bos_and_hold_only_valid_ids(corpus_data, batches):
    meta = read_meta(corpus_data)
    bos = meta["bos_id"]
    for b in batches:
        assert b.shape == (8, T + 1)
        assert (b[:, 0] == bos).all()
        assert b.min() >= 0 and b.max() < meta["vocab_size"]
        # the only special token in a row is BOS: no padding, no other filler
        specials = b >= meta["vocab_size"] - 4
        assert (b[specials] == bos).all()


def test_every_segment_is_a_slice_of_a_training_document(corpus_data, split, batches, val_markers):
    enc = load_tokenizer(corpus_data)
    bos = read_meta(corpus_data)["bos_id"]
    train_bytes = b"\x00".join(enc.decode_bytes(split.doc(i)[1:].tolist()) for i in range(split.num_docs))
    seen = bytearray()
    for b in batches:
        for row in b:
            for seg in segments(row, bos):
                piece = enc.decode_bytes(seg.tolist())
                assert piece in train_bytes  # contiguous text of one training document
                seen += piece
    text = seen.decode("utf-8", errors="replace")
    assert not any(marker in text for marker in val_markers)  # no validation document, ever
    assert "DOC" in text and "HIDDEN" not in text


def test_validation_split_holds_the_validation_documents(corpus_data, val_markers):
    enc = load_tokenizer(corpus_data)
    val = open_split(corpus_data, "val")
    text = enc.decode(val.tokens.tolist())
    assert val_markers and all(m in text for m in val_markers)


def test_pieces_cover_each_document_once(split):
    starts, ns = make_pieces(split, T)
    assert (ns >= 1).all() and (ns <= T).all()
    assert ns.sum() == len(split.tokens) - split.num_docs  # every token but each doc's BOS
    covered = np.zeros(len(split.tokens), dtype=np.int32)
    for s, n in zip(starts, ns):
        covered[s:s + n] += 1
    assert (covered[split.offsets[:-1]] == 0).all() and covered.sum() == ns.sum() and covered.max() == 1


def test_one_epoch_uses_every_training_token(split, batches):
    # no token is thrown away: text tokens served ~= rows x (T+1) minus one BOS per segment
    text_tokens = len(split.tokens) - split.num_docs
    served = sum(int((b != b[0, 0]).sum()) for b in batches)
    assert served >= 2.5 * text_tokens  # three epochs' worth of batches, minus the last partial one


def test_same_seed_same_batches_other_seed_other_batches(split):
    def first(seed, n=6):
        stream = BatchStream(split, rows=4, row_len=T + 1, seed=seed)
        try:
            return np.stack([stream.next_array() for _ in range(n)])
        finally:
            stream.close()

    assert (first(7) == first(7)).all()
    assert not (first(7) == first(8)).all()


def test_torch_loader_gives_shifted_int64_pairs(split):
    loader = TrainLoader(split, batch_size=4, seq_len=T, seed=1, device="cpu")
    try:
        x, y = next(loader)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T)
        assert (x[:, 1:] == y[:, :-1]).all()
        next(loader)
        assert loader.tokens_served == 2 * 4 * T
    finally:
        loader.close()
