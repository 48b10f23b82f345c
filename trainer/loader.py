"""Packed batches from a pre-tokenized split: rows of exactly T+1 tokens, each starting with BOS.

Documents longer than a row are cut into pieces of at most T text tokens, each piece led by
BOS; pieces are packed best-fit into rows (largest piece that fits the space left, else the
shortest piece is split and its rest goes back to the buffer), so no token is padding and none
is thrown away. Planning is a small Python loop over pieces; the gather of tokens is one
vectorised numpy take per batch, done on a background thread, with pinned-memory,
non-blocking copies to CUDA.
"""

from __future__ import annotations

import queue
import threading
from bisect import bisect_right, insort
from collections.abc import Iterator

import numpy as np

from trainer.shards import TokenSplit

BUFFER_PIECES = 1000  # best-fit candidates; the seed used a buffer of the same order
_SLOT_BITS = 32


def make_pieces(split: TokenSplit, max_text: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, n) of every piece: n <= max_text text tokens from `start`, to be led by BOS."""
    doc_start = split.offsets[:-1] + 1  # skip each document's own BOS
    doc_n = split.offsets[1:] - doc_start
    keep = doc_n > 0
    doc_start, doc_n = doc_start[keep], doc_n[keep]
    count = (doc_n + max_text - 1) // max_text
    first = np.repeat(np.cumsum(count) - count, count)
    k = np.arange(count.sum()) - first  # piece number within its document
    start = np.repeat(doc_start, count) + k * max_text
    n = np.minimum(np.repeat(doc_n, count) - k * max_text, max_text)
    return start.astype(np.int64), n.astype(np.int64)


class Packer:
    """Plans rows best-fit from a shuffled stream of pieces; deterministic for a seed."""

    def __init__(self, split: TokenSplit, row_len: int, seed: int):
        if split.num_docs == 0:
            raise ValueError("cannot pack an empty split")
        self.row_len = row_len
        self.starts, self.ns = make_pieces(split, row_len - 1)
        self.seed, self.epoch, self.order, self.pos = seed, -1, np.empty(0, np.int64), 0
        self.keys: list[int] = []  # (piece length << 32) | slot, sorted
        self.slots: dict[int, tuple[int, int]] = {}
        self.next_slot = 0
        for _ in range(min(BUFFER_PIECES, len(self.starts))):
            self._refill()

    def _refill(self) -> None:
        if self.pos >= len(self.order):
            self.epoch += 1
            rng = np.random.default_rng([self.seed, self.epoch])
            self.order, self.pos = rng.permutation(len(self.starts)), 0
        i = int(self.order[self.pos])
        self.pos += 1
        self._add(int(self.starts[i]), int(self.ns[i]))

    def _add(self, start: int, n: int) -> None:
        slot = self.next_slot = (self.next_slot + 1) & ((1 << _SLOT_BITS) - 1)
        self.slots[slot] = (start, n)
        insort(self.keys, ((n + 1) << _SLOT_BITS) | slot)

    def _take(self, index: int) -> tuple[int, int]:
        key = self.keys.pop(index)
        return self.slots.pop(key & ((1 << _SLOT_BITS) - 1))

    def plan(self, rows: int, starts: list[int], ns: list[int]) -> None:
        """Append the segments of `rows` rows: each segment is BOS + tokens[start:start+n]."""
        for _ in range(rows):
            space = self.row_len
            while space > 0:
                i = bisect_right(self.keys, (space << _SLOT_BITS) | ((1 << _SLOT_BITS) - 1)) - 1
                if i >= 0:  # the largest piece that fits whole
                    start, n = self._take(i)
                    self._refill()
                else:  # nothing fits: split the shortest, its rest goes back for later rows
                    start, full = self._take(0)
                    n = space - 1
                    self._add(start + n, full - n)
                starts.append(start)
                ns.append(n)
                space -= n + 1


def gather(tokens: np.ndarray, bos_index: int, starts: list[int], ns: list[int],
           out: np.ndarray) -> None:
    """Fill out (flat) with BOS + tokens[start:start+n] for each segment, in one take."""
    s = np.asarray(starts, dtype=np.int64)
    seg = np.asarray(ns, dtype=np.int64) + 1
    begins = np.cumsum(seg) - seg
    idx = np.arange(int(seg.sum()), dtype=np.int64) + np.repeat(s - 1 - begins, seg)
    idx[begins] = bos_index
    out[:] = tokens[idx]


class BatchStream:
    """Numpy batches (rows, row_len) of int32 from a Packer, produced on a background thread."""

    def __init__(self, split: TokenSplit, rows: int, row_len: int, seed: int, prefetch: int = 4):
        self.split, self.rows, self.row_len = split, rows, row_len
        self.packer = Packer(split, row_len, seed)
        self.bos_index = int(split.offsets[0])  # every document starts with BOS
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="loader", daemon=True)
        self.thread.start()

    def next_array(self) -> np.ndarray:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise RuntimeError("the data loader thread failed") from item
        return item

    def make(self) -> np.ndarray:
        starts: list[int] = []
        ns: list[int] = []
        self.packer.plan(self.rows, starts, ns)
        out = np.empty((self.rows, self.row_len), dtype=np.int32)
        gather(self.split.tokens, self.bos_index, starts, ns, out.reshape(-1))
        return out

    def _produce(self) -> None:
        try:
            while not self.stop.is_set():
                batch = self.make()
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which raises it
            self.queue.put(e)

    def close(self) -> None:
        self.stop.set()


class TrainLoader:
    """Iterator of (inputs, targets) int64 tensors of shape (B, T) on the program's device."""

    def __init__(self, split: TokenSplit, batch_size: int, seq_len: int, seed: int, device: str):
        import torch  # the loader is the only part of this module that needs torch

        self.torch, self.device = torch, torch.device(device)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.stream = BatchStream(split, batch_size, seq_len + 1, seed)
        self.tokens_served = 0
        self.cuda = self.device.type == "cuda"
        if self.cuda:  # rotating pinned buffers; an event guards each until its copy is done
            self.pinned = [torch.empty((batch_size, seq_len + 1), dtype=torch.int32).pin_memory()
                           for _ in range(3)]
            self.events = [None] * 3
            self.turn = 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        torch = self.torch
        arr = self.stream.next_array()
        if self.cuda:
            k = self.turn = (self.turn + 1) % len(self.pinned)
            if self.events[k] is not None:
                self.events[k].synchronize()
            self.pinned[k].numpy()[:] = arr
            rows = self.pinned[k].to(self.device, non_blocking=True)
            self.events[k] = torch.cuda.Event()
            self.events[k].record()
            rows = rows.long()
        else:
            rows = torch.from_numpy(arr).long()
        self.tokens_served += self.batch_size * self.seq_len
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def close(self) -> None:
        self.stream.close()
