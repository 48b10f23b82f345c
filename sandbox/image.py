"""Build the sandbox image (one Dockerfile.gpu, two flavours) and, where no registry is reachable,
the local Debian base it can start from.

The cpu flavour builds fully offline: the base comes from the local engine (or debootstrap) and
every wheel from a host-side wheelhouse filled by `pip download`, because pip inside `docker build`
may not reach the index. The gpu flavour uses the public NVIDIA base and the package index.
A GPU host with neither registry nor index builds from a base made of its own packages and torch
(sandbox.host_base, --host-base) and a wheelhouse carried in (--wheelhouse).
Usage: python -m sandbox.image build|ensure --flavor cpu|gpu [--tag T] [--base B | --host-base]
       [--online] [--wheelhouse DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import docker
import docker.errors

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sandbox.errors import EngineUnavailableError, ImageBuildError
from sandbox.host_base import HOST_BASE, SITE as HOST_SITE, base_provides, make_host_base

Flavor = Literal["cpu", "gpu"]
ProgressFn = Callable[[str], None]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TAGS: dict[str, str] = {"cpu": "autoresearch-sandbox:cpu", "gpu": "autoresearch-sandbox:gpu"}
PUBLIC_BASES: dict[str, str] = {
    "cpu": "python:3.11-slim-bookworm",
    "gpu": "nvidia/cuda:12.8.1-base-ubuntu24.04",
}
LOCAL_BASE = "autoresearch-base:bookworm"  # made by debootstrap when no registry answers
# the Python of each default base (bookworm: 3.11, ubuntu 24.04: 3.12): offline wheels must match it
PYTHON_VERSIONS: dict[str, str] = {"cpu": "3.11", "gpu": "3.12"}
TORCH_SPECS: dict[str, str] = {"cpu": "torch==2.13.0+cpu", "gpu": "torch==2.13.0"}
"""The CPU image takes PyTorch's CPU build (~190 MB, no CUDA); PyPI's torch is the CUDA build."""
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
"""Where the CPU build lives; asked only when the wheel is in no local wheelhouse or index of pip's."""
DEFAULT_WHEELHOUSE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autoresearch-mcp" / "wheels"
LABEL_INPUTS = "autoresearch-mcp.image-inputs"
LABEL_FLAVOR = "autoresearch-mcp.image-flavor"


def _say(on_progress: ProgressFn | None, line: str) -> None:
    if on_progress is not None and line.strip():
        on_progress(line.rstrip("\n"))


def _client(client: docker.DockerClient | None) -> docker.DockerClient:
    if client is not None:
        return client
    try:
        c = docker.from_env()
        c.ping()
        return c
    except docker.errors.DockerException as e:
        raise EngineUnavailableError(f"cannot reach the Docker engine ({e}); start dockerd") from e


def trainer_requirements(flavor: Flavor, repo_root: Path = REPO_ROOT) -> list[str]:
    """The image's pip requirements: pyproject.toml's `trainer` extra, plus its `gpu` extra for the
    gpu flavour (torch is pinned separately)."""
    extras = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [*extras["trainer"], *(extras["gpu"] if flavor == "gpu" else [])]


def image_exists(tag: str, client: docker.DockerClient | None = None) -> bool:
    try:
        _client(client).images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


# ---------------------------------------------------------------------------------------------
# Local base image (debootstrap), for hosts without a registry


def _debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    return "http://deb.debian.org/debian"


def _stream_cmd(cmd: list[str], on_progress: ProgressFn | None, what: str, **kw) -> None:
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line)
        _say(on_progress, line)
    if proc.wait() != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}", "".join(tail))


