"""Benchmarks of the trusted parts, printing figures (speed goals are checked here, not in tests).

Usage:
    python -m trainer.bench loader --data DIR [--batch 128 --seq 2048 --seconds 10]
    python -m trainer.bench loader --synthetic [--mean-doc 700]   # web-like document lengths
    python -m trainer.bench run --program P.toml --data DIR --train A.py [--train B.py] [--budget-s 60]
    python -m trainer.bench profile --program P.toml --data DIR --train A.py [--skip 12 --steps 3]
    python -m trainer.bench quality --program P.toml --data DIR --train A.py --train B.py [--seeds 42,43,44]
    python -m trainer.bench edits --program P.toml --data DIR --train A.py --train A-edited.py [...]
    python -m trainer.bench audit --program P.toml --data DIR --train A.py [--seeds 42,43 --audits 10]

`loader` prints tokens/s of the packer+gather (numpy batches) and, with --device, of the full
loader (pinned copy to the device included). `run` trains each train.py through the harness
twice, back to back — cold (empty compile cache) then warm (the same cache) — and prints one
column per file: tokens/s, step-time spread, MFU, overhead cold and warm, eval seconds, peak
memory and val_bpb, so ratios are measured side by side on one machine, then the loader's
tokens/s alone on the same data. `profile` (trainer/stepprofile.py) runs one train.py in this
process under the harness, records a few steady steps with torch.profiler and prints where the
device time goes (kernel families and the top kernels, ms per step), then what compilation cost
(dynamo's phase times and the compile-cache hits and misses). `quality` trains
each train.py at the full budget once per seed, the files interleaved (their order alternating
from seed to seed), appends every result to quality.jsonl in --out and prints val_bpb's mean and
spread per file over all the rows there (earlier calls' too: a 10-minute slot may hold one run),
and each file's difference from the folder's first file, paired by seed, with a sign test: one run
is a noisy measurement of a training recipe. `edits` measures what an agent's edits cost besides training:
the first train.py on an empty compile cache, again on the warm cache, then each further file once
on that same cache, in order (as one agent's runs share its cache), one row per run. `audit` trains
one honest model per seed and runs the causality audit (trainer.audit) on each many times, routine
then deep: false refusals, the advantage an honest model shows in its precision, and the audit's
cost against the scoring and the score process, cold and warm.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer.config import load_program, set_top_level
from trainer.contract import MODEL_DIR, parse_score_output
from trainer.loader import BatchStream, TrainLoader
from trainer.run import spike_text
from trainer.shards import META_FILE, open_split

BOS_ID = 8188


def synthetic_split(folder: Path, tokens: int, mean_doc: int, vocab: int = 8192) -> None:
    """Random tokens in documents of exponential length (web text is roughly that shape)."""
    rng = np.random.default_rng(0)
    lengths = np.maximum(rng.exponential(mean_doc, size=tokens // mean_doc + 1).astype(np.int64), 2)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = rng.integers(0, BOS_ID, size=int(offsets[-1]), dtype=np.uint16)
    data[offsets[:-1]] = BOS_ID
    data.tofile(folder / "train.bin")
    np.save(folder / "train.idx.npy", offsets)
    (folder / META_FILE).write_text(json.dumps({"token_dtype": "uint16", "vocab_size": vocab,
                                                "bos_id": BOS_ID}))


def rate(next_batch, tokens_per_batch: int, seconds: float) -> float:
    next_batch()  # warm-up: the first batch includes thread start and buffer fill
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        next_batch()
        n += tokens_per_batch
    return n / (time.perf_counter() - t0)


def loader_rates(data: Path, batch: int, seq: int, seconds: float, device: str | None) -> list[str]:
    """Lines of loader figures: the packer+gather alone, then (with a device) the full loader."""
    split = open_split(data, "train")
    per_batch = batch * seq
    stream = BatchStream(split, batch, seq + 1, seed=0)
    try:
        r = rate(stream.next_array, per_batch, seconds)
    finally:
        stream.close()
    lines = [f"loader (pack + gather, background thread): {r / 1e6:.2f} M tokens/s (batch {batch} x {seq})"]
    if device:
        import torch

        loader = TrainLoader(split, batch, seq, seed=0, device=device)

        def step():
            x, y = next(loader)
            if x.is_cuda:
                torch.cuda.synchronize()

        try:
            r = rate(step, per_batch, seconds)
        finally:
            loader.close()
        lines.append(f"loader to {device} (pinned, non-blocking): {r / 1e6:.2f} M tokens/s")
    return lines


def bench_loader(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp)
        if not args.data:
            synthetic_split(data, args.synthetic_tokens, args.mean_doc)
        split = open_split(data, "train")
        docs = np.diff(split.offsets)
        print(f"data: {data if args.data else 'synthetic'}: {split.num_docs:,} documents, "
              f"{len(split.tokens):,} tokens, mean document {docs.mean():.0f} tokens")
        print("\n".join(loader_rates(data, args.batch, args.seq, args.seconds, args.device)))


def val_stream(data: Path, out: Path):
    """The validation split as the host streams it to a run's stdin (a JSON header, then the files)."""
    from trainer.contract import VAL_FILES

    path = out.with_suffix(".val-stream")
    with open(path, "wb") as f:
        f.write((json.dumps({n: (data / n).stat().st_size for n in VAL_FILES}) + "\n").encode())
        for name in VAL_FILES:
            f.write((data / name).read_bytes())
    return open(path, "rb")


