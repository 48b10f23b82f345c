#!/usr/bin/env bash
# A job that outlives the device tool's call (a call lasts at most 10 minutes; a job of several
# 300-s runs does not fit in one): `start` runs COMMAND in its own session with its log in
# /tmp/jobs/NAME; `wait` holds the call until the job ends or SECONDS pass, then copies the log and
# FILES (paths or globs, relative to the job's folder) to OUT_DIR, r1/x as r1-x. The machine stays warm only while
# a call runs, so the next `wait` must follow at once.
#   usage: gpu_background.sh start NAME COMMAND...  |  gpu_background.sh wait NAME OUT_DIR SECONDS [FILES...]
set -euo pipefail
job=/tmp/jobs/${2:?usage: $0 start NAME COMMAND... | wait NAME OUT_DIR SECONDS [FILES...]}
case $1 in
  start)
    mkdir -p "$job"; shift 2
    setsid nohup bash -c "cd '$PWD' && ( $* ); echo \$? > '$job/rc'" > "$job/log" 2>&1 < /dev/null &
    echo "started $job (pid $!)";;
  wait)
    out=$(mkdir -p "$3" && cd "$3" && pwd) end=$((SECONDS + $4)); shift 4
    while [[ ! -f $job/rc && $SECONDS -lt $end ]]; do sleep 5; done
    cp "$job/log" "$out/"
    (cd "$job" && for f in "$@"; do for p in $f; do [[ -f $p ]] && cp "$p" "$out/${p//\//-}"; done; done) || true
    if [[ -f $job/rc ]]; then echo "job ended, rc $(cat "$job/rc")"; else echo "job still running"; fi;;
  *) echo "usage: $0 start NAME COMMAND... | wait NAME OUT_DIR SECONDS [FILES...]" >&2; exit 2;;
esac