def make_local_base(
    tag: str = LOCAL_BASE,
    suite: str = "bookworm",
    mirror: str | None = None,
    client: docker.DockerClient | None = None,
    on_progress: ProgressFn | None = None,
) -> str:
    """Create a minimal Debian image with python3, pip and venv by debootstrap (root; ~1 min)."""
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("no base image can be pulled and debootstrap is missing: "
                              "`apt-get install debootstrap`, or pass a base image that is on this host")
    c = _client(client)
    with tempfile.TemporaryDirectory(prefix="autoresearch-base-") as tmp:
        root = Path(tmp) / "root"
        _say(on_progress, f"debootstrap {suite} into {root}")
        _stream_cmd(["debootstrap", "--variant=minbase",
                     "--include=python3,python3-pip,python3-venv,ca-certificates",
                     suite, str(root), mirror or _debian_mirror()], on_progress, "debootstrap")
        tarball = Path(tmp) / "root.tar"
        _stream_cmd(["tar", "-C", str(root), "-cf", str(tarball), "."], on_progress, "tar")
        repo, _, version = tag.partition(":")
        try:
            c.api.import_image_from_file(str(tarball), repository=repo, tag=version or "latest")
        except docker.errors.DockerException as e:
            raise ImageBuildError(f"docker import of the debootstrap tree failed: {e}") from e
    _say(on_progress, f"made base image {tag}")
    return tag


def resolve_base(flavor: Flavor, client: docker.DockerClient, on_progress: ProgressFn | None) -> str:
    """Pick the base: the public one if here or pullable, else the local debootstrap one (made if need be)."""
    public = PUBLIC_BASES[flavor]
    if image_exists(public, client):
        return public
    if flavor == "cpu" and image_exists(LOCAL_BASE, client):
        return LOCAL_BASE
    try:
        _say(on_progress, f"pulling {public}")
        client.images.pull(public)
        return public
    except docker.errors.DockerException as e:
        if flavor == "gpu":
            raise ImageBuildError(f"cannot pull the gpu base {public} ({e}); pass --base with a local image") from e
        _say(on_progress, f"cannot pull {public}; building {LOCAL_BASE} with debootstrap")
    return make_local_base(client=client, on_progress=on_progress)


# ---------------------------------------------------------------------------------------------
# Wheelhouse (host-side pip download)


def download_wheelhouse(
    dest: Path,
    requirements: list[str],
    python_version: str = "3.11",
    on_progress: ProgressFn | None = None,
) -> Path:
    """Fill `dest` with wheels for `requirements` (linux, `python_version`); skipped when up to date."""
    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / ".requirements"
    wanted = "\n".join([python_version, platform.machine(), *sorted(requirements)])
    if stamp.exists() and stamp.read_text() == wanted:
        _say(on_progress, f"wheelhouse {dest} is up to date")
        return dest
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-d", str(dest)]
    if f"{sys.version_info.major}.{sys.version_info.minor}" != python_version:
        arch = platform.machine()
        cmd += ["--only-binary=:all:", "--python-version", python_version]
        for plat in ("manylinux_2_28", "manylinux_2_17", "manylinux2014"):
            cmd += ["--platform", f"{plat}_{arch}"]
    try:
        _stream_cmd(cmd + requirements, on_progress, "pip download")
    except ImageBuildError:
        if not any("+cpu" in r for r in requirements):
            raise
        # not in pip's own indexes or wheelhouses (an ordinary machine): PyTorch's CPU wheel index
        _say(on_progress, f"torch's CPU build is not in pip's indexes here; asking {CPU_TORCH_INDEX}")
        _stream_cmd(cmd + ["--extra-index-url", CPU_TORCH_INDEX] + requirements, on_progress, "pip download")
    stamp.write_text(wanted)
    return dest


# ---------------------------------------------------------------------------------------------
# Build


