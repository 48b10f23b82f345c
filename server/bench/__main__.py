"""`python -m server.bench reliability [--size small]`: the reliability suite of issues 19 and 23, with figures.

  load    N agents (N server processes over stdio) x S slots x R runs of a trivial program
  faults  kill -9 of a server and of a supervisor mid-run, dockerd restarted mid-run, a full disk,
          a container OOM, a locked ledger (docker backend)
  fuzz    hypothesis-generated arguments for every tool, diffs above all
  noise   the keep rule on a program of known noise: neutral changes and real improvements kept,
          and the confirm reruns' cost (a simulation through server.noise.decide; no runs)

Prints one JSON object per part and a summary; exits 1 when any check fails.

`python -m server.bench dashboard [--runs 1000]`: the dashboard's answer times for a lab of that many
runs (server/bench/dashboard.py).

`python -m server.bench cluster [--agents 3 --runs 4 --budget-s 5]`: the same runs on one host and on a
Ray cluster on this machine (in a network namespace): scheduling overhead and wall times (issue 21).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

# small: CI. One pair of runs beside a fork bomb, on a 2-core host that runs other tests at the same time,
# is noisy (26.8 % seen against a 25 % bound): its bound there only tells a contained bomb (each slot keeps
# its own core) from an uncontained one (the neighbour starved, slowed by ~100 %). The full size's 10 %
# is the benchmark's figure.
SIZES = {"small": dict(agents=2, slots=2, runs=4, cases=300, max_slowdown=0.6, changes=2000),
         "full": dict(agents=8, slots=2, runs=100, cases=10_000, max_slowdown=0.10, changes=2000)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("reliability", help="load, faults and fuzzing, with figures")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--parts", default="load,faults,fuzz,noise", help="comma-separated: load, faults, fuzz, noise")
    for name in ("agents", "slots", "runs", "cases", "changes"):
        p.add_argument(f"--{name}", type=int, help=f"override the size's {name}")
    p.add_argument("--faults", help="comma-separated fault names to stage (default: all)")
    p.add_argument("--image", default="autoresearch-sandbox:cpu", help="the sandbox image of the docker faults")
    p.add_argument("--work", type=Path, help="keep the labs here (default: a temporary folder, removed)")
    p = sub.add_parser("dashboard", help="the dashboard's answer times for a big lab")
    p.add_argument("--runs", type=int, default=1000)
    p = sub.add_parser("cluster", help="runs on one host against the same runs on a Ray cluster")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--runs", type=int, default=4, help="runs per agent")
    p.add_argument("--budget-s", type=float, default=5.0)
    p.add_argument("--image", default="autoresearch-sandbox:cpu")
    args = ap.parse_args(argv)

    from server import log  # noqa: PLC0415

    log.configure()
    if args.cmd == "dashboard":
        from server.bench.dashboard import run_dashboard_bench  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="autoresearch-bench-") as tmp:
            report = run_dashboard_bench(Path(tmp), args.runs)
        print(json.dumps(report))
        return 0 if all(report["checks"].values()) else 1
    if args.cmd == "cluster":
        from server.bench.cluster import run_cluster_bench  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="autoresearch-bench-") as tmp:
            Path(tmp).chmod(0o755)
            report = run_cluster_bench(Path(tmp), args.image, args.agents, args.runs, args.budget_s)
        print(json.dumps(report))
        return 0 if all(report["checks"].values()) else 1
    size = {k: getattr(args, k, None) or v for k, v in SIZES[args.size].items()}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="autoresearch-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o755)
        only = set(args.faults.split(",")) if args.faults else None
        reports = asyncio.run(_run(parts, work, size, args.image, only))
    failed = [f"{r['part']}: {name}" for r in reports for name, ok in r["checks"].items() if not ok]
    print(json.dumps({"summary": "ok" if not failed else "FAILED", "failed": failed}))
    return 1 if failed else 0


async def _run(parts: list[str], work: Path, size: dict, image: str, only: set[str] | None) -> list[dict]:
    from server.bench.common import prepare_data, write_program  # noqa: PLC0415

    program = write_program(work / "program", budget_s=0.3)
    data = prepare_data(program, work / "data")
    reports = []
    for part in parts:
        if part == "load":
            from server.bench.load import run_load  # noqa: PLC0415

            report = await run_load(work, program, data, size["agents"], size["slots"], size["runs"])
        elif part == "faults":
            from server.bench.faults import run_faults  # noqa: PLC0415

            report = await run_faults(work, data, image, only, size["max_slowdown"])
        elif part == "noise":
            from server.bench.noise import run_noise  # noqa: PLC0415

            report = await run_noise(size["changes"])
        elif part == "fuzz":
            from server.bench.fuzz import run_fuzz  # noqa: PLC0415

            report = await run_fuzz(work, program, data, size["cases"])
        else:
            raise SystemExit(f"unknown part {part!r}; the parts are load, faults, fuzz, noise")
        print(json.dumps(report), flush=True)
        reports.append(report)
    return reports


if __name__ == "__main__":
    sys.exit(main())
