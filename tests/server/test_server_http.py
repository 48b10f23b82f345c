"""Streamable HTTP: bearer tokens from a tokens file; no or wrong token → 401; two tokens → two
agents with their own train.py, on one server and one lab."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from server_helpers import REPO, ledger_rows, make_diff, wait_until

from server.lab import Lab
from server.runs import Runs

pytestmark = pytest.mark.anyio

TOKENS = {"alice-token-0123456789abcdef": "alice", "bob-token-0123456789abcdef": "bob"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def http_server(http_lab):
    root, proc, url = http_lab
    yield url


@pytest.fixture
async def http_lab(make_lab, tiny_data, tmp_path):
    """(lab root, server process, MCP url) of an HTTP server on a local-backend lab (60-s budget)."""
    root = make_lab(data_dir=tiny_data, budget_s=60)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--lab", str(root), "--transport", "http",
         "--port", str(port), "--tokens", str(tokens)], cwd=REPO, env=dict(os.environ),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        await wait_until(listening, 30, "the HTTP server to listen")
        yield root, proc, f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(15)


def agent_client(url: str, token: str) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
    return Client(streamable_http_client(url, http_client=http))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789abcdef"},
                                     {"Authorization": "Basic YWxpY2U6cHc="}, {"Authorization": "Bearer short"}],
                         ids=["no-token", "wrong-token", "basic-auth", "short-token"])
async def test_requests_without_a_valid_token_get_401(http_server, headers):
    async with httpx.AsyncClient() as h:
        r = await h.post(http_server, json=INIT, headers={**headers, "Accept": "application/json, text/event-stream"})
    assert r.status_code == 401
    assert "Bearer" in r.headers.get("www-authenticate", "")


@pytest.mark.anyio
async def test_the_dashboard_beside_the_tools_needs_a_token(http_lab):
    root, proc, url = http_lab
    base = url.removesuffix("/mcp")
    for path in ("/", "/api/lab", "/static/dashboard.js", "/runs/alice-0001"):
        r = httpx.get(base + path)
        assert r.status_code == 401 and "token needed" in r.text, path
    assert httpx.get(base + "/", headers={"Authorization": "Bearer wrong-token-0123456789abcdef"}).status_code == 401
    r = httpx.get(base + "/api/lab", headers={"Authorization": "Bearer alice-token-0123456789abcdef"})
    assert r.status_code == 200 and r.json()["runs"] == []
    with httpx.Client(base_url=base) as browser:  # a browser's first visit: ?token= sets a cookie
        first = browser.get("/?token=bob-token-0123456789abcdef", follow_redirects=True)
        assert first.status_code == 200 and "Leaderboard" in first.text and "token" not in str(first.url)
        assert browser.get("/api/lab").status_code == 200
        assert browser.get("/runs/nobody-0001").status_code == 404


async def test_two_tokens_are_two_agents(http_server):
    async with agent_client(http_server, "alice-token-0123456789abcdef") as alice, \
            agent_client(http_server, "bob-token-0123456789abcdef") as bob:
        a = (await alice.call_tool("read_train", {})).structured_content
        b = (await bob.call_tool("read_train", {})).structured_content
        assert (a["agent"], b["agent"]) == ("alice", "bob") and a["text"] == b["text"]
        patched = await alice.call_tool("apply_patch", {"diff": make_diff(a["text"], "LR = ", "LR = 5e-3")})
        assert not patched.is_error, patched.content[0].text
        assert "LR = 5e-3" in (await alice.call_tool("read_train", {})).structured_content["text"]
        assert (await bob.call_tool("read_train", {})).structured_content["text"] == b["text"]
        # an agent named in a request cannot override the token's identity
        sneaky = await bob.call_tool("read_train", {"agent": "alice"})
        assert sneaky.is_error


async def test_sigterm_ends_the_server_and_its_run_goes_on(http_lab):
    root, proc, url = http_lab

    async def session() -> None:
        try:
            async with agent_client(url, "alice-token-0123456789abcdef") as alice:
                await alice.call_tool("run_experiment", {"description": "the server is told to stop"})
        except BaseException:  # noqa: BLE001 - the server goes away under the call
            pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(session)
        await wait_until(lambda: [r.status for r in ledger_rows(root)] == ["running"], 60, "the run to start")
        run_dir = root / "runs" / ledger_rows(root)[0].run_id
        proc.terminate()
        await wait_until(lambda: proc.poll() is not None, 30, "the server to exit")
        tg.cancel_scope.cancel()
    await anyio.sleep(3)
    [row] = ledger_rows(root)
    assert row.status == "running" and os.path.exists(f"/proc/{row.owner_pid}")  # its supervisor goes on
    lab = Lab(root)
    try:  # only a cancel stops it, from any server of the lab (here: this process)
        result = await Runs(lab).cancel(row.run_id, "cancelled by the test")
    finally:
        lab.close()
    assert (result.status, result.reason) == ("cancelled", "cancelled by the test")
    await wait_until(lambda: not subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).stdout, 15,
                     "the run's processes to end")