def _context(repo_root: Path, dest: Path, requirements: list[str], wheelhouse: Path | None, torch_spec: str) -> None:
    """Assemble the build context: Dockerfile.gpu, requirements.txt, trainer/, wheels/."""
    shutil.copy2(repo_root / "Dockerfile.gpu", dest / "Dockerfile.gpu")
    (dest / "requirements.txt").write_text("\n".join(requirements) + "\n")
    shutil.copytree(repo_root / "trainer", dest / "trainer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    wheels = dest / "wheels"
    wheels.mkdir()
    (wheels / ".keep").write_text(torch_spec)  # COPY of an empty folder is fine, but keep it explicit
    for whl in sorted(wheelhouse.glob("*")) if wheelhouse else []:
        if whl.suffix in (".whl", ".gz", ".zip"):
            try:
                os.link(whl, wheels / whl.name)  # no copy of a 200 MB torch wheel when on one disk
            except OSError:
                shutil.copy2(whl, wheels / whl.name)


def _digest(ctx: Path, buildargs: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in sorted(buildargs):
        h.update(f"{k}={buildargs[k]}\n".encode())
    for path in sorted(p for p in ctx.rglob("*") if p.is_file()):
        rel = path.relative_to(ctx).as_posix()
        h.update(rel.encode() + b"\0")
        # wheels are identified by name (version + tags); hashing 200 MB each time is wasted work
        h.update(path.name.encode() if rel.startswith("wheels/") else path.read_bytes())
    return h.hexdigest()[:32]


def build_image(
    flavor: Flavor = "cpu",
    tag: str | None = None,
    base: str | None = None,
    host_base: bool = False,
    host_base_tag: str = HOST_BASE,
    offline: bool | None = None,
    wheelhouse: Path | None = None,
    torch_spec: str | None = None,
    pip_flags: str = "",
    only_if_stale: bool = False,
    python_version: str | None = None,
    repo_root: Path = REPO_ROOT,
    client: docker.DockerClient | None = None,
    on_progress: ProgressFn | None = None,
) -> str:
    """Build the sandbox image and return its tag.

    offline (default: True for cpu and on a host base) installs every wheel from a host wheelhouse:
    `wheelhouse` as given (a folder of wheels for the base's Python, filled elsewhere), or a cache
    folder filled by `pip download` for `python_version`, the base's Python. On a host base
    (sandbox.host_base) torch and every requirement the base provides are pinned to the base's
    versions, and only the rest comes from wheels. only_if_stale skips the build when an image with
    this tag was built from the same inputs (Dockerfile, requirements, trainer/, build args).
    host_base makes that base first, from this host's packages and this Python's torch, tagged host_base_tag.
    """
    if flavor not in DEFAULT_TAGS:
        raise ImageBuildError(f"flavor must be 'cpu' or 'gpu', got {flavor!r}")
    c = _client(client)
    tag = tag or DEFAULT_TAGS[flavor]
    wanted = trainer_requirements(flavor, repo_root)
    if host_base:
        base = make_host_base(c, host_base_tag, extra_py=[_name(r) for r in wanted],
                              on_progress=on_progress or (lambda line: None))
    base = base or resolve_base(flavor, c, on_progress)
    provides = base_provides(c, base)
    offline = (flavor == "cpu" or bool(provides)) if offline is None else offline
    requirements = _pinned_to(provides, wanted)
    torch_spec = torch_spec or (f"torch=={provides['torch']}" if "torch" in provides else TORCH_SPECS[flavor])
    buildargs = {"BASE_IMAGE": base, "TORCH_SPEC": torch_spec, "PIP_FLAGS": pip_flags}
    if flavor == "cpu" or provides:
        buildargs["APT_PACKAGES"] = ""  # the cpu bases and a host base already carry python3 + venv
    if provides:  # the base's own distributions, torch among them, seen from the image's venv
        buildargs["VENV_FLAGS"] = "--system-site-packages --without-pip"
        buildargs["COMPILE_DIRS"] = f"/{HOST_SITE}"
    if offline:
        buildargs["PIP_FLAGS"] = (pip_flags + " --no-index").strip()
        needed = [r for r in [torch_spec, *requirements] if _name(r) not in provides]
        if wheelhouse is None and needed:
            py = python_version or PYTHON_VERSIONS[flavor]
            wheelhouse = download_wheelhouse(DEFAULT_WHEELHOUSE / f"{flavor}-py{py}", needed,
                                             python_version=py, on_progress=on_progress)
    with tempfile.TemporaryDirectory(prefix="autoresearch-image-", dir=_tmp_near(wheelhouse)) as tmp:
        ctx = Path(tmp)
        _context(repo_root, ctx, requirements, wheelhouse if offline else None, torch_spec)
        digest = _digest(ctx, buildargs)
        if only_if_stale and _built_from(c, tag, digest):
            _say(on_progress, f"image {tag} is up to date ({digest[:12]})")
            return tag
        _say(on_progress, f"building {tag} ({flavor}) from {base}")
        old = _image_id(c, tag)
        _docker_build(c, ctx, tag, buildargs, {LABEL_INPUTS: digest, LABEL_FLAVOR: flavor}, on_progress)
    if old and old != _image_id(c, tag):
        try:  # the previous build is now an untagged leftover; keep it only while containers use it
            c.images.remove(old, noprune=False)
        except docker.errors.DockerException:
            pass
    return tag


def _name(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def _pinned_to(provides: dict[str, str], requirements: list[str]) -> list[str]:
    """The requirements, each one a base provides pinned to the base's version instead."""
    names = [_name(r) for r in requirements]
    return [f"{n}=={provides[n]}" if n in provides else r for n, r in zip(names, requirements)]


def _image_id(c: docker.DockerClient, tag: str) -> str | None:
    try:
        return c.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def ensure_image(flavor: Flavor = "cpu", tag: str | None = None, **kw) -> str:
    """Build the image unless one built from the current inputs is already here (fast when so)."""
    return build_image(flavor, tag, only_if_stale=True, **kw)


def _tmp_near(wheelhouse: Path | None) -> str | None:
    # hard links need the context on the wheelhouse's filesystem
    return str(wheelhouse.parent) if wheelhouse is not None else None


def _built_from(c: docker.DockerClient, tag: str, digest: str) -> bool:
    try:
        labels = c.images.get(tag).labels or {}
    except docker.errors.ImageNotFound:
        return False
    return labels.get(LABEL_INPUTS) == digest


def _docker_build(c: docker.DockerClient, ctx: Path, tag: str, buildargs: dict[str, str],
                  labels: dict[str, str], on_progress: ProgressFn | None) -> None:
    tail: deque[str] = deque(maxlen=60)
    try:
        for chunk in c.api.build(path=str(ctx), dockerfile="Dockerfile.gpu", tag=tag, buildargs=buildargs,
                                 labels=labels, rm=True, forcerm=True, decode=True):
            line = chunk.get("stream") or chunk.get("status") or ""
            if line:
                tail.append(line)
                _say(on_progress, line)
            if "error" in chunk:
                raise ImageBuildError(f"docker build of {tag} failed: {chunk['error'].strip()}", "".join(tail))
    except docker.errors.DockerException as e:
        raise ImageBuildError(f"docker build of {tag} failed: {e}", "".join(tail)) from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.image", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["build", "ensure"], help="ensure: build only when inputs changed")
    p.add_argument("--flavor", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--tag", default=None)
    p.add_argument("--base", default=None, help="base image (default: public, else local debootstrap)")
    p.add_argument("--host-base", action="store_true",
                   help="make the base from this host's own packages and torch (sandbox.host_base): a GPU "
                        "host with neither registry nor index; run it with the Python that has torch")
    p.add_argument("--host-base-tag", default=HOST_BASE, help=f"the host base's tag (default {HOST_BASE})")
    p.add_argument("--online", action="store_true", help="let pip in the build use the index (cpu default: off)")
    p.add_argument("--wheelhouse", type=Path, default=None,
                   help="a folder of wheels for the base's Python, used as it is (default: a cache filled by pip)")
    args = p.parse_args(argv)
    tag = build_image(args.flavor, args.tag, base=args.base, host_base=args.host_base, host_base_tag=args.host_base_tag,
                      offline=False if args.online else None, wheelhouse=args.wheelhouse,
                      only_if_stale=args.action == "ensure", on_progress=lambda line: print(line, flush=True))
    print(f"image ready: {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
