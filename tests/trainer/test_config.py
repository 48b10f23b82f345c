"""program.toml loading: the shipped programs load; every kind of mistake names file and field."""

import subprocess

import pytest

from trainer_testlib import PROGRAMS, PYTHON, REPO
from trainer.config import ClimbmixSource, ProgramConfigError, PythonStdlibSource, load_program, set_top_level

GOOD = """
name = "t"
seq_len = 128
vocab_size = 512
eval_batch_size = 2
eval_tokens = 1024
device = "cpu"

[data]
kind = "python-stdlib"
"""


def write(tmp_path, text):
    path = tmp_path / "program.toml"
    path.write_text(text)
    return path


def test_shipped_programs_load():
    tiny = load_program(PROGRAMS / "tiny-stdlib" / "program.toml")
    assert tiny.device == "cpu" and tiny.budget_s == 60 and isinstance(tiny.data, PythonStdlibSource)
    gpt = load_program(PROGRAMS / "gpt-climbmix" / "program.toml")
    assert (gpt.device, gpt.seq_len, gpt.vocab_size, gpt.budget_s) == ("cuda", 2048, 8192, 300)
    assert isinstance(gpt.data, ClimbmixSource) and gpt.data.val_shard == 6542


def test_defaults_and_frozen(tmp_path):
    cfg = load_program(write(tmp_path, GOOD))
    assert cfg.budget_s == 300 and cfg.untimed_steps == 10
    with pytest.raises(ValueError):
        cfg.budget_s = 1


@pytest.mark.parametrize("edit, field, words", [
    (lambda t: t.replace('seq_len = 128\n', ''), "seq_len", "required field is missing"),
    (lambda t: t.replace('seq_len = 128', 'seq_len = "long"'), "seq_len", "integer"),
    (lambda t: t + '', None, None),
    (lambda t: t.replace('name = "t"', 'name = "t"\nbudget_sec = 5'), "budget_sec", "unknown field"),
    (lambda t: t.replace('device = "cpu"', 'device = "tpu"'), "device", "'cuda' or 'cpu'"),
    (lambda t: t.replace('eval_tokens = 1024', 'eval_tokens = 100'), "eval_tokens", "eval batch"),
    (lambda t: t.replace('kind = "python-stdlib"', 'kind = "ftp"'), "data", "'local'"),
    (lambda t: t + "max_bytes = -3\n", "data.max_bytes", "greater than or equal to 1"),
    (lambda t: t.replace('vocab_size = 512', 'vocab_size = 100'), "vocab_size", "greater than"),
])
def test_bad_field_names_file_and_field(tmp_path, edit, field, words):
    path = write(tmp_path, edit(GOOD))
    if field is None:
        load_program(path)  # the unedited file is valid
        return
    with pytest.raises(ProgramConfigError) as info:
        load_program(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field and err.path == str(path)
    assert str(path) in str(err) and f"field '{field}'" in str(err) and words in str(err)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ProgramConfigError, match="file not found"):
        load_program(tmp_path / "nope.toml")
    path = write(tmp_path, 'name = "t"\nseq_len = [1,\n')
    with pytest.raises(ProgramConfigError, match="not valid TOML") as info:
        load_program(path)
    assert str(path) in str(info.value)


def test_config_import_pulls_in_neither_torch_nor_numpy():
    code = ("import sys, trainer, trainer.config; "
            "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_set_top_level_replaces_only_top_level_keys():
    text = 'name = "x"\nbudget_s = 300\nseed = 42\n[data]\nseed = 7\nkind = "local"\n'
    assert set_top_level(text, budget_s=7.0, seed=43) == (
        'name = "x"\nbudget_s = 7.0\nseed = 43\n[data]\nseed = 7\nkind = "local"\n')
    assert set_top_level('name = "x"\n[data]\nkind = "local"\n', seed=5) == 'seed = 5\nname = "x"\n[data]\nkind = "local"\n'
    assert set_top_level('name = "x"\n', budget_s=None) == 'name = "x"\n'
