"""What each `autoresearch-mcp` subcommand does (argument parsing lives in server.cli)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from server import log
from server.errors import InvalidArgumentError

logger = log.get("cli")


@contextlib.contextmanager
def cancelled_by_signals(signals: tuple[signal.Signals, ...], then=None):
    """While inside, each of `signals` cancels the current task; `then(task)` runs after. Yields the
    task; `task.stopped_by` names the signal once one came."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def stop(sig: signal.Signals) -> None:
        logger.warning("stopping", signal=sig.name)
        task.stopped_by = sig.name  # type: ignore[attr-defined]
        task.cancel()
        if then is not None:
            then(task)

    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        yield task
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def serve_stdio(server) -> None:
    """Serve over stdio until stdin closes or SIGTERM / SIGHUP / SIGINT arrives.

    Either way the server exits and its runs go on: each belongs to its supervisor (issue 19), and a
    server of the lab started later sees them, waits on them or cancels them.
    """
    def exit_soon(task: asyncio.Task) -> None:
        asyncio.get_running_loop().create_task(_exit_soon(task))

    with cancelled_by_signals((signal.SIGTERM, signal.SIGHUP, signal.SIGINT), exit_soon) as task:
        try:
            await server.run_stdio_async()
        except asyncio.CancelledError:
            if not getattr(task, "stopped_by", None):
                raise


async def _exit_soon(task: asyncio.Task, limit_s: float = 5.0) -> None:
    """Exit once the lifespan has closed the lab (or after `limit_s`).

    The stdio transport reads stdin in a worker thread that no cancellation can interrupt while the
    client keeps the pipe open, so the process would otherwise never finish exiting.
    """
    end = time.monotonic() + limit_s
    while time.monotonic() < end and not task.done():
        await asyncio.sleep(0.05)
    logger.info("server_stopped")
    logging.shutdown()
    os._exit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import build_server  # noqa: PLC0415

    if args.transport == "stdio":
        if not args.agent:
            raise InvalidArgumentError("stdio needs an agent name: --agent NAME or AUTORESEARCH_AGENT=NAME")
        _preflight(args.lab)
        asyncio.run(serve_stdio(build_server(args.lab, stdio_agent=args.agent)))
        return 0
    if args.tokens is None:
        raise InvalidArgumentError("http needs --tokens FILE mapping each bearer token to an agent name")
    _preflight(args.lab)
    import uvicorn  # noqa: PLC0415

    url = f"http://{args.host}:{args.port}"
    app = build_server(args.lab, tokens_file=args.tokens, url=url).streamable_http_app(host=args.host)
    from starlette.routing import Mount  # noqa: PLC0415

    from server.app import load_tokens  # noqa: PLC0415
    from server.dashboard import build_app  # noqa: PLC0415

    app.router.routes.append(Mount("/", app=build_app(args.lab, tokens=load_tokens(args.tokens))))  # after /mcp
    logger.info("http_serving", url=f"{url}/mcp", dashboard=f"{url}/")
    # On SIGTERM/SIGINT uvicorn waits this long for requests in flight, then drops them; their runs go
    # on under their supervisors (a client's cancel is the only thing that stops one).
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def _preflight(root: Path) -> None:
    """Fail here, with a one-line error, rather than inside the protocol loop: no lab, no Docker,
    no image, a runtime that is not installed."""
    from server.lab import Lab  # noqa: PLC0415
    from server.runtime import make_runtime  # noqa: PLC0415

    lab = Lab(root)
    try:
        make_runtime(lab)
    finally:
        lab.close()


