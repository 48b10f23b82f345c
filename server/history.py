"""Git history of a lab, through gitpython: the baseline on `main`, one branch and worktree per agent.

Each experiment becomes one commit on the agent's branch with trailers (Run-Id, Val-BPB, Status) and
a ref `refs/autoresearch/attempts/<run-id>`; a discarded attempt is then dropped from the branch
(reset to the best) and stays reachable through that ref. Patches go through `git apply`, first
against a scratch copy, so a rejected patch never touches the worktree.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import git

from server.errors import HistoryError, InvalidPatchError

TRAIN = "train.py"
MAIN = "main"
ATTEMPT_PREFIX = "refs/autoresearch/attempts/"
COMMITTER = {"GIT_COMMITTER_NAME": "autoresearch-mcp", "GIT_COMMITTER_EMAIL": "autoresearch-mcp@localhost"}


def branch_name(agent: str) -> str:
    return f"autoresearch/{agent}"


@dataclass(frozen=True)
class PatchStats:
    """What a checked patch would do, and the resulting file."""

    new_text: str
    lines_added: int
    lines_removed: int


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    subject: str
    trailers: dict[str, str]


def _identity(agent: str) -> dict[str, str]:
    return {**COMMITTER, "GIT_AUTHOR_NAME": agent, "GIT_AUTHOR_EMAIL": f"{agent}@autoresearch.local"}


def init_repo(repo_dir: Path, files: dict[str, bytes]) -> str:
    """Make the lab's repo with the program's files committed on `main`; returns the commit."""
    repo_dir.mkdir(parents=True, exist_ok=False)
    repo = git.Repo.init(repo_dir, initial_branch=MAIN)
    for name, data in files.items():
        (repo_dir / name).write_bytes(data)
    repo.index.add(list(files))
    with repo.git.custom_environment(**_identity("baseline")):
        repo.git.commit("-m", "Baseline from the program\n\nStatus: baseline")
    return repo.head.commit.hexsha


class History:
    """The lab repo plus its per-agent worktrees. Methods are blocking: call them from a thread."""

    def __init__(self, repo_dir: Path, worktrees_dir: Path) -> None:
        try:
            self.repo = git.Repo(repo_dir.resolve())
        except (git.InvalidGitRepositoryError, git.NoSuchPathError) as e:
            raise HistoryError(f"{repo_dir} is not the lab's git repo") from e
        self.worktrees_dir = worktrees_dir.resolve()

    # -- agents --------------------------------------------------------------------------------

    def worktree(self, agent: str) -> Path:
        return self.worktrees_dir / agent

    def ensure_agent(self, agent: str) -> Path:
        """The agent's worktree, made on first use from `main` (callers hold the lab lock)."""
        path = self.worktree(agent)
        if (path / ".git").exists():
            return path
        branch = branch_name(agent)
        self.repo.git.worktree("prune")
        if branch in [h.name for h in self.repo.heads]:
            self.repo.git.worktree("add", str(path), branch)
        else:
            self.repo.git.worktree("add", "-b", branch, str(path), MAIN)
        return path

    def _wt(self, agent: str) -> git.Repo:
        return git.Repo(self.ensure_agent(agent))

    def head(self, agent: str) -> str:
        return self._wt(agent).head.commit.hexsha

    def main_commit(self) -> str:
        return self.repo.commit(MAIN).hexsha

    def read_train(self, agent: str) -> str:
        return (self.ensure_agent(agent) / TRAIN).read_text(encoding="utf-8")

    def train_at(self, commit: str) -> str:
        return self.repo.git.show(f"{commit}:{TRAIN}", strip_newline_in_stdout=False)

    def is_modified(self, agent: str) -> bool:
        return bool(self._wt(agent).git.status("--porcelain", "--", TRAIN))

    # -- patches -------------------------------------------------------------------------------

    def check_patch(self, agent: str, diff: str) -> PatchStats:
        """Dry-run a diff with `git apply` on a scratch copy of train.py; raise InvalidPatchError if bad."""
        current = self.read_train(agent)
        with tempfile.TemporaryDirectory(prefix="autoresearch-patch-") as tmp:
            scratch = Path(tmp)
            (scratch / TRAIN).write_text(current, encoding="utf-8")
            (scratch / "change.diff").write_text(diff, encoding="utf-8")
            # A bare folder, never a repo: stop git from finding one above it.
            g = git.Git(scratch)
            env = {"GIT_CEILING_DIRECTORIES": str(scratch.parent), "GIT_DIR": str(scratch / "no-repo")}
            added, removed = self._check_paths(g, env)
            try:
                g.apply("--check", "change.diff", env=env)
                g.apply("change.diff", env=env)
            except git.GitCommandError as e:
                raise InvalidPatchError(
                    f"the diff does not apply to the current train.py: {_git_message(e)}. "
                    "Call read_train and make the diff against exactly that text."
                ) from e
            return PatchStats((scratch / TRAIN).read_text(encoding="utf-8"), added, removed)

    def _check_paths(self, g: git.Git, env: dict[str, str]) -> tuple[int, int]:
        try:
            numstat = g.apply("--numstat", "change.diff", env=env)
            summary = g.apply("--summary", "change.diff", env=env)
        except git.GitCommandError as e:
            raise InvalidPatchError(f"not a unified diff git can read ({_git_message(e)}); send a unified diff of "
                                    "train.py as `git diff` writes it (--- a/train.py, +++ b/train.py, @@ hunks)") from e
        if not numstat.strip():
            raise InvalidPatchError("the diff changes nothing; send a unified diff of train.py")
        added = removed = 0
        for line in numstat.splitlines():
            a, r, path = line.split("\t", 2)
            if path != TRAIN:
                raise InvalidPatchError(f"the diff touches {path!r}; only train.py may be changed")
            if a == "-" or r == "-":
                raise InvalidPatchError("binary diffs are not accepted; train.py is text")
            added, removed = added + int(a), removed + int(r)
        if summary.strip():
            raise InvalidPatchError(
                f"the diff renames, creates, deletes or changes the mode of a file ({summary.strip()}); "
                "only edits to train.py's content are accepted"
            )
        return added, removed

    def write_train(self, agent: str, text: str) -> None:
        """Replace train.py in the worktree atomically."""
        path = self.ensure_agent(agent) / TRAIN
        tmp = path.with_name(f".{TRAIN}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    def diffstat(self, agent: str) -> str:
        return self._wt(agent).git.diff("--stat", "HEAD", "--", TRAIN).strip()

    def restore_train(self, agent: str, commit: str) -> None:
        """Make train.py equal to its version at `commit`; the branch does not move."""
        self.write_train(agent, self.train_at(commit))

    # -- commits -------------------------------------------------------------------------------

    def commit_attempt(self, agent: str, run_id: str, snapshot: str, message: str, trailers: dict[str, str],
                       keep: bool) -> str:
        """Commit the run's train.py snapshot, ref it as an attempt, and keep or drop it from the branch."""
        wt = self._wt(agent)
        base = wt.head.commit.hexsha
        self.write_train(agent, snapshot)
        body = message.strip() or "(no description)"
        body += "\n\n" + "\n".join(f"{k}: {v}" for k, v in trailers.items())
        wt.index.add([TRAIN])
        with wt.git.custom_environment(**_identity(agent)):
            wt.git.commit("--allow-empty", "--no-verify", "-m", body)
        sha = wt.head.commit.hexsha
        self.repo.git.update_ref(ATTEMPT_PREFIX + run_id, sha)
        if not keep:
            wt.git.reset("--hard", base)  # the seed's `git reset`: train.py returns to the best
        return sha

    def committed_attempt(self, agent: str, run_id: str) -> str | None:
        """The commit a run already got, if any: its attempt ref, else the branch head carrying its
        Run-Id (a server that died between the commit and the ref); the ref is then made."""
        sha = self.attempt(run_id)
        if sha is None:
            head = self.log(self.head(agent))[0]
            if head.trailers.get("Run-Id") != run_id:
                return None
            sha = head.sha
            self.repo.git.update_ref(ATTEMPT_PREFIX + run_id, sha)
        return sha

    def drop_attempt(self, agent: str, sha: str) -> None:
        """Finish a discard a dead server left half done: the branch must not keep `sha`."""
        wt = self._wt(agent)
        if wt.head.commit.hexsha == sha:
            wt.git.reset("--hard", f"{sha}^")

    def log(self, ref: str) -> list[CommitInfo]:
        """Commits reachable from `ref`, newest first, with their trailers."""
        out = []
        for c in self.repo.iter_commits(ref):
            trailers = {}
            for line in str(c.message).strip().splitlines():
                key, sep, value = line.partition(": ")
                if sep and key in TRAILERS:
                    trailers[key] = value.strip()
            out.append(CommitInfo(c.hexsha, str(c.summary), trailers))
        return out

    def attempt(self, run_id: str) -> str | None:
        try:
            return self.repo.commit(ATTEMPT_PREFIX + run_id).hexsha
        except (git.BadName, ValueError):
            return None


TRAILERS = ("Run-Id", "Val-BPB", "Status", "Verified", "Seed", "Delta", "Z", "Confirm-Runs")
"""The trailers of an attempt's commit: enough to record the run again from git alone."""


def _git_message(e: git.GitCommandError) -> str:
    text = str(e.stderr or e.stdout or e).strip().replace("stderr: ", "").strip("'\n ")
    # git's hints are for a person at a shell (--allow-empty, --reject, ...), not for an agent
    lines = [re.sub(r"\s*\(allow with ['\"][^'\"]*['\"]\)", "", ln.strip()).removeprefix("error: ")
             for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("hint:")]
    return "; ".join(lines[:4]) or "git apply failed"
