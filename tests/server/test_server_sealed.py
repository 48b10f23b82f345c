"""Sealed scoring against hostile code (issue 18): train.py files written to cheat, run through the official
MCP client on the docker backend, and hostile artifacts handed to the scorer's container. None changes
the recorded score, none finds a validation token, and each is refused or scored honestly."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mcp import Client
from server_helpers import ledger_rows, open_dir

from sandbox.gpus import Lease
from sandbox.runio import disk_usage

from server.app import build_server
from server.lab import Lab
from server.phases import Phases
from trainer.contract import parse_score_output

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

TRAIN = (Path(__file__).resolve().parents[2] / "programs" / "tiny-stdlib" / "train.py").read_text()
LOOP_END = "trainer.submit(model, attention=[(MODEL_DIM, SEQ_LEN)] * DEPTH)\n"


async def run_with(client: Client, text: str, description: str) -> dict:
    """Replace train.py with `text` through apply_patch (unless it is that already), then run it; the
    tool's structured result."""
    old = (await client.call_tool("read_train", {})).structured_content["text"]
    if old != text:
        diff = "".join(difflib.unified_diff(old.splitlines(keepends=True), text.splitlines(keepends=True),
                                            "a/train.py", "b/train.py"))
        patched = await client.call_tool("apply_patch", {"diff": diff})
        assert not patched.is_error, patched.content
    result = await client.call_tool("run_experiment", {"description": description})
    assert not result.is_error, result.content
    return result.structured_content


@pytest.fixture
async def client(make_lab, tiny_data, lab_containers, request):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data), **getattr(request, "param", {}))
    async with Client(build_server(root, stdio_agent="alice"), read_timeout_seconds=600) as c:
        c.lab_root = root
        yield c
    assert lab_containers() == []  # both phases' containers are gone


FORGE = """
import json, os
result = {"status": "ok", "val_bpb": 0.001, "training_seconds": 4.0, "total_seconds": 5.0, "num_steps": 999}
with open("/out/result.json", "w") as f:
    json.dump(result, f)
print("val_bpb:          0.001000", flush=True)
os._exit(0)
"""


async def test_a_forged_result_written_before_os_exit_scores_nothing(client):
    result = await run_with(client, TRAIN.replace(LOOP_END, FORGE), "forge result.json and exit")
    assert result["val_bpb"] is None and result["status"] == "unscorable" and not result["kept"]
    assert "export is unusable" in result["reason"]


PATCH_EVALUATOR = """
import trainer.evaluate, trainer.run
trainer.evaluate.evaluate_bpb = lambda *a, **k: 0.001
trainer.evaluate.evaluate_program = lambda *a, **k: {"val_bpb": 0.001, "unigram_bpb": 9.0, "eval_tokens": 1,
                                                     "seconds": {}}
trainer.run.score_in_process = lambda run, device, result, val: result.update(val_bpb=0.001)
print("val_bpb:          0.001000", flush=True)
"""


async def test_a_monkeypatched_evaluator_and_a_printed_score_change_nothing(client):
    result = await run_with(client, TRAIN.replace(LOOP_END, PATCH_EVALUATOR + LOOP_END), "patch the evaluator")
    assert result["status"] == "ok" and result["verified"] is True
    assert 1.5 < result["val_bpb"] < 4.0  # the honest score of a 4-s model, from the scorer's container
    log = (await client.call_tool("get_log", {"run_id": result["run_id"], "lines": 400})).structured_content["text"]
    assert "--- score phase (trusted scorer) ---" in log and f"val_bpb {result['val_bpb']:.6f}" in log


PATCH_SUBMIT = """
import json, os, trainer, trainer.api

def fake_submit(model, attention=None):
    with open("/out/result.json", "w") as f:
        json.dump({"status": "ok", "val_bpb": 0.001}, f)
    os._exit(0)

trainer.submit = trainer.api.submit = fake_submit
"""


async def test_a_replaced_submit_scores_nothing(client):
    result = await run_with(client, TRAIN.replace(LOOP_END, PATCH_SUBMIT + LOOP_END), "replace trainer.submit")
    assert result["val_bpb"] is None and result["status"] in ("unscorable", "crash")


