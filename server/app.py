"""The MCP server: an `MCPServer` whose lifespan opens the lab, reaps what a dead server left
behind, and yields the state every tool call uses. Same tools over stdio and Streamable HTTP.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer

from server import tools
from server.errors import InvalidArgumentError
from server.lab import check_agent
from server.runs import AppState, open_state

INSTRUCTIONS = """\
Autonomous ML research: improve train.py so that validation bits per byte (val_bpb, lower is
better) drops after a fixed training budget. Loop: read_program once, read_train, apply_patch (a
unified diff of train.py), run_experiment (minutes; kept only if val_bpb beats your best), repeat.
get_best and list_experiments show where you stand; reset_train undoes unrun patches."""


class TokenFileVerifier:
    """Bearer tokens from a JSON file mapping token → agent name; the agent becomes the client id."""

    def __init__(self, path: Path) -> None:
        self.tokens = load_tokens(path)

    async def verify_token(self, token: str) -> AccessToken | None:
        agent = agent_of_token(self.tokens, token)
        return AccessToken(token=token, client_id=agent, scopes=["agent"]) if agent else None


def agent_of_token(tokens: dict[str, str], token: str | None) -> str | None:
    """The agent whose token this is (compared in constant time), or None."""
    for known, agent in tokens.items():
        if token and hmac.compare_digest(known.encode(), token.encode()):
            return agent
    return None


def load_tokens(path: Path) -> dict[str, str]:
    """Read and check a tokens file: {"<token>": "<agent>", ...}, tokens of 16+ characters."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"cannot read tokens file {path}: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise InvalidArgumentError(f'tokens file {path} must be a JSON object {{"<token>": "<agent name>"}}')
    for token, agent in raw.items():
        if not isinstance(agent, str) or len(token) < 16:
            raise InvalidArgumentError(f"tokens file {path}: each token needs 16+ characters and an agent name")
        check_agent(agent)
    return raw


def build_server(lab_dir: Path, stdio_agent: str | None = None, tokens_file: Path | None = None,
                 url: str = "http://127.0.0.1:8000") -> MCPServer:
    """The server for one lab. With a tokens file, HTTP callers must send `Authorization: Bearer`."""

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[AppState]:
        async with open_state(lab_dir, stdio_agent) as state:
            yield state

    auth = {}
    if tokens_file is not None:
        auth = dict(
            token_verifier=TokenFileVerifier(tokens_file),
            # Static bearer tokens, no OAuth: no resource_server_url, so no OAuth metadata is published
            # (clients that see it may try an OAuth flow instead of sending their configured header).
            auth=AuthSettings(issuer_url=url, resource_server_url=None, required_scopes=["agent"]),
        )
    mcp = MCPServer("autoresearch-mcp", instructions=INSTRUCTIONS, lifespan=lifespan, **auth)
    tools.register(mcp)
    return mcp
