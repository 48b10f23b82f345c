#!/usr/bin/env bash
# gpt-climbmix on one GPU host with no containers and no network (the harness in local mode):
# prepare a local corpus from the host's own Python sources, benchmark the loader, then train
# for the full budget with python -m trainer.run.
#   usage: programs/gpt-climbmix/gpu_local_run.sh OUT_DIR [BUDGET_S]   (from the repo root)
# train.py runs its sliding windows on cuDNN when the cuDNN frontend (pyproject's `gpu` extra) is
# importable, else on FlexAttention; its "model:" line says which.
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [BUDGET_S]}
BUDGET=${2:-300}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpt-climbmix-local}
mkdir -p "$OUT" "$WORK"
source programs/gpt-climbmix/gpu_corpus.sh

corpus_program "$BUDGET" > "$WORK/program.toml"
prepare_corpus "$WORK/program.toml" 2>&1 | tee "$OUT/prepare.log"
echo "== loader benchmark"
{ $PY -m trainer.bench loader --data "$WORK/data" --seconds 3 --device cuda
  $PY -m trainer.bench loader --seconds 3; } 2>&1 | tee "$OUT/bench.log"
echo "== train $BUDGET s"
cp programs/gpt-climbmix/train.py "$WORK/train.py"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" TRITON_CACHE_DIR="$WORK/triton" PYTHONUNBUFFERED=1 \
    PYTHONPYCACHEPREFIX="$WORK/pycache"  # bytecode kept between runs, as the local backend does
unset PYTHONDONTWRITEBYTECODE
$PY -m trainer.run --program "$WORK/program.toml" --train "$WORK/train.py" --data "$WORK/data" \
    --out "$OUT/run" 2>&1 | tee "$OUT/run.log"