READS_AHEAD = """
import random
from trainer.evaluate import EVAL_SEED


class ReadsAhead(nn.Module):
    \"\"\"Issue 34's wrappers: `beta` added to the next token's logit, read off the input; at a share of
    positions a keyed hash picks (the key drawn as train.py runs), or everywhere but the cuts that the
    old check drew from EVAL_SEED.\"\"\"

    def __init__(self, inner, beta, share=1.0, spare_old_cuts=False):
        super().__init__()
        self.inner, self.beta, self.share = inner, beta, share
        self.key = random.randrange(1, 1 << 20)
        spare = torch.ones(EVAL_ROWS, SEQ_LEN)
        if spare_old_cuts:
            cuts = torch.randint(0, SEQ_LEN - 1, (EVAL_ROWS,), generator=torch.Generator().manual_seed(EVAL_SEED))
            spare[torch.arange(SEQ_LEN)[None, :] <= cuts[:, None]] = 0.0
        self.register_buffer("spare", spare)

    def forward(self, x):
        logits = self.inner(x)
        nxt = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        bonus = self.beta * F.one_hot(nxt, logits.shape[-1]).to(logits.dtype) * self.spare.unsqueeze(-1)
        if self.share < 1:
            h = (x * self.key + torch.roll(x, 1, 1) * 40503 + self.key) % 10007
            bonus = bonus * (h < int(self.share * 10007)).unsqueeze(-1).to(logits.dtype)
        return logits + bonus


EVAL_ROWS = cfg.eval_batch_size
model = ReadsAhead(model, {beta}, {share}, {spare})
"""


async def test_a_model_that_reads_ahead_is_invalid_never_kept(client):
    """Issue 34's attacks through the normal run path: reading ahead at 1 % of positions picked by a key
    drawn as train.py runs, a bonus on the next token at every position under the old check's
    tolerance (0.95), and a large one everywhere but the old check's fixed cuts. alice has no best, so
    each could be kept: the audit is deep. (0.5 and 2.0: tests/trainer/test_evaluate.py.)"""
    results = {}
    for what, beta, share, spare in [("1 % of positions", 30.0, 0.01, False), ("+0.95 everywhere", 0.95, 1.0, False),
                                     ("+30 around the old check's cuts", 30.0, 1.0, True)]:
        code = READS_AHEAD.format(beta=beta, share=share, spare=spare)
        results[what] = await run_with(client, TRAIN.replace(LOOP_END, code + LOOP_END), f"reads ahead: {what}")
    for what, result in results.items():
        assert result["status"] == "invalid" and not result["kept"] and result["val_bpb"] is None, (what, result)
        assert "not causal" in result["reason"] and "drawn at random" in result["reason"], (what, result["reason"])
    assert [r.decision for r in ledger_rows(client.lab_root)] == ["invalid"] * 3


