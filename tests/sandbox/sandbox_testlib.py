"""Helpers shared by the sandbox tests (imported by name: the test folders are not packages)."""

from __future__ import annotations


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def result_of(outcome) -> dict | None:
    """The result.json a test script wrote to /out (conftest's layout: <work>/run.log, <work>/out), read
    as the host reads a run's output (a regular file, size-bounded), or None."""
    import json  # noqa: PLC0415

    from sandbox.runio import read_output  # noqa: PLC0415

    raw, _ = read_output(outcome.log_path.parent / "out", "result.json")
    try:
        value = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
