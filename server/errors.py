"""The server's exceptions: one root, subclasses that also inherit the matching builtin.

Anything an agent can fix (a bad patch, an unknown run id) is a `LabError` whose message says what
to do next; the MCP tools turn it into a `ToolError`. Experiment outcomes are never exceptions.
"""

from __future__ import annotations


class LabError(Exception):
    """Root of every error the server raises on purpose."""


class InvalidPatchError(LabError, ValueError):
    """The diff was rejected; nothing was changed."""


class InvalidArgumentError(LabError, ValueError):
    """A tool or CLI argument is out of range or malformed."""


class NotFoundError(LabError, LookupError):
    """A run id, program or agent that does not exist."""


class BusyError(LabError, RuntimeError):
    """The agent already has an experiment in flight; the operation would race it."""


class LabStateError(LabError, RuntimeError):
    """The lab folder is missing, half made, or disagrees with itself."""


class LedgerUnavailableError(LabStateError):
    """The ledger cannot be written: another process holds its lock too long, or the disk is full."""


class HistoryError(LabError, RuntimeError):
    """A git operation failed in a way the caller did not cause."""
