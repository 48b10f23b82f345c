"""A base image made of this host's own installed software, for a GPU host that can reach neither
a registry nor the package index (the sandbox image is then built from it with Dockerfile.gpu).

Two parts go in, nothing else of the host (no /home, no /root, no /etc beyond the loader's and
two generated account files):
- the Debian/Ubuntu packages that Dockerfile.gpu would have installed with apt (python3,
  python3-dev, gcc, libc6-dev, a shell and coreutils) and everything they depend on, as dpkg
  lists them installed here;
- the Python distributions the trainer needs that this host's Python already has (torch with its
  CUDA libraries and Triton, numpy, ...), with everything they require, moved into the system
  Python's dist-packages so that the image's venv sees them (`--system-site-packages`).
The image is labelled with what it provides; sandbox.image pins the trainer's requirements to those
versions (the host's torch stack as it is) and installs the rest from a wheelhouse.
"""

from __future__ import annotations

import importlib.metadata as md
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import docker
import docker.errors
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from sandbox.errors import ImageBuildError

HOST_BASE = "autoresearch-base:host"
LABEL_PROVIDES = "autoresearch-mcp.base-provides"
"""Label of a host base: the Python distributions it provides, `name==version` space-separated."""
DEB_ROOTS = ("python3", "gcc", "libc6-dev", "dash", "coreutils", "libc-bin")
"""What Dockerfile.gpu's APT_PACKAGES would install (with Python's own packages: the owners of
this host's interpreter and of its Python.h; python3-venv aside: the image's venv takes pip from the
host's distributions instead), plus the shell and tools its RUN lines use, and ldconfig (which
Triton asks where libcuda is)."""
PY_ROOTS = ("torch", "pip")
SITE = "usr/lib/python3/dist-packages"
"""Where the host's distributions go: a folder Debian's Python always puts on a venv's path when
the venv is made with --system-site-packages."""
MERGED = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
EMPTY_DIRS = {"tmp": 0o1777, "var/tmp": 0o1777, "dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755,
              "root": 0o700, "etc": 0o755, "usr/local/bin": 0o755}
ProgressFn = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# The Debian packages: dpkg's own record of what is installed


