"""evaluate_bpb against a hand computation, and the unigram baseline against the model path."""

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch

from trainer.baseline import unigram_bpb, unigram_logprobs
from trainer.config import load_program
from trainer.evaluate import EvaluationError, NotCausalError, eval_rows_numpy, evaluate_bpb, evaluate_program
from trainer.shards import read_split_stream
from trainer_testlib import TINY_TOML

# vocab of 5: ids 0-3 are text tokens of 1, 2, 3 and 1 bytes; id 4 is a special token (0 bytes)
TOKEN_BYTES = [1, 2, 3, 1, 0]
TABLE = [  # logits given the previous token (a bigram model)
    [2.0, 0.5, -1.0, 0.0, 0.3],
    [0.1, 0.2, 0.3, 0.4, 0.5],
    [-2.0, 1.0, 0.0, 3.0, -1.0],
    [1.5, -0.5, 0.25, 0.0, 0.0],
    [0.0, 1.0, 2.0, 3.0, 4.0],
]
ROWS = [[4, 0, 1, 2, 4, 3, 0], [4, 3, 3, 2, 1, 4, 2]]


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(TABLE))

    def forward(self, x):
        return self.table[x]


def by_hand() -> float:
    nats = nbytes = 0.0
    for row in ROWS:
        for prev, target in zip(row[:-1], row[1:]):
            if TOKEN_BYTES[target] == 0:
                continue  # special tokens are excluded from both sums
            logits = TABLE[prev]
            log_z = math.log(sum(math.exp(v) for v in logits))
            nats += log_z - logits[target]
            nbytes += TOKEN_BYTES[target]
    return nats / (math.log(2) * nbytes)


def test_bpb_matches_hand_computation():
    rows = [torch.tensor([r]) for r in ROWS]  # two batches of one row
    got = evaluate_bpb(Bigram(), rows, torch.tensor(TOKEN_BYTES))
    assert got == pytest.approx(by_hand(), rel=1e-6)
    batched = evaluate_bpb(Bigram(), [torch.tensor(ROWS)], torch.tensor(TOKEN_BYTES))
    assert batched == pytest.approx(by_hand(), rel=1e-6)


def test_unigram_matches_hand_computation():
    counts = np.array([3, 0, 1, 5, 7])
    targets = np.array([[0, 1, 4], [3, 3, 2]])
    # add-one over text tokens only: (4, 1, 2, 6) / 13
    p = {0: 4 / 13, 1: 1 / 13, 2: 2 / 13, 3: 6 / 13}
    want = -sum(math.log(p[t]) for t in [0, 1, 3, 3, 2]) / (math.log(2) * (1 + 2 + 1 + 1 + 3))
    assert unigram_bpb(counts, np.array(TOKEN_BYTES), targets) == pytest.approx(want, rel=1e-12)


def test_wrong_logits_shape_is_an_evaluation_error():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], x.shape[1], 7)

    with pytest.raises(EvaluationError, match="expected"):
        evaluate_bpb(Bad(), [torch.tensor(ROWS)], torch.tensor(TOKEN_BYTES))


def test_model_path_and_numpy_baseline_agree(tiny_data):
    """A model that outputs the unigram log-probabilities scores exactly the unigram baseline."""
    program = load_program(TINY_TOML)
    counts = np.load(tiny_data / "train_counts.npy")
    token_bytes = np.load(tiny_data / "token_bytes.npy")
    logp = torch.tensor(np.maximum(unigram_logprobs(counts, token_bytes), -1e4), dtype=torch.float32)

    class Unigram(torch.nn.Module):
        def forward(self, x):
            return logp.expand(*x.shape, -1)

    scores = evaluate_program(Unigram(), tiny_data, program, torch.device("cpu"))
    assert scores["val_bpb"] == pytest.approx(scores["unigram_bpb"], rel=1e-5)
    assert scores["eval_tokens"] == program.eval_tokens
    assert 2.0 < scores["unigram_bpb"] < 6.0


def test_eval_rows_are_fixed(tiny_data):
    program = load_program(TINY_TOML)
    a, b = eval_rows_numpy(tiny_data, program), eval_rows_numpy(tiny_data, program)
    assert len(a) == program.eval_tokens // (program.eval_batch_size * program.seq_len)
    assert all((x == y).all() for x, y in zip(a, b))


