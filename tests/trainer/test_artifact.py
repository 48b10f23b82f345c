"""The export that travels from the train phase to the scorer: the same weights score the same sealed
as in-process; a model that cannot be exported, or calls an op the scorer does not know, is unscorable;
a model that peeks ahead is refused on the exported graph. (Hostile artifacts, a pickle payload or a
forbidden op, are scored in containers: tests/server/test_server_sealed.py.)"""

from __future__ import annotations

import types

import pytest
import torch

from trainer import ops
from trainer.artifact import (ArtifactInvalid, ArtifactUnscorable, ExportFailed, _save_tensors, check_targets, export_model,
                              load_model)
from trainer.config import load_program
from trainer.evaluate import NotCausalError, evaluate_program
from trainer_testlib import PROGRAMS, TINY_TOML, derive_program, mini, score_export


def tiny_gpt(vocab: int, seq_len: int) -> torch.nn.Module:
    """tiny-stdlib's own GPT class, from its train.py (the model section only, no training)."""
    source = (PROGRAMS / "tiny-stdlib" / "train.py").read_text().split("# Optimizer and schedule")[0]
    fake = types.SimpleNamespace(program=lambda: types.SimpleNamespace(vocab_size=vocab, seq_len=seq_len, device="cpu"))
    scope: dict = {"__name__": "tiny"}
    import sys  # noqa: PLC0415

    real, sys.modules["trainer"] = sys.modules.get("trainer"), fake
    try:
        exec(compile(source, "train.py", "exec"), scope)
    finally:
        sys.modules["trainer"] = real
    torch.manual_seed(0)
    model = scope["GPT"](vocab, 128, 3, 4, seq_len)
    for p in model.parameters():  # weights away from the init (zeros there would hide a wiring error)
        p.data.add_(0.02 * torch.randn_like(p))
    return model


def test_the_same_weights_score_the_same_sealed_and_in_process(tmp_path, tiny_data):
    program = load_program(TINY_TOML).model_copy(update={"eval_tokens": 8 * 32 * 256})
    model = tiny_gpt(program.vocab_size, program.seq_len).eval()
    device = torch.device("cpu")
    in_process = evaluate_program(model, tiny_data, program, device)["val_bpb"]
    export_model(model, torch.zeros((program.eval_batch_size, program.seq_len), dtype=torch.long), tmp_path / "m")
    sealed = evaluate_program(load_model(tmp_path / "m", device, ops.trusted_ops()), tiny_data, program, device)
    print(f"tiny-stdlib weights: in-process {in_process:.8f}, sealed {sealed['val_bpb']:.8f}")
    assert sealed["val_bpb"] == pytest.approx(in_process, abs=1e-6)


LOOP = mini("""
        if not trainer.step(loss):
            break
    """)


def wrapped_run(tmp_path, tiny_data, wrapper: str, head: str = "") -> tuple[dict, object]:
    """The harness on MINI's model, submitted inside `wrapper` (class Wrapped(inner)); (result, program)."""
    from trainer import run as harness  # noqa: PLC0415

    program = derive_program(TINY_TOML, tmp_path / "program.toml", budget_s=1, untimed_steps=1)
    train = tmp_path / "train.py"
    train.write_text(head + LOOP + f"""
class Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        {wrapper}

trainer.submit(Wrapped(model))
""")
    return harness.execute(program, train, tiny_data, tmp_path / "out"), program


def test_a_model_with_data_dependent_control_flow_is_unscorable_with_a_hint(tmp_path, tiny_data):
    result, _ = wrapped_run(tmp_path, tiny_data, "logits = self.inner(x)\n        "
                            "return logits if logits.sum() > 0 else -logits  # a Python branch on a tensor's value")
    assert result["status"] == "unscorable" and "torch.export failed" in result["reason"]
    assert "no Python branches on tensor values" in result["reason"]  # the hint says what to change
    assert result["traceback_tail"] and not (tmp_path / "out" / "model").exists()


