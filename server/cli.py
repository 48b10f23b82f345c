"""`autoresearch-mcp`: serve the MCP tools, prepare a lab, build the image, check the host, run one
experiment from the shell, and report.

    autoresearch-mcp prepare tiny-stdlib --lab .labs/demo      # make the lab, prepare its data
    autoresearch-mcp serve --lab .labs/demo --agent alice      # stdio, for Claude Code
    autoresearch-mcp serve --lab .labs/demo --transport http --tokens tokens.json
    autoresearch-mcp run --lab .labs/demo --agent demo --description baseline
    autoresearch-mcp calibrate --lab .labs/demo --seeds 3    # the noise a keep must beat
    autoresearch-mcp report --lab .labs/demo
    autoresearch-mcp dashboard --lab .labs/demo              # the lab in a browser, read-only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from sandbox.errors import SandboxError
from trainer.config import TrainerError

from server import log
from server.errors import LabError

DEFAULT_LAB = Path(os.environ.get("AUTORESEARCH_LAB", ".labs/default"))


def _lab_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lab", type=Path, default=DEFAULT_LAB,
                   help="lab folder (default: $AUTORESEARCH_LAB or .labs/default)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autoresearch-mcp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--log-level", default=os.environ.get("AUTORESEARCH_LOG_LEVEL", "INFO"))
    ap.add_argument("--log-stderr", action="store_true",
                    help="log lines to stderr; without it, commands other than serve append them to "
                         "LAB/logs/cli.log (JSON), and the terminal shows only the command's output")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the MCP tools (stdio by default)")
    _lab_arg(p)
    p.add_argument("--agent", default=os.environ.get("AUTORESEARCH_AGENT"),
                   help="agent name on stdio (default: $AUTORESEARCH_AGENT)")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tokens", type=Path, help='HTTP: JSON file {"<token>": "<agent>"} (required for http)')

    p = sub.add_parser("prepare", help="make the lab (if new) and prepare the program's data")
    p.add_argument("program", help="program name under programs/ (tiny-stdlib, gpt-climbmix) or a folder")
    _lab_arg(p)
    p.add_argument("--backend", choices=["docker", "local"], help="new lab: sandbox backend (default docker)")
    p.add_argument("--image", help="new lab: sandbox image (default autoresearch-sandbox:cpu)")
    p.add_argument("--runtime", help="new lab: OCI runtime for the containers, e.g. runsc (gVisor)")
    p.add_argument("--budget-s", type=float, help="new lab: override the program's training budget")
    p.add_argument("--data-dir", type=Path, help="new lab: prepared data folder (default LAB/data)")
    p.add_argument("--on-host", action="store_true",
                   help="run the (trusted) prepare step with the host's Python instead of the sandbox image")
    p.add_argument("--source", choices=["climbmix", "local", "python-stdlib"], help="override the program's source")
    p.add_argument("--path", action="append", help="local source: a folder or file to read (repeatable; --on-host)")
    p.add_argument("--glob", action="append", help="local source: only files matching, e.g. '**/*.py' (repeatable)")
    p.add_argument("--max-bytes", type=int, help="cap on text bytes read (local, python-stdlib)")
    p.add_argument("--num-train-shards", type=int, help="climbmix: training shards to download")
    p.add_argument("--base-url", help="climbmix: where shard_NNNNN.parquet files are served")
    p.add_argument("--force", action="store_true", help="prepare again even if the data is up to date")

    p = sub.add_parser("build-image", help="build the sandbox image")
    p.add_argument("--flavor", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--tag", help="image tag (default autoresearch-sandbox:<flavor>)")
    p.add_argument("--online", action="store_true", help="let pip inside the build reach the package index")
    p.add_argument("--host-base", action="store_true",
                   help="a host with neither registry nor index: the base from this host's own packages "
                        "and torch (run with the Python that has torch); the rest from --wheelhouse")
    p.add_argument("--wheelhouse", type=Path, help="a folder of wheels for the base's Python, used as it is")

    p = sub.add_parser("doctor", help="check Docker, the image, the data, GPUs; say how to fix each gap")
    _lab_arg(p)

    p = sub.add_parser("run", help="run one experiment from the shell (the same path as the MCP tool)")
    _lab_arg(p)
    p.add_argument("--agent", default=os.environ.get("AUTORESEARCH_AGENT", "cli"))
    p.add_argument("--description", required=True)
    p.add_argument("--patch", type=Path, help="apply this unified diff of train.py first")

    p = sub.add_parser("calibrate", help="measure the lab's noise: σ of val_bpb over seeds of the baseline")
    _lab_arg(p)
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")

    p = sub.add_parser("report", help="print results.tsv of each agent and write progress.png")
    _lab_arg(p)
    p.add_argument("--out", type=Path, help="PNG path (default LAB/progress.png)")
    p = sub.add_parser("dashboard", help="serve a live, read-only web page of the lab")
    _lab_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lab = getattr(args, "lab", None)
    if args.command == "serve" or args.log_stderr or lab is None:
        log.configure(args.log_level.upper())  # serve: its host (Claude Code, a terminal) reads stderr
    else:
        log.configure(args.log_level.upper(), file=lab / "logs" / "cli.log")
    from server import commands  # noqa: PLC0415 - keeps --help fast

    handler = getattr(commands, "cmd_" + args.command.replace("-", "_"))
    try:
        result = handler(args)
        return int(asyncio.run(result) if asyncio.iscoroutine(result) else result or 0)
    except (LabError, SandboxError, TrainerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
