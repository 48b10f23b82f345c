"""On the GPU (run on the device machine: pytest -m gpu tests/trainer): pinned transfers, BPB, MFU,
trainer.ops' attention on cuDNN against a dense band mask, its fused MLP against PyTorch's, and
gpt-climbmix's model scored sealed (exported, trusted ops) against in-process."""

import importlib.util
import json
import subprocess

import pytest
import torch

from trainer.config import load_program
from trainer.evaluate import evaluate_program
from trainer.loader import TrainLoader
from trainer.shards import open_split
from trainer_testlib import (PROGRAMS, PYTHON, REPO, RESULT_KEYS, TINY_TOML, derive_program, mini, scaled_climbmix,
                             score_export)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_cuda():
    assert torch.cuda.is_available(), "gpu tests need an NVIDIA GPU: run them on the device machine"


def test_cuda_batches_equal_cpu_batches_while_pinned_buffers_rotate(corpus_data):
    split = open_split(corpus_data, "train")
    cpu = TrainLoader(split, batch_size=8, seq_len=64, seed=5, device="cpu")
    gpu = TrainLoader(split, batch_size=8, seq_len=64, seed=5, device="cuda")
    try:
        # no synchronisation between batches: 40 copies in flight over 3 pinned buffers
        on_gpu = [next(gpu) for _ in range(40)]
        for gx, gy in on_gpu:
            x, y = next(cpu)
            assert gx.is_cuda and gx.dtype == torch.int64
            assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
    finally:
        cpu.close()
        gpu.close()


def test_bpb_on_cuda_matches_cpu(tiny_data):
    program = load_program(TINY_TOML)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(program.vocab_size, 32),
                                torch.nn.Linear(32, program.vocab_size))
    on_cpu = evaluate_program(model, tiny_data, program, torch.device("cpu"))
    on_gpu = evaluate_program(model.cuda(), tiny_data, program, torch.device("cuda"))
    assert on_gpu["val_bpb"] == pytest.approx(on_cpu["val_bpb"], rel=1e-4)
    assert on_gpu["unigram_bpb"] == on_cpu["unigram_bpb"]


def test_harness_reports_gpu_memory_and_mfu(tmp_path, tiny_data):
    from trainer import run as harness

    program = derive_program(TINY_TOML, tmp_path / "program.toml", budget_s=3, untimed_steps=1,
                             device="cuda", autocast="bfloat16")
    train = tmp_path / "train.py"
    train.write_text(mini("""
        if not trainer.step(loss):
            break
    """).replace("opt = torch.optim", "model = model.cuda()\nopt = torch.optim") + "trainer.submit(model)\n")
    result = harness.execute(program, train, tiny_data, tmp_path / "out")
    assert set(result) >= RESULT_KEYS and result["status"] == "ok", result
    assert result["peak_memory_mb"] > 0 and score_export(tmp_path / "out", program, tiny_data)["val_bpb"] > 0
    assert result["gpu_uuid"] == f"GPU-{torch.cuda.get_device_properties(0).uuid}"
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        assert result["mfu_percent"] is not None and 0 < result["mfu_percent"] < 100
    print(json.dumps(result))


