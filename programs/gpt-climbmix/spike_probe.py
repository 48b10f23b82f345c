"""Why gpt-climbmix's loss spikes (issue 20): an instrumented copy of train.py, and a summary of its log.

    python3 programs/gpt-climbmix/spike_probe.py make OUT.py [NAME=VALUE ...]
    python3 programs/gpt-climbmix/spike_probe.py summary RUN.log [RUN.log ...]

`make` writes train.py with settings replaced (any top-level constant, plus VE_LR: the value
embeddings' own AdamW rate, None = EMBEDDING_LR; and GRAD_CLIP: clip the global gradient norm,
0 = off) and, every step, one line `probe {json}`: the loss, the gradient norm of each parameter
group, the RMS of the embeddings, the residual and x0 scalars' range and the value-embedding
gates' largest weight. `summary` finds the spikes (a loss above 1.5x the running median of the
last 50 steps, after step 40) and prints, for each, what the groups did in the steps before it.
A scratch tool for measurements: train.py itself stays free of it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

TRAIN = Path(__file__).with_name("train.py")

PROBE = '''
    # -- probe (spike_probe.py) --
    with torch.no_grad():
        _g = {}
        for _name, _ps in PROBE_GROUPS.items():
            _gs = [p.grad for p in _ps if p.grad is not None]
            _g[_name] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(_gs))) if _gs else torch.zeros((), device=device)
        _total = torch.linalg.vector_norm(torch.stack(list(_g.values())))
        if GRAD_CLIP > 0:
            torch._foreach_mul_([p.grad for ps in PROBE_GROUPS.values() for p in ps if p.grad is not None],
                                torch.clamp(GRAD_CLIP / (_total + 1e-6), max=1.0))
        _stats = torch.stack([loss.detach().float(), _total, *_g.values(),
                              raw_model.wte.weight.float().pow(2).mean().sqrt(),
                              torch.stack([ve.weight.float().pow(2).mean().sqrt() for ve in raw_model.value_embeds.values()]).max(),
                              raw_model.lm_head.weight.float().pow(2).mean().sqrt(),
                              raw_model.resid_lambdas.min(), raw_model.resid_lambdas.max(),
                              raw_model.x0_lambdas.min(), raw_model.x0_lambdas.max(),
                              torch.stack([b.attn.ve_gate.weight.abs().max() for b in raw_model.blocks
                                           if b.attn.ve_gate is not None]).max()]).tolist()
        print("probe " + json.dumps(dict(zip(PROBE_KEYS, [step] + [round(v, 5) for v in _stats]))), flush=True)
'''

GROUPS = '''
import json
PROBE_GROUPS = {
    "g_wte": [raw_model.wte.weight],
    "g_ve": [ve.weight for ve in raw_model.value_embeds.values()],
    "g_head": [raw_model.lm_head.weight],
    "g_resid": [raw_model.resid_lambdas], "g_x0": [raw_model.x0_lambdas],
    "g_gates": [b.attn.ve_gate.weight for b in raw_model.blocks if b.attn.ve_gate is not None],
    "g_matrices": [p for g in muon.param_groups for p in g["params"]],
}
PROBE_KEYS = ["step", "loss", "g_total", *PROBE_GROUPS, "rms_wte", "rms_ve_max", "rms_head", "resid_min", "resid_max",
              "x0_min", "x0_max", "gate_w_max"]
'''


def make(out: Path, settings: list[str]) -> None:
    text = TRAIN.read_text()
    text = text.replace("FINAL_LR_FRAC = 0.0 ", "VE_LR = None\nGRAD_CLIP = 0.0\nFINAL_LR_FRAC = 0.0 ", 1)
    text = text.replace("    embeds = [model.wte.weight, *(ve.weight for ve in model.value_embeds.values())]\n",
                        "    embeds = [model.wte.weight]\n    ves = [ve.weight for ve in model.value_embeds.values()]\n", 1)
    text = text.replace("        dict(params=embeds, lr=EMBEDDING_LR * width_scale),\n",
                        "        dict(params=embeds, lr=EMBEDDING_LR * width_scale),\n"
                        "        dict(params=ves, lr=(EMBEDDING_LR if VE_LR is None else VE_LR) * width_scale),\n", 1)
    text = text.replace("model = torch.compile(raw_model, dynamic=False) if COMPILE else raw_model\n",
                        "model = torch.compile(raw_model, dynamic=False) if COMPILE else raw_model\n" + GROUPS, 1)
    text = text.replace("    progress = trainer.progress()\n", PROBE + "    progress = trainer.progress()\n", 1)
    for setting in settings:
        name, _, value = setting.partition("=")
        text, n = re.subn(rf"(?m)^{name} = [^#\n]*", f"{name} = {value}  ", text, count=1)
        if not n:
            raise SystemExit(f"no top-level constant {name} in train.py")
    for needle in ("PROBE_GROUPS", "# -- probe", "ves = ["):
        if needle not in text:
            raise SystemExit(f"train.py changed shape: could not place {needle!r}")
    out.write_text(text)


def summary(paths: list[Path]) -> None:
    for path in paths:
        rows = [json.loads(line.split("probe ", 1)[1]) for line in path.read_text().splitlines()
                if line.startswith("probe ")]
        if not rows:
            print(f"{path}: no probe lines")
            continue
        losses = [r["loss"] for r in rows]
        spikes = []
        for i, r in enumerate(rows):
            window = losses[max(0, i - 50):i]
            if r["step"] > 40 and window and r["loss"] > 1.5 * statistics.median(window):
                if not spikes or r["step"] > spikes[-1][-1]["step"] + 5:
                    spikes.append([])
                spikes[-1].append(r)
        print(f"== {path}: {len(rows)} steps, final loss {losses[-1]:.3f}, min {min(losses):.3f}; "
              f"{len(spikes)} spike(s)")
        keys = [k for k in rows[0] if k not in ("step",)]
        print("   max over the run: " + ", ".join(f"{k} {max(r[k] for r in rows):.4g}" for k in keys))
        for spike in spikes:
            top = max(spike, key=lambda r: r["loss"])
            first = spike[0]["step"]
            print(f"-- spike at step {first} (peak {top['loss']:.3f} at {top['step']}, median before "
                  f"{statistics.median(losses[max(0, first - 50):first]):.3f})")
            for r in rows[max(0, first - 4):first + 3]:
                print("   " + " ".join(f"{k}={r[k]:.4g}" if k != "step" else f"step={r[k]}" for k in r))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "make":
        make(Path(sys.argv[2]), sys.argv[3:])
    elif len(sys.argv) >= 3 and sys.argv[1] == "summary":
        summary([Path(p) for p in sys.argv[2:]])
    else:
        raise SystemExit(__doc__)
