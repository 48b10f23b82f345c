"""The reconciler: a lab's three books (ledger rows, git commits and attempt refs, results.tsv) must
tell one story (issue 19). Every finished run is in the ledger once; a run with a commit has exactly
one attempt ref pointing at it, carrying its Run-Id and decision, on the agent's branch exactly when
it was kept, and exactly one results.tsv row; a run without a commit has neither.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from server.history import ATTEMPT_PREFIX, MAIN, branch_name
from server.lab import Lab, read_results
from server.models import LIVE_STATUSES


@dataclass(frozen=True)
class Finding:
    """One disagreement between the books."""

    run_id: str
    problem: str

    def __str__(self) -> str:
        return f"{self.run_id}: {self.problem}"


def reconcile(lab: Lab, *, allow_live: bool = False) -> list[Finding]:
    """Every disagreement between ledger, git and results.tsv; [] when they agree. A live row is a
    finding unless `allow_live` (a lab at rest has none)."""
    repo = lab.history.repo
    rows = lab.ledger.runs()
    refs: dict[str, tuple[str, str, str]] = {}
    heads = dict(line.split(" ", 1)[::-1] for line in
                 repo.git.for_each_ref(ATTEMPT_PREFIX, "--format=%(objectname) %(refname)").splitlines())
    trailers = {}
    if heads:  # one `git log` for all attempts (git 2.39's for-each-ref ignores trailers' key=)
        fmt = "%H%x09%(trailers:key=Run-Id,valueonly,separator=)%x09%(trailers:key=Status,valueonly,separator=)"
        for line in repo.git.log("--no-walk=unsorted", f"--format={fmt}", *sorted(set(heads.values()))).splitlines():
            sha, run_id, status = (line.split("\t") + ["", ""])[:3]
            trailers[sha] = (run_id.strip(), status.strip())
    for ref, sha in heads.items():
        refs[ref.removeprefix(ATTEMPT_PREFIX)] = (sha, *trailers.get(sha, ("", "")))
    agents = sorted({r.agent for r in rows} | {p.stem for p in (lab.root / "results").glob("*.tsv")})
    on_branch: dict[str, set[str]] = {}
    results: dict[str, Counter] = {}
    for agent in agents:
        branch = branch_name(agent)
        known = {h.name for h in repo.heads}
        on_branch[agent] = set(repo.git.rev_list(f"{MAIN}..{branch}").split()) if branch in known else set()
        results[agent] = Counter(row.get("commit", "") for row in read_results(lab.results_path(agent)))

    findings: list[Finding] = []
    add = lambda run_id, problem: findings.append(Finding(run_id, problem))  # noqa: E731
    for r in rows:
        ref = refs.pop(r.run_id, None)
        if r.status in LIVE_STATUSES:
            if not allow_live:
                add(r.run_id, f"still {r.status} in the ledger")
            continue
        short = (r.commit or "")[:7]
        rows_in_results = results[r.agent].pop(short, 0) if short else 0
        if r.commit is None:
            if ref is not None:
                add(r.run_id, f"the ledger has no commit but git has attempt {ref[0][:7]} ({ref[2]})")
            continue
        if ref is None:
            add(r.run_id, f"the ledger names commit {short} but git has no attempt ref for it")
        else:
            sha, trailer_id, status = ref
            if sha != r.commit:
                add(r.run_id, f"the ledger names commit {short}, the attempt ref {sha[:7]}")
            if trailer_id != r.run_id:
                add(r.run_id, f"its commit's Run-Id trailer says {trailer_id!r}")
            if status != (r.decision or ""):
                add(r.run_id, f"the ledger's decision is {r.decision!r}, the commit's Status {status!r}")
        if r.kept != (r.commit in on_branch[r.agent]):
            add(r.run_id, "kept in the ledger but not on the branch" if r.kept else "discarded but still on the branch")
        if rows_in_results != 1:
            add(r.run_id, f"{rows_in_results} results.tsv rows for its commit {short} (one expected)")
    for run_id, (sha, _, _) in refs.items():
        add(run_id, f"git has attempt {sha[:7]} but the ledger has no such run")
    for agent, left in results.items():
        for short, n in left.items():
            if n:
                add(f"{agent}:{short}", f"{n} results.tsv row(s) whose commit no ledger row names")
    return findings
