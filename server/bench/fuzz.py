"""Bad input: hypothesis generates arguments for every tool, diffs above all (paths with `..`,
absolute paths, symlink and mode changes, binary, huge, CRLF, no final newline, unicode, several
files, mangled hunks). Each case goes through the official MCP client (in memory). Figures: cases,
accepted, rejected, unhandled (the SDK's bare "Error executing tool X": a crash), rejections that
changed the lab (worktree, git refs, ledger, results, run folders), and the distinct rejections.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server.bench.common import make_lab

TOOLS_ARGS = {
    "read_program": [], "read_train": [], "get_best": [], "apply_patch": ["diff"],
    "run_experiment": ["description"], "start_experiment": ["description"], "get_experiment": ["run_id"],
    "wait_experiment": ["run_id"], "cancel_experiment": ["run_id"], "get_log": ["run_id", "lines"],
    "list_experiments": ["status", "kept_only", "limit"], "reset_train": ["to"],
}
NASTY_PATHS = ["../train.py", "../../etc/passwd", "/etc/passwd", "/train.py", "a/../train.py", "train.py/..",
               "./train.py", "train.py\x00.txt", "tràin.py", "program.toml", ".git/config", "train.py ", "TRAIN.PY"]
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                       max_leaves=6)


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)


@st.composite
def diffs(draw, train: str) -> str:
    """A diff of train.py, then zero or more mutations, each a way agents (or attackers) get diffs wrong."""
    import difflib  # noqa: PLC0415

    lines = _lines(train)
    i = draw(st.integers(0, len(lines) - 1))
    new = draw(st.sampled_from(["LR = 0.25\n", "WIDTH = 8\n", "", "# a comment\n", "x = (\n", "import os\n"]))
    if draw(st.booleans()):
        new = draw(st.text(max_size=60)) + "\n"
    changed = lines[:i] + ([new] if new else []) + lines[i + 1:]
    diff = "".join(difflib.unified_diff(lines, changed, "a/train.py", "b/train.py"))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["path", "mode", "symlink", "binary", "huge", "crlf", "no-eol", "unicode",
                                     "several", "hunk", "truncate", "nul", "surrogate", "delete", "rename", "garbage"]))
        if kind == "path":
            bad = draw(st.sampled_from(NASTY_PATHS))
            diff = diff.replace("train.py", bad, draw(st.integers(1, 2)))
        elif kind == "mode":
            diff = "diff --git a/train.py b/train.py\nold mode 100644\nnew mode 100755\n" + diff
        elif kind == "symlink":
            diff = ("diff --git a/train.py b/train.py\ndeleted file mode 100644\n" + diff +
                    "diff --git a/train.py b/train.py\nnew file mode 120000\n--- /dev/null\n+++ b/train.py\n"
                    "@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n")
        elif kind == "binary":
            diff = "diff --git a/train.py b/train.py\nindex 1..2 100644\nGIT binary patch\nliteral 4\nLcmZ?d00001\n\n"
        elif kind == "huge":
            diff += "+#" + "x" * draw(st.integers(100_000, 300_000)) + "\n"
        elif kind == "crlf":
            diff = diff.replace("\n", "\r\n")
        elif kind == "no-eol":
            diff = diff.rstrip("\n")
        elif kind == "unicode":
            diff = diff.replace("LR", draw(st.text(min_size=1, max_size=5)), 1)
        elif kind == "several":
            diff += diff.replace("train.py", draw(st.sampled_from(["prepare.py", "train.py", "evil.py"])))
        elif kind == "hunk":
            diff = re.sub(r"@@ -\d+,\d+ \+\d+,\d+ @@", lambda m: f"@@ -{draw(st.integers(-2, 999))},"
                          f"{draw(st.integers(0, 9))} +1,{draw(st.integers(0, 9))} @@", diff, count=1)
        elif kind == "truncate":
            diff = diff[:draw(st.integers(0, max(len(diff) - 1, 0)))]
        elif kind == "nul":
            diff = diff.replace("\n", "\x00\n", 1)
        elif kind == "surrogate":
            diff = diff.replace("\n", "\udcff\n", 1)
        elif kind == "delete":
            diff = "diff --git a/train.py b/train.py\ndeleted file mode 100644\n--- a/train.py\n+++ /dev/null\n"
        elif kind == "rename":
            diff = "diff --git a/train.py b/x.py\nsimilarity index 100%\nrename from train.py\nrename to x.py\n"
        else:
            diff = draw(st.text(max_size=200))
    return diff


@st.composite
def cases(draw, train: str) -> tuple[str, dict]:
    tool = draw(st.sampled_from(sorted(TOOLS_ARGS)))
    if tool == "apply_patch" and draw(st.integers(0, 9)) < 8:
        args: dict = {"diff": draw(diffs(train))}
    else:
        names = TOOLS_ARGS[tool]
        args = {}
        for name in names:
            if draw(st.booleans()):
                args[name] = draw(_value(name))
        if draw(st.integers(0, 4)) == 0:
            args[draw(st.text(min_size=1, max_size=12))] = draw(JSONISH)
    return tool, args


def _value(name: str):
    typical = {
        "diff": st.text(max_size=300), "description": st.text(max_size=600),
        "run_id": st.sampled_from(["fz-0001", "fz-9999", "bob-0001", "../fz-0001", "", "fz-0001; rm -rf /"]) | st.text(max_size=30),
        "lines": st.integers(-5, 5000), "limit": st.integers(-5, 100_000), "kept_only": st.booleans(),
        "status": st.sampled_from(["ok", "crash", "great", "", "running"]) | st.text(max_size=10),
        "to": st.sampled_from(["best", "baseline", "yesterday", "", "BEST"]) | st.text(max_size=10),
    }[name]
    return typical | JSONISH


def _would_run(tool: str, args: dict) -> bool:
    """A call that would start a real run (the fuzzer checks rejections, not experiments)."""
    from server.errors import InvalidArgumentError  # noqa: PLC0415
    from server.experiment import check_description  # noqa: PLC0415

    if tool not in ("run_experiment", "start_experiment") or set(args) != {"description"}:
        return False
    try:
        return isinstance(args["description"], str) and bool(check_description(args["description"]))
    except InvalidArgumentError:
        return False


def _template(text: str) -> str:
    """A rejection with its variable parts blanked, so distinct messages can be counted."""
    text = re.sub(r", got .*?(\(|;|$)", r", got …\1", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return text[:160]


async def run_fuzz(work: Path, program: Path, data: Path, cases_n: int) -> dict:
    import anyio  # noqa: PLC0415
    from anyio.from_thread import start_blocking_portal  # noqa: PLC0415
    from mcp import Client  # noqa: PLC0415

    from server.app import build_server  # noqa: PLC0415
    from server.bench.state import lab_state  # noqa: PLC0415

    root = make_lab(work / "fuzz", program, data, backend="local", slots=1)
    stats: Counter = Counter()
    templates: Counter = Counter()
    problems: list[str] = []
    t0 = time.monotonic()

    async def session(portal_ready, stop) -> None:
        async with Client(build_server(root, stdio_agent="fz")) as client:
            portal_ready.append(client)
            await stop.wait()

    with start_blocking_portal() as portal:
        stop = portal.call(anyio.Event)
        ready: list = []
        portal.start_task_soon(session, ready, stop)
        while not ready:
            time.sleep(0.05)
        client = ready[0]
        train = portal.call(client.call_tool, "read_train", {}).structured_content["text"]
        before = lab_state(root, ("fz",))

        @settings(max_examples=cases_n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=cases(train))
        def one(case: tuple[str, dict]) -> None:
            nonlocal before
            tool, args = case
            if _would_run(tool, args):
                stats["skipped: would start a run"] += 1
                return
            stats["cases"] += 1
            try:
                res = portal.call(client.call_tool, tool, args)
            except Exception as e:  # noqa: BLE001 - the client itself failed: a protocol-level crash
                stats["client errors"] += 1
                problems.append(f"{tool} {str(args)[:120]}: client raised {type(e).__name__}: {str(e)[:200]}")
                return
            if not res.is_error:
                stats["accepted"] += 1
                if tool == "apply_patch":  # undo it, so every case starts from the same lab
                    portal.call(client.call_tool, "reset_train", {"to": "best"})
                before = lab_state(root, ("fz",))
                return
            stats["rejected"] += 1
            text = res.content[0].text if res.content else ""
            if re.fullmatch(r"Error executing tool \w+", text.strip()):
                stats["unhandled"] += 1
                problems.append(f"unhandled: {tool} {str(args)[:200]}")
            elif len(text) > 1500 or "pydantic.dev" in text or "Traceback (most recent" in text or re.search(
                    r"\(allow with ['\"]", text):  # git's hint for a person at a shell
                stats["unreadable"] += 1
                problems.append(f"unreadable rejection ({len(text)} chars): {text[:200]}")
            templates[f"{tool}: {_template(text)}"] += 1
            after = lab_state(root, ("fz",))
            if after != before:
                stats["changed state"] += 1
                problems.append(f"a rejected {tool} changed the lab: {str(args)[:200]}")
                before = after

        one()
        portal.call(stop.set)
    elapsed = time.monotonic() - t0
    checks = {f"at least {cases_n} cases": stats["cases"] >= cases_n * 0.9,
              "0 unhandled exceptions": stats["unhandled"] == 0 and stats["client errors"] == 0,
              "0 state changes on a rejected call": stats["changed state"] == 0,
              "every rejection readable": stats["unreadable"] == 0}
    return {"part": "fuzz", **dict(stats), "elapsed_s": round(elapsed, 1),
            "cases_per_s": round(stats["cases"] / elapsed, 1), "distinct_rejections": len(templates),
            "rejections": templates.most_common(40), "problems": problems[:30], "checks": checks}