def _dpkg_table() -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """Installed packages: name -> dependency groups (each a list of alternatives), and the virtual
    names they provide -> a providing package."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Provides}\t${Pre-Depends}, ${Depends}\n"],
            capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ImageBuildError(f"a host base needs a Debian or Ubuntu host (dpkg-query failed: {e}); "
                              "pass --base with an image that is on this host instead") from e
    deps: dict[str, list[list[str]]] = {}
    provides: dict[str, str] = {}
    for line in out.splitlines():
        status, name, prov, dep = (line.split("\t") + ["", "", ""])[:4]
        if not status.startswith("ii"):
            continue
        deps[name] = [[alt.split()[0].split(":")[0] for alt in group.split("|") if alt.strip()]
                      for group in dep.split(",") if group.strip()]
        for p in prov.split(","):
            if p.strip():
                provides.setdefault(p.split()[0].split(":")[0], name)
    return deps, provides


def deb_closure(roots: Iterable[str]) -> list[str]:
    """The installed packages `roots` need, by their Depends and Pre-Depends (the first installed
    alternative of each); a root that is not installed is an error."""
    deps, provides = _dpkg_table()
    missing = [r for r in roots if r not in deps and r not in provides]
    if missing:
        raise ImageBuildError(f"a host base needs these Debian packages installed on this host: "
                              f"{', '.join(missing)} (apt-get install them, or pass --base)")
    seen: set[str] = set()
    todo = [provides.get(r, r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for group in deps.get(name, []):
            chosen = next((a if a in deps else provides[a] for a in group if a in deps or a in provides), None)
            if chosen is not None:
                todo.append(chosen)
    return sorted(seen)


def deb_owners(paths: Iterable[str]) -> list[str]:
    """The installed packages that hold `paths` (dpkg -S); a path no package holds is an error."""
    owners = []
    for path in paths:
        out = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True)
        if out.returncode != 0:
            raise ImageBuildError(f"no Debian package holds {path}: a host base takes the host's Python from "
                                  "its packages, so the torch environment must be a venv of the system python3")
        owners.append(out.stdout.split(":")[0].strip())
    return owners


def deb_files(packages: list[str]) -> list[str]:
    """Every path dpkg lists for `packages` that exists here, under its real folder (a merged-/usr
    host lists /bin/sh, which is /usr/bin/sh)."""
    out = subprocess.run(["dpkg-query", "-L", *packages], capture_output=True, text=True).stdout
    paths: set[str] = set()
    for line in out.splitlines():
        if not line.startswith("/") or line == "/.":
            continue
        real = os.path.join(os.path.realpath(os.path.dirname(line)), os.path.basename(line))
        if os.path.lexists(real):
            paths.add(real)
    return sorted(paths)


# ---------------------------------------------------------------------------------------------
# The Python distributions: importlib.metadata's record of what this Python has


def py_closure(roots: Iterable[str], path: list[str] | None = None) -> list[md.Distribution]:
    """The installed distributions `roots` need, by Requires-Dist with markers evaluated, extras
    followed where a requirement asks for them (torch's CUDA wheels name their libraries through a
    package's extras); roots that are not installed are skipped. Where a name is installed twice,
    the one that import finds (first on sys.path, or on `path`) counts."""
    by_name: dict[str, md.Distribution] = {}
    for d in md.distributions(path=sys.path if path is None else path):
        if d.metadata["Name"]:
            by_name.setdefault(canonicalize_name(d.metadata["Name"]), d)
    extras_seen: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(canonicalize_name(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name not in by_name or (name in extras_seen and extras <= extras_seen[name]):
            continue
        new = {""} | set(extras) if name not in extras_seen else set(extras) - extras_seen[name]
        extras_seen.setdefault(name, set()).update(new)
        for spec in by_name[name].requires or []:
            try:
                req = Requirement(spec)
            except InvalidRequirement:
                continue
            if req.marker is None and "" in new or req.marker is not None and any(
                    req.marker.evaluate({"extra": e}) for e in new):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return sorted((by_name[n] for n in extras_seen), key=lambda d: canonicalize_name(d.metadata["Name"]))


def _dist_members(dist: md.Distribution) -> list[tuple[Path, str]]:
    """(host path, path in the image) for each file a distribution recorded, under SITE."""
    if dist.files is None:
        raise ImageBuildError(f"{dist.metadata['Name']} {dist.version} lists no files (no RECORD): "
                              "the host base cannot copy it; reinstall it with pip")
    members = []
    for f in dist.files:
        rel = f.as_posix()
        if rel.startswith("../") or rel.startswith("/"):  # scripts in the venv's bin/: not needed
            continue
        path = Path(dist.locate_file(f))
        if path.exists() or path.is_symlink():
            members.append((path, f"{SITE}/{rel}"))
    return members


# ---------------------------------------------------------------------------------------------
# The image


def _python_paths() -> list[str]:
    """This Python's interpreter and Python.h, which the host base takes from their packages."""
    interpreter = os.path.realpath(sys.executable)
    header = Path(sysconfig.get_paths()["include"], "Python.h")
    if sys.base_prefix != "/usr":
        raise ImageBuildError(
            f"this host's Python ({sys.executable} -> {interpreter}, base prefix {sys.base_prefix}) is not "
            "the system's python3: a host base needs the torch environment to be a venv of it")
    if not header.exists():
        raise ImageBuildError(f"{header} is missing (python3-dev is not installed): torch.compile's Triton "
                              "builds against it; install python3-dev, or pass --base")
    return [interpreter, str(header)]


def write_host_root(tarball: Path, extra_py: Iterable[str] = (), on_progress: ProgressFn = _quiet) -> dict[str, str]:
    """Write the host base's root file system to `tarball`; return the distributions it provides
    (canonical name -> version)."""
    packages = deb_closure([*DEB_ROOTS, *deb_owners(_python_paths())])
    files = deb_files(packages)
    dists = py_closure([*PY_ROOTS, *extra_py])
    provides = {canonicalize_name(d.metadata["Name"]): d.version for d in dists}
    if "torch" not in provides:
        raise ImageBuildError(f"this host's Python ({sys.executable}) has no torch: a host base takes the "
                              "host's own torch; run this with the Python that trains on the GPU")
    on_progress(f"host base: {len(packages)} Debian packages ({len(files)} paths), "
                f"{len(dists)} Python distributions (torch {provides['torch']})")
    with tarfile.open(tarball, "w", format=tarfile.PAX_FORMAT) as tar:
        added: set[str] = set()  # the engine refuses a layer that names a path twice

        def add(path: str | None, arcname: str, text: str | None = None, mode: int = 0o755) -> None:
            if arcname in added:
                return
            added.add(arcname)
            if path is not None:
                tar.add(path, arcname=arcname, recursive=False)
                return
            info = tarfile.TarInfo(arcname)
            if text is None:
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            else:
                data = text.encode()
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))

        for name, mode in EMPTY_DIRS.items():
            add(None, name, mode=mode)
        for name in MERGED:  # merged /usr: /bin -> usr/bin and the like
            if os.path.islink(f"/{name}"):
                add(f"/{name}", name)
        for path in files:
            add(path, path.lstrip("/"))
        add(None, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        add(None, "etc/group", "root:x:0:\n")
        for dist in dists:
            for path, arcname in _dist_members(dist):
                parts = arcname.split("/")
                for i in range(len(SITE.split("/")) + 1, len(parts)):  # RECORDs list files, not folders
                    add(None, "/".join(parts[:i]))
                add(str(path), arcname)
    return provides


def make_host_base(client: docker.DockerClient, tag: str = HOST_BASE, extra_py: Iterable[str] = (),
                   tmp_dir: Path | None = None, on_progress: ProgressFn = _quiet) -> str:
    """Import this host's base (see the module docstring) as `tag`; `extra_py` are more Python
    distributions to take from this host if it has them (the trainer's requirements)."""
    with tempfile.TemporaryDirectory(prefix="autoresearch-host-base-", dir=tmp_dir) as tmp:
        tarball = Path(tmp) / "root.tar"
        provides = write_host_root(tarball, extra_py, on_progress)
        on_progress(f"importing {tarball.stat().st_size / 1e9:.2f} GB as {tag}")
        repo, _, version = tag.partition(":")
        label = " ".join(f"{k}=={v}" for k, v in sorted(provides.items()))
        try:
            client.api.import_image_from_file(str(tarball), repository=repo, tag=version or "latest",
                                         changes=[f'LABEL {LABEL_PROVIDES}="{label}"'])
        except docker.errors.DockerException as e:
            raise ImageBuildError(f"docker import of the host base failed: {e}") from e
    on_progress(f"made base image {tag}")
    return tag


def base_provides(client: docker.DockerClient, base: str) -> dict[str, str]:
    """What a host base provides (canonical name -> version); {} for any other image."""
    try:
        labels = client.images.get(base).labels or {}
    except docker.errors.ImageNotFound:
        return {}
    return dict(item.split("==", 1) for item in labels.get(LABEL_PROVIDES, "").split() if "==" in item)
