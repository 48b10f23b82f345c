"""Fixtures for the sandbox tests: a real Docker engine, the CPU sandbox image (built from the
current inputs if missing or stale), both backends, and a spec factory for small test scripts.

Docker tests fail, never skip, when the engine or the image is missing. Containers are labelled
with this session's id and removed at the end, whatever the tests left.
"""

from __future__ import annotations

import itertools
import os
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from sandbox.config import DockerBackendConfig, LocalBackendConfig
from sandbox.docker_backend import DockerBackend
from sandbox.errors import SandboxError
from sandbox.image import DEFAULT_TAGS, ensure_image
from sandbox.local_backend import LocalBackend
from sandbox.models import Limits, Mount, RunSpec

TEST_LABEL = "autoresearch-sandbox-tests"
SESSION = uuid.uuid4().hex[:10]
_RUN_NUMBERS = itertools.count()
BASE_ENV = {"PYTHONUNBUFFERED": "1", "HOME": "/tmp", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as e:
        pytest.fail(f"the Docker engine is not reachable ({e}); start dockerd (see .ci/run)")
    yield client
    _remove_labelled(client)


def _remove_labelled(client: docker.DockerClient) -> None:
    for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={SESSION}"},
                                    ignore_removed=True):
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="session")
def sandbox_image(docker_client: docker.DockerClient) -> str:
    """The CPU sandbox image tag; built via sandbox.image when missing or built from older inputs."""
    tag = os.environ.get("AUTORESEARCH_SANDBOX_IMAGE", DEFAULT_TAGS["cpu"])
    try:
        ensure_image("cpu", tag, client=docker_client, on_progress=lambda line: None)
    except SandboxError as e:
        pytest.fail(f"cannot build the sandbox image {tag}: {e}")
    return tag


@pytest.fixture(scope="session")
def docker_backend(sandbox_image: str) -> DockerBackend:
    backend = DockerBackend(DockerBackendConfig(image=sandbox_image))
    backend.check()
    return backend


@pytest.fixture()
def local_backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(LocalBackendConfig(state_dir=tmp_path / "local-state"))


@pytest.fixture(params=["docker", "local"])
def backend(request: pytest.FixtureRequest):
    """Each deadline/outcome test runs against both backends."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture()
def no_leftovers(docker_client: docker.DockerClient) -> Callable[[str], list[str]]:
    """Names of containers of this session still present for a run id (should be [])."""

    def check(run_id: str) -> list[str]:
        found = docker_client.containers.list(
            all=True, filters={"label": [f"{TEST_LABEL}={SESSION}", f"autoresearch-mcp.run-id={run_id}"]},
            ignore_removed=True)
        return [c.name for c in found]

    return check


SpecFactory = Callable[..., RunSpec]


@pytest.fixture()
def make_spec(tmp_path: Path, sandbox_image: str) -> SpecFactory:
    """A RunSpec that runs `script` (Python source) as /work/script.py with /out as its argument."""

    def make(script: str, *, deadline_s: float = 30.0, limits: Limits | None = None,
             env: dict[str, str] | None = None, mounts: list[Mount] | None = None,
             args: list[str] | None = None) -> RunSpec:
        n = next(_RUN_NUMBERS)  # session-wide: run ids (and container names) never repeat
        run_id = f"t{SESSION}-{os.getpid()}-{n}"
        work = tmp_path / f"run{n}"
        work.mkdir()
        (work / "script.py").write_text(textwrap.dedent(script))
        return RunSpec(
            run_id=run_id,
            image=sandbox_image,
            command=["python3", "/work/script.py", "/out", *(args or [])],
            mounts=[Mount(source=work / "script.py", target="/work/script.py"), *(mounts or [])],
            env={**BASE_ENV, **(env or {})},
            output_dir=work / "out",
            log_path=work / "run.log",
            deadline_s=deadline_s,
            limits=limits or Limits(memory_gb=2, pids=256, shm_gb=0.25, tmpfs_gb=0.25, log_cap_bytes=1 << 20),
            labels={TEST_LABEL: SESSION},
        )

    return make


