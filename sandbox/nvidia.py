"""How a container gets its leased GPU (issue 24): through the NVIDIA Container Toolkit where the
engine has it (a DeviceRequest), else by hand, as a CDI spec would: the leased GPU's device node
and the driver's control nodes passed in, and the driver's user-space libraries mounted read-only.

The second way needs no toolkit, only the driver: on a host without the toolkit (none is in the
package registries of some hosts) the GPU container still runs, still with no network, a
read-only root and no capabilities, and still sees only its own GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

GpuMode = Literal["toolkit", "devices"]

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
LIB_TARGET = "/usr/local/nvidia/lib64"  # where the libraries appear inside; on LD_LIBRARY_PATH there
# the driver's user-space side a CUDA program loads (what the toolkit's CDI spec lists for compute)
DRIVER_LIBS = re.compile(r"^(libcuda|libcudadebugger|libnvidia-(ml|ptxjitcompiler|nvvm|gpucomp|cfg|allocator|"
                         r"opencl|fatbinaryloader))\.so(\.\d+)*$")
LIB_DIRS = (Path("/usr/local/nvidia/lib64"), Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"),
            Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/lib"))


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index: the PCI bus order
    uuid: str
    minor: int  # /dev/nvidia<minor>
    bus: str


def gpus(proc: Path = PROC_GPUS) -> list[Gpu]:
    """The driver's GPUs, from /proc/driver/nvidia (no nvidia-smi needed), in PCI bus order."""
    found = []
    for bus in sorted(p.name for p in proc.iterdir()) if proc.is_dir() else []:
        try:
            info = (proc / bus / "information").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        try:
            found.append(Gpu(len(found), fields["GPU UUID"], int(fields["Device Minor"]), bus))
        except (KeyError, ValueError):
            continue
    return found


def find_gpu(gpu_id: str, proc: Path = PROC_GPUS) -> Gpu:
    """The GPU a lease names (an index or a UUID); LookupError with what there is when absent."""
    known = gpus(proc)
    for g in known:
        if gpu_id == str(g.index) or gpu_id.lower() == g.uuid.lower():
            return g
    have = ", ".join(f"{g.index} ({g.uuid})" for g in known) or "none"
    raise LookupError(f"GPU {gpu_id!r} is not one of this host's GPUs (the driver lists: {have})")


def driver_libs(lib_dir: Path | None = None) -> list[Path]:
    """The driver's user-space libraries: those in `lib_dir`, else in the first usual folder that
    holds libcuda.so.1."""
    for folder in [lib_dir] if lib_dir is not None else LIB_DIRS:
        if folder is not None and (folder / "libcuda.so.1").exists():
            return sorted(p for p in folder.iterdir() if DRIVER_LIBS.match(p.name))
    return []


@dataclass(frozen=True)
class GpuAccess:
    """What a container needs to reach one GPU without the toolkit."""

    devices: list[str]  # "host:container:rwm"
    libs: list[Path]


def devices_for(gpu_id: str, dev_dir: Path = Path("/dev"), lib_dir: Path | None = None,
                proc: Path = PROC_GPUS) -> GpuAccess:
    """The device nodes and libraries for the leased GPU; ValueError saying what is missing."""
    g = find_gpu(gpu_id, proc)
    node = dev_dir / f"nvidia{g.minor}"
    missing = [str(p) for p in (node, dev_dir / "nvidiactl") if not p.exists()]
    if missing:
        raise ValueError(f"the GPU's device nodes are missing: {', '.join(missing)} (is the NVIDIA driver loaded?)")
    libs = driver_libs(lib_dir)
    if not libs:
        where = str(lib_dir) if lib_dir else ", ".join(map(str, LIB_DIRS))
        raise ValueError(f"the driver's libraries (libcuda.so.1) are not in {where}; set the docker backend's "
                         "driver_lib_dir to the folder that holds them")
    nodes = [node, *(dev_dir / n for n in CONTROL_NODES if (dev_dir / n).exists())]
    # the container sees each node under its usual name, whatever folder the host keeps it in
    return GpuAccess(devices=[f"{p}:/dev/{p.name}:rwm" for p in nodes], libs=libs)


def choose_mode(runtimes: dict, dev_dir: Path = Path("/dev"), proc: Path = PROC_GPUS,
                wanted: str = "auto") -> tuple[GpuMode | None, str]:
    """Which way this host can give a container a GPU, and why; (None, why) when neither works."""
    toolkit = "nvidia" in runtimes
    listed = gpus(proc)
    devices = (dev_dir / "nvidiactl").exists() and bool(listed)
    if wanted == "toolkit" or (wanted == "auto" and toolkit):
        if toolkit:
            return "toolkit", "the engine has the NVIDIA runtime (the Container Toolkit): a DeviceRequest per run"
        return None, "gpu_mode is 'toolkit' but the engine has no NVIDIA runtime (install the NVIDIA Container Toolkit)"
    if devices:
        return "devices", (f"no NVIDIA runtime in the engine; the driver is loaded ({dev_dir / 'nvidiactl'}, "
                           f"{len(listed)} GPU(s) in {proc}): each run gets its GPU's device node and the "
                           "driver's libraries, read-only")
    why = "the engine has no NVIDIA runtime (the Container Toolkit)" if not toolkit else ""
    return None, (f"{why + ' and ' if why else ''}this host has no NVIDIA device nodes ({dev_dir / 'nvidiactl'}) "
                  f"or driver GPUs ({proc}): install the NVIDIA driver, and the Container Toolkit or nothing more")

