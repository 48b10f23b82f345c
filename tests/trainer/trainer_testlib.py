"""Helpers shared by the trainer tests (a unique module name: every test folder has a conftest)."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = REPO / "programs"
TINY_TOML = PROGRAMS / "tiny-stdlib" / "program.toml"
PYTHON = sys.executable


def derive_program(src: Path, dest: Path, **overrides) -> Path:
    """Copy a program.toml, replacing top-level `key = value` lines (values as TOML literals)."""
    text = src.read_text()
    for key, value in overrides.items():
        literal = json.dumps(value)
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {literal}", text, count=1)
        if n == 0:  # not in the file: add it before the first table
            text = re.sub(r"(?m)^\[", f"{key} = {literal}\n[", text, count=1)
    dest.write_text(text)
    return dest


def scaled_climbmix(dest: Path, **constants) -> Path:
    """gpt-climbmix's train.py with some of its top-level constants replaced (sizes cut to fit)."""
    source = (PROGRAMS / "gpt-climbmix" / "train.py").read_text()
    for name, value in constants.items():
        source, n = re.subn(rf"(?m)^{name} = .*$", f"{name} = {value}", source)
        assert n == 1, f"{name} is not set on one line of gpt-climbmix/train.py"
    dest.write_text(source)
    return dest


def words(i: int, n: int) -> str:
    """Deterministic prose-like filler so BPE has something to merge."""
    vocab = ["alpha", "beta", "gamma", "delta", "packing", "loader", "token", "rows", "résumé",
             "naïve", "日本", "δοκιμή", "def", "return", "(x)", "=", "+", "\n"]
    return " ".join(vocab[(i * 7 + k * 3 + k * k) % len(vocab)] for k in range(n))


def corpus_docs() -> list[str]:
    """Documents, each with a unique marker; their split is known from is_val."""
    return [f"DOC{i:04d}MARK {words(i, 40 + (i * 37) % 400)} END{i:04d}" for i in range(240)]


def write_corpus(root: Path, docs: list[str]) -> Path:
    """Split documents over three formats: text files, one .jsonl, one .parquet."""
    (root / "txt" / "sub").mkdir(parents=True)
    for i, doc in enumerate(docs[:120]):
        folder = root / "txt" / ("sub" if i % 2 else "")
        (folder / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[120:180]:
            f.write(json.dumps({"text": doc, "id": doc[:7]}) + "\n")
    pq.write_table(pa.table({"text": docs[180:]}), root / "docs.parquet", row_group_size=16)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("HIDDEN FILE must not be read")
    return root


RESULT_KEYS = {"status", "reason", "training_seconds", "total_seconds", "startup_seconds", "export_seconds",
               "peak_memory_mb", "mfu_percent", "total_tokens", "num_steps", "num_params", "traceback_tail"}


def score_export(out: Path, program: Path, data: Path) -> dict:
    """The score phase on a train phase's export (trusted code, in this process: our own models only;
    hostile artifacts are scored in containers, tests/server/test_server_sealed.py)."""
    from trainer.contract import MODEL_DIR
    from trainer.score import score

    return score(program, out / MODEL_DIR, data, val_stdin=False).model_dump()

MINI = """
import torch
import trainer

cfg = trainer.program()
model = torch.nn.Sequential(torch.nn.Embedding(cfg.vocab_size, 8), torch.nn.Linear(8, cfg.vocab_size))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loader = trainer.train_loader(4)
step = 0
while True:
    x, y = next(loader)
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward(); opt.step(); opt.zero_grad()
    step += 1
{body}
"""


def mini(body: str) -> str:
    return MINI.format(body=textwrap.indent(textwrap.dedent(body), "    "))
