"""Set-up commands: make a lab and prepare its data; build the sandbox image. Both show progress.

Prepare runs the trainer's own `python -m trainer.prepare` (trusted code, never the agent's). With
the docker backend it runs in the sandbox image, with network only when the data source needs it
(climbmix downloads); with the local backend, or `--on-host`, it runs with the host's Python.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from sandbox.config import DockerBackendConfig, LocalBackendConfig
from tqdm import tqdm

from server import log
from server.errors import InvalidArgumentError, LabError, LabStateError
from server.lab import REPO_ROOT, Lab, create_lab, program_dir

PREPARE_DEADLINE_S = 6 * 3600.0  # climbmix: tens of GB over the network on a slow link
logger = log.get("prepare")


class _Lines:
    """A step of unknown length: on a terminal a tqdm bar that counts output lines and shows the latest
    one; elsewhere (a log file, CI) each line as it comes, so a log holds lines rather than one long
    line of redrawn bars."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.bar = tqdm(desc=what, unit=" lines", file=sys.stderr, dynamic_ncols=True, leave=True) \
            if sys.stderr.isatty() else None

    def __call__(self, line: str) -> None:
        line = line.rstrip()
        if not line:
            return
        if self.bar is None:
            print(f"{self.what}: {line}", file=sys.stderr, flush=True)
        else:
            self.bar.update(1)
            self.bar.set_postfix_str(line[-80:], refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def open_or_create(root: Path, program: str, *, backend: str | None, image: str | None, runtime: str | None,
                   budget_s: float | None, data_dir: Path | None) -> Lab:
    """The lab at `root`, made from `program` first if it is not a lab yet."""
    existed = (root / "lab.json").exists()
    if not existed:
        cfg: DockerBackendConfig | LocalBackendConfig = (
            LocalBackendConfig() if backend == "local" else DockerBackendConfig(
                **({"image": image} if image else {}), **({"runtime": runtime} if runtime else {})))
        create_lab(root, program, budget_s=budget_s, backend=cfg, data_dir=data_dir.resolve() if data_dir else None)
        print(f"created lab {root} from program {program}", file=sys.stderr)
    lab = Lab(root)
    if lab.config.program != program_dir(program).name:
        lab.close()
        raise LabStateError(f"lab {root} was made for program {lab.config.program!r}, not {program!r}")
    differing = existed and _differences(lab, backend=backend, image=image, runtime=runtime, budget_s=budget_s,
                                         data_dir=data_dir)
    if differing:  # the same command run again (say, after a failed prepare) is fine
        lab.close()
        raise InvalidArgumentError(f"{root} is already a lab with other settings: {'; '.join(differing)}. These "
                                   "options only make a new lab (edit lab.json, or pick another --lab)")
    return lab


def _differences(lab: Lab, *, backend: str | None, image: str | None, runtime: str | None,
                 budget_s: float | None, data_dir: Path | None) -> list[str]:
    """The new-lab options given that disagree with the existing lab, each with what the lab has."""
    cfg = lab.config.backend
    has = {"--backend": "local" if isinstance(cfg, LocalBackendConfig) else "docker",
           "--image": getattr(cfg, "image", None), "--runtime": getattr(cfg, "runtime", None),
           "--budget-s": lab.program().budget_s, "--data-dir": lab.data_dir.resolve()}
    given = {"--backend": backend, "--image": image, "--runtime": runtime,
             "--budget-s": None if budget_s is None else float(budget_s),
             "--data-dir": None if data_dir is None else data_dir.resolve()}
    return [f"{flag} {want} (the lab has {has[flag]})" for flag, want in given.items()
            if want is not None and want != has[flag]]


def prepare(root: Path, program: str, *, backend: str | None = None, image: str | None = None,
            runtime: str | None = None, budget_s: float | None = None, data_dir: Path | None = None, on_host: bool = False,
            extra: list[str] | None = None) -> int:
    lab = open_or_create(Path(root), program, backend=backend, image=image, runtime=runtime, budget_s=budget_s,
                         data_dir=data_dir)
    try:
        lab.data_dir.mkdir(parents=True, exist_ok=True)
        extra = list(extra or [])
        if on_host or isinstance(lab.config.backend, LocalBackendConfig):
            code = _prepare_on_host(lab, extra)
        else:
            code = asyncio.run(_prepare_in_sandbox(lab, extra))
        if code == 0 and not (lab.data_dir / "meta.json").is_file():
            raise LabStateError(f"prepare exited 0 but wrote no meta.json in {lab.data_dir}")
        print(f"data {'ready' if code == 0 else 'NOT prepared'}: {lab.data_dir}", file=sys.stderr)
        return code
    finally:
        lab.close()


def _prepare_on_host(lab: Lab, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "trainer.prepare", "--program", str(lab.program_toml),
           "--data-dir", str(lab.data_dir), *extra]
    bar = _Lines("prepare (host)")
    try:
        with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            assert p.stdout is not None
            tail: list[str] = []
            for line in p.stdout:
                bar(line)
                tail = (tail + [line.rstrip()])[-20:]
    finally:
        bar.close()
    if p.returncode != 0:
        print("\n".join(tail), file=sys.stderr)
    return p.returncode


def _needs_network(lab: Lab, extra: list[str]) -> bool:
    source = extra[extra.index("--source") + 1] if "--source" in extra[:-1] else lab.program().data.kind
    return source == "climbmix"


async def _prepare_in_sandbox(lab: Lab, extra: list[str]) -> int:
    """trainer.prepare in the sandbox image, the data folder mounted at /out (read-write)."""
    from sandbox.config import make_backend  # noqa: PLC0415
    from sandbox.models import Limits, Mount, RunSpec  # noqa: PLC0415

    if "--path" in extra:
        raise InvalidArgumentError("--path (local documents) is read on the host: add --on-host")
    run_id = lab.sandbox_id(f"prepare-{int(time.time())}")
    logs = lab.root / "runs" / run_id
    logs.mkdir(parents=True)
    spec = RunSpec(
        run_id=run_id, image=lab.config.backend.image,  # type: ignore[union-attr]
        command=["python3", "-m", "trainer.prepare", "--program", "/work/program.toml", "--data-dir", "/out", *extra],
        mounts=[Mount(source=lab.program_toml, target="/work/program.toml")],
        env={"PYTHONUNBUFFERED": "1", "HOME": "/tmp"}, output_dir=lab.data_dir.resolve(),
        log_path=logs / "log.txt", deadline_s=PREPARE_DEADLINE_S, limits=Limits(memory_gb=16.0),
        # only the climbmix download may reach the network: same hardening, bridge network (trusted code)
        network="bridge" if _needs_network(lab, extra) else "none",
    )
    backend = make_backend(lab.config.backend)
    backend.check()
    bar = _Lines("prepare (sandbox)")
    follow = asyncio.create_task(_follow_log(spec.log_path, bar))
    try:
        outcome = await backend.run(spec)
    finally:
        follow.cancel()
        bar.close()
    if outcome.status != "ok":
        print(outcome.log_tail, file=sys.stderr)
    return 0 if outcome.status == "ok" else 1


async def _follow_log(path: Path, bar: _Lines) -> None:
    """Feed the bar with the log's new lines while the sandbox writes it."""
    offset = 0
    while True:
        await asyncio.sleep(0.5)
        if path.exists():
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read()
            cut = data.rfind(b"\n") + 1
            offset += cut
            for line in data[:cut].decode(errors="replace").splitlines():
                bar(line)


def build_image(flavor: str, tag: str | None, online: bool, host_base: bool = False,
                wheelhouse: Path | None = None) -> int:
    from sandbox.image import build_image as build  # noqa: PLC0415

    bar = _Lines(f"build-image ({flavor})")
    try:
        built = build(flavor, tag, offline=False if online else None, host_base=host_base,  # type: ignore[arg-type]
                      wheelhouse=wheelhouse, only_if_stale=True, on_progress=bar)
    except Exception as e:
        bar.close()
        raise LabError(f"image build failed: {e}") from e
    bar.close()
    print(f"image ready: {built}", file=sys.stderr)
    return 0
