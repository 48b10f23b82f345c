"""`python -m server.bench dashboard [--runs 1000]`: how fast the dashboard answers for a big lab.

Makes a lab (tiny-stdlib, no data needed), fills its ledger with RUNS finished runs over 4 agents,
serves the dashboard on 127.0.0.1 and times each page over real HTTP, 30 requests each: the lab page,
its JSON (what the page polls), a run's page and an unknown run's 404. Goal: ≤ 200 ms each.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from pathlib import Path

GOAL_MS = 200.0


def run_dashboard_bench(work: Path, runs: int, repeats: int = 30) -> dict:
    import logging  # noqa: PLC0415

    import httpx  # noqa: PLC0415
    import uvicorn  # noqa: PLC0415

    from server.dashboard import build_app  # noqa: PLC0415
    from server.lab import create_lab  # noqa: PLC0415
    from server.ledger import Ledger  # noqa: PLC0415

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would drown the figures
    root = work / "dashboard-lab"
    create_lab(root, "tiny-stdlib", backend={"type": "local", "state_dir": str(work / "local-state")},
               pool={"state_dir": str(work / "slots"), "gpus": [], "cpu_slots": 1})
    ledger = Ledger(root / "ledger.sqlite")
    try:
        for i in range(runs):
            rec = ledger.create_run(f"agent-{i % 4}", f"idea {i}: " + "a longer description " * 3, None)
            val = 2.2 - 0.0001 * i + (i % 7) / 100
            crash, kept = i % 23 == 0, i % 40 == 1
            ledger.finish(rec.run_id, "crash" if crash else "ok", val_bpb=None if crash else val, kept=kept,
                          decision="crash" if crash else "keep" if kept else "discard")
    finally:
        ledger.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    pages = {"lab page /": "/", "JSON /api/lab": "/api/lab", "run page": "/runs/agent-1-0100",
             "unknown run (404)": "/runs/nobody-0001"}
    figures, checks = {}, {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for name, path in pages.items():
                client.get(path)  # warm
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    r = client.get(path)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == (404 if "404" in name else 200), (path, r.status_code)
                figures[name] = {"p50_ms": round(statistics.median(times), 1),
                                 "p95_ms": round(sorted(times)[int(0.95 * len(times)) - 1], 1),
                                 "max_ms": round(max(times), 1), "bytes": len(r.content)}
                checks[f"{name} p95 <= {GOAL_MS:g} ms"] = figures[name]["p95_ms"] <= GOAL_MS
    finally:
        server.should_exit = True
        thread.join(10)
    return {"part": "dashboard", "runs": runs, "pages": figures, "checks": checks}
