"""Git history against real repos: worktrees per agent, git-apply checks, keep/discard commits."""

from __future__ import annotations

import git
import pytest

from server.errors import InvalidPatchError
from server.history import ATTEMPT_PREFIX, History, branch_name, init_repo

BASE = "LR = 0.1\nSTEPS = 10\nprint(LR)\n"


def diff(old: str, new: str, path: str = "train.py") -> str:
    return f"--- a/{path}\n+++ b/{path}\n@@ -1,3 +1,3 @@\n-{old}\n+{new}\n STEPS = 10\n print(LR)\n"


@pytest.fixture
def hist(tmp_path):
    init_repo(tmp_path / "repo", {"train.py": BASE.encode(), "program.md": b"# p\n"})
    return History(tmp_path / "repo", tmp_path / "worktrees")


def test_agents_get_their_own_branch_and_worktree(hist, tmp_path):
    a, b = hist.ensure_agent("alice"), hist.ensure_agent("bob")
    assert a == tmp_path / "worktrees" / "alice" and b != a
    assert git.Repo(a).active_branch.name == branch_name("alice")
    assert hist.head("alice") == hist.head("bob") == hist.main_commit()
    assert hist.ensure_agent("alice") == a  # idempotent


def test_check_patch_returns_new_text_without_touching_the_worktree(hist):
    stats = hist.check_patch("alice", diff("LR = 0.1", "LR = 0.2"))
    assert stats.new_text == BASE.replace("0.1", "0.2")
    assert (stats.lines_added, stats.lines_removed) == (1, 1)
    assert hist.read_train("alice") == BASE and not hist.is_modified("alice")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (diff("LR = 0.1", "LR = 0.2", "../outside.py"), "only train.py"),
        (diff("LR = 0.1", "LR = 0.2", "program.md"), "only train.py"),
        (diff("LR = 9.9", "LR = 0.2"), "does not apply"),
        ("this is not a diff\n", "not a unified diff|changes nothing"),
        ("diff --git a/train.py b/x.py\nsimilarity index 100%\nrename from train.py\nrename to x.py\n", "only train.py"),
        ("diff --git a/train.py b/train.py\nold mode 100644\nnew mode 100755\n", "mode|changes nothing"),
    ],
)
def test_bad_patches_are_rejected(hist, patch, message):
    with pytest.raises(InvalidPatchError, match=message):
        hist.check_patch("alice", patch)
    assert hist.read_train("alice") == BASE


def test_keep_advances_the_branch_and_discard_leaves_an_attempt_ref(hist):
    base = hist.head("alice")
    kept = hist.commit_attempt("alice", "alice-0001", BASE.replace("0.1", "0.2"), "lr 0.2",
                               {"Run-Id": "alice-0001", "Val-BPB": "1.000000", "Status": "keep"}, keep=True)
    assert hist.head("alice") == kept and hist.repo.commit(kept).parents[0].hexsha == base
    dropped = hist.commit_attempt("alice", "alice-0002", BASE.replace("0.1", "0.9"), "lr 0.9",
                                  {"Run-Id": "alice-0002", "Val-BPB": "2.000000", "Status": "discard"}, keep=False)
    assert hist.head("alice") == kept
    assert hist.attempt("alice-0002") == dropped
    assert hist.repo.commit(ATTEMPT_PREFIX + "alice-0002").parents[0].hexsha == kept
    assert hist.read_train("alice") == BASE.replace("0.1", "0.2")
    log = hist.log(branch_name("alice"))
    assert [c.trailers.get("Run-Id") for c in log] == ["alice-0001", None]
    assert log[0].trailers == {"Run-Id": "alice-0001", "Val-BPB": "1.000000", "Status": "keep"}
    assert hist.train_at(dropped) == BASE.replace("0.1", "0.9")
    assert hist.repo.commit(dropped).author.name == "alice"


def test_restore_train_moves_only_the_file(hist):
    hist.write_train("alice", "x = 1\n")
    assert hist.is_modified("alice")
    hist.restore_train("alice", hist.main_commit())
    assert hist.read_train("alice") == BASE and not hist.is_modified("alice")
