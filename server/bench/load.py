"""Load: N agents, each its own `autoresearch-mcp serve` process over stdio, run R experiments each
on a pool of S slots (local backend, the trivial program). Figures: runs per second, the most runs
that trained at one instant (never above S: no double-booked slot), and the reconciled books.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from pathlib import Path

from server.bench.common import books, make_lab, replace_line, stdio_params

WINDOW = re.compile(r"^window-(start|end) (\d+\.\d+)$", re.MULTILINE)


async def _agent(root: Path, agent: str, runs: int, seed: int) -> dict[str, int]:
    from mcp import Client  # noqa: PLC0415

    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    async with Client(stdio_params(root, agent), read_timeout_seconds=900) as client:
        for i in range(runs):
            if i % 3 == 1:  # a third of the runs try another learning rate first
                text = (await client.call_tool("read_train", {})).structured_content["text"]
                diff = replace_line(text, "LR = ", f"LR = {rng.choice([0.05, 0.2, 0.5, 1.0, 2.0])}")
                await client.call_tool("apply_patch", {"diff": diff})  # may be a no-op diff: refused, fine
            res = await client.call_tool("run_experiment", {"description": f"{agent} run {i + 1}"})
            status = "tool-error" if res.is_error else res.structured_content["status"]
            statuses[status] = statuses.get(status, 0) + 1
    return statuses


def max_overlap(root: Path) -> tuple[int, int]:
    """(most runs whose training overlapped at one instant, runs whose log shows a window)."""
    events = []
    for log in (root / "runs").glob("*/log.txt"):
        marks = dict((k, float(v)) for k, v in WINDOW.findall(log.read_text(errors="replace")))
        if "start" in marks and "end" in marks:
            events += [(marks["start"], 1), (marks["end"], -1)]
    now = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at one instant
        now += step
        peak = max(peak, now)
    return peak, len(events) // 2


async def run_load(work: Path, program: Path, data: Path, agents: int, slots: int, runs: int) -> dict:
    root = make_lab(work / "load", program, data, backend="local", slots=slots, progress_interval_s=5.0)
    t0 = time.monotonic()
    results = await asyncio.gather(*(_agent(root, f"agent{i}", runs, seed=i) for i in range(agents)))
    elapsed = time.monotonic() - t0
    tools: dict[str, int] = {}
    for r in results:
        for k, v in r.items():
            tools[k] = tools.get(k, 0) + v
    peak, windows = max_overlap(root)
    b = books(root)
    expected = agents * runs
    checks = {
        "every run recorded once": b["rows"] == expected,
        "books reconcile": not b["findings"],
        "no double-booked slot": peak <= slots,
        "every run trained": windows == expected,
    }
    return {"part": "load", "agents": agents, "slots": slots, "runs_per_agent": runs, "runs": expected,
            "elapsed_s": round(elapsed, 1), "runs_per_s": round(expected / elapsed, 3),
            "tool_statuses": tools, "ledger": b, "max_concurrent_training": peak, "checks": checks}