def test_an_op_of_train_pys_own_is_unscorable_naming_it(tmp_path, tiny_data):
    result, program = wrapped_run(tmp_path, tiny_data, "return twice(self.inner(x))", head="""
import torch

@torch.library.custom_op("mine::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2

twice.register_fake(lambda x: torch.empty_like(x))
""")
    assert result["status"] == "ok"  # it exports: the op is named in the graph
    scores = score_export(tmp_path / "out", program, tiny_data)
    assert scores["status"] == "unscorable" and "mine.twice.default" in scores["reason"]
    assert "trainer.ops" in scores["reason"] and scores["val_bpb"] is None


def test_a_model_that_peeks_ahead_is_refused_on_its_exported_graph(tmp_path, tiny_data):
    program = load_program(TINY_TOML).model_copy(update={"eval_tokens": 32 * 256})

    class Peek(torch.nn.Module):  # sees the next token: would score near zero
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(program.vocab_size, program.vocab_size)

        def forward(self, x):
            return self.embed(torch.roll(x, -1, dims=1)) * 10

    export_model(Peek(), torch.zeros((program.eval_batch_size, program.seq_len), dtype=torch.long), tmp_path / "m")
    model = load_model(tmp_path / "m", torch.device("cpu"), ops.trusted_ops())
    with pytest.raises(NotCausalError, match="not causal"):
        evaluate_program(model, tiny_data, program, torch.device("cpu"))


class Remembers(torch.nn.Module):
    """Keeps the last tokens it was shown: a later call could read a row's future from them."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)
        self.register_buffer("seen", torch.zeros(2, 8, dtype=torch.long))

    def forward(self, x):
        self.seen.copy_(x)
        return self.embed(x)


class Dice(torch.nn.Module):
    def __init__(self, vocab: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)

    def forward(self, x):
        h = self.embed(x)
        return h + torch.rand_like(h)


@pytest.mark.parametrize(("model", "why"), [(Remembers, "writes to seen"), (Dice, "draws random numbers")])
def test_a_forward_that_keeps_state_or_draws_random_numbers_is_not_exported(tmp_path, model, why):
    with pytest.raises(ExportFailed, match=why):
        export_model(model(), torch.zeros((2, 8), dtype=torch.long), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_hand_made_graph_that_writes_in_place_is_refused_by_the_scorer(tmp_path):
    """The harness exports functional graphs; an artifact written by other means (the training IR, whose
    copy_ writes the buffer in place) is refused before it runs."""
    from torch._export.serde.serialize import serialize  # noqa: PLC0415

    with torch.no_grad():
        program = torch.export.export(Remembers().eval(), (torch.zeros((2, 8), dtype=torch.long),), strict=False)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.json").write_bytes(serialize(program, serialize_state_dict=False, serialize_constants=False,
                                                  serialize_example_inputs=False).exported_program)
    _save_tensors({f"{'param' if k in program.graph_signature.parameters else 'state'}:{k}": v
                   for k, v in program.state_dict.items()}, folder / "weights.safetensors")
    with pytest.raises(ArtifactInvalid, match="aten.copy_.default, which writes into a tensor in place"):
        load_model(folder, torch.device("cpu"), ops.trusted_ops())


def test_the_op_check_sorts_targets_into_allowed_forbidden_and_unknown():
    trusted = ops.trusted_ops()
    check_targets({"torch.ops.aten.linear.default", "_operator.getitem", "torch.ops.trainer.window_attention.default"},
                  trusted)
    for forbidden in ("builtins.open", "os.system", "torch.ops.aten.from_file.default", "#custom"):
        with pytest.raises(ArtifactInvalid):
            check_targets({forbidden}, trusted)
    with pytest.raises(ArtifactUnscorable, match="gpt.window_attention"):
        check_targets({"torch.ops.gpt.window_attention.default"}, trusted)


def test_trainer_ops_match_plain_pytorch_on_cpu():
    x = torch.randn(2, 16, 2, 8)
    full = ops.window_attention(x, x, x, 16)
    band = ops.window_attention(x, x, x, 4)
    assert full.shape == band.shape == x.shape and not torch.allclose(full, band)
    h = torch.randn(3, 5, 8)
    w_fc, w_proj = torch.randn(32, 8), torch.randn(8, 32)
    want = torch.nn.functional.relu(h @ w_fc.t()).square() @ w_proj.t()
    assert torch.allclose(ops.relu2_mlp(h, w_fc, w_proj), want, atol=1e-5)
