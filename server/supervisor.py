"""A run's supervisor: a detached process per run that owns it from its ledger row to its record
(issue 19). It holds the agent's lock and the slot lease, runs both phases, decides, commits and
writes results.tsv; the MCP server that asked for the run only starts it and watches the ledger.
A server that exits, is killed or loses its client leaves the run going; only a cancel (SIGTERM to
the supervisor, sent by `cancel_experiment` or a cancelled blocking call) stops it. A supervisor
that dies is found by the next server's recovery (its row `interrupted`, its container reaped).

    python -m server.supervisor --lab DIR --agent NAME --description TEXT [--role calibration --seed N]
prints one JSON line on stdout ({"run_id": ...} or {"error": ..., "kind": ...}) once the row is
written, then nothing more; its own log goes to stderr (the spawner points it at a file).
"""

from __future__ import annotations

import argparse
import contextlib
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from server import log

STATUS_FILE = "status.txt"  # runs/<id>/status.txt: the latest progress line, for any server to read
CANCEL_FILE = "cancel.txt"  # runs/<id>/cancel.txt: why a canceller stopped the run, for its row
HANDSHAKE_S = 60.0  # how long a spawner waits for the row to be written (lab open, lock, ledger)

logger = log.get("supervisor")


def write_status(run_dir: Path, line: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(line, encoding="utf-8")
    os.replace(tmp, run_dir / STATUS_FILE)


def read_status(run_dir: Path) -> str | None:
    try:
        return (run_dir / STATUS_FILE).read_text(encoding="utf-8")[:500]
    except OSError:
        return None


async def supervise(lab_dir: Path, agent: str, description: str, role: str = "experiment",
                    seed: int | None = None) -> int:
    from server.errors import LabError  # noqa: PLC0415
    from server.experiment import Experiments  # noqa: PLC0415
    from server.lab import Lab  # noqa: PLC0415
    from server.runtime import image_of, make_runtime  # noqa: PLC0415

    from sandbox.errors import SandboxError  # noqa: PLC0415

    from server.experiment import check_description  # noqa: PLC0415

    lab = Lab(lab_dir)
    try:
        try:
            try:
                backend, pool = make_runtime(lab)
            except SandboxError as e:  # the host is broken, not the agent's code: one infra-error row
                check_description(description)
                rec = lab.ledger.create_run(agent, " ".join(description.split()), None, seed=seed, role=role)
                lab.ledger.finish(rec.run_id, "infra-error", detail=f"the sandbox failed: {type(e).__name__}: {e}")
                answer({"run_id": rec.run_id})
                return 1
            experiments = Experiments(lab, backend, pool, image_of(lab))
            pending = await experiments.begin(agent, description, role, seed)  # type: ignore[arg-type]
        except LabError as e:
            answer({"error": str(e), "kind": type(e).__name__})
            return 1
        except Exception as e:  # noqa: BLE001 — the spawner says what broke
            answer({"error": f"{type(e).__name__}: {e}", "kind": "SandboxError"})
            return 1
        run_id = pending.record.run_id
        run_dir = lab.run_dir(run_id)
        write_status(run_dir, pending.status_line)
        answer({"run_id": run_id})
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def cancel() -> None:
            try:  # the canceller says why (server.runs); a bare signal is the client's cancel
                experiments.cancel_detail = (run_dir / CANCEL_FILE).read_text(encoding="utf-8")[:300]
            except OSError:
                experiments.cancel_detail = "cancelled by the client"
            task.cancel()  # type: ignore[union-attr]

        loop.add_signal_handler(signal.SIGTERM, cancel)
        loop.add_signal_handler(signal.SIGINT, cancel)
        status = asyncio.create_task(_keep_status(run_dir, pending))
        try:
            await experiments.execute(pending)
        except asyncio.CancelledError:
            logger.info("run_cancelled_by_request", run_id=run_id)
        finally:
            status.cancel()
            write_status(run_dir, "finished")
        return 0
    finally:
        lab.close()


async def _keep_status(run_dir: Path, pending) -> None:
    last = None
    while True:
        if pending.status_line != last:
            last = pending.status_line
            write_status(run_dir, last)
        await asyncio.sleep(0.5)


def answer(message: dict) -> None:
    """The one line the spawner waits for; stdout then goes to /dev/null (the spawner has hung up)."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


async def spawn(lab_dir: Path, agent: str, description: str, role: str = "experiment", seed: int | None = None) -> str:
    """Start a supervisor for a new run of `agent` (a calibration run of the lab's: role
    `calibration`, at `seed`); its run id once the ledger row exists.

    Raises the LabError the supervisor met (busy agent, no data, a bad description) with its text.
    """
    from server.errors import BusyError, InvalidArgumentError, LabStateError  # noqa: PLC0415

    logs = lab_dir / "logs"
    logs.mkdir(exist_ok=True)
    errlog = open(logs / f"supervisor-{agent}-{time.time_ns()}.log", "ab")  # noqa: SIM115
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server.supervisor", "--lab", str(lab_dir), "--agent", agent,
            "--description", description, "--role", role, *(["--seed", str(seed)] if seed is not None else []),
            "--detach", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=errlog, start_new_session=True,  # its own session: a signal to the server's group misses it
            cwd=str(Path(__file__).resolve().parent.parent), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        errlog.close()
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), HANDSHAKE_S)
    except TimeoutError:
        proc.kill()
        raise LabStateError(f"the run's supervisor did not start within {HANDSHAKE_S:g} s; see {logs}") from None
    await proc.wait()  # the forking parent, gone already: the supervisor is not our child
    try:
        message = json.loads(line)
    except ValueError:
        raise LabStateError(f"the run's supervisor failed to start; see its log in {logs}") from None
    if "run_id" in message:
        with contextlib.suppress(OSError):  # the supervisor keeps writing it under its new name
            os.replace(errlog.name, logs / f"supervisor-{message['run_id']}.log")
        return message["run_id"]
    text = message.get("error", "the run's supervisor failed")
    if message.get("kind") == "SandboxError":
        from sandbox.errors import SandboxError  # noqa: PLC0415

        raise SandboxError(text)
    raise {"BusyError": BusyError, "InvalidArgumentError": InvalidArgumentError}.get(message.get("kind"),
                                                                                    LabStateError)(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.supervisor", description=__doc__.split("\n")[0])
    ap.add_argument("--lab", required=True, type=Path)
    ap.add_argument("--agent", required=True)
    ap.add_argument("--description", required=True)
    ap.add_argument("--role", choices=["experiment", "calibration"], default="experiment")
    ap.add_argument("--seed", type=int, help="the run's seed (default: the program's)")
    ap.add_argument("--detach", action="store_true", help="fork once more, so that the spawner is not "
                    "this process's parent (no zombie left in a long-lived server)")
    args = ap.parse_args(argv)
    if args.detach and os.fork() > 0:
        os._exit(0)  # the spawner reaps this at once; the child goes on, adopted by init
    log.configure()
    return asyncio.run(supervise(args.lab, args.agent, args.description, args.role, args.seed))


if __name__ == "__main__":
    sys.exit(main())
