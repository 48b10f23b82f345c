"""Errors raised by the sandbox package.

Experiment outcomes (crash, timeout, OOM) are statuses in a RunOutcome, never exceptions; these
are for bad input and for infrastructure that is missing or broken. Every class subclasses the
matching builtin as well, so callers can catch either.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Root of every error the sandbox package raises on purpose."""


class SpecError(SandboxError, ValueError):
    """A RunSpec or backend config cannot be run as given (nothing was started)."""


class EngineUnavailableError(SandboxError, ConnectionError):
    """The Docker engine cannot be reached; start dockerd or pick the local backend."""


class ImageNotFoundError(SandboxError, LookupError):
    """The sandbox image is not on this host."""

    def __init__(self, tag: str) -> None:
        super().__init__(
            f"sandbox image {tag!r} is not on this host; build it with "
            f"`python -m sandbox.image build --flavor cpu|gpu --tag {tag}`"
        )
        self.tag = tag


class ImageBuildError(SandboxError, RuntimeError):
    """Building the sandbox image (or its local base) failed; `log_tail` has the build output."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message + (f"\n--- build output (tail) ---\n{log_tail}" if log_tail else ""))
        self.log_tail = log_tail


class LeaseError(SandboxError, RuntimeError):
    """The GPU/CPU slot pool is misconfigured or its state folder is unusable."""


class ContainerError(SandboxError, RuntimeError):
    """A Docker API call failed while managing a run's container."""
