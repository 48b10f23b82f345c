"""The GPU mode for hosts without the NVIDIA Container Toolkit (issue 24), on this CPU host's real
engine: the driver's /proc listing, its device nodes and its libraries are stand-ins made here (the
nodes are character devices with /dev/null's numbers), so what is checked is the plumbing: the run
gets exactly its GPU's node and the control nodes, the libraries read-only on LD_LIBRARY_PATH, and
nothing of the other GPU; a host with neither the toolkit nor the driver is told so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sandbox_testlib import result_of

from sandbox.config import DockerBackendConfig
from sandbox.docker_backend import DockerBackend
from sandbox.errors import SpecError
from sandbox.nvidia import choose_mode, devices_for, gpus

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

UUIDS = ("GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000")

PROBE = """
import json, os, sys
lib = "/usr/local/nvidia/lib64"
try:
    open(lib + "/libcuda.so.1", "a")
    writable = True
except OSError:
    writable = False
json.dump({"dev": sorted(n for n in os.listdir("/dev") if n.startswith("nvidia")),
           "libs": sorted(os.listdir(lib)), "ld": os.environ.get("LD_LIBRARY_PATH"),
           "cuda": open(lib + "/libcuda.so.1").read(), "lib_writable": writable},
          open(os.path.join(sys.argv[1], "result.json"), "w"))
"""

DEV_PROBE = """
import json, os, sys
json.dump({"dev": sorted(n for n in os.listdir("/dev") if n.startswith("nvidia"))},
          open(os.path.join(sys.argv[1], "result.json"), "w"))
"""


@pytest.fixture
def fake_driver(tmp_path: Path) -> dict:
    """Two GPUs (minors 0 and 1) as the driver would list them, their nodes, and its libraries."""
    proc, dev, lib = tmp_path / "proc", tmp_path / "dev", tmp_path / "lib"
    for i, uuid in enumerate(UUIDS):
        (proc / f"0000:0{i + 1}:00.0").mkdir(parents=True)
        (proc / f"0000:0{i + 1}:00.0" / "information").write_text(
            f"Model: \t\t NVIDIA H200\nIRQ:   \t\t 42\nGPU UUID: \t {uuid}\nDevice Minor: \t {i}\n")
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
        os.mknod(dev / name, 0o666 | 0o020000, os.makedev(1, 3))  # a char device: /dev/null's numbers
    lib.mkdir()
    (lib / "libcuda.so.550.1").write_text("the driver's libcuda\n")
    (lib / "libcuda.so.1").symlink_to("libcuda.so.550.1")
    (lib / "libnvidia-ml.so.1").write_text("nvml\n")
    (lib / "libunrelated.so.1").write_text("not the driver's\n")
    return dict(nvidia_proc_dir=proc, nvidia_dev_dir=dev, driver_lib_dir=lib)


def test_the_driver_s_gpus_and_the_mode_chosen(fake_driver, tmp_path):
    listed = gpus(fake_driver["nvidia_proc_dir"])
    assert [(g.index, g.uuid, g.minor) for g in listed] == [(0, UUIDS[0], 0), (1, UUIDS[1], 1)]
    mode, why = choose_mode({"runc": {}}, fake_driver["nvidia_dev_dir"], fake_driver["nvidia_proc_dir"])
    assert mode == "devices" and "no NVIDIA runtime" in why
    assert choose_mode({"nvidia": {}}, fake_driver["nvidia_dev_dir"], fake_driver["nvidia_proc_dir"])[0] == "toolkit"
    access = devices_for(UUIDS[1].lower(), fake_driver["nvidia_dev_dir"], fake_driver["driver_lib_dir"],
                         fake_driver["nvidia_proc_dir"])
    assert [d.split(":")[1] for d in access.devices] == ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm",
                                                           "/dev/nvidia-uvm-tools"]
    assert [p.name for p in access.libs] == ["libcuda.so.1", "libcuda.so.550.1", "libnvidia-ml.so.1"]
    nothing, why = choose_mode({"runc": {}}, tmp_path / "no-dev", tmp_path / "no-proc")
    assert nothing is None and "no NVIDIA runtime" in why and "no NVIDIA device nodes" in why


async def test_a_run_gets_its_gpu_s_nodes_and_the_driver_read_only(fake_driver, sandbox_image, make_spec,
                                                                  no_leftovers):
    backend = DockerBackend(DockerBackendConfig(image=sandbox_image, gpu_mode="devices", **fake_driver))
    spec = make_spec(PROBE).model_copy(update={"gpu": "1"})
    outcome = await backend.run(spec)
    assert outcome.status == "ok", outcome.log_tail
    seen = result_of(outcome)
    assert seen["dev"] == ["nvidia-uvm", "nvidia-uvm-tools", "nvidia1", "nvidiactl"]  # not GPU 0's node
    assert seen["libs"] == ["libcuda.so.1", "libcuda.so.550.1", "libnvidia-ml.so.1"]
    assert seen["cuda"] == "the driver's libcuda\n" and seen["lib_writable"] is False
    assert seen["ld"].split(":")[0] == "/usr/local/nvidia/lib64"
    cpu = await backend.run(make_spec(DEV_PROBE))
    assert cpu.status == "ok", cpu.log_tail
    assert result_of(cpu)["dev"] == []  # a run without a GPU lease sees no GPU node
    assert no_leftovers(spec.run_id) == []


async def test_a_host_without_toolkit_or_driver_says_so(sandbox_image, make_spec, tmp_path):
    backend = DockerBackend(DockerBackendConfig(image=sandbox_image, nvidia_dev_dir=tmp_path / "no-dev",
                                                nvidia_proc_dir=tmp_path / "no-proc"))
    with pytest.raises(SpecError, match="leased GPU 0, but the engine has no NVIDIA runtime .* no NVIDIA device nodes"):
        await backend.run(make_spec(PROBE).model_copy(update={"gpu": "0"}))
    fake = DockerBackend(DockerBackendConfig(image=sandbox_image, gpu_mode="devices", nvidia_dev_dir=tmp_path / "d",
                                             nvidia_proc_dir=tmp_path / "no-proc"))
    with pytest.raises(SpecError):
        await fake.run(make_spec(PROBE).model_copy(update={"gpu": "0"}))


def test_a_lease_s_gpu_uuid_comes_from_the_driver(fake_driver):
    from sandbox.gpus import uuid_of  # noqa: PLC0415

    proc = fake_driver["nvidia_proc_dir"]
    assert uuid_of("1", proc) == UUIDS[1] and uuid_of(UUIDS[0], proc) == UUIDS[0] and uuid_of("7", proc) is None
