"""Fixtures for the server tests: labs made from the real tiny-stdlib program, its prepared data
(prepared once per session with the trainer's own prepare), and Docker clean-up by label.

Docker tests fail, never skip, when the engine or the image is missing.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import docker.errors
import pytest

from server_helpers import IMAGE, LOADED_HOST_TIME_SLACK_S, PROGRAM, REPO, TEST_BUDGET_S

from server.lab import Lab, create_lab, program_dir


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """tiny-stdlib's prepared data folder, made once per session on the host (prepare is trusted code)."""
    out = tmp_path_factory.mktemp("tiny-data")
    subprocess.run(
        [sys.executable, "-m", "trainer.prepare", "--program", str(program_dir(PROGRAM) / "program.toml"),
         "--data-dir", str(out), "--max-bytes", "3000000"],
        check=True, cwd=REPO, stdout=subprocess.DEVNULL,
    )
    return out


@pytest.fixture
def slots_dir(tmp_path) -> Path:
    """A private slot pool per test, so tests never queue behind another test's runs."""
    path = tmp_path / "slots"
    path.mkdir()
    return path


@pytest.fixture
def make_lab(tmp_path, slots_dir):
    """Create a lab from tiny-stdlib (budget shrunk to seconds); options become LabConfig fields."""

    def make(name: str = "lab", backend: str = "local", budget_s: float = TEST_BUDGET_S, data_dir: Path | None = None,
             **config) -> Path:
        root = tmp_path / name
        # test files run side by side on 2 cores: an honest run's start-up jitters by many seconds there,
        # past the product's 5-s slack for time outside the clock (the tests of that bound set it tight)
        config.setdefault("min_time_slack_s", LOADED_HOST_TIME_SLACK_S)
        backend_cfg = {"type": "docker", "image": IMAGE} if backend == "docker" else {
            "type": "local", "state_dir": str(tmp_path / "local-state")}
        create_lab(root, PROGRAM, budget_s=budget_s, backend=backend_cfg, data_dir=data_dir,
                   pool={"state_dir": str(slots_dir), "gpus": [], "cpu_slots": 1}, **config)
        return root

    return make


@pytest.fixture
def lab(make_lab):
    """An open lab with the local backend."""
    lab = Lab(make_lab())
    yield lab
    lab.close()


@pytest.fixture(scope="session")
def docker_client():
    """The Docker engine with the sandbox image present; fails (never skips) otherwise."""
    import docker  # noqa: PLC0415

    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"Docker engine not reachable ({e}): start dockerd; these tests need a real engine")
    try:
        client.images.get(IMAGE)
    except Exception:  # noqa: BLE001
        pytest.fail(f"sandbox image {IMAGE} missing: run `autoresearch-mcp build-image --flavor cpu`")
    return client


@pytest.fixture
def lab_containers(docker_client, tmp_path):
    """A function listing the containers of labs under this test's tmp_path; removes leftovers after."""

    def containers() -> list:
        # other labs' containers on the same engine may vanish between the listing and its inspection
        found = docker_client.containers.list(all=True, filters={"label": "autoresearch.lab"}, ignore_removed=True)
        return [c for c in found if c.labels.get("autoresearch.lab", "").startswith(str(tmp_path))]

    yield containers
    for c in containers():
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)
