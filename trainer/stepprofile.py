"""`python -m trainer.bench profile`: where one train.py's step time and compile time go.

Runs the train.py in this process under the harness, records a few steady steps with
torch.profiler and prints the device time by kernel family and the top kernels (ms per step), then
dynamo's compile phases and the compile-cache hits and misses.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import trainer
from trainer import api
from trainer import run as harness

KERNEL_FAMILIES = [  # (family, name fragments), first match wins; lower-case
    ("attention: flex", ("flex_attention", "triton_tem_")),
    ("attention: fused sdpa", ("flash", "fmha", "sdpa", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma", "aten::mm", "aten::addmm", "aten::bmm")),
    ("inductor pointwise/reduction", ("triton_poi", "triton_red", "triton_per")),
    ("optimizer (foreach)", ("multi_tensor", "foreach")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
]


def kernel_family(name: str) -> str:
    low = name.lower()
    return next((fam for fam, parts in KERNEL_FAMILIES if any(p in low for p in parts)), "other")


def profile_steps(args: argparse.Namespace, out: Path, program: Path) -> None:
    """Profile steps args.skip..args.skip+args.steps of args.train under the harness (this process),
    with `program` (a copy in the output folder `out`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    prof = profile(activities=activities)
    window = {}
    real_step = api.step

    def step(loss):  # the step count before this call is the number of finished steps
        done = api._RUN.steps + 1
        if done == args.skip:
            sync()
            prof.start()
            window["t0"] = time.perf_counter()
        elif done == args.skip + args.steps and "t0" in window:
            sync()
            window["wall"] = time.perf_counter() - window.pop("t0")
            prof.stop()
        return real_step(loss)

    trainer.step = step  # train.py calls trainer.step: the package attribute wins over __getattr__
    try:
        result = harness.execute(program, Path(args.train), Path(args.data), out / "run")
    finally:
        del trainer.step
    print(f"run: {result['status']} {result['reason'] or ''} startup {result['startup_seconds']} s, "
          f"eval {result['eval_seconds']} s, tokens/s {result['tokens_per_s']}, MFU {result['mfu_percent']}")
    if "wall" not in window:
        print(f"no profile: the run made {result['num_steps']} steps, fewer than {args.skip + args.steps}")
    else:
        kernels, calls = collections.Counter(), collections.Counter()
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                kernels[evt.name] += evt.time_range.elapsed_us() / 1e3 / args.steps
                calls[evt.name] += 1
        what = "kernels"
        if not kernels:  # a CPU run: the operators' own CPU time instead of kernels
            what = "CPU operators (self time)"
            for avg in prof.key_averages():
                if avg.key.startswith("aten::"):
                    kernels[avg.key] += avg.self_cpu_time_total / 1e3 / args.steps
                    calls[avg.key] += avg.count
        wall_ms = 1e3 * window["wall"] / args.steps
        families = collections.Counter()
        for name, ms in kernels.items():
            families[kernel_family(name)] += ms
        busy = sum(kernels.values())
        print(f"\nprofiled steps {args.skip}..{args.skip + args.steps - 1}: {wall_ms:.1f} ms per step "
              f"wall, {busy:.1f} ms of {what} ({100 * busy / wall_ms:.1f} % busy)")
        for fam, ms in families.most_common():
            print(f"  {fam:32} {ms:8.1f} ms/step {100 * ms / wall_ms:6.1f} %")
        print(f"\ntop {what} (ms per step, calls per step):")
        for name, ms in kernels.most_common(args.top):
            print(f"  {ms:8.2f} {calls[name] / args.steps:6.1f}  {name[:110]}")
        prof.export_chrome_trace(str(out / "trace.json"))
    from torch._dynamo.utils import compile_times, counters

    print("\ncompile phases (dynamo, seconds over the run):")
    print(compile_times(repr="str", aggregate=True))
    print("cache counters:", {k: dict(v) for k, v in counters.items()
                              if k in ("inductor", "aot_autograd") and v})
