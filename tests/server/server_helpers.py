"""Shared helpers of the server tests (a unique module name: every test folder has its own conftest)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from server.lab import Lab

REPO = Path(__file__).resolve().parents[2]
PROGRAM = os.environ.get("AUTORESEARCH_TEST_PROGRAM", "tiny-stdlib")
TEST_BUDGET_S = float(os.environ.get("AUTORESEARCH_TEST_BUDGET_S", "4"))
IMAGE = os.environ.get("AUTORESEARCH_TEST_IMAGE", "autoresearch-sandbox:cpu")
LOADED_HOST_TIME_SLACK_S = 30.0  # the labs' min_time_slack_s: a busy 2-core box delays start-ups that much


def make_diff(text: str, old: str, new: str, path: str = "train.py") -> str:
    """A unified diff (difflib, 3 lines of context) replacing the first line that starts with `old`."""
    lines = text.splitlines(keepends=True)
    i = next(n for n, ln in enumerate(lines) if ln.startswith(old))
    changed = lines[:i] + [new + "\n"] + lines[i + 1:]
    return "".join(difflib.unified_diff(lines, changed, f"a/{path}", f"b/{path}"))


def lab_state(root: Path, agents: tuple[str, ...] = ("alice",)) -> dict:
    """Everything a tool call could change: git refs, worktree files, ledger rows, results, run folders."""
    from server.bench.state import lab_state as state  # noqa: PLC0415

    return state(root, agents)


def stdio_params(root: Path, agent: str):
    """How the official client starts `autoresearch-mcp serve` over stdio for `agent`."""
    import sys  # noqa: PLC0415

    from mcp import StdioServerParameters  # noqa: PLC0415

    return StdioServerParameters(
        command=sys.executable, args=["-m", "server.cli", "serve", "--lab", str(root), "--agent", agent],
        env={**os.environ, "AUTORESEARCH_LOG_LEVEL": "INFO"}, cwd=str(REPO),
    )


def open_dir(path: Path) -> Path:
    """pytest makes its temp folders 0700; the container's user must be able to read mounted data."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path


def ledger_rows(root: Path, agent: str | None = None) -> list:
    lab = Lab(root)
    try:
        return sorted(lab.ledger.runs(agent=agent), key=lambda r: (r.agent, r.seq))
    finally:
        lab.close()


async def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.25):
    """Poll `predicate` until it returns something truthy; fail with `what` after timeout_s."""
    import time  # noqa: PLC0415

    import anyio  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await anyio.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def server_pids(root: Path) -> list[int]:
    """The `autoresearch-mcp serve` processes of a lab (a run's row names its supervisor, not these)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(root).encode() in argv and any(a.endswith(b"server.cli") for a in argv):
            pids.append(int(proc.name))
    return pids
