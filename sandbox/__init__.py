"""Run one experiment in isolation: the docker backend (hardened container), the local backend
(no isolation), exclusive GPU/CPU slot leases, the reaper, and the sandbox image build."""

from sandbox.base import Backend
from sandbox.config import BackendConfig, DockerBackendConfig, LocalBackendConfig, make_backend
from sandbox.errors import SandboxError
from sandbox.gpus import Lease, PoolConfig, SlotPool
from sandbox.models import Limits, Mount, Reaped, RunOutcome, RunSpec, RunStatus

__all__ = [
    "Backend", "BackendConfig", "DockerBackendConfig", "LocalBackendConfig", "make_backend", "SandboxError",
    "Lease", "PoolConfig", "SlotPool", "Limits", "Mount", "Reaped", "RunOutcome", "RunSpec", "RunStatus",
]
