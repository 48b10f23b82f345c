"""The lab without experiments: creation from a program, patches, resets, locks, results.tsv."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import pytest

from server_helpers import PROGRAM

from server.errors import BusyError, InvalidArgumentError, InvalidPatchError, LabStateError, NotFoundError
from server.lab import Lab, create_lab, read_results, write_results_row

pytestmark = pytest.mark.anyio
PROGRAM_NAME = Path(PROGRAM).name


def one_line_diff(text: str, old: str, new: str) -> str:
    """A unified diff (difflib, 3 lines of context) replacing the first line equal to `old`."""
    lines = text.splitlines(keepends=True)
    i = lines.index(old + "\n")
    changed = lines[:i] + [new + "\n"] + lines[i + 1:]
    return "".join(difflib.unified_diff(lines, changed, "a/train.py", "b/train.py"))


def test_create_lab_copies_the_program_and_shrinks_the_budget(lab):
    assert lab.program().budget_s == pytest.approx(4.0)
    assert json.loads((lab.root / "lab.json").read_text())["program"] == PROGRAM_NAME
    assert lab.history.log("main")[0].subject == "Baseline from the program"
    for sub in ("runs", "results", "worktrees", "cache", "locks"):
        assert (lab.root / sub).is_dir()


def test_create_lab_refuses_unknown_programs_and_existing_labs(make_lab, tmp_path):
    with pytest.raises(NotFoundError, match="bundled programs"):
        create_lab(tmp_path / "x", "no-such-program")
    assert not (tmp_path / "x").exists()
    root = make_lab()
    with pytest.raises(LabStateError, match="already a lab"):
        create_lab(root, "tiny-stdlib")
    with pytest.raises(LabStateError, match="not a lab"):
        Lab(tmp_path / "nowhere")


async def test_apply_patch_then_reset(lab):
    train = await lab.read_train("alice")
    assert not train.modified and train.line_count > 10
    first = train.text.splitlines()[0]
    result = await lab.apply_patch("alice", one_line_diff(train.text, first, first + "  # tuned"))
    assert (result.lines_added, result.lines_removed) == (1, 1) and "1 insertion" in result.diffstat
    after = await lab.read_train("alice")
    assert after.modified and after.text.splitlines()[0].endswith("# tuned")
    reset = await lab.reset_train("alice", "best")
    assert reset.commit == train.base_commit
    assert (await lab.read_train("alice")).text == train.text
    # agents do not see each other's edits
    await lab.apply_patch("alice", one_line_diff(train.text, first, first + "  # alice"))
    assert (await lab.read_train("bob")).text == train.text


async def test_syntax_errors_and_caps_are_rejected_with_no_change(lab):
    train = await lab.read_train("alice")
    lines = train.text.splitlines()
    code_line = next(ln for ln in lines if ln.startswith("import "))
    with pytest.raises(InvalidPatchError, match="does not compile"):
        await lab.apply_patch("alice", one_line_diff(train.text, code_line, "import ("))
    with pytest.raises(InvalidPatchError, match="cap"):
        await lab.apply_patch("alice", "x" * (lab.config.max_patch_bytes + 1))
    with pytest.raises(InvalidPatchError, match="UTF-8"):
        await lab.apply_patch("alice", one_line_diff(train.text, code_line, code_line + " # \udcff"))
    assert (await lab.read_train("alice")).text == train.text and not (await lab.read_train("alice")).modified


async def test_agent_lock_makes_patches_wait_for_the_run(lab):
    train = await lab.read_train("alice")
    first = train.text.splitlines()[0]
    with lab.agent_lock("alice"):
        with pytest.raises(BusyError, match="in flight"):
            await lab.apply_patch("alice", one_line_diff(train.text, first, first + " #"))
        with lab.agent_lock("bob"):  # another agent is not blocked
            pass
    assert (await lab.read_train("alice")).text == train.text


async def test_bad_agent_names_and_arguments(lab):
    for bad in ("", "Alice", "../x", "a" * 33, "a b"):
        with pytest.raises(InvalidArgumentError, match="agent name"):
            await lab.read_train(bad)
    with pytest.raises(InvalidArgumentError):
        await lab.reset_train("alice", "yesterday")
    with pytest.raises(InvalidArgumentError):
        lab.list_runs("alice", "bogus", False, 10)
    with pytest.raises(NotFoundError):
        lab.log_tail("alice", "alice-0001", 10)


def test_results_rows_use_the_seed_format(tmp_path):
    """The seed's five columns first, then the run's seed and z; a file begun with five keeps five."""
    path = tmp_path / "r.tsv"
    write_results_row(path, "a1b2c3d4e5", 0.99791, 45060.2, "keep", "baseline", seed=42)
    write_results_row(path, "f6e5d4c3b2", None, None, "crash", "double\tthe width\n", seed=42, z=-1.234)
    assert path.read_text().splitlines() == [
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\tseed\tz",
        "a1b2c3d\t0.997910\t44.0\tkeep\tbaseline\t42\t",
        "f6e5d4c\t0.000000\t0.0\tcrash\tdouble the width\t42\t-1.23",
    ]
    assert read_results(path)[1]["status"] == "crash" and read_results(path)[1]["z"] == "-1.23"
    old = tmp_path / "old.tsv"
    old.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    write_results_row(old, "a1b2c3d4e5", 0.99791, None, "keep", "baseline", seed=42, z=3.0)
    assert old.read_text().splitlines()[1] == "a1b2c3d\t0.997910\t0.0\tkeep\tbaseline"


def test_each_run_gets_its_share_of_the_host():
    """Memory under the host's (so the run's own cgroup, not the host's OOM killer, stops a memory
    hog, and it is recorded `oom`), and with several slots cores of its own (a quota when there are
    more slots than cores)."""
    import os  # noqa: PLC0415

    from server.phases import host_share  # noqa: PLC0415

    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = sorted(os.sched_getaffinity(0))
    one, first, second = host_share(1), host_share(2, 0), host_share(2, 1)
    assert one.memory_gb < host_gb and one.memory_gb <= 32 and (one.cpus, one.cpuset) == (None, None)
    assert first.memory_gb == pytest.approx(min(32, round(0.85 * host_gb / 2, 1)))
    half = len(cores) // 2
    assert first.cpuset == ",".join(map(str, cores[:half])) and second.cpuset == ",".join(map(str, cores[half:2 * half]))
    crowded = host_share(len(cores) + 1, 0)
    assert crowded.cpuset is None and crowded.cpus == pytest.approx(len(cores) / (len(cores) + 1), abs=0.01)