def first_two_losses(program, train, data, out, says: str, hide: str = "") -> list:
    """Run train.py through the harness (`hide`: Python run first, e.g. to hide a module); check it
    ended ok and its stdout `says` so; the losses of steps 1 and 2."""
    argv = ["trainer.run", "--program", str(program), "--train", str(train), "--data", str(data), "--out", str(out)]
    proc = subprocess.run([PYTHON, "-c", f"import runpy, sys; {hide}sys.argv = {argv!r}; "
                           "runpy.run_module('trainer.run', run_name='__main__')"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok", result["traceback_tail"] or proc.stderr[-3000:]
    assert says in proc.stdout
    lines = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    by_step = {line["step"]: line["loss"] for line in lines if line["phase"] == "train" and line["loss"]}
    # steps 1-3 are always logged, each with the loss of the step before (read one step late)
    return [by_step.get(step) for step in (2, 3)]


def test_gpt_climbmix_windows_on_cudnn_train_like_the_dense_mask(tmp_path, tiny_data):
    """trainer.ops' sliding windows on cuDNN's band mask (the cuDNN frontend, pyproject's gpu extra)
    train the same model as its fallback, SDPA with a dense band mask: the first two losses agree. Scaled down: two
    layers of two heads, a 128-token window in the first (cuDNN or the dense mask), a full window in the
    second (SDPA)."""
    assert importlib.util.find_spec("cudnn"), "needs nvidia-cudnn-frontend (pyproject's gpu extra)"
    train = scaled_climbmix(tmp_path / "train.py", DEPTH=2, ASPECT_RATIO=128, TOTAL_BATCH_TOKENS=4096,
                            DEVICE_BATCH_SIZE=8)
    program = derive_program(TINY_TOML, tmp_path / "program.toml", budget_s=3, untimed_steps=1,
                             device="cuda", autocast="bfloat16")
    runs = {attention: first_two_losses(program, train, tiny_data, tmp_path / attention.split()[0],
                                        f"attention {attention}", hide)
            for attention, hide in (("cuDNN band mask", ""), ("dense band mask (SDPA)", "sys.modules['cudnn'] = None; "))}
    cudnn_losses, flex_losses = runs.values()
    print(f"losses of steps 1 and 2: cuDNN {cudnn_losses}, dense mask {flex_losses}")
    assert None not in cudnn_losses + flex_losses
    assert cudnn_losses[0] == pytest.approx(flex_losses[0], rel=2e-3)  # the forward pass
    assert cudnn_losses[1] == pytest.approx(flex_losses[1], rel=1e-2)  # after one update: the backward


def test_gpt_climbmix_fused_mlp_trains_like_pytorch(tmp_path, tiny_data):
    """trainer.ops' ReLU² MLP in Triton kernels (the square and its derivative in matmul epilogues,
    each after rounding the sum to bf16 as cuBLAS does) trains the same model as the plain PyTorch
    MLP: the first two losses agree to the log's 6 decimals (the rounding makes its output and gradients bit-identical
    at these shapes and the baseline's, checked on an H100). Scaled down to two layers of width 256
    (hidden 1024); 200-token rows, so the 1,600 rows of a micro-batch end in a part-filled tile of
    128."""
    name = torch.cuda.get_device_name()
    assert torch.cuda.get_device_capability() >= (9, 0), f"the fused MLP needs Hopper (TMA); this is {name}"
    program = derive_program(TINY_TOML, tmp_path / "program.toml", budget_s=3, untimed_steps=1, seq_len=200,
                             device="cuda", autocast="bfloat16")
    runs = {}
    train = scaled_climbmix(tmp_path / "train.py", DEPTH=2, ASPECT_RATIO=128, TOTAL_BATCH_TOKENS=4000,
                            DEVICE_BATCH_SIZE=8)
    for fused in (True, False):
        runs[fused] = first_two_losses(program, train, tiny_data, tmp_path / f"fused_{fused}",
                                       f"MLP {'fused (Triton)' if fused else 'PyTorch'}",
                                       "" if fused else "import trainer.kernels; trainer.kernels.triton = None; ")
    print(f"losses of steps 1 and 2: fused {runs[True]}, PyTorch {runs[False]}")
    assert None not in runs[True] + runs[False]
    assert runs[True][0] == runs[False][0]  # the forward pass
    # after one update, the backward too: the progress log rounds a loss to 6 decimals, so two losses
    # 1e-7 apart can print one digit apart (6.619012 and 6.619013 on an H200, issue 20)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=0, abs=1.01e-6)  # one unit of the last digit


def climbmix_model(vocab: int, seq_len: int, **constants) -> torch.nn.Module:
    """gpt-climbmix's GPT class from its train.py (the sections before the optimizer), on the GPU."""
    import sys
    import types

    import trainer
    from trainer import ops

    source = (PROGRAMS / "gpt-climbmix" / "train.py").read_text().split("# Optimizer:")[0]
    for name, value in constants.items():
        source = source.replace(f"\n{name} = ", f"\n{name} = {value}  # ", 1)
    cfg = types.SimpleNamespace(vocab_size=vocab, seq_len=seq_len, device="cuda")
    scope: dict = {"__name__": "climbmix"}
    real, sys.modules["trainer"] = sys.modules["trainer"], types.SimpleNamespace(program=lambda: cfg, ops=ops)
    try:
        exec(compile(source, "train.py", "exec"), scope)
    finally:
        sys.modules["trainer"] = real
    assert trainer is real
    with torch.device("cuda"):
        model = scope["GPT"](vocab, scope["MODEL_DIM"], scope["DEPTH"], scope["N_HEAD"], seq_len)
    model.init_weights()
    with torch.no_grad():  # the init zeroes the output projections: move away from it
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_gpt_climbmix_scores_the_same_sealed_and_in_process(tmp_path, tiny_data):
    """The same weights of gpt-climbmix's model (cuDNN windows and the fused MLP through trainer.ops),
    scored in-process and exported then rebuilt by the scorer: equal within bf16 rounding."""
    from trainer import ops
    from trainer.artifact import export_model, load_model
    from trainer.run import autocast_of

    program = load_program(derive_program(TINY_TOML, tmp_path / "program.toml", device="cuda", autocast="bfloat16",
                                          eval_tokens=16 * 32 * 256))
    device = torch.device("cuda")
    model = climbmix_model(program.vocab_size, program.seq_len, DEPTH=4).eval()
    in_process = evaluate_program(model, tiny_data, program, device)["val_bpb"]
    example = torch.zeros((program.eval_batch_size, program.seq_len), dtype=torch.long, device=device)
    with autocast_of(program, device):
        export_model(model, example, tmp_path / "m")
    graph = (tmp_path / "m" / "model.json").read_text()
    assert "torch.ops.trainer.window_attention" in graph and "torch.ops.trainer.relu2_mlp" in graph
    sealed = evaluate_program(load_model(tmp_path / "m", device, ops.trusted_ops()), tiny_data, program, device)
    print(f"gpt-climbmix weights on {torch.cuda.get_device_name()}: in-process {in_process:.6f}, "
          f"sealed {sealed['val_bpb']:.6f}")
    assert sealed["val_bpb"] == pytest.approx(in_process, rel=2e-3)
