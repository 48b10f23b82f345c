"""A lab's whole state as data, to compare before and after a call that should change nothing."""

from __future__ import annotations

from pathlib import Path


def lab_state(root: Path, agents: tuple[str, ...]) -> dict:
    """git refs, worktree files and status, ledger rows, results files, run folders."""
    import git  # noqa: PLC0415

    from server.lab import Lab  # noqa: PLC0415

    repo = git.Repo(root / "repo")
    lab = Lab(root)
    try:
        rows = [r.model_dump() for r in lab.ledger.runs()]
    finally:
        lab.close()
    state = {
        "refs": sorted(repo.git.for_each_ref("--format=%(refname) %(objectname)").splitlines()),
        "ledger": rows,
        "results": sorted(p.name + ":" + p.read_text() for p in (root / "results").glob("*.tsv")),
        "runs": sorted(p.name for p in (root / "runs").iterdir()),
    }
    for agent in agents:
        wt = root / "worktrees" / agent
        state[f"train:{agent}"] = (wt / "train.py").read_bytes() if wt.exists() else None
        state[f"status:{agent}"] = git.Repo(wt).git.status("--porcelain", "--ignored") if wt.exists() else None
    return state
