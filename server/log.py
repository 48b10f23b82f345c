"""Logging, configured once: structlog JSON lines to stderr (a console renderer on a terminal), or
to a file (the CLI's commands other than `serve`: the lab's logs/cli.log, so the terminal shows only
the command's own output).

Never stdout: on the stdio transport stdout carries the MCP protocol.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog


def configure(level: str = "INFO", json: bool | None = None, file: Path | None = None) -> None:
    """Route structlog and the standard library's logging (the MCP SDK, uvicorn) to stderr, or as
    JSON lines to `file` (opened at the first line, its folder made then)."""
    if json is None:
        json = file is not None or not sys.stderr.isatty()
    stream = sys.stderr if file is None else _LazyFile(file)
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info,
            renderer], foreign_pre_chain=shared)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _LazyFile:
    """A text stream appending to `path` (LAB/logs/cli.log), opened at the first write once LAB is a
    lab: a command that logs nothing leaves no file, and lines logged before the lab exists (or for a
    folder that is not one) go to stderr."""

    def __init__(self, path: Path) -> None:
        self.path, self._f = path, None

    def write(self, text: str) -> int:
        if self._f is None:
            if not (self.path.parent.parent / "lab.json").exists():  # not a lab (yet): make no folder
                return sys.stderr.write(text)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the process
        n = self._f.write(text)
        self._f.flush()
        return n

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()


def get(name: str = "autoresearch") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
