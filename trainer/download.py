"""Resumable HTTP download with retries, exponential backoff and a progress line.

Used at prepare time only (the one step allowed network). A partial file is kept as
`<name>.part` and continued with an HTTP Range request on the next attempt or run.
"""

from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from trainer.config import TrainerError

CHUNK = 1 << 20
_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(TrainerError, ConnectionError):
    """A file could not be fetched; the message says what to try instead."""

    def __init__(self, url: str, message: str):
        self.url = url
        super().__init__(f"{url}: {message}")


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, every ~10% otherwise."""

    def __init__(self, label: str, total: int | None, done: int = 0):
        self.label, self.total, self.done = label, total, done
        self.t0, self.start_done, self.last = time.monotonic(), done, -1.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        frac = self.done / self.total if self.total else None
        step = frac if frac is not None else self.done / (100 * CHUNK)
        if self.tty or step - self.last >= 0.1:
            self.last = step
            self._print(end="\r" if self.tty else "\n")

    def close(self) -> None:
        self._print(end="\n")

    def _print(self, end: str) -> None:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.t0, 1e-6) / 1e6
        size = f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB" if self.total else f"{self.done / 1e6:.1f} MB"
        print(f"  {self.label}  {size}  {rate:.1f} MB/s", end=end, file=sys.stderr, flush=True)


def download(url: str, dest: Path, retries: int = 5, backoff_s: float = 2.0,
             timeout_s: float = 60.0) -> Path:
    """Fetch url to dest unless dest exists; resume a partial `.part`; retry transient errors."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_s * 2 ** (attempt - 1)
            print(f"  retry {attempt}/{retries} of {dest.name} in {wait:.1f}s ({last})", file=sys.stderr)
            time.sleep(wait)
        try:
            _fetch_once(url, part, timeout_s)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code not in _RETRYABLE_HTTP:
                raise DownloadError(url, f"HTTP {e.code} {e.reason}; check the base URL and shard number") from e
            last = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last = e
    raise DownloadError(
        url,
        f"failed after {retries + 1} attempts (last error: {last}). Downloading needs network access; "
        "offline, prepare from local files instead: --source local --path DIR, or --source python-stdlib",
    )


def _fetch_once(url: str, part: Path, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "autoresearch-mcp"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left past what we have: the .part is whole
            return
        raise
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored Range: start over
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = Progress(part.name.removesuffix(".part"), total, have)
        with open(part, "ab" if have else "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
        bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)