def harness_run(program: Path, train: Path, data: Path, out: Path, cache: Path) -> dict:
    """One `python -m trainer.run` in a fresh process; the result plus its whole wall clock."""
    # the agent's persistent caches, as the sandbox gives them (bytecode: as the local backend does)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TRITON_CACHE_DIR": str(cache / "triton"), "PYTHONPYCACHEPREFIX": str(cache / "pycache"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    in_process = load_program(program).scoring == "in-process"
    log_path = out.parent / f"{out.name}.log"  # beside the run folder (a name may hold dots)
    t0 = time.monotonic()
    with open(log_path, "w") as log, \
            (val_stream(data, out) if in_process else open(os.devnull, "rb")) as stdin:
        subprocess.run([sys.executable, "-m", "trainer.run", "--program", str(program), "--train",
                        str(train), "--data", str(data), "--out", str(out), *(["--val-stdin"] if in_process else [])],
                       env=env, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, check=False)
    result = json.loads((out / "result.json").read_text())
    result["train_wall_seconds"] = round(time.monotonic() - t0, 2)
    if result["status"] == "ok" and not in_process:  # the score phase, as the host runs it: a second process, trusted code
        t1 = time.monotonic()
        scored = subprocess.run([sys.executable, "-m", "trainer.score", "--program", str(program), "--artifact",
                                 str(out / MODEL_DIR), "--data", str(data)], env=env, capture_output=True, text=True)
        with open(log_path, "a") as log:
            log.write(scored.stdout + scored.stderr)
        score = parse_score_output(scored.stdout)
        result.update(status=score.status, reason=score.reason, val_bpb=score.val_bpb, unigram_bpb=score.unigram_bpb,
                      eval_seconds=score.eval_seconds, eval_parts_seconds=score.eval_parts_seconds,
                      load_seconds=score.load_seconds, score_wall_seconds=round(time.monotonic() - t1, 2))
    result["wall_seconds"] = round(time.monotonic() - t0, 2)
    # Everything that is not charged training: process start, imports, compile, the untimed
    # warm-up steps, export, the score process and exit (issue 5's "non-training overhead").
    result["overhead_seconds"] = round(result["wall_seconds"] - result["training_seconds"], 2)
    return result