async def cmd_run(args: argparse.Namespace) -> int:
    from server.runs import open_state  # noqa: PLC0415

    with cancelled_by_signals((signal.SIGTERM, signal.SIGHUP)) as task:  # Ctrl-C: asyncio.run's own
        try:
            async with open_state(args.lab, args.agent) as state:
                if args.patch is not None:
                    patch = await state.lab.apply_patch(args.agent, args.patch.read_text())
                    print(f"patched: {patch.diffstat}", file=sys.stderr)
                t0 = time.monotonic()

                async def report(elapsed: float, line: str) -> None:
                    print(f"[{elapsed:6.1f}s] {line}", file=sys.stderr, flush=True)

                # this shell is the run's client: a signal to it, or Ctrl-C, cancels the run
                state.runs.cancel_reason = "cancelled: stopped by a signal to `autoresearch-mcp run`"

                def named(t: asyncio.Task = task) -> bool:
                    if getattr(t, "stopped_by", None):
                        state.runs.cancel_reason = f"cancelled: stopped by {t.stopped_by}"
                    return True

                result = await state.runs.run(args.agent, args.description, report, cancelled_by_client=named)
        except asyncio.CancelledError:
            if not getattr(task, "stopped_by", None):
                raise
            print(f"stopped by {task.stopped_by}: the run was cancelled and recorded", file=sys.stderr)
            return 128 + getattr(signal, task.stopped_by).value
    print(json.dumps(result.model_dump(), indent=2))
    z = f", z {result.z:.2f}" if result.z is not None else ""
    print(f"{result.run_id}: {result.status}, val_bpb {result.val_bpb}, {result.decision or 'not committed'}{z}, "
          f"kept {result.kept} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 0 if result.status == "ok" else 1


async def cmd_calibrate(args: argparse.Namespace) -> int:
    from server.lab import Lab  # noqa: PLC0415
    from server.runs import Runs  # noqa: PLC0415

    lab = Lab(args.lab)
    try:
        async def report(elapsed: float, line: str) -> None:
            print(f"[{elapsed:6.1f}s] seed {lab.program().seed}: {line}", file=sys.stderr, flush=True)

        runs = Runs(lab)
        runs.cancel_reason = "cancelled: `autoresearch-mcp calibrate` was stopped"
        with cancelled_by_signals((signal.SIGTERM, signal.SIGHUP)):
            calibration = await runs.calibrate(args.seeds, report)
        noise = lab.noise()
    finally:
        lab.close()
    print(calibration.model_dump_json(indent=2))
    values = ", ".join(f"{r.val_bpb:.6f} (seed {r.seed})" for r in calibration.runs)
    print(f"σ = {calibration.sigma:.6f} over {len(calibration.runs)} seeds: {values}\n{noise.rule()}", file=sys.stderr)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415

    from server.dashboard import build_app  # noqa: PLC0415

    try:
        app = build_app(args.lab)
    except FileNotFoundError as e:
        raise InvalidArgumentError(str(e)) from e
    print(f"dashboard of {args.lab}: http://{args.host}:{args.port}/ (read-only; Ctrl-C stops it)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from server import report  # noqa: PLC0415
    from server.lab import Lab  # noqa: PLC0415

    lab = Lab(args.lab)
    try:
        print(report.table(lab), end="", flush=True)
        out = report.plot(lab, args.out or lab.root / "progress.png")
        print(f"progress plot: {out}", file=sys.stderr)
    finally:
        lab.close()
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from server.prepare import prepare  # noqa: PLC0415

    extra: list[str] = []
    for flag in ("source", "max_bytes", "num_train_shards", "base_url"):
        if getattr(args, flag) is not None:
            extra += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for path in args.path or []:
        extra += ["--path", str(Path(path).resolve())]
    for pattern in args.glob or []:
        extra += ["--glob", pattern]
    if args.force:
        extra.append("--force")
    return prepare(args.lab, args.program, backend=args.backend, image=args.image, runtime=args.runtime,
                   budget_s=args.budget_s,
                   data_dir=args.data_dir, on_host=args.on_host, extra=extra)


def cmd_build_image(args: argparse.Namespace) -> int:
    from server.prepare import build_image  # noqa: PLC0415

    return build_image(args.flavor, args.tag, args.online, host_base=args.host_base, wheelhouse=args.wheelhouse)


def cmd_doctor(args: argparse.Namespace) -> int:
    from server.doctor import doctor  # noqa: PLC0415

    return doctor(Path(args.lab))
