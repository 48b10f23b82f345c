"""Text that came out of a run (its errors, its log), made safe to store and to show an agent.

A run's code decides what it prints and raises: lone surrogates (which SQLite and git cannot encode),
terminal escape sequences, NUL and bell bytes, megabytes on one line. The raw log stays on disk;
what goes to the ledger and to the tools is printable text within a cap in characters (issue 19).
"""

from __future__ import annotations

import re

ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")  # CSI, OSC, two-byte
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline
DETAIL_CHARS = 2000
TAIL_CHARS = 20_000


def printable(text: str, max_chars: int) -> str:
    """`text` as valid UTF-8 without escapes or control characters, its end kept within `max_chars`."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"
    text = CONTROLS.sub("", ESCAPES.sub("", text.replace("\r\n", "\n")))
    if len(text) > max_chars:
        cut = len(text) - max_chars
        text = f"[... {cut} characters left out ...]\n" + text[cut:]
    return text
