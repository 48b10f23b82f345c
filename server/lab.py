"""A lab: one folder holding one program's git repo, agent worktrees, runs, ledger and results.

Layout (only the server writes here; a container sees only its own run folder):
    lab.json               the LabConfig
    repo/                  git repo, baseline on `main`
    worktrees/<agent>/     the agent's worktree on branch autoresearch/<agent>
    runs/<run-id>/         train.py snapshot, out/ (result.json, progress.jsonl), log.txt
    results/<agent>.tsv    the seed's results table
    cache/<agent>/         compile cache shared by the agent's runs
    data/                  prepared data (unless lab.json names another folder)
    ledger.sqlite          the source of truth
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sandbox.runio import disk_usage, read_tail_bytes
from trainer.config import ProgramConfig, TrainerError, load_program, parse_program, set_top_level

from server import log
from server.errors import BusyError, InvalidArgumentError, InvalidPatchError, LabStateError, NotFoundError
from server.history import TRAIN, History, init_repo
from server.ledger import Ledger
from server.text import TAIL_CHARS, printable
from server.noise import Noise
from server.models import (
    AGENT_RE, CALIBRATION_AGENT, NoiseInfo, LIVE_STATUSES, RUN_STATUSES, BestEntry, BestResults, LabConfig, LogText, PatchResult, ProgramText,
    ResetResult, RunList, RunRecord, RunSummary, TrainFile,
)

PROGRAM_FILES = ("program.md", "program.toml", "train.py")
REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRAMS_DIR = REPO_ROOT / "programs"

logger = log.get("lab")
T = TypeVar("T")


def program_dir(name: str) -> Path:
    """The folder of a bundled program, or a path to one."""
    candidate = Path(name)
    if candidate.is_dir() and (candidate / "program.toml").is_file():
        return candidate.resolve()
    path = PROGRAMS_DIR / name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not (path / "program.toml").is_file():
        known = sorted(p.name for p in PROGRAMS_DIR.iterdir() if (p / "program.toml").is_file()) if PROGRAMS_DIR.is_dir() else []
        raise NotFoundError(f"no program {name!r}; bundled programs: {', '.join(known) or 'none'}")
    return path


def create_lab(root: Path, program: str, *, budget_s: float | None = None, **config: object) -> LabConfig:
    """Make a lab folder from programs/<program>/: the repo with the baseline on `main`, and lab.json."""
    root = Path(root)
    if (root / "lab.json").exists():
        raise LabStateError(f"{root} is already a lab; open it instead")
    src = program_dir(program)
    missing = [name for name in PROGRAM_FILES if not (src / name).is_file()]
    if missing:
        raise LabStateError(f"program folder {src} lacks {', '.join(missing)}")
    files = {name: (src / name).read_bytes() for name in PROGRAM_FILES}
    if budget_s is not None:
        files["program.toml"] = set_top_level(files["program.toml"].decode(), budget_s=float(budget_s)).encode()
    try:  # fail now, before anything is written, not at the first run
        parse_program(tomllib.loads(files["program.toml"].decode("utf-8")), src / "program.toml")
    except (TrainerError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LabStateError(f"program {program!r} has a bad program.toml: {e}") from e
    cfg = LabConfig(program=src.name, **config)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    init_repo(root / "repo", files)
    for sub in ("worktrees", "runs", "results", "cache", "locks"):
        (root / sub).mkdir(exist_ok=True)
    (root / "lab.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    logger.info("lab_created", lab=str(root), program=cfg.program)
    return cfg


def check_agent(agent: str) -> str:
    if not isinstance(agent, str) or not AGENT_RE.fullmatch(agent):
        raise InvalidArgumentError(
            f"invalid agent name {agent!r}: use 1-32 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
    if agent == CALIBRATION_AGENT:
        raise InvalidArgumentError(f"the agent name {agent!r} is the lab's own (its calibration runs); choose another")
    return agent


def code_hash(text: str) -> str:
    """The identity of a train.py: two runs of one hash at one seed are a rerun."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


