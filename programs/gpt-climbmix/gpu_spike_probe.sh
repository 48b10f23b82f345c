#!/usr/bin/env bash
# Issue 20: instrumented gpt-climbmix runs in one call on one GPU host (local mode): prepare the
# local corpus as gpu_local_run.sh does, then run train.py variants made by spike_probe.py (each
# line of VARIANTS: a name, then NAME=VALUE settings), one after another on one compile cache, each
# scored by the sealed scorer; logs and the probe summary go to OUT_DIR.
#   usage: programs/gpt-climbmix/gpu_spike_probe.sh OUT_DIR BUDGET_S 'name K=V ...' ['name K=V ...' ...]
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: $0 OUT_DIR BUDGET_S VARIANT...}" && cd "$1" && pwd)
BUDGET=${2:?budget seconds}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpt-climbmix-local}
mkdir -p "$WORK"
source programs/gpt-climbmix/gpu_corpus.sh
corpus_program "$BUDGET" > "$WORK/probe.toml"
prepare_corpus "$WORK/probe.toml" > "$OUT/prepare.log" 2>&1
tail -2 "$OUT/prepare.log"
nvidia-smi --query-gpu=name,uuid --format=csv,noheader | tee "$OUT/gpu.txt"
for variant in "${@:3}"; do
  read -r name settings <<< "$variant"
  $PY programs/gpt-climbmix/spike_probe.py make "$WORK/$name.py" $settings
  $PY - "$WORK" "$name" "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from trainer.bench import harness_run
work, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
r = harness_run(work / "probe.toml", work / f"{name}.py", work / "data", work / f"run-{name}", work / "cache")
keep = ("status", "reason", "val_bpb", "num_steps", "tokens_per_s", "epochs", "training_seconds", "overhead_seconds")
print(name, json.dumps({k: r.get(k) for k in keep}), flush=True)
(out / f"{name}.log").write_bytes((work / f"run-{name}.log").read_bytes())
PYEOF
  $PY programs/gpt-climbmix/spike_probe.py summary "$OUT/$name.log" | cut -c1-400 | tee "$OUT/$name.summary"
done
