"""The sandbox image's recipe, and an image built where no registry and no index can be reached:
the base made of this host's own Debian packages and a venv of its system Python holding torch
(sandbox.host_base), the image from Dockerfile.gpu on it with the one requirement that venv lacks
taken from a wheelhouse, and a hardened run in it. The GPU host does the same with its CUDA torch (GPU_RUNS.md, issue 24)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import docker
import packaging
import pytest
import structlog

from sandbox.config import DockerBackendConfig
from sandbox.docker_backend import DockerBackend
from sandbox.host_base import base_provides, py_closure
from sandbox.image import (
    DEFAULT_WHEELHOUSE, PYTHON_VERSIONS, REPO_ROOT, TORCH_SPECS, _context, _pinned_to, trainer_requirements,
)
from sandbox.models import Limits

from sandbox_testlib import result_of

pytestmark = pytest.mark.anyio
TAG = "autoresearch-sandbox:host-base-test"
BASE_TAG = "autoresearch-base:host-test"  # never the user's own host base (sandbox.host_base.HOST_BASE)
SYSTEM_PYTHON = Path("/usr/bin/python3")
LACKED = "safetensors"  # the requirement the host venv lacks: it must come from the wheelhouse
TORCH = TORCH_SPECS["cpu"]


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, text=True)


@pytest.fixture(scope="module")
def host_image(tmp_path_factory, docker_client: docker.DockerClient, sandbox_image: str) -> dict:
    """A venv of the system Python with CPU torch and the trainer's requirements but LACKED, a
    wheelhouse holding LACKED, and `python -m sandbox.image build --host-base` run with that venv's
    Python. No network: the wheels are the CPU image's wheelhouse (filled when `sandbox_image` was
    built); the sandbox's own host-side libraries (pure Python) come from this test's environment
    on PYTHONPATH, and the base must not take them (the trainer does not need them)."""
    if not SYSTEM_PYTHON.exists():
        pytest.fail("this test needs Debian's python3 with python3-venv and python3-dev (.ci/run installs them)")
    house = DEFAULT_WHEELHOUSE / f"cpu-py{PYTHON_VERSIONS['cpu']}"
    tmp = tmp_path_factory.mktemp("host-base")
    venv = tmp / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pin = next(r for r in trainer_requirements("cpu") if r.startswith(f"{LACKED}=="))
    wanted = [r for r in trainer_requirements("cpu") if r != pin]
    _pip(py, "install", "--no-index", "--find-links", str(house), TORCH, *wanted)
    wheels = tmp / "wheels"
    wheels.mkdir()
    for whl in house.glob(f"{LACKED}-*.whl"):
        shutil.copy2(whl, wheels / whl.name)
    libs = tmp / "host-libs"
    libs.mkdir()
    for module in (docker, packaging, structlog):
        (libs / module.__name__).symlink_to(Path(module.__file__).parent)
    build = subprocess.run([str(py), "-m", "sandbox.image", "build", "--flavor", "cpu", "--host-base",
                            "--wheelhouse", str(wheels), "--tag", TAG, "--host-base-tag", BASE_TAG],
                           cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(libs)})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    versions = json.loads(subprocess.run(
        [str(py), "-c", "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name'].lower(): "
                        "d.version for d in m.distributions()}))"], capture_output=True, text=True, check=True).stdout)
    yield {"venv": versions, "log": build.stdout, "pin": pin}
    docker_client.images.remove(TAG, force=True)
    docker_client.images.remove(BASE_TAG, force=True)


def _in_image(client: docker.DockerClient, script: str, tmp_options: str = "") -> dict:
    out = client.containers.run(TAG, ["python3", "-c", script], remove=True, network_mode="none", read_only=True,
                                tmpfs={"/tmp": tmp_options})
    return json.loads(out.decode().strip().splitlines()[-1])


def test_the_host_base_holds_the_hosts_torch_and_only_the_packages_it_needs(host_image, docker_client):
    provides = base_provides(docker_client, BASE_TAG)
    assert provides["torch"] == host_image["venv"]["torch"] == "2.13.0+cpu"
    assert LACKED not in provides and "pip" in provides and "numpy" in provides
    assert "docker" not in provides  # importable by the builder, not needed by the trainer
    r = _in_image(docker_client, """