def needle(data: Path, split: str, avoid: Path | None = None) -> tuple[str, str]:
    """64 bytes of a split's tokens as two hex halves (the whole never sits in train.py's memory),
    found nowhere in `avoid`."""
    raw = (data / f"{split}.bin").read_bytes()
    other = avoid.read_bytes() if avoid else b""
    for start in range(len(raw) // 3, len(raw) - 64, 4096):
        window = raw[start:start + 64]
        if window not in other and len(set(window)) > 16:
            return window[:32].hex(), window[32:].hex()
    raise AssertionError(f"no distinctive window in {split}.bin")


HUNT = """
import gc, os, sys, inspect
A_VAL, B_VAL = bytes.fromhex("{va}"), bytes.fromhex("{vb}")
A_TRAIN, B_TRAIN = bytes.fromhex("{ta}"), bytes.fromhex("{tb}")

def holds(blob, a, b):
    i = blob.find(a)
    while i >= 0:
        if blob[i + 32:i + 64] == b:
            return True
        i = blob.find(a, i + 1)
    return False

def scan_memory(a, b):
    hits = 0
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            for at in range(lo, hi, 1 << 26):  # 64 MB at a time, overlapping by a needle
                try:
                    mem.seek(at)
                    hits += holds(mem.read(min(hi - at, (1 << 26) + 64)), a, b)
                except (OSError, ValueError, OverflowError):
                    break
    return hits

train_tokens = open("/data/train.bin", "rb").read()  # the control: this needle must be found
found = []
found += ["/data:" + n for n in os.listdir("/data") if n.startswith("val")]
stdin = sys.stdin.buffer.read() if not sys.stdin.closed else b""
found += ["stdin"] if stdin else []
found += ["env:" + k for k, v in os.environ.items() if holds(v.encode(errors="ignore"), A_VAL, B_VAL)]
frame = inspect.currentframe()
while frame is not None:
    for name, value in list(frame.f_locals.items()):
        blob = getattr(value, "tokens", value)
        blob = blob.tobytes() if hasattr(blob, "tobytes") else blob
        if isinstance(blob, (bytes, bytearray)) and holds(blob, A_VAL, B_VAL):
            found.append("frame:" + frame.f_code.co_name + "." + name)
    frame = frame.f_back
for obj in gc.get_objects():
    if type(obj).__name__ in ("TokenSplit", "ndarray") and hasattr(obj, "tobytes"):
        if holds(obj.tobytes(), A_VAL, B_VAL):
            found.append("gc:" + type(obj).__name__)
found += ["memory"] if scan_memory(A_VAL, B_VAL) else []
control = scan_memory(A_TRAIN, B_TRAIN)
print(f"hunt: searched /data, stdin, env, frames, gc, /proc/self/mem; found {{found}}; control hits {{control}}",
      flush=True)
"""


async def test_no_read_of_data_stdin_env_frames_gc_or_memory_finds_a_validation_token(client, tiny_data):
    va, vb = needle(tiny_data, "val", avoid=tiny_data / "train.bin")
    ta, tb = needle(tiny_data, "train")
    hunt = HUNT.format(va=va, vb=vb, ta=ta, tb=tb)
    result = await run_with(client, TRAIN.replace("loader = trainer.train_loader", hunt + "loader = trainer.train_loader"),
                            "hunt for validation tokens")
    assert result["status"] == "ok" and 1.5 < result["val_bpb"] < 4.0
    log = (await client.call_tool("get_log", {"run_id": result["run_id"], "lines": 400})).structured_content["text"]
    line = next(ln for ln in log.splitlines() if ln.startswith("hunt: searched"))
    assert "found []" in line, line
    assert int(line.rsplit("control hits ", 1)[1]) >= 1, line  # the scan works: it finds a train window


SLIDE = """
import time, trainer.api
run = trainer.api.current()
real_start = None
"""
SLIDE_STEP = """    if real_start is None and run.clock_start is not None:
        real_start = time.monotonic()
    if real_start is not None and time.monotonic() - real_start < 15:
        run.clock_start = time.monotonic() - 0.5  # the harness's clock says half a second has passed
    if not trainer.step(loss):"""


@pytest.mark.parametrize("client", [{"min_time_slack_s": 5.0}], indirect=True)  # the product's slack
async def test_sliding_the_harness_clock_is_refused(client):
    baseline = await run_with(client, TRAIN, "the baseline, unmodified: the lab's time reference")
    assert baseline["status"] == "ok", baseline
    text = TRAIN.replace("loader = trainer.train_loader", SLIDE + "loader = trainer.train_loader")
    text = text.replace("    if not trainer.step(loss):", SLIDE_STEP)
    result = await run_with(client, text, "slide the clock start")
    assert result["status"] == "invalid" and result["val_bpb"] is None and not result["kept"]
    assert "outside the clock" in result["reason"], result["reason"]
    row = ledger_rows(client.lab_root)[-1]
    assert row.train_phase_seconds > 15 and row.decision == "invalid"


@pytest.mark.parametrize("client", [{"min_time_slack_s": 5.0}], indirect=True)  # the product's slack
async def test_a_slow_start_ratchet_widens_no_allowance(client):
    """Ten runs, each starting its clock 1.2 s later than the last (time the host cannot tell from
    training): judged against the lab's baseline run, never the agent's own recent runs, none gains
    more than the 5-s allowance, however its predecessors drifted (issue 34)."""
    baseline = await run_with(client, TRAIN, "the baseline, unmodified")
    assert baseline["status"] == "ok", baseline
    outcomes = []
    for k in range(1, 11):
        hidden = round(1.2 * k, 1)
        text = TRAIN.replace("import torch\n", f"import torch\nimport time as _t\n_t.sleep({hidden})\n", 1)
        result = await run_with(client, text, f"start the clock {hidden} s later")
        outcomes.append((hidden, result["status"], result["reason"]))
    for hidden, status, reason in outcomes:
        assert status in ("ok", "invalid"), outcomes
        if status == "invalid":
            assert "outside the clock" in reason and "baseline" in reason, reason
    rows = ledger_rows(client.lab_root)  # what passed started at most 5 s after the baseline did
    if rows[0].startup_seconds < 20:  # a baseline start not slowed by much on a loaded box: the drift is caught
        assert all(status == "invalid" for hidden, status, _ in outcomes if hidden >= 10.8), outcomes
    base_start = rows[0].startup_seconds
    assert all(r.startup_seconds - base_start <= 5.0 + 1e-3 for r in rows[1:] if r.status == "ok"), \
        [(r.run_id, r.status, r.startup_seconds) for r in rows]


HOARD = """
import os
with open("/out/hoard.bin", "wb") as f:  # left in the run's folder, kept forever before issue 34
    f.write(os.urandom(1 << 20) * 48)
os.makedirs("/cache/junk", exist_ok=True)
with open("/cache/junk/hoard.bin", "wb") as f:
    f.write(bytes(24 << 20))
"""


@pytest.mark.parametrize("client", [{"agent_cache_gb": 0.01}], indirect=True)
async def test_what_a_run_leaves_is_trimmed_and_its_cache_is_bounded(client):
    first = await run_with(client, TRAIN.replace(LOOP_END, HOARD + LOOP_END), "fill the lab's disk")
    assert first["status"] == "ok", first
    run_dir = client.lab_root / "runs" / first["run_id"]
    kept = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert {"train.py", "log.txt", "score-log.txt", "out/result.json", "out/progress.jsonl"} <= set(kept), kept
    assert not any(k.startswith(("artifact", "score-out", "out/model")) or "hoard" in k for k in kept), kept
    assert disk_usage([run_dir]) < 8 << 20
    got = await client.call_tool("get_experiment", {"run_id": first["run_id"]})
    assert not got.is_error and got.structured_content["result"]["val_bpb"] == first["val_bpb"]  # the books read on
    hoard = client.lab_root / "cache" / "alice" / "junk" / "hoard.bin"
    assert hoard.stat().st_size == 24 << 20  # a compile cache is kept from run to run...
    second = await run_with(client, TRAIN, "honest")
    assert second["status"] == "ok" and not hoard.exists()  # ...but emptied before the next once past 10 MB


# -- hostile artifacts: the scorer's container refuses them before anything in them runs ------------


class Pwn:
    def __reduce__(self):
        return (exec, ("open('/out/pwned', 'w').write('ran')",))


def genuine_export(folder: Path, vocab: int, seq_len: int, rows: int) -> None:
    from trainer.artifact import export_model  # noqa: PLC0415

    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    export_model(model, torch.zeros((rows, seq_len), dtype=torch.long), folder)


def pickle_weights(folder: Path) -> None:
    import pickle  # noqa: PLC0415

    (folder / "weights.safetensors").write_bytes(pickle.dumps(Pwn()))


def extra_pickle(folder: Path) -> None:
    import pickle  # noqa: PLC0415

    (folder / "data.pkl").write_bytes(pickle.dumps(Pwn()))


def forbidden_op(folder: Path) -> None:
    graph = json.loads((folder / "model.json").read_text())
    text = json.dumps(graph).replace('"torch.ops.aten.linear.default"', '"builtins.exec"', 1)
    assert "builtins.exec" in text
    (folder / "model.json").write_text(text)


@pytest.mark.parametrize("spoil", [pickle_weights, extra_pickle, forbidden_op])
async def test_a_hostile_artifact_is_refused_and_runs_nothing(make_lab, tiny_data, lab_containers, spoil):
    root = make_lab(backend="docker", data_dir=open_dir(tiny_data))
    lab = Lab(root)
    try:
        from server.runtime import make_runtime  # noqa: PLC0415

        backend, _ = make_runtime(lab)
        program = lab.program()
        run_dir = lab.run_dir("alice-0001")
        run_dir.mkdir(parents=True)
        (run_dir / "program.toml").write_bytes(lab.program_toml.read_bytes())
        genuine_export(run_dir / "artifact", program.vocab_size, program.seq_len, program.eval_batch_size)
        spoil(run_dir / "artifact")
        open_dir(run_dir)
        spec = Phases(lab, backend, lab.config.backend.image).score_spec("alice-0001", "alice", Lease("cpu-0", None))
        outcome = await backend.run(spec)
        answer = parse_score_output(spec.log_path.read_text())
        assert outcome.status == "ok" and answer.status == "invalid" and answer.val_bpb is None, answer
        assert not (spec.output_dir / "pwned").exists()  # the payload never ran
        print(f"{spoil.__name__}: {answer.reason}")
    finally:
        lab.close()
    assert lab_containers() == []


def test_needles_differ_between_splits(tiny_data):
    """The hunt's two needles are distinct token windows of each split (a sanity check of the test itself)."""
    va, vb = needle(tiny_data, "val", avoid=tiny_data / "train.bin")
    assert bytes.fromhex(va + vb) not in (tiny_data / "train.bin").read_bytes()
    assert np.frombuffer(bytes.fromhex(va + vb), dtype=np.uint8).size == 64


def test_a_gpu_run_must_have_seen_its_lease_s_gpu():
    from sandbox.gpus import uuid_of  # noqa: PLC0415
    from server.phases import gpu_mismatch  # noqa: PLC0415

    lease = "GPU-244e2aef-a1e5-bf0f-393e-2ab668d83d24"
    assert gpu_mismatch(lease, lease.upper()) is None and gpu_mismatch(None, lease) is None
    assert gpu_mismatch(lease, None) is None  # a CPU program on a GPU slot reports none
    said = gpu_mismatch(lease, "GPU-00000000-0000-0000-0000-000000000000")
    assert said and lease in said and "GPU-00000000" in said
    assert uuid_of(lease) == lease and uuid_of(None) is None
    assert uuid_of("0") is None  # this host's driver lists no GPU
