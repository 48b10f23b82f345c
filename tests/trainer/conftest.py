"""Fixtures for the trainer tests: hermetic (CPU, no network, no Docker), built in-process.

`tiny_data` is the tiny-stdlib program's data prepared from this interpreter's stdlib (capped
small); `corpus` is a local corpus of marked documents in text, .jsonl and .parquet files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import load_program
from trainer.prepare import prepare
from trainer.sources import is_val
from trainer_testlib import TINY_TOML, corpus_docs, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), corpus_docs())


@pytest.fixture(scope="session")
def corpus_program(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus-program")
    text = """
name = "corpus-test"
seq_len = 64
vocab_size = 300
eval_batch_size = 4
eval_tokens = 512
device = "cpu"
autocast = "none"

[data]
kind = "local"
val_fraction = 0.2
"""
    (folder / "program.toml").write_text(text)
    return folder / "program.toml"


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory, corpus, corpus_program) -> Path:
    """The marked corpus prepared through the local source."""
    from trainer.config import LocalSource

    program = load_program(corpus_program)
    src = LocalSource(paths=[str(corpus)], val_fraction=0.2)
    data = tmp_path_factory.mktemp("corpus-data")
    prepare(program, src, data)
    return data


@pytest.fixture(scope="session")
def val_markers() -> set[str]:
    return {doc[:11] for doc in corpus_docs() if is_val(doc, 0.2)}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """tiny-stdlib's data, from ~4 MB of this interpreter's stdlib (a few seconds)."""
    from trainer.config import PythonStdlibSource

    program = load_program(TINY_TOML)
    data = tmp_path_factory.mktemp("tiny-data")
    prepare(program, PythonStdlibSource(val_fraction=0.1, max_bytes=4_000_000), data)
    return data
