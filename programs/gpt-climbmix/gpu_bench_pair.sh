#!/usr/bin/env bash
# Before/after on one GPU host in one call (issue 5): prepare the local corpus as gpu_local_run.sh
# does, then `trainer.bench run` each side (cold, then warm) with its own harness and train.py,
# so both columns come from the same card. A tar of the bench folders (no compile caches) is
# written after each side, so a run cut short still returns what finished.
#   usage: programs/gpt-climbmix/gpu_bench_pair.sh OUT_DIR BUDGET_S BEFORE_TREE [MORE_TRAIN.py ...]
# (from the repo root; MORE_TRAIN files are benched as further columns with this tree's harness)
# BEFORE_TREE holds an older trainer/ and programs/gpt-climbmix/, e.g. made with
#   git archive OLD trainer programs/gpt-climbmix | tar -x -C BEFORE_TREE
# Bench programs keep the program's full eval_tokens (the validation rows repeat on this corpus).
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: $0 OUT_DIR BUDGET_S BEFORE_TREE}" && cd "$1" && pwd)
BUDGET=${2:?budget seconds}
BEFORE=$(cd "${3:?before tree}" && pwd)
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpt-climbmix-local}
mkdir -p "$WORK"
source programs/gpt-climbmix/gpu_corpus.sh

corpus_program 300 > "$WORK/prepare.toml"  # the data exactly as gpu_local_run.sh prepares it
prepare_corpus "$WORK/prepare.toml" > "$OUT/prepare.log" 2>&1
tail -3 "$OUT/prepare.log"
$PY -m trainer.bench loader --data "$WORK/data" --seconds 3 --device cuda 2>&1 | tee "$OUT/loader.log"

bench() {  # $1: side name, $2: tree whose trainer/ and program.toml are used, then more train.py
  { sed -e 's/^tokenizer_train_chars = .*/tokenizer_train_chars = 100_000_000/' -e '/^\[data\]/,$d' \
        "$2/programs/gpt-climbmix/program.toml"; echo "$DATA_BLOCK"; } > "$WORK/$1.toml"
  echo "== bench $1 ($2 ${*:3})"
  local side=$1 tree=$2 more=() f
  shift 2
  for f in "$@"; do more+=(--train "$f"); done
  (cd "$tree" && $PY -m trainer.bench run --program "$WORK/$side.toml" --data "$WORK/data" \
      --train "$tree/programs/gpt-climbmix/train.py" "${more[@]}" --budget-s "$BUDGET" --out "$WORK/bench-$side")
  tar --exclude='cache-*' -czf "$OUT/bench.tgz" -C "$WORK" $(cd "$WORK" && ls -d bench-*)
}
MORE=()
for f in "${@:4}"; do MORE+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"); done
bench before "$BEFORE"
bench after "$PWD" "${MORE[@]}"