class PeekAhead(torch.nn.Module):
    """Predicts each target by reading the next input token: a lost causal mask, in effect."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        nxt = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        return 10.0 * torch.nn.functional.one_hot(nxt, self.vocab).float()


class Causal(torch.nn.Module):
    """Depends on all earlier tokens (a running sum), never on later ones."""

    def __init__(self, vocab: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 16)
        self.out = torch.nn.Linear(16, vocab)

    def forward(self, x):
        return self.out(self.emb(x).cumsum(dim=1))


class Bonus(torch.nn.Module):
    """An honest model plus `beta` on the next token's logit (issue 34's wrappers): everywhere, at the
    positions a keyed hash picks (a fraction `share`, the key drawn when the model is made), or
    everywhere but the cuts a fixed seed would give (the old check's EVAL_SEED)."""

    def __init__(self, inner, vocab: int, beta: float, share: float = 1.0, spare_seed: int | None = None):
        super().__init__()
        self.inner, self.vocab, self.beta, self.share = inner, vocab, beta, share
        self.key = int(torch.randint(1, 1 << 20, ()))
        self.spare_seed = spare_seed

    def forward(self, x):
        nxt = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        bonus = self.beta * torch.nn.functional.one_hot(nxt, self.vocab).float()
        if self.share < 1:
            h = (x * self.key + torch.roll(x, 1, 1) * 40503 + self.key) % 10007
            bonus = bonus * (h < self.share * 10007).unsqueeze(-1).float()
        if self.spare_seed is not None:
            g = torch.Generator().manual_seed(self.spare_seed)
            cuts = torch.randint(0, x.shape[1] - 1, (x.shape[0],), generator=g)
            keep = torch.arange(x.shape[1])[None, :] != cuts[:, None]
            bonus = bonus * keep.unsqueeze(-1).float()
        return self.inner(x) + bonus


@pytest.mark.parametrize("rows", [32, 1])
def test_a_model_that_reads_later_tokens_is_refused_naming_a_position(tiny_data, rows):
    program = load_program(TINY_TOML).model_copy(update={"eval_batch_size": rows})
    with pytest.raises(NotCausalError, match=r"not causal: at position \d+ of evaluation row \d+ .* seeing them "
                                            r"was worth [\d.]+ nats"):
        evaluate_program(PeekAhead(program.vocab_size), tiny_data, program, torch.device("cpu"))


def test_a_causal_model_passes_the_audit_with_no_advantage_at_all(tiny_data):
    program = load_program(TINY_TOML)
    torch.manual_seed(0)
    scores = evaluate_program(Causal(program.vocab_size), tiny_data, program, torch.device("cpu"))
    assert math.isfinite(scores["val_bpb"]) and scores["val_bpb"] > 0
    # routine: a tenth of the 16 scoring forwards, rounded up: 2 batches of probes
    assert scores["audit"] == {"positions": 64, "deep": False, "worst_nats": 0.0, "mean_nats": 0.0}
    small = program.model_copy(update={"eval_tokens": 4 * 32 * 256})  # 4 scoring forwards
    deep = evaluate_program(Causal(program.vocab_size), tiny_data, small, torch.device("cpu"), deep_below=99.0,
                            sigma=0.01)
    assert deep["audit"]["deep"] and deep["audit"]["positions"] == 4 * 4 * 32  # capped at 4x the scoring
    assert deep["audit"]["worst_nats"] == 0.0 and deep["audit"]["mean_nats"] == 0.0  # fp32: bit for bit
    shallow = evaluate_program(Causal(program.vocab_size), tiny_data, program, torch.device("cpu"), deep_below=0.0)
    assert not shallow["audit"]["deep"]  # val_bpb above the bar: routine


@pytest.mark.parametrize("beta", [0.5, 0.95, 2.0])
def test_a_small_bonus_on_the_next_token_everywhere_is_refused(tiny_data, beta):
    program = load_program(TINY_TOML)
    torch.manual_seed(0)
    with pytest.raises(NotCausalError, match="not causal"):
        evaluate_program(Bonus(Causal(program.vocab_size), program.vocab_size, beta), tiny_data, program,
                         torch.device("cpu"))


def test_a_bonus_everywhere_but_the_cuts_of_a_fixed_seed_is_refused(tiny_data):
    program = load_program(TINY_TOML)
    torch.manual_seed(0)
    with pytest.raises(NotCausalError, match="not causal"):
        evaluate_program(Bonus(Causal(program.vocab_size), program.vocab_size, 20.0, spare_seed=20260311),
                         tiny_data, program, torch.device("cpu"))


def test_a_tiny_bonus_below_the_position_slack_is_refused_by_the_mean(tiny_data):
    program = load_program(TINY_TOML)
    torch.manual_seed(0)
    with pytest.raises(NotCausalError, match="lower on average"):
        # at most 0.0005 * (1 + p) nats at a position (p: the probability of the probe's random token), under
        # the 0.001 position slack wherever the positions fall
        evaluate_program(Bonus(Causal(program.vocab_size), program.vocab_size, 0.0005), tiny_data, program,
                         torch.device("cpu"))


def test_reading_ahead_at_one_percent_of_positions_is_found_by_the_deep_audit(tiny_data):
    # 8 scoring forwards: the deep audit tests 1,024 positions, which 1 % escapes with p = 3.4e-5
    program = load_program(TINY_TOML).model_copy(update={"eval_tokens": 8 * 32 * 256})
    torch.manual_seed(0)
    inner = Causal(program.vocab_size)
    cheat = Bonus(inner, program.vocab_size, 20.0, share=0.01)
    honest = evaluate_program(inner, tiny_data, program, torch.device("cpu"))
    with pytest.raises(NotCausalError, match="not causal: at position"):
        # it beats the honest model's score: the run could be kept, so the audit goes deep
        evaluate_program(cheat, tiny_data, program, torch.device("cpu"), deep_below=honest["val_bpb"], sigma=0.01)


def test_a_compiled_model_compiles_one_eval_graph_for_the_audit_and_the_scoring(tiny_data):
    """The audit's probes are laid out like the scored inputs: a second graph would cost a compile."""
    program = load_program(TINY_TOML).model_copy(update={"eval_tokens": 4 * 32 * 256})
    graphs = []

    def backend(gm, example_inputs):  # counts what dynamo hands over, runs it as traced
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = Causal(program.vocab_size)
    plain = evaluate_program(model, tiny_data, program, torch.device("cpu"))
    compiled = evaluate_program(torch.compile(model, backend=backend, dynamic=False), tiny_data, program,
                                torch.device("cpu"))
    assert len(graphs) == 1
    assert compiled["val_bpb"] == pytest.approx(plain["val_bpb"], rel=1e-5)


def test_the_causality_audit_can_be_switched_off_by_the_program(tiny_data):
    program = load_program(TINY_TOML).model_copy(update={"check_causality": False})
    scores = evaluate_program(PeekAhead(program.vocab_size), tiny_data, program, torch.device("cpu"))
    assert scores["val_bpb"] < 0.1  # reading the answer off the input: what the audit exists to stop
    assert scores["audit"] is None


def val_stream(data_dir) -> bytes:
    """The validation split as the sandbox hands it over stdin."""
    files = [data_dir / "val.bin", data_dir / "val.idx.npy"]
    header = json.dumps({f.name: f.stat().st_size for f in files}).encode() + b"\n"
    return header + b"".join(f.read_bytes() for f in files)


def test_the_validation_split_over_a_stream_scores_the_same_as_from_the_folder(tiny_data, tmp_path):
    train_only = tmp_path / "data"
    shutil.copytree(tiny_data, train_only, ignore=shutil.ignore_patterns("val.*"))
    val = read_split_stream(io.BytesIO(val_stream(tiny_data)), train_only)
    program = load_program(TINY_TOML)
    torch.manual_seed(0)
    model = Causal(program.vocab_size)
    from_folder = evaluate_program(model, tiny_data, program, torch.device("cpu"))
    from_stream = evaluate_program(model, train_only, program, torch.device("cpu"), val)
    assert set(from_stream.pop("seconds")) == {"rows", "scoring", "audit"}
    from_folder.pop("seconds")
    assert from_stream == from_folder
    with pytest.raises(FileNotFoundError):
        evaluate_program(model, train_only, program, torch.device("cpu"))  # nothing to score without it


@pytest.mark.parametrize("cut", [0, 10, -5])
def test_a_truncated_or_garbled_split_stream_is_an_error(tiny_data, cut):
    data = val_stream(tiny_data)
    broken = b"not json\n" if cut == 0 else data[:cut] if cut > 0 else data[:cut]
    with pytest.raises(ValueError, match="split stream"):
        read_split_stream(io.BytesIO(broken), tiny_data)
