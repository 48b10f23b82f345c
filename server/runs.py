"""What an MCP server does with runs it does not own (issue 19): start one (a detached supervisor,
server.supervisor, owns it from then on), watch one through the ledger and its status file, wait
for one with progress, cancel one. Any server of the lab can do each of these for any run of the
agent it serves, whichever server started it; a server that exits leaves its runs going.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox.base import finish_despite_cancel
from sandbox.reaper import owner_alive

from server import log
from server.errors import InvalidArgumentError, LabStateError
from server.experiment import check_description, to_result
from server.lab import Lab, check_agent
from server.models import CALIBRATION_AGENT, LIVE_STATUSES, Calibration, ExperimentResult, RunRecord
from server.noise import spread
from server.runtime import finish_orphan, make_runtime, recover
from server.supervisor import CANCEL_FILE, read_status, spawn

Reporter = Callable[[float, str], Awaitable[None]]
"""Called with (seconds since the call began, one human-readable line) at least every interval."""

POLL_S = 0.25
CANCEL_WAIT_S = 60.0

logger = log.get("runs")


class Runs:
    """The lab's runs as one server sees them."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    async def start(self, agent: str, description: str) -> RunRecord:
        """Start a run under its own supervisor; returns its `queued` row."""
        check_agent(agent)
        check_description(description)
        run_id = await spawn(self.lab.root, agent, description)
        logger.info("run_started_detached", run_id=run_id, agent=agent)
        return self.lab.ledger.get(run_id)

    def progress_of(self, run_id: str) -> str | None:
        rec = self.lab.ledger.find(run_id)
        if rec is None or rec.status not in LIVE_STATUSES:
            return None
        return read_status(self.lab.run_dir(run_id)) or rec.status

    def result(self, rec: RunRecord) -> ExperimentResult:
        """A finished run as the tools return it: with the log's end when its own code ended it."""
        tail = None
        if rec.status not in ("ok", *LIVE_STATUSES):
            tail = self.lab.log_tail(rec.agent, rec.run_id, self.lab.config.log_tail_lines).text or None
        return to_result(rec, tail)

    async def wait(self, run_id: str, report: Reporter | None = None) -> ExperimentResult:
        """Block until the run's row is final, reporting its progress at least every interval."""
        t0, last_report = time.monotonic(), -1e9
        interval = self.lab.config.progress_interval_s
        while True:
            rec = self.lab.ledger.get(run_id)
            if rec.status not in LIVE_STATUSES:
                return self.result(rec)
            if not owner_alive(rec.owner_pid, rec.owner_start, host=""):
                await asyncio.sleep(1.0)  # it may have just recorded the run: look once more
                rec = self.lab.ledger.get(run_id)
                if rec.status in LIVE_STATUSES:
                    await finish_orphan(self.lab, rec, "the run's supervisor died during the run")
                continue
            now = time.monotonic()
            if report is not None and now - last_report >= interval:
                last_report = now
                await report(now - t0, self.progress_of(run_id) or rec.status)
            await asyncio.sleep(POLL_S)

    async def cancel(self, run_id: str, why: str = "cancelled by the client") -> ExperimentResult:
        """Stop a run in flight (its supervisor kills the sandbox and records `cancelled`)."""
        rec = self.lab.ledger.get(run_id)
        if rec.status not in LIVE_STATUSES:
            raise InvalidArgumentError(f"run {run_id} already finished ({rec.status}); nothing to cancel")
        (self.lab.run_dir(run_id)).mkdir(parents=True, exist_ok=True)
        (self.lab.run_dir(run_id) / CANCEL_FILE).write_text(why, encoding="utf-8")
        if owner_alive(rec.owner_pid, rec.owner_start, host=""):
            try:
                os.kill(rec.owner_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        logger.info("run_cancel_sent", run_id=run_id, supervisor=rec.owner_pid)
        return await asyncio.wait_for(self.wait(run_id), CANCEL_WAIT_S)

    async def run(self, agent: str, description: str, report: Reporter | None = None,
                  cancelled_by_client: Callable[[], bool] = lambda: True) -> ExperimentResult:
        """Start and wait. Cancelled, it cancels the run only if `cancelled_by_client()` says the
        caller asked for it; a server that is going away leaves the run to its supervisor."""
        rec = await self.start(agent, description)
        try:
            return await self.wait(rec.run_id, report)
        except asyncio.CancelledError:
            if cancelled_by_client():  # recorded before this call ends, however often it is cancelled
                await finish_despite_cancel(asyncio.ensure_future(self.cancel(rec.run_id, self.cancel_reason)))
            else:
                logger.info("run_left_to_its_supervisor", run_id=rec.run_id)
            raise

    async def calibrate(self, seeds: int, report: Reporter | None = None) -> Calibration:
        """Measure the lab's noise: the baseline (main's train.py) at `seeds` seeds of the harness's
        choosing (the program's seed and the next ones), each a run of its own through the normal
        run path, side by side as the slots allow; σ of their val_bpb goes into the ledger."""
        if not 2 <= seeds <= 50:
            raise InvalidArgumentError(f"--seeds must be between 2 and 50 (a spread needs two runs), not {seeds}")
        base = self.lab.program().seed
        run_ids: list[str] = []
        try:
            for seed in range(base, base + seeds):
                run_ids.append(await spawn(self.lab.root, CALIBRATION_AGENT, f"calibration: the baseline at seed {seed}",
                                           "calibration", seed))
            results = await asyncio.gather(*(self.wait(r, report if i == 0 else None) for i, r in enumerate(run_ids)))
        except asyncio.CancelledError:
            for run_id in run_ids:
                with contextlib.suppress(InvalidArgumentError, TimeoutError):
                    await finish_despite_cancel(asyncio.ensure_future(self.cancel(run_id, self.cancel_reason)))
            raise
        ok = [self.lab.ledger.get(r.run_id) for r in results if r.status == "ok" and r.val_bpb is not None]
        if len(ok) < 2:
            said = ", ".join(f"{r.run_id} {r.status}" + (f" ({r.reason})" if r.reason else "") for r in results)
            raise LabStateError(f"only {len(ok)} of {seeds} calibration runs scored ({said}); σ needs two. Fix what "
                                "stopped them (`autoresearch-mcp doctor`), then calibrate again")
        sigma = spread([r.val_bpb for r in ok if r.val_bpb is not None])
        commit = ok[0].base_commit or await self.lab.git(self.lab.history.main_commit)
        calibration = self.lab.ledger.add_calibration(commit, ok, sigma)
        logger.info("lab_calibrated", sigma=sigma, runs=[r.run_id for r in ok])
        return calibration

    cancel_reason = "cancelled by the client"
    """What a cancelled run's row says (the shell's `run` names the signal that stopped it)."""


@dataclass
class AppState:
    """An open lab with its runs: what the MCP server's lifespan yields to every tool call, and what
    the shell's `run` uses (without the MCP SDK)."""

    lab: Lab
    runs: Runs
    stdio_agent: str | None


@asynccontextmanager
async def open_state(lab_dir: Path, stdio_agent: str | None) -> AsyncIterator[AppState]:
    """Open the lab, check its sandbox, mark runs of dead supervisors `interrupted`. Runs in flight
    belong to their supervisors: closing the server leaves them going."""
    if stdio_agent is not None:
        check_agent(stdio_agent)
    lab = Lab(lab_dir)
    try:
        backend, _ = make_runtime(lab)  # engine, image, runtime: say what is missing now
        await recover(lab, backend)
        logger.info("lab_opened", lab=str(lab.root), program=lab.config.program, agent=stdio_agent)
        yield AppState(lab, Runs(lab), stdio_agent)
    finally:
        lab.close()