import json, os, torch, numpy, safetensors, sys
print(json.dumps({"torch": torch.__version__, "torch_at": torch.__file__, "numpy_at": numpy.__file__,
    "safetensors_at": safetensors.__file__, "prefix": sys.prefix, "home": os.listdir("/home") if os.path.exists("/home") else None,
    "shadow": os.path.exists("/etc/shadow"), "etc": sorted(os.listdir("/etc")), "uid": os.getuid()}))""")
    assert r["torch"] == "2.13.0+cpu" and r["torch_at"].startswith("/usr/lib/python3/dist-packages/")
    assert r["numpy_at"].startswith("/usr/lib/python3/dist-packages/")
    assert r["safetensors_at"].startswith("/opt/venv/")  # from the wheelhouse, into the image's venv
    assert r["prefix"] == "/opt/venv" and r["uid"] == 10001
    assert r["home"] is None and not r["shadow"]  # nothing of the host but what was asked for
    assert "shadow" not in r["etc"] and "ssh" not in r["etc"]


def test_the_trainer_requirements_are_pinned_to_what_the_base_provides(host_image, docker_client, tmp_path):
    provides = base_provides(docker_client, BASE_TAG)
    pinned = _pinned_to(provides, trainer_requirements("cpu"))
    _context(REPO_ROOT, tmp_path, pinned, None, f"torch=={provides['torch']}")
    assert (tmp_path / "requirements.txt").read_text().split() == pinned
    assert (tmp_path / "Dockerfile.gpu").is_file() and (tmp_path / "trainer" / "run.py").is_file()
    assert f"numpy=={host_image['venv']['numpy']}" in pinned and host_image["pin"] in pinned
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [r.split("==")[0] for r in pinned] == [r.split("==")[0] for r in extras["trainer"]]
    gpu = trainer_requirements("gpu")
    assert gpu == extras["trainer"] + extras["gpu"] and any(r.startswith("nvidia-cudnn-frontend==") for r in gpu)
    assert "host base: " in host_image["log"] and "Debian packages" in host_image["log"]


def test_a_c_extension_builds_against_the_images_python_as_triton_does(host_image, docker_client):
    script = r"""
import json, os, subprocess, sys, sysconfig
src = "/tmp/m.c"
open(src, "w").write('#include <Python.h>\nstatic struct PyModuleDef d = {PyModuleDef_HEAD_INIT, "m"};\n'
                     'PyMODINIT_FUNC PyInit_m(void) { return PyModule_Create(&d); }\n')
inc = sysconfig.get_paths()["include"]
r = subprocess.run(["gcc", "-shared", "-fPIC", "-I" + inc, src, "-o", "/tmp/m.so"], capture_output=True, text=True)
sys.path.insert(0, "/tmp")
import m
print(json.dumps({"rc": r.returncode, "err": r.stderr, "module": m.__name__}))"""
    r = _in_image(docker_client, script, tmp_options="exec")
    assert r == {"rc": 0, "err": "", "module": "m"}


async def test_a_hardened_run_trains_in_the_host_base_image(host_image, make_spec):
    backend = DockerBackend(DockerBackendConfig(image=TAG))
    spec = make_spec("""
        import json, socket, sys, torch
        torch.manual_seed(0)
        w = torch.zeros(8, requires_grad=True)
        x = torch.randn(256, 8)
        y = x @ torch.linspace(-1, 1, 8)
        opt = torch.optim.SGD([w], lr=0.1)
        losses = []
        for _ in range(50):
            loss = ((x @ w - y) ** 2).mean()
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        try:
            open("/usr/lib/python3/dist-packages/torch/x", "w"); root = "writable"
        except OSError:
            root = "read-only"
        try:
            socket.create_connection(("127.0.0.1", 9), timeout=2); net = "reached"
        except OSError as e:
            net = type(e).__name__
        json.dump({"first": losses[0], "last": losses[-1], "root": root, "net": net}, open(f"{sys.argv[1]}/result.json", "w"))
    """, limits=Limits(memory_gb=2, pids=256, shm_gb=0.25, tmpfs_gb=0.25, log_cap_bytes=1 << 20))
    outcome = await backend.run(spec.model_copy(update={"image": TAG}))
    r = result_of(outcome)
    assert outcome.status == "ok" and r is not None, outcome.log_tail
    assert r["last"] < r["first"] * 0.1 and r["root"] == "read-only" and r["net"] != "reached"
    print(f"host-base image: a hardened run in {outcome.wall_s:.1f} s; loss {r['first']:.3f} -> {r['last']:.3f}")


def _dist(site: Path, name: str, version: str, *requires: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (info / "RECORD").write_text(f"{name}-{version}.dist-info/METADATA,,\n")


def test_the_host_bases_python_closure_follows_extras_and_markers_and_takes_the_first_install(tmp_path):
    """torch's CUDA wheels name their libraries through another package's extras: those must come too;
    an extra nobody asked for, a marker that does not hold, and a shadowed second install must not."""
    first, second = tmp_path / "first", tmp_path / "second"
    _dist(first, "torchlike", "1.0", "toolkit[blas]==2.0", "helper; python_version >= '3'",
          "winonly; sys_platform == 'win32'", "docs; extra == 'docs'")
    _dist(first, "toolkit", "2.0", "blaslib==3.0; extra == 'blas'", "fftlib; extra == 'fft'")
    _dist(first, "blaslib", "3.0")
    _dist(first, "helper", "1.1")
    for name in ("fftlib", "winonly", "docs"):
        _dist(first, name, "1.0")
    _dist(second, "helper", "0.9")

    found = {d.metadata["Name"]: d.version for d in py_closure(["torchlike", "absent"], [str(first), str(second)])}
    assert found == {"torchlike": "1.0", "toolkit": "2.0", "blaslib": "3.0", "helper": "1.1"}
    found = {d.metadata["Name"]: d.version for d in py_closure(["helper"], [str(second), str(first)])}
    assert found == {"helper": "0.9"}
