"""What the reliability benchmark's parts share: a trivial program (a bigram model trained for a
moment, through the real harness and scorer), labs made from it, MCP clients over real stdio, and
the checks that every part ends with (reconciled books, no live rows, no leftover containers).
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
import time
from pathlib import Path

from server.lab import REPO_ROOT, Lab, create_lab
from server.reconcile import reconcile

TRIVIAL_TOML = """\
# trivial: the reliability benchmark's program. A bigram model trained for a moment, so that a run
# costs what the harness, the export and the scorer cost, and little more.
name = "trivial"
description = "Bigram model on Python stdlib sources, for the reliability benchmark"
budget_s = {budget_s}
untimed_steps = 0
grace_s = 10
seq_len = 32
vocab_size = 512
eval_tokens = 2048
eval_batch_size = 16
device = "cpu"
autocast = "none"
cpu_threads = 1
seed = 42

[data]
kind = "python-stdlib"
val_fraction = 0.1
max_bytes = 600_000
"""

TRIVIAL_TRAIN = '''\
"""trivial: a bigram model (embedding, then a linear read-out), trained until the budget is spent.
The first and last lines of its log say when training ran (the benchmark counts overlapping runs)."""

import time

print(f"window-start {time.time():.6f}", flush=True)

import torch
import torch.nn.functional as F

import trainer

LR = 0.5
WIDTH = 16

cfg = trainer.program()  # the harness has seeded torch with cfg.seed
model = torch.nn.Sequential(torch.nn.Embedding(cfg.vocab_size, WIDTH), torch.nn.Linear(WIDTH, cfg.vocab_size))
opt = torch.optim.SGD(model.parameters(), lr=LR)
loader = trainer.train_loader(8)
while True:
    x, y = next(loader)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if not trainer.step(loss):
        break
print(f"window-end {time.time():.6f}", flush=True)
trainer.submit(model)
'''

PROGRAM_MD = "# trivial\n\nThe reliability benchmark's program: change LR or WIDTH in train.py.\n"


def write_program(dest: Path, budget_s: float, train: str = TRIVIAL_TRAIN) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "program.toml").write_text(TRIVIAL_TOML.format(budget_s=budget_s))
    (dest / "train.py").write_text(train)
    (dest / "program.md").write_text(PROGRAM_MD)
    return dest


def prepare_data(program: Path, data_dir: Path) -> Path:
    """The program's data, made once by the trainer's own prepare (trusted code, on the host)."""
    if not (data_dir / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "trainer.prepare", "--program", str(program / "program.toml"),
                        "--data-dir", str(data_dir)], check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        for p in [data_dir, *data_dir.rglob("*")]:  # the container's user reads it
            p.chmod(0o755 if p.is_dir() else 0o644)
    return data_dir


def make_lab(root: Path, program: Path, data_dir: Path, *, backend: str, slots: int, image: str | None = None,
             base_url: str | None = None, **config: object) -> Path:
    backend_cfg = {"type": "docker", "image": image, "base_url": base_url} if backend == "docker" else {
        "type": "local", "state_dir": str(root.parent / f"{root.name}-local-state")}
    (root.parent / f"{root.name}-slots").mkdir(parents=True, exist_ok=True)
    # the faults and the load run beside each other's servers (and, in the suite, other tests) on a few
    # cores: start-ups jitter past the product's 5-s slack for time outside the clock, which no part tests
    config.setdefault("min_time_slack_s", 30.0)
    create_lab(root, str(program), backend=backend_cfg, data_dir=data_dir,
               pool={"state_dir": str(root.parent / f"{root.name}-slots"), "gpus": [], "cpu_slots": slots}, **config)
    return root


def stdio_params(root: Path, agent: str):
    """How the official client starts `autoresearch-mcp serve` over stdio for `agent`."""
    from mcp import StdioServerParameters  # noqa: PLC0415

    return StdioServerParameters(
        command=sys.executable, args=["-m", "server.cli", "serve", "--lab", str(root), "--agent", agent],
        env={**os.environ, "AUTORESEARCH_LOG_LEVEL": "WARNING"}, cwd=str(REPO_ROOT))


def replace_line(text: str, prefix: str, new: str) -> str:
    """A unified diff of train.py that replaces the first line starting with `prefix`."""
    lines = text.splitlines(keepends=True)
    i = next(n for n, ln in enumerate(lines) if ln.startswith(prefix))
    changed = lines[:i] + [new + "\n"] + lines[i + 1:]
    return "".join(difflib.unified_diff(lines, changed, "a/train.py", "b/train.py"))


def books(root: Path) -> dict:
    """The end-of-part checks: reconciler findings, live rows, rows by status."""
    lab = Lab(root)
    try:
        rows = lab.ledger.runs()
        findings = [str(f) for f in reconcile(lab)]
        statuses: dict[str, int] = {}
        for r in rows:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        return {"rows": len(rows), "statuses": statuses, "findings": findings}
    finally:
        lab.close()


def processes_matching(*words: str) -> list[int]:
    """Pids whose command line holds every one of `words` (this host's /proc)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(w in cmd for w in words) and int(p.name) != os.getpid():
            pids.append(int(p.name))
    return pids


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")
