# Sourced by gpu_local_run.sh and gpu_bench_pair.sh (needs PY and WORK): the local corpus that stands
# in for ClimbMix on a GPU host with no network. By default the host's own Python sources, ~51 M
# training tokens, which a 300-s run reads ~10 times over; CORPUS_PATHS, CORPUS_GLOBS (both
# space-separated), CORPUS_MAX_BYTES and CORPUS_VAL_FRACTION take in more text. GPU_RUNS.md's eleventh pass made 371 M
# tokens (~1.35 epochs a run) by adding an unpacked Linux source tree and C/C++ and docs globs.
# CORPUS=linux is that recipe, with the tree unpacked by gpu_linux_tree.sh into /tmp/big/src and
# the program's full evaluation (20.97 M tokens; its validation split holds ~31.7 M).
if [[ ${CORPUS:-} == linux ]]; then
  CORPUS_PATHS=${CORPUS_PATHS:-"/tmp/big/src /usr /opt /root /home /srv"}
  CORPUS_GLOBS=${CORPUS_GLOBS:-"**/*.py **/*.pyi **/*.h **/*.hpp **/*.cuh **/*.c **/*.cc **/*.cpp **/*.S **/*.md **/*.rst **/*.txt"}
  CORPUS_MAX_BYTES=${CORPUS_MAX_BYTES:-3_000_000_000} CORPUS_VAL_FRACTION=${CORPUS_VAL_FRACTION:-0.08}
  EVAL_TOKENS=${EVAL_TOKENS:-20_971_520}
fi
STDLIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CORPUS_PATHS=${CORPUS_PATHS:-"$SITE $STDLIB"}
CORPUS_GLOBS=${CORPUS_GLOBS:-"**/*.py"}
DATA_BLOCK=$'[data]\nkind = "local"\nval_fraction = '"${CORPUS_VAL_FRACTION:-0.1}"$'\nmax_bytes = '"${CORPUS_MAX_BYTES:-200_000_000}"

corpus_program() {  # $1: budget seconds; prints the program as shipped with this corpus and an
  # evaluation size that fits its validation split (the Python-only one: 5.3 M tokens)
  sed -e "s/^budget_s = .*/budget_s = $1/" -e "s/^eval_tokens = .*/eval_tokens = ${EVAL_TOKENS:-6_291_456}/" \
      -e 's/^tokenizer_train_chars = .*/tokenizer_train_chars = 100_000_000/' -e '/^\[data\]/,$d' \
      programs/gpt-climbmix/program.toml
  echo "$DATA_BLOCK"
}

prepare_corpus() {  # $1: a program.toml that ends with DATA_BLOCK; the data goes to $WORK/data
  local args=() p g
  for p in $CORPUS_PATHS; do args+=(--path "$p"); done
  set -f  # the globs are trainer.prepare's, not this shell's
  for g in $CORPUS_GLOBS; do args+=(--glob "$g"); done
  set +f
  echo "== prepare (local: $CORPUS_PATHS; $CORPUS_GLOBS)"
  $PY -m trainer.prepare --program "$1" --data-dir "$WORK/data" "${args[@]}"
}