ROWS = [  # (label, how to read it from the cold and warm results)
    ("status (cold / warm)", lambda c, w: f"{c['status']} / {w['status']}"),
    ("tokens/s, warm (M)", lambda c, w: _f(w.get("tokens_per_s"), 1e-6, ".3f")),
    ("step s p10 / p50 / p90", lambda c, w: " / ".join(_f((w.get("step_seconds") or {}).get(k), 1, ".3f")
                                                       for k in ("p10", "p50", "p90"))),
    ("MFU %, warm", lambda c, w: _f(w.get("mfu_percent"), 1, ".1f")),
    ("startup s cold / warm", lambda c, w: f"{c['startup_seconds']:.1f} / {w['startup_seconds']:.1f}"),
    ("export s cold / warm", lambda c, w: f"{_f(c.get('export_seconds'), 1, '.1f')} / "
                                          f"{_f(w.get('export_seconds'), 1, '.1f')}"),
    ("score process s cold / warm", lambda c, w: f"{_f(c.get('score_wall_seconds'), 1, '.1f')} / "
                                                 f"{_f(w.get('score_wall_seconds'), 1, '.1f')}"),
    ("  of it load / eval, warm", lambda c, w: f"{_f(w.get('load_seconds'), 1, '.1f')} / "
                                               f"{_f(w.get('eval_seconds'), 1, '.1f')}"),
    ("overhead s cold / warm", lambda c, w: f"{c['overhead_seconds']:.1f} / {w['overhead_seconds']:.1f}"),
    ("peak memory MB", lambda c, w: f"{w['peak_memory_mb']:,.0f}"),
    ("steps, warm", lambda c, w: str(w["num_steps"])),
    ("val_bpb cold / warm", lambda c, w: f"{_f(c.get('val_bpb'), 1, '.4f')} / {_f(w.get('val_bpb'), 1, '.4f')}"),
]


def ratios(base: dict, other: dict) -> list[str]:
    """other / base for the figures a speed change moves, measured in the same call."""
    out = []
    for key, label in (("tokens_per_s", "tokens/s"), ("mfu_percent", "MFU"),
                       ("overhead_seconds", "overhead"), ("eval_seconds", "eval")):
        a, b = base.get(key), other.get(key)
        a, b = (a if isinstance(a, (int, float)) else None), (b if isinstance(b, (int, float)) else None)
        out.append(f"{label} x{b / a:.3f}" if a and b is not None else f"{label} -")
    return out


def _f(value, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)


def program_copy(source: Path, dest: Path, **overrides) -> Path:
    """dest: the program at source with top-level settings replaced (None: left as it is)."""
    dest.write_text(set_top_level(source.read_text(), **overrides))
    load_program(dest)  # a bad override fails here, before any run
    return dest


def out_folder(args: argparse.Namespace, prefix: str) -> Path:
    """--out, made if need be, or a new temp folder."""
    out = Path(args.out or tempfile.mkdtemp(prefix=prefix))
    out.mkdir(parents=True, exist_ok=True)
    return out


def bench_folder(args: argparse.Namespace, prefix: str) -> tuple[Path, Path]:
    """The output folder and its copy of the program, budget overridden."""
    out = out_folder(args, prefix)
    return out, program_copy(Path(args.program), out / "program.toml", budget_s=args.budget_s)


def column_names(trains: list[str]) -> list[str]:
    names = [Path(t).name for t in trains]
    return names if len(set(names)) == len(names) else list(trains)  # two train.py: their paths


