"""The morning view: a read-only web dashboard of one lab (issue 22).

    autoresearch-mcp dashboard --lab DIR [--host 127.0.0.1 --port 8765]

`/` is the lab's page: the leaderboard (each agent's best, its improvement over its baseline, keeps
/ runs, the noise band), one chart of val_bpb over experiments per agent (uPlot, vendored in
server/dashboard_static: the page needs no network), the runs table with a filter by agent and
status, and the runs in flight with their latest progress line. The page polls `/api/lab` every
few seconds. `/runs/<run_id>` is a run's page: its diff against its parent commit, its log's tail, its
figures and its commit's trailers. Every text that comes from a run (descriptions, logs, diffs) is
escaped, never rendered as HTML. The dashboard opens the ledger read-only and git only to read.
"""

from __future__ import annotations

import contextlib
import datetime
import html
import re
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import git
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from server.app import agent_of_token
from server.lab import run_log_lines
from server.ledger import Ledger
from server.models import CALIBRATION_AGENT, LIVE_STATUSES, RunRecord
from server.report import experiments
from server.supervisor import read_status

STATIC = Path(__file__).with_name("dashboard_static")
STATIC_FILES = {  # the only files /static serves: no path from a URL ever reaches the disk
    "uPlot.iife.min.js": "application/javascript", "uPlot.min.css": "text/css",
    "dashboard.js": "application/javascript", "dashboard.css": "text/css",
}
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,80}")
LOG_TAIL_LINES = 200
DIFF_MAX_CHARS = 200_000


