"""Backend configuration: one model per backend, told apart by `type`, and make_backend()."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandbox.base import Backend

DEFAULT_STATE_DIR = Path("/tmp/autoresearch-mcp")


class DockerBackendConfig(BaseModel):
    """Run each experiment in a hardened container (the default, and the only isolated backend)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["docker"] = "docker"
    image: str = Field(default="autoresearch-sandbox:cpu",
                       description="Sandbox image tag (see `python -m sandbox.image build`).")
    runtime: str | None = Field(default=None,
                                description="OCI runtime, e.g. 'runsc' for gVisor; None: the engine default.")
    user: str | None = Field(default=None, pattern=r"^\d+:\d+$",
                             description="uid:gid the code runs as; None: the caller's uid, or 10001 "
                                         "(the image's sandbox user) when the caller is root.")
    base_url: str | None = Field(default=None,
                                 description="Docker engine URL; None: DOCKER_HOST or the local socket.")
    gpu_mode: Literal["auto", "toolkit", "devices"] = Field(
        default="auto", description="How a run gets its leased GPU: toolkit (the NVIDIA Container Toolkit's "
        "DeviceRequest), devices (its device node and the driver's libraries passed by hand, for hosts without "
        "the toolkit), auto: toolkit where the engine has it, else devices (sandbox.nvidia).")
    driver_lib_dir: Path | None = Field(default=None, description="The folder of the driver's user-space "
                                        "libraries (libcuda.so.1) for the devices mode; None: the usual folders.")
    nvidia_dev_dir: Path = Field(default=Path("/dev"), description="Where the host's NVIDIA device nodes are.")
    nvidia_proc_dir: Path = Field(default=Path("/proc/driver/nvidia/gpus"),
                                  description="Where the driver lists its GPUs (UUID, device minor).")


class LocalBackendConfig(BaseModel):
    """Run each experiment as a plain subprocess: NO isolation. Development and docker-less hosts only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["local"] = "local"
    python: Path | None = Field(default=None,
                                description="Interpreter that replaces argv[0] 'python3'; None: this one.")
    pythonpath: list[Path] = Field(default_factory=list,
                                   description="Prepended to PYTHONPATH; empty: the repository root, then "
                                   "this process's own PYTHONPATH (the run's interpreter is this one by default).")
    state_dir: Path = Field(default=DEFAULT_STATE_DIR / "local-runs",
                            description="Where running runs are recorded so the reaper can find orphans.")


BackendConfig = Annotated[DockerBackendConfig | LocalBackendConfig, Field(discriminator="type")]


def make_backend(config: DockerBackendConfig | LocalBackendConfig) -> Backend:
    """The backend for `config`. Connecting to the engine happens here (EngineUnavailableError)."""
    if isinstance(config, DockerBackendConfig):
        from sandbox.docker_backend import DockerBackend

        return DockerBackend(config)
    if isinstance(config, LocalBackendConfig):
        from sandbox.local_backend import LocalBackend

        return LocalBackend(config)
    raise TypeError(f"unknown backend config {type(config).__name__}")