def bench_run(args: argparse.Namespace) -> None:
    out, program = bench_folder(args, "bench-")
    names = column_names(args.train)
    config = load_program(program)
    # The loader alone, at the batch the shipped programs train with (128 rows, or fewer on CPU)
    device = "cuda" if config.device == "cuda" else None
    loader_lines = loader_rates(Path(args.data), 128 if device else 32, config.seq_len, 3.0, device)
    columns = []
    for i, train in enumerate(args.train):
        cache = out / f"cache-{i}"  # one cache per file, as each agent has its own
        runs = [harness_run(program, Path(train), Path(args.data), out / f"{i}-{kind}", cache)
                for kind in ("cold", "warm")]
        columns.append((names[i], *runs))
        print(f"{train}: cold {runs[0]['status']}, warm {runs[1]['status']}", flush=True)
    (out / "bench.json").write_text(json.dumps(
        [{"train": name, "cold": c, "warm": w} for name, c, w in columns], indent=2))
    width = max(24, *(len(name) + 2 for name, _, _ in columns))
    print(f"\n{'':24}" + "".join(f"{name:>{width}}" for name, _, _ in columns))
    for label, read in ROWS:
        print(f"{label:24}" + "".join(f"{read(c, w):>{width}}" for _, c, w in columns))
    for name, _, warm in columns[1:]:
        print(f"{name} / {columns[0][0]}, warm: " + ", ".join(ratios(columns[0][2], warm)))
    print("\n".join(loader_lines))
    print(f"(budget {args.budget_s or 'as the program says'} s; logs and results in {out})")


def bench_quality(args: argparse.Namespace) -> None:
    out = out_folder(args, "quality-")
    names = column_names(args.train)
    rows_file = out / "quality.jsonl"
    for r, seed in enumerate(args.seeds):
        program = program_copy(Path(args.program), out / f"program-seed{seed}.toml",
                               budget_s=args.budget_s, seed=seed)
        order = list(enumerate(args.train))
        for i, train in order if r % 2 == 0 else order[::-1]:  # neither file always runs first
            slug = re.sub(r"[^\w.-]", "_", names[i])  # folders by file, not by position: calls add up
            run_dir = out / f"{slug}-seed{seed}"
            for n in itertools.count(2):  # a rerun of a seed, in this call or an earlier one
                if not run_dir.exists():
                    break
                run_dir = out / f"{slug}-seed{seed}-{n}"
            result = harness_run(program, Path(train), Path(args.data), run_dir, out / f"cache-{slug}")
            row = {"train": names[i], "path": str(train), "seed": seed, "status": result["status"],
                   "val_bpb": result["val_bpb"], "num_steps": result["num_steps"],
                   "tokens_per_s": result["tokens_per_s"], "epochs": result["epochs"],
                   "loss_spike": result.get("loss_spike")}
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"seed {seed}, {names[i]}: {result['status']}, val_bpb {_f(result['val_bpb'], 1, '.4f')}, "
                  f"{result['num_steps']} steps, {_f(result.get('tokens_per_s'), 1e-6, '.3f')} M tokens/s, "
                  f"largest loss spike {spike_text(result.get('loss_spike'))}", flush=True)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    print("\n".join(quality_summary(rows)))
    print(f"(all {len(rows)} runs in {rows_file})")


def bench_edits(args: argparse.Namespace) -> None:
    out, program = bench_folder(args, "edits-")
    names = column_names(args.train)
    plan = [(names[0], "empty cache", args.train[0]), (names[0], "warm", args.train[0])]
    plan += [(names[i], "edit", train) for i, train in enumerate(args.train[1:], start=1)]
    runs = []
    for i, (name, kind, train) in enumerate(plan):
        result = harness_run(program, Path(train), Path(args.data), out / f"{i}-{kind.replace(' ', '-')}",
                             out / "cache")  # one cache for all: one agent's runs
        runs.append({"run": f"{name} ({kind})", "path": str(train), **result})
        print(f"{runs[-1]['run']}: {result['status']}, overhead {result['overhead_seconds']:.1f} s", flush=True)
    (out / "edits.json").write_text(json.dumps(runs, indent=2))
    width = max(24, *(len(r["run"]) + 2 for r in runs))
    header = ("status", "overhead s", "startup s", "export s", "score proc s", "load s", "eval s", "tokens/s (M)")
    print(f"\n{'run, in order':{width}}" + "".join(f"{h:>14}" for h in header))
    for r in runs:
        cells = (r["status"], f"{r['overhead_seconds']:.1f}", f"{r['startup_seconds']:.1f}",
                 _f(r.get("export_seconds"), 1, ".1f"), _f(r.get("score_wall_seconds"), 1, ".1f"),
                 _f(r.get("load_seconds"), 1, ".1f"), _f(r.get("eval_seconds"), 1, ".1f"),
                 _f(r.get("tokens_per_s"), 1e-6, ".3f"))
        print(f"{r['run']:{width}}" + "".join(f"{c:>14}" for c in cells))
    print("(score proc s: the sealed score process's wall clock, load and eval inside it; in-process runs "
          f"evaluate in the train process; budget {args.budget_s or 'as the program says'} s; logs and results in {out})")