class Lab:
    """An open lab: paths, config, ledger and git history. Experiments live in server.experiment."""

    def __init__(self, root: Path, config: LabConfig | None = None) -> None:
        self.root = Path(root).resolve()
        if not (self.root / "lab.json").is_file():
            raise LabStateError(
                f"{self.root} is not a lab (no lab.json); create one with `autoresearch-mcp prepare PROGRAM --lab {root}`"
            )
        try:
            self.config = config or LabConfig.model_validate_json((self.root / "lab.json").read_text())
        except ValidationError as e:
            raise LabStateError(f"{self.root / 'lab.json'} is not a valid lab config: {e}") from e
        self.history = History(self.root / "repo", self.root / "worktrees")
        self.ledger = Ledger(self.root / "ledger.sqlite")
        self._git_lock = asyncio.Lock()

    # -- paths ---------------------------------------------------------------------------------

    @property
    def program_toml(self) -> Path:
        return self.root / "repo" / "program.toml"

    @property
    def data_dir(self) -> Path:
        return Path(self.config.data_dir) if self.config.data_dir else self.root / "data"

    def sandbox_id(self, run_id: str) -> str:
        """The run's id for the sandbox (container names are host-wide): the ledger id plus a short
        hash of this lab's path, so that two labs' `alice-0001` never collide."""
        return f"{run_id}-{hashlib.sha1(str(self.root).encode()).hexdigest()[:8]}"

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def cache_dir(self, agent: str) -> Path:
        return self.root / "cache" / agent

    def bound_cache(self, agent: str) -> int:
        """Empty the agent's compile cache when it holds more than agent_cache_gb (a run may fill it with
        anything; a compile cache only saves time). The bytes freed."""
        folder = self.cache_dir(agent)
        size = disk_usage([folder])
        if size <= self.config.agent_cache_gb * 2**30:
            return 0
        for entry in list(folder.iterdir()):
            remove(entry)
        logger.warning("agent_cache_emptied", agent=agent, gb=round(size / 2**30, 2),
                       limit_gb=self.config.agent_cache_gb)
        return size

    def trim_run(self, run_id: str) -> int:
        """Once a run is recorded: keep what the books, the tools and the dashboard read (train.py,
        program.toml, the logs, out/result.json, out/progress.jsonl; each cut to its last
        KEPT_FILE_BYTES), delete the rest (the export, its copy, whatever train.py left in /out). The
        bytes freed."""
        run_dir = self.run_dir(run_id)
        before = disk_usage([run_dir])
        for entry in list(run_dir.iterdir()) if run_dir.is_dir() else []:
            if entry.name == "out" and entry.is_dir() and not entry.is_symlink():
                for inner in list(entry.iterdir()):
                    if inner.name in KEPT_OUTPUTS and keep_file(inner):
                        continue
                    remove(inner)
            elif not keep_file(entry):
                remove(entry)
        return before - disk_usage([run_dir])

    def results_path(self, agent: str) -> Path:
        return self.root / "results" / f"{agent}.tsv"

    def program(self) -> ProgramConfig:
        return load_program(self.program_toml)

    def close(self) -> None:
        self.ledger.close()

    # -- locks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def agent_lock(self, agent: str) -> Iterator[None]:
        """Hold the agent's lock, across processes, or raise BusyError at once.

        flock, not asyncio: stdio agents each have their own server process, and a second process
        for the same agent must not race the first one's experiment.
        """
        path = self.root / "locks" / f"agent-{agent}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise BusyError(
                    f"agent {agent!r} has an experiment in flight (list_experiments shows it as queued/running); "
                    "wait for it to finish, then try again"
                ) from e
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    async def git(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking History call in a worker thread, one at a time per lab and process.

        A file lock also guards worktree creation against other server processes.
        """
        async with self._git_lock:
            return await asyncio.to_thread(self._locked_git, fn, *args)

    def _locked_git(self, fn: Callable[..., T], *args: Any) -> T:
        fd = os.open(self.root / "locks" / "git.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fn(*args)
        finally:
            os.close(fd)

    # -- setup of an agent -----------------------------------------------------------------------

    async def ensure_agent(self, agent: str) -> Path:
        check_agent(agent)
        path = await self.git(self.history.ensure_agent, agent)
        self.cache_dir(agent).mkdir(parents=True, exist_ok=True)  # the sandbox hands it to the run's user
        return path

    # -- what the tools do, apart from experiments (server.experiment) --------------------------

    def noise(self) -> Noise:
        """The keep rule's inputs: the latest calibration's σ, else the program's min_improvement."""
        calibration = self.ledger.calibration()
        return Noise(sigma=calibration.sigma if calibration else None, floor=self.program().min_improvement,
                     keep_z=self.config.keep_z, confirm_reruns=self.config.confirm_reruns)

    def noise_info(self) -> NoiseInfo:
        noise, calibration = self.noise(), self.ledger.calibration()
        return NoiseInfo(sigma=noise.sigma, margin=round(noise.margin(), 6), rule=noise.rule(),
                         calibration_runs=calibration.runs if calibration else [])

    def read_program(self) -> ProgramText:
        text = (self.root / "repo" / "program.md").read_text(encoding="utf-8")
        return ProgramText(program=self.config.program, text=text, budget_s=self.program().budget_s,
                           noise=self.noise_info())

    async def read_train(self, agent: str) -> TrainFile:
        await self.ensure_agent(agent)
        text = await self.git(self.history.read_train, agent)
        head = await self.git(self.history.head, agent)
        modified = await self.git(self.history.is_modified, agent)
        return TrainFile(agent=agent, text=text, line_count=len(text.splitlines()), base_commit=head, modified=modified)

    async def apply_patch(self, agent: str, diff: str) -> PatchResult:
        """Check a diff from every side, then write train.py; a rejected diff changes nothing."""
        await self.ensure_agent(agent)
        with self.agent_lock(agent):  # checked and written against the same train.py
            new_text, added, removed = await self._checked_patch(agent, diff)
            await self.git(self.history.write_train, agent, new_text)
            stat = await self.git(self.history.diffstat, agent)
        logger.info("patch_applied", agent=agent, added=added, removed=removed)
        return PatchResult(line_count=len(new_text.splitlines()), lines_added=added, lines_removed=removed,
                           diffstat=stat or "(train.py now equals base_commit)")

    async def _checked_patch(self, agent: str, diff: str) -> tuple[str, int, int]:
        if not isinstance(diff, str) or not diff.strip():
            raise InvalidPatchError("the diff is empty; send a unified diff of train.py (--- a/train.py +++ b/train.py)")
        try:
            raw = diff.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidPatchError(f"the diff is not valid UTF-8 text ({e.reason} at character {e.start})") from e
        if len(raw) > self.config.max_patch_bytes:
            raise InvalidPatchError(
                f"the diff is {len(raw)} bytes, over the {self.config.max_patch_bytes}-byte cap; send smaller patches"
            )
        if "\x00" in diff or "GIT binary patch" in diff:
            raise InvalidPatchError("binary content is not accepted; train.py is text")
        if not diff.endswith("\n"):  # every line of a unified diff ends with one; git calls the diff corrupt
            diff += "\n"
        stats = await self.git(self.history.check_patch, agent, diff)
        size = len(stats.new_text.encode("utf-8"))
        if size > self.config.max_train_bytes:
            raise InvalidPatchError(f"the patched train.py would be {size} bytes, over the {self.config.max_train_bytes}-byte cap")
        try:
            compile(stats.new_text, TRAIN, "exec", dont_inherit=True)  # compiled, never executed
        except SyntaxError as e:
            raise InvalidPatchError(
                f"the patched train.py does not compile: {e.msg} at line {e.lineno}: {(e.text or '').strip()!r}"
            ) from e
        except ValueError as e:  # e.g. source with NUL bytes
            raise InvalidPatchError(f"the patched train.py does not compile: {e}") from e
        return stats.new_text, stats.lines_added, stats.lines_removed

    async def reset_train(self, agent: str, target: str) -> ResetResult:
        if target not in ("best", "baseline"):
            raise InvalidArgumentError(f"target must be 'best' or 'baseline', not {target!r}")
        await self.ensure_agent(agent)
        commit = await self.git(self.history.head if target == "best" else (lambda _a: self.history.main_commit()), agent)
        with self.agent_lock(agent):
            await self.git(self.history.restore_train, agent, commit)
        text = await self.git(self.history.read_train, agent)
        return ResetResult(target=target, commit=commit, line_count=len(text.splitlines()))  # type: ignore[arg-type]

    def best(self, agent: str) -> BestResults:
        def entry(rec: RunRecord | None) -> BestEntry | None:
            if rec is None or rec.val_bpb is None or rec.commit is None:
                return None
            base = self.ledger.baseline(rec.agent)
            gain = base.val_bpb - rec.val_bpb if base is not None and base.val_bpb is not None else None
            return BestEntry(agent=rec.agent, run_id=rec.run_id, val_bpb=rec.val_bpb, commit=rec.commit,
                             description=rec.description, improvement_over_baseline=gain, verified=rec.verified)

        base = self.ledger.baseline(agent)
        return BestResults(agent_best=entry(self.ledger.best(agent)), lab_best=entry(self.ledger.best()),
                           agent_baseline_val_bpb=base.val_bpb if base else None, noise=self.noise_info())

    def own_run(self, agent: str, run_id: str) -> RunRecord:
        """A run of this agent; another agent's runs are not visible."""
        rec = self.ledger.find(run_id) if isinstance(run_id, str) else None
        if rec is None or rec.agent != agent:
            raise NotFoundError(f"no run {run_id!r} of agent {agent!r}; list_experiments shows your run ids")
        return rec

    def log_tail(self, agent: str, run_id: str, lines: int) -> LogText:
        if not 1 <= lines <= 2000:
            raise InvalidArgumentError(f"lines must be between 1 and 2000, not {lines}")
        rec = self.own_run(agent, run_id)
        all_lines = run_log_lines(self.run_dir(run_id))
        text = "\n".join(all_lines[-lines:])
        clean = printable(text, TAIL_CHARS)  # the raw log stays on disk
        return LogText(run_id=run_id, status=rec.status, text=clean,
                       truncated=len(all_lines) > lines or len(clean) < len(text))

    def list_runs(self, agent: str, status: str | None, kept_only: bool, limit: int) -> RunList:
        if not 1 <= limit <= 500:
            raise InvalidArgumentError(f"limit must be between 1 and 500, not {limit}")
        if status is not None and status not in RUN_STATUSES + LIVE_STATUSES:
            raise InvalidArgumentError(f"unknown status {status!r}; one of {', '.join(RUN_STATUSES + LIVE_STATUSES)}")
        runs = [r for r in self.ledger.runs(agent=agent, status=status) if r.kept or not kept_only]
        return RunList(total=len(runs), runs=[
            RunSummary(run_id=r.run_id, agent=r.agent, status=r.status, decision=r.decision, val_bpb=r.val_bpb,
                       verified=r.verified, delta=r.delta, kept=r.kept, commit=r.commit, description=r.description,
                       seed=r.seed, z=r.z, role=r.role)
            for r in runs[:limit]])


RESULTS_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\tseed\tz\n"
"""The seed's five columns first, then the run's seed and the keep rule's z (blank when unknown)."""


def write_results_row(path: Path, commit: str, val_bpb: float | None, memory_mb: float | None, status: str,
                      description: str, verified: bool = True, seed: int | None = None, z: float | None = None) -> None:
    """Append one row to an agent's results.tsv in the seed's format (crashes as 0.000000 / 0.0), then
    seed and z; a score from train.py's own process is marked in the description. A file begun with
    the seed's five columns only keeps getting five."""
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    bpb = f"{val_bpb:.6f}" if val_bpb is not None else "0.000000"
    mem = f"{memory_mb / 1024:.1f}" if memory_mb is not None else "0.0"
    desc = " ".join(description.split())
    if val_bpb is not None and not verified:
        desc = f"[unverified: in-process score] {desc}"
    row = f"{commit[:7]}\t{bpb}\t{mem}\t{status}\t{desc}"
    with path.open("r+") as f:
        if f.readline().rstrip("\n").count("\t") > 4:
            row += f"\t{'' if seed is None else seed}\t{'' if z is None else f'{z:.2f}'}"
        f.seek(0, os.SEEK_END)
        f.write(row + "\n")


def read_results(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t", len(header) - 1))) for ln in lines[1:] if ln]


__all__ = ["Lab", "create_lab", "check_agent", "program_dir", "write_results_row", "read_results", "TRAIN"]


KEPT_OUTPUTS = ("result.json", "progress.jsonl")
KEPT_FILE_BYTES = 4 << 20


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def keep_file(path: Path) -> bool:
    """Whether a regular file is kept (cut to its last KEPT_FILE_BYTES); anything else is not."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if st.st_size > KEPT_FILE_BYTES:
        path.write_bytes(read_tail_bytes(path, KEPT_FILE_BYTES))
    return True


def run_log_lines(run_dir: Path) -> list[str]:
    """A run's log as lines: the train phase's, then the score phase's under a banner."""
    lines: list[str] = []
    for name, banner in (("log.txt", None), ("score-log.txt", "--- score phase (trusted scorer) ---")):
        path = run_dir / name
        if path.is_file():
            lines += ([banner] if banner else []) + path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines
