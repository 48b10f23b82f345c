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
STDLIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# The program as shipped, with the local corpus instead of ClimbMix and an evaluation size
# that fits that corpus's validation split.
sed -e "s/^budget_s = .*/budget_s = $BUDGET/" -e 's/^eval_tokens = .*/eval_tokens = 6_291_456/' \
    -e 's/^tokenizer_train_chars = .*/tokenizer_train_chars = 100_000_000/' -e '/^\[data\]/,$d' \
    programs/gpt-climbmix/program.toml > "$WORK/program.toml"
cat >> "$WORK/program.toml" <<TOML
[data]
kind = "local"
val_fraction = 0.1
max_bytes = 200_000_000
TOML

echo "== prepare (local: $SITE $STDLIB)"
$PY -m trainer.prepare --program "$WORK/program.toml" --data-dir "$WORK/data" \
    --path "$SITE" --path "$STDLIB" --glob '**/*.py' 2>&1 | tee "$OUT/prepare.log"
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