def quality_summary(rows: list[dict]) -> list[str]:
    """val_bpb per file name over all its ok runs, reruns of a seed included (mean, sample sd, range,
    steps), and each file minus the first one run into the folder, per seed (a seed's mean)."""
    names = list(dict.fromkeys(r["train"] for r in rows))
    runs = {name: [r["val_bpb"] for r in rows if r["train"] == name and r["status"] == "ok"] for name in names}
    by_seed: dict[str, dict[int, list[float]]] = {name: {} for name in names}  # reruns of a seed all count
    for r in rows:
        if r["status"] == "ok":
            by_seed[r["train"]].setdefault(r["seed"], []).append(r["val_bpb"])
    scores = {name: {seed: _mean(v) for seed, v in seeds.items()} for name, seeds in by_seed.items()}
    width = max(24, *(len(name) + 2 for name in names))
    lines = [f"\n{'':24}" + "".join(f"{name:>{width}}" for name in names)]

    def row(label, cell):
        lines.append(f"{label:24}" + "".join(f"{cell(name):>{width}}" for name in names))

    row("runs ok / all", lambda n: f"{len(runs[n])} / {sum(r['train'] == n for r in rows)}")
    row("val_bpb mean", lambda n: _f(_mean(runs[n]), 1, ".4f"))
    row("val_bpb sd", lambda n: _f(_sd(runs[n]), 1, ".4f"))
    row("val_bpb min / max", lambda n: " / ".join(_f(f(runs[n], default=None), 1, ".4f") for f in (min, max)))
    row("steps mean", lambda n: _f(_mean([r["num_steps"] for r in rows if r["train"] == n
                                          and r["status"] == "ok"]), 1, ".0f"))
    row("largest loss spike (x)", lambda n: _f(max((r["loss_spike"]["ratio"] for r in rows if r["train"] == n
                                                    and r["status"] == "ok" and r.get("loss_spike")), default=None),
                                               1, ".2f"))
    row("epochs mean", lambda n: _f(_mean([r["epochs"] for r in rows if r["train"] == n and r["status"] == "ok"
                                           and r.get("epochs") is not None]), 1, ".2f"))  # rows of older runs lack it
    base = scores[names[0]]
    for name in names[1:]:
        seeds = sorted(set(base) & set(scores[name]))
        diffs = [scores[name][s] - base[s] for s in seeds]
        higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        lines.append(f"{name} - {names[0]}, paired by seed ({len(seeds)}: {', '.join(map(str, seeds))}): "
                     f"mean {_f(_mean(diffs), 1, '+.4f')}, sd {_f(_sd(diffs), 1, '.4f')}, "
                     f"higher at {higher}, lower at {lower} (sign test p {sign_test_p(higher, lower):.3f})")
    return lines


def sign_test_p(higher: int, lower: int) -> float:
    """Two-sided sign test: how likely a split at least this uneven is when either side is as likely
    (ties left out). Runs of this recipe spread widely, so a mean alone says little."""
    n = higher + lower
    tail = sum(math.comb(n, i) for i in range(min(higher, lower) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _sd(values) -> float | None:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else None


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, like 42,43,44; got {text!r}")
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is listed twice in {text!r}")
    return seeds


def bench_profile(args: argparse.Namespace) -> None:
    # torch and its profiler: only this command needs them
    from trainer.stepprofile import profile_steps

    profile_steps(args, *bench_folder(args, "profile-"))


def bench_audit(args: argparse.Namespace) -> None:
    """Honest models through the causality audit (trainer.audit): one per seed, trained by the harness,
    then audited `--audits` times each (deep, fresh OS-random positions every time). Prints the false
    refusals, the spread of the advantage an honest model shows, and what the audit costs against
    the score process (cold: the harness's own score process; warm: repeats in this process)."""
    import torch  # noqa: PLC0415

    from trainer import ops  # noqa: PLC0415
    from trainer.artifact import load_model  # noqa: PLC0415
    from trainer.evaluate import NotCausalError, evaluate_program  # noqa: PLC0415

    out = out_folder(args, "audit-")
    rows = []
    for seed in args.seeds:
        program_path = program_copy(Path(args.program), out / f"program-seed{seed}.toml", budget_s=args.budget_s,
                                    seed=seed)
        run = harness_run(program_path, Path(args.train), Path(args.data), out / f"seed{seed}", out / "cache")
        if run["status"] != "ok":
            print(f"seed {seed}: {run['status']}: {run.get('reason')}", flush=True)
            rows.append({"seed": seed, "status": run["status"], "reason": run.get("reason")})
            continue
        program = load_program(program_path)
        device = torch.device(program.device)
        model = load_model(out / f"seed{seed}" / MODEL_DIR, device, ops.trusted_ops())
        cold = run["eval_parts_seconds"]
        audits = []
        for i in range(args.audits):
            deep = i > 0  # the first repeat routine, the others deep
            try:
                got = evaluate_program(model, Path(args.data), program, device, deep_below=math.inf if deep else None)
                audits.append({"deep": deep, **got["audit"], **{f"{k}_s": v for k, v in got["seconds"].items()}})
            except NotCausalError as e:
                audits.append({"deep": deep, "refused": str(e)})
        rows.append({"seed": seed, "status": "ok", "val_bpb": run["val_bpb"], "score_wall_s": run["score_wall_seconds"],
                     "cold_parts_s": cold, "audits": audits})
        ok = [a for a in audits if "refused" not in a]
        print(f"seed {seed}: val_bpb {run['val_bpb']:.4f}, {len(audits) - len(ok)} of {len(audits)} audits refused, "
              f"worst {max((a['worst_nats'] for a in ok), default=float('nan')):.3g} nats", flush=True)
    (out / "audit.json").write_text(json.dumps(rows, indent=2))
    done = [r for r in rows if r["status"] == "ok"]
    audits = [a for r in done for a in r["audits"]]
    ok = [a for a in audits if "refused" not in a]
    print(f"\nhonest models: {len(done)} of {len(rows)} trained; audits: {len(audits)}, "
          f"false refusals: {len(audits) - len(ok)}")
    if ok:
        print(f"advantage of an honest model, nats: worst position {max(a['worst_nats'] for a in ok):.3g}, "
              f"mean over positions in [{min(a['mean_nats'] for a in ok):.3g}, {max(a['mean_nats'] for a in ok):.3g}]")
    for kind, deep in (("routine", False), ("deep", True)):
        warm = [a for a in ok if a["deep"] == deep]
        if warm:
            scoring = statistics.median(a["scoring_s"] for a in warm)
            audit = statistics.median(a["audit_s"] for a in warm)
            print(f"{kind} audit, warm: {warm[0]['positions']} positions, {audit:.2f} s against scoring {scoring:.2f} s "
                  f"(+{100 * audit / scoring:.0f} % of the scoring)")
    for r in done:
        parts = r["cold_parts_s"] or {}
        audit = parts.get("audit", 0.0)
        print(f"seed {r['seed']}, cold score process {r['score_wall_s']:.1f} s: routine audit {audit:.2f} s "
              f"(+{100 * audit / max(r['score_wall_s'] - audit, 1e-9):.1f} % of the rest)")
    print(f"(logs and audit.json in {out})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trainer.bench")
    sub = ap.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loader", help="tokens/s of the packed loader")
    lo.add_argument("--data", help="a prepared data folder (default: synthetic data)")
    lo.add_argument("--synthetic-tokens", type=int, default=50_000_000)
    lo.add_argument("--mean-doc", type=int, default=700, help="synthetic mean document tokens")
    lo.add_argument("--batch", type=int, default=128)
    lo.add_argument("--seq", type=int, default=2048)
    lo.add_argument("--seconds", type=float, default=5.0)
    lo.add_argument("--device", help="also time the full loader onto this device (cpu, cuda)")
    ru = sub.add_parser("run", help="train.py files through the harness, cold and warm, side by side")
    ru.add_argument("--program", required=True, help="program.toml")
    ru.add_argument("--data", required=True, help="the prepared data folder")
    ru.add_argument("--train", required=True, action="append", help="a train.py (repeat to compare)")
    ru.add_argument("--budget-s", type=float, help="override the program's training budget")
    ru.add_argument("--out", help="folder for logs and bench.json (default: a new temp folder)")
    pr = sub.add_parser("profile", help="where one train.py's step time and compile time go")
    pr.add_argument("--program", required=True, help="program.toml")
    pr.add_argument("--data", required=True, help="the prepared data folder")
    pr.add_argument("--train", required=True, help="the train.py to profile")
    pr.add_argument("--budget-s", type=float, help="override the program's training budget")
    pr.add_argument("--skip", type=int, default=12, help="first profiled step (1-based)")
    pr.add_argument("--steps", type=int, default=3, help="how many steps to profile")
    pr.add_argument("--top", type=int, default=25, help="how many kernels to list")
    pr.add_argument("--out", help="folder for the run, program.toml and trace.json")
    qu = sub.add_parser("quality", help="val_bpb over several seeds per train.py, at the full budget")
    qu.add_argument("--program", required=True, help="program.toml")
    qu.add_argument("--data", required=True, help="the prepared data folder")
    qu.add_argument("--train", required=True, action="append", help="a train.py (repeat to compare)")
    qu.add_argument("--seeds", type=seed_list, default=[42, 43, 44], help="comma-separated (default 42,43,44)")
    qu.add_argument("--budget-s", type=float, help="override the program's training budget")
    qu.add_argument("--out", help="folder for runs and quality.jsonl; rows already there are summarised too")
    ed = sub.add_parser("edits", help="what edits cost besides training: files run in order on one compile cache")
    ed.add_argument("--program", required=True, help="program.toml")
    ed.add_argument("--data", required=True, help="the prepared data folder")
    ed.add_argument("--train", required=True, action="append",
                    help="the base train.py (run on an empty cache, then warm), then each edited copy")
    ed.add_argument("--budget-s", type=float, help="override the program's training budget")
    ed.add_argument("--out", help="folder for the runs, the shared cache and edits.json")
    au = sub.add_parser("audit", help="honest models through the causality audit: false refusals, spread, cost")
    au.add_argument("--program", required=True, help="program.toml")
    au.add_argument("--data", required=True, help="the prepared data folder")
    au.add_argument("--train", required=True, help="the (honest) train.py")
    au.add_argument("--seeds", type=seed_list, default=[42, 43, 44], help="comma-separated (default 42,43,44)")
    au.add_argument("--audits", type=int, default=10, help="audits per model: the first routine, then deep")
    au.add_argument("--budget-s", type=float, help="override the program's training budget")
    au.add_argument("--out", help="folder for the runs and audit.json")
    args = ap.parse_args(argv)
    {"audit": bench_audit, "loader": bench_loader, "run": bench_run, "profile": bench_profile, "quality": bench_quality,
     "edits": bench_edits}[args.what](args)


if __name__ == "__main__":
    main()
