#!/usr/bin/env bash
# Issue 20: reruns of train.py at one seed on one GPU host (local mode), to measure the spread of
# identical code: prepare the local corpus once (kept in WORK while the machine stays up), then
# `trainer.bench quality` at the program's budget into WORK/quality, whose quality.jsonl and compile
# cache carry over from call to call on one machine; its summary counts every run there. The
# quality rows and the new runs' logs are copied to OUT_DIR.
#   usage: programs/gpt-climbmix/gpu_quality.sh OUT_DIR SEEDS [TRAIN.py ...]   (SEEDS: 42 or 42,43)
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: $0 OUT_DIR SEEDS [TRAIN.py ...]}" && cd "$1" && pwd)
SEEDS=${2:?seeds, comma-separated}
shift 2
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpt-climbmix-local}
mkdir -p "$WORK/quality"
source programs/gpt-climbmix/gpu_corpus.sh
corpus_program "${BUDGET:-300}" > "$WORK/quality.toml"
if [[ ! -f "$WORK/data/meta.json" ]]; then
  prepare_corpus "$WORK/quality.toml" > "$OUT/prepare.log" 2>&1
  tail -1 "$OUT/prepare.log"
fi
nvidia-smi --query-gpu=name,uuid --format=csv,noheader | tee "$OUT/gpu.txt"
trains=()
for t in "${@:-programs/gpt-climbmix/train.py}"; do trains+=(--train "$t"); done
touch "$OUT/.start"
$PY -m trainer.bench quality --program "$WORK/quality.toml" --data "$WORK/data" "${trains[@]}" \
    --seeds "$SEEDS" --out "$WORK/quality" 2>&1 | tee "$OUT/quality.txt"
cp "$WORK/quality/quality.jsonl" "$OUT/"
find "$WORK/quality" -maxdepth 1 -name '*.log' -newer "$OUT/.start" -exec cp {} "$OUT/" \;
