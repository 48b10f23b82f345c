"""The MCP server, the lab (git, ledger, results) and the `autoresearch-mcp` CLI."""