class LabView:
    """What the pages show, read from one lab without writing to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / "ledger.sqlite").exists():
            raise FileNotFoundError(f"{root} is not a lab (no ledger.sqlite); make one with `autoresearch-mcp prepare`")
        self.ledger = Ledger(root / "ledger.sqlite", read_only=True)
        self.repo = git.Repo(root / "repo")

    def close(self) -> None:
        self.ledger.close()
        self.repo.close()

    def state(self) -> dict[str, Any]:
        runs = [r for r in self.ledger.runs() if r.agent != CALIBRATION_AGENT]
        agents = sorted({r.agent for r in runs})
        try:
            calibration = self.ledger.calibration()
        except Exception:  # a lab from before calibrations has no such table
            calibration = None
        by_agent = {agent: [r for r in runs if r.agent == agent] for agent in agents}
        board = []
        for agent, mine in by_agent.items():
            best, base = self.ledger.best(agent), self.ledger.baseline(agent)
            base = base if base is not None and base.val_bpb is not None else None
            board.append({
                "agent": agent, "best": best.val_bpb if best else None, "best_run": best.run_id if best else None,
                "baseline": base.val_bpb if base else None,
                "improvement": (base.val_bpb - best.val_bpb) if best and base else None,
                "keeps": sum(r.kept for r in mine), "runs": len(mine),
            })
        board.sort(key=lambda b: (b["best"] is None, b["best"] or 0.0))
        series = {agent: [{"x": i, "val_bpb": r.val_bpb, "kept": r.kept, "status": r.status, "run_id": r.run_id}
                          for i, r in experiments(mine)] for agent, mine in by_agent.items()}
        live = [{**row(r), "progress": read_status(self.root / "runs" / r.run_id)}
                for r in runs if r.status in LIVE_STATUSES]
        return {"sigma": calibration.sigma if calibration else None, "leaderboard": board, "series": series,
                "runs": [row(r) for r in runs], "live": live}

    def run(self, run_id: str) -> RunRecord | None:
        rec = self.ledger.find(run_id) if RUN_ID.fullmatch(run_id) else None
        return rec if rec is not None and rec.agent != CALIBRATION_AGENT else None

    def diff(self, rec: RunRecord) -> str:
        if not rec.commit:
            return ""
        commit = self.repo.commit(rec.commit)
        parent = rec.base_commit or (commit.parents[0].hexsha if commit.parents else None)
        if parent is None:
            return ""
        return self.repo.git.diff(parent, commit.hexsha, "--", "train.py")[:DIFF_MAX_CHARS]

    def message(self, rec: RunRecord) -> str:
        return self.repo.commit(rec.commit).message if rec.commit else ""

    def log_tail(self, rec: RunRecord) -> str:
        return "\n".join(run_log_lines(self.root / "runs" / rec.run_id)[-LOG_TAIL_LINES:])


def row(r: RunRecord) -> dict[str, Any]:
    return {"run_id": r.run_id, "agent": r.agent, "seq": r.seq, "status": r.status, "decision": r.decision,
            "val_bpb": r.val_bpb, "delta": r.delta, "kept": r.kept, "description": r.description,
            "role": r.role, "z": r.z, "created_at": r.created_at, "started_at": r.started_at,
            "finished_at": r.finished_at}


def figure(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key.endswith("_at") and isinstance(value, float):
        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><link rel='icon' href='data:,'>"
        "<link rel='stylesheet' href='/static/uPlot.min.css'><link rel='stylesheet' href='/static/dashboard.css'>"
        f"</head><body>{body}</body></html>", status_code=status)


def not_found(what: str) -> HTMLResponse:
    return page("not found", f"<h1>Not found</h1><p>{html.escape(what)}</p><p><a href='/'>the lab</a></p>", 404)


def diff_html(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        kind = ("add" if line.startswith("+") and not line.startswith("+++") else
                "del" if line.startswith("-") and not line.startswith("---") else
                "hunk" if line.startswith("@@") else "ctx")
        out.append(f"<span class='{kind}'>{html.escape(line)}</span>")
    return "".join(out)  # each line a block of its own


TOKEN_COOKIE = "autoresearch_token"


def guarded(tokens: dict[str, str], handler):
    """The handler, answered only to a caller with one of the lab's bearer tokens: in an
    `Authorization: Bearer` header, in the cookie that `?token=` sets (a browser's first visit), or in
    that cookie later. Anyone else gets 401 and how to get in."""

    def known(token: str | None) -> bool:
        return agent_of_token(tokens, token) is not None

    async def guard(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        bearer = header[7:] if header.lower().startswith("bearer ") else None
        if known(bearer) or known(request.cookies.get(TOKEN_COOKIE)):
            return await handler(request)
        query = request.query_params.get("token")
        if known(query):
            response = RedirectResponse(request.url.path, status_code=303)
            response.set_cookie(TOKEN_COOKIE, query, httponly=True, samesite="strict")
            return response
        return page("token needed", "<h1>401: token needed</h1><p>This dashboard is served beside the MCP "
                    "tools: open it once as <code>/?token=YOUR-TOKEN</code> (a token of the server's tokens "
                    "file), or send <code>Authorization: Bearer</code>.</p>", 401)

    return guard


def build_app(root: Path, tokens: dict[str, str] | None = None) -> Starlette:
    """The dashboard of the lab at `root`; with `tokens` (the HTTP transport's tokens file), every page
    needs one of them."""
    view = LabView(root)

    async def index(request: Request) -> Response:
        return page(f"autoresearch: {root.name}", (
            f"<h1>autoresearch lab <code>{html.escape(root.name)}</code></h1>"
            "<p id='noise'></p><h2>Leaderboard</h2><table id='board'></table>"
            "<h2>val_bpb over experiments</h2><div id='chart'></div>"
            "<h2>In flight</h2><table id='live'></table>"
            "<h2>Runs</h2><p><label>agent <select id='agent'><option value=''>all</option></select></label> "
            "<label>status <select id='status'><option value=''>all</option></select></label></p>"
            "<table id='runs'></table><script src='/static/uPlot.iife.min.js'></script>"
            "<script src='/static/dashboard.js'></script>"))

    async def api(request: Request) -> Response:
        return JSONResponse(view.state(), headers={"Cache-Control": "no-store"})

    async def run_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        rec = view.run(run_id)
        if rec is None:
            return not_found(f"no run {run_id!r} in this lab")
        figures = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(figure(k, v))}</td></tr>"
                          for k, v in rec.model_dump().items()
                          if k not in ("owner_pid", "owner_start") and v not in (None, ""))  # unmeasured: no row
        return page(rec.run_id, (
            f"<p><a href='/'>the lab</a></p><h1>{html.escape(rec.run_id)}: {html.escape(rec.status)}</h1>"
            f"<p class='description'>{html.escape(rec.description)}</p>"
            f"<h2>Diff against its parent</h2><pre id='diff' class='diff'>{diff_html(view.diff(rec))}</pre>"
            f"<h2>Commit</h2><pre id='message'>{html.escape(view.message(rec))}</pre>"
            f"<h2>Figures</h2><table id='figures'>{figures}</table>"
            f"<h2>Log (last {LOG_TAIL_LINES} lines)</h2><pre id='log'>{html.escape(view.log_tail(rec))}</pre>"))

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return not_found(f"no file {name!r}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "max-age=3600"})

    async def missing(request: Request, exc: Exception) -> Response:
        return not_found(f"nothing at {request.url.path}")

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            view.close()

    def route(path: str, handler) -> Route:
        return Route(path, guarded(tokens, handler) if tokens else handler)

    return Starlette(routes=[route("/", index), route("/api/lab", api), route("/runs/{run_id:str}", run_page),
                             route("/static/{name:str}", static)],
                     exception_handlers={404: missing}, lifespan=lifespan)
