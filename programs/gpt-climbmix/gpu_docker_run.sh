#!/usr/bin/env bash
# gpt-climbmix in the hardened container on a GPU host that has no NVIDIA Container Toolkit, no
# registry and no network (issue 24), in one job, against the local backend on the same card:
#   1. Debian's engine from ENGINE_ARCHIVE (gpu_docker_engine.sh pack made it), started here;
#   2. the sandbox image from Dockerfile.gpu on a base made of this host's own packages and torch
#      (`python -m sandbox.image build --flavor gpu --host-base`), the rest from WHEELHOUSE;
#   3. what a leased and an unleased container see (gpu_docker_check.py), and `doctor`;
#   4. the local corpus (gpu_corpus.sh), prepared once through the CLI;
#   5. for each budget, the baseline through the CLI's run path (`autoresearch-mcp run`) on a docker
#      lab, then on a local lab over the same data; summary.json holds both from their ledgers and
#      run folders (val_bpb, tokens/s, start-up, train and score phases, the GPU's UUID).
# OUT_DIR.tgz holds OUT_DIR as it stands, remade after each step (a job cut short still tells).
#   usage: programs/gpt-climbmix/gpu_docker_run.sh OUT_DIR ENGINE_ARCHIVE WHEELHOUSE [BUDGET_S ...]
#          (from the repo root, as root; budgets default to "30 300"). GIT_DEB: Debian's git package,
#          unpacked when the host has no git (the lab keeps its books in git).
# BACKENDS (default "docker local") picks the labs. PROGRAM=tiny-stdlib with ENGINE_ARCHIVE "-" (an
# engine already answering) and FLAVOR=cpu rehearses the same steps on a CPU box.
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: $0 OUT_DIR ENGINE_ARCHIVE WHEELHOUSE [BUDGET_S ...]}" && cd "$1" && pwd)
ARCHIVE=${2:?engine archive, or - for an engine already running}
WHEELS=$(cd "${3:?wheelhouse}" && pwd)
shift 3
if (($#)); then BUDGETS=("$@"); else BUDGETS=(30 300); fi
PY=${PYTHON:-python3}
PROGRAM=${PROGRAM:-gpt-climbmix}
FLAVOR=${FLAVOR:-gpu}
IMAGE=${IMAGE:-autoresearch-sandbox:$FLAVOR}
WORK=${WORK:-/tmp/gpt-climbmix-docker}
rm -rf "$WORK/labs" && mkdir -p "$WORK/labs"
cli() { $PY -m server.cli --log-stderr --log-level WARNING "$@"; }
stamp() { tar -czf "$OUT.tgz" -C "$OUT" .; echo "== $(date -u +%H:%M:%S) $*"; }
timed() {  # NAME COMMAND...: run it, log to OUT/NAME.log, add its seconds to OUT/timings.txt
  local name=$1 t0=$SECONDS; shift
  "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed:"; tail -40 "$OUT/$name.log"; exit 1; }
  echo "$name $((SECONDS - t0)) s" | tee -a "$OUT/timings.txt"
}

stamp "host"
{ nvidia-smi --query-gpu=name,uuid,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c 'import os, sys, torch; print("python", sys.version.split()[0], os.path.realpath(sys.executable),
      "base", sys.base_prefix, "torch", torch.__version__)'; uname -r; } | tee "$OUT/host.txt"
if ! command -v git > /dev/null; then
  dpkg -x "${GIT_DEB:?this host has no git: set GIT_DEB to Debian\'s git package}" /tmp/git-deb
  export PATH=/tmp/git-deb/usr/bin:$PATH GIT_EXEC_PATH=/tmp/git-deb/usr/lib/git-core \
         GIT_TEMPLATE_DIR=/tmp/git-deb/usr/share/git-core/templates
fi
git --version | tee -a "$OUT/host.txt"

stamp "engine"
if [[ $ARCHIVE != - ]]; then
  timed engine programs/gpt-climbmix/gpu_docker_engine.sh start "$ARCHIVE"
  eval "$(grep '^export ' "$OUT/engine.log")"
fi
docker info --format 'engine {{.ServerVersion}}, {{.Driver}}, cgroup {{.CgroupVersion}}, security: {{.SecurityOptions}}' \
  | tee -a "$OUT/host.txt"

stamp "image: host base + Dockerfile.gpu"
timed image $PY -m sandbox.image build --flavor "$FLAVOR" --host-base --wheelhouse "$WHEELS" --tag "$IMAGE"
grep -E '^host base|^importing|^made base' "$OUT/image.log"
docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | tee -a "$OUT/host.txt"
for i in 1 2 3; do  # what a container's start and end cost, alone
  t0=$(date +%s%N); docker run --rm --network none --read-only "$IMAGE" true; t1=$(date +%s%N)
  echo "container start+stop $i: $(((t1 - t0) / 1000000)) ms"
done | tee -a "$OUT/timings.txt"
for cache in image none; do  # torch's import, with the image's bytecode and without (a prefix that has none)
  prefix=(); [[ $cache == none ]] && prefix=(-e PYTHONPYCACHEPREFIX=/tmp/nopyc)
  for i in 1 2; do
    docker run --rm --network none --read-only --tmpfs /tmp "${prefix[@]}" "$IMAGE" python3 -c \
      'import time; t = time.perf_counter(); import torch; print(f"import torch: {time.perf_counter() - t:.2f} s")' \
      | sed "s/^/bytecode $cache, $i: /"
  done
done | tee -a "$OUT/timings.txt"

stamp "what a leased and an unleased container see"
if [[ $FLAVOR == gpu ]]; then timed check $PY programs/gpt-climbmix/gpu_docker_check.py "$WORK/check" "$IMAGE" 0; fi

stamp "program and data"
prog=$WORK/program/$PROGRAM prepare_args=()
rm -rf "$prog" && mkdir -p "$prog" && cp programs/"$PROGRAM"/{train.py,program.md} "$prog/"
if [[ $PROGRAM == gpt-climbmix ]]; then
  source programs/gpt-climbmix/gpu_corpus.sh
  corpus_program 300 > "$prog/program.toml"
  prepare_args=(--on-host --source local)
  for p in $CORPUS_PATHS; do prepare_args+=(--path "$p"); done
  set -f; for g in $CORPUS_GLOBS; do prepare_args+=(--glob "$g"); done; set +f
else
  cp programs/"$PROGRAM"/program.toml "$prog/"
fi

n=0
for budget in "${BUDGETS[@]}"; do
  for backend in ${BACKENDS:-docker local}; do
    lab=$WORK/labs/$backend-$budget
    image_arg=(); [[ $backend == docker ]] && image_arg=(--image "$IMAGE")
    stamp "lab $lab"
    timed "prepare-$backend-$budget" cli prepare "$prog" --lab "$lab" --backend "$backend" "${image_arg[@]}" \
      --budget-s "$budget" --data-dir "$WORK/data" "${prepare_args[@]}"
    if ((n++ == 0)); then cli doctor --lab "$lab" > "$OUT/doctor.txt" 2>&1 || true; fi
    stamp "run: $backend, $budget s"
    cli run --lab "$lab" --agent gpu --description "baseline, $backend backend, $budget s" \
      > "$OUT/run-$backend-$budget.json" 2> "$OUT/run-$backend-$budget.log" || true
    tail -1 "$OUT/run-$backend-$budget.log"
  done
done

stamp "summary"
$PY - "$WORK/labs" > "$OUT/summary.json" <<'EOF'
import json, sqlite3, sys
from pathlib import Path
rows = {}
for lab in sorted(Path(sys.argv[1]).iterdir()):
    db = sqlite3.connect(f"file:{lab / 'ledger.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    for r in db.execute("SELECT * FROM runs ORDER BY seq"):
        r = dict(r)
        train = {}
        for f in sorted((lab / "runs" / r["run_id"]).rglob("result.json")):
            try:
                train.update({k: v for k, v in json.loads(f.read_text()).items() if not isinstance(v, (dict, list))})
            except (OSError, ValueError):
                pass
        keep = ("status", "val_bpb", "verified", "startup_seconds", "train_phase_seconds", "score_phase_seconds",
                "training_seconds", "total_seconds", "num_steps", "epochs", "peak_memory_mb", "gpu", "slot", "detail")
        rows[f"{lab.name}/{r['run_id']}"] = {**{k: r.get(k) for k in keep},
                                              **{k: train.get(k) for k in ("tokens_per_s", "gpu_uuid")}}
print(json.dumps(rows, indent=1))
EOF
cat "$OUT/summary.json"
stamp "done"
