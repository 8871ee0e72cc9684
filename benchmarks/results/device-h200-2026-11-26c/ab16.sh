#!/usr/bin/env bash
# A/B on the device: HEAD against 225ed45 (before the sync thread and the dispatcher's wake-up change),
# scaling.py at a few worker counts, alternating, same machine. ab16.sh DATA OUT WORKERS ROUNDS CAP
set -u
DATA=$1; OUT=$2; WK=${3:-1,6,16}; ROUNDS=${4:-2}; CAP=${5:-60}; PY=${PYTHON:-python3}
ROOT=$PWD
mkdir -p "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for v in new old; do
    d=$ROOT; [[ $v == old ]] && d=$ROOT/.devdata/old225
    echo "== $(date +%T) ab $v round $r"
    (cd "$d" && NUMBA_CACHE_DIR=$d/.numba_cache timeout -k 5 "$CAP" $PY benchmarks/scaling.py --input "$DATA" \
        --workers "$WK" --pinned none --repeats 1 --tag "ab-$v-$r" --out-dir "$OUT") > "$OUT/ab-$v-$r.log" 2>&1
    echo "exit $?"; grep -E "^\| (threads|processes)" "$OUT/ab-$v-$r.log"
  done
done
