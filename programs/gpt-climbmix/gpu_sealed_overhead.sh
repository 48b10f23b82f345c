#!/usr/bin/env bash
# What sealed scoring costs per experiment on one GPU host (issue 18), local mode: gpt-climbmix at a
# short budget, cold (empty compile cache) then warm, once scored sealed (export in the train process,
# then a second process of trusted code loads and scores it) and once in-process (the old way), all in
# one call with the same corpus. `python -m trainer.bench edits` prints each run's figures.
#   usage: programs/gpt-climbmix/gpu_sealed_overhead.sh OUT_DIR [BUDGET_S]   (from the repo root)
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [BUDGET_S]}
BUDGET=${2:-20}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpt-climbmix-sealed}
mkdir -p "$OUT" "$WORK"
source programs/gpt-climbmix/gpu_corpus.sh

corpus_program "$BUDGET" > "$WORK/sealed.toml"
sed 's/^\[data\]/scoring = "in-process"\n[data]/' "$WORK/sealed.toml" > "$WORK/in-process.toml"
prepare_corpus "$WORK/sealed.toml" > "$OUT/prepare.log" 2>&1
nvidia-smi --query-gpu=name,uuid --format=csv,noheader | tee "$OUT/card.txt"
for mode in ${MODES:-in-process sealed}; do
    echo "== $mode"
    $PY -m trainer.bench edits --program "$WORK/$mode.toml" --data "$WORK/data" \
        --train programs/gpt-climbmix/train.py --out "$OUT/$mode" 2>&1 | grep -v '^step ' | tee "$OUT/$mode.log"
done
