#!/usr/bin/env bash
# Same machine, same paths (so one numba cache): the HEAD engine against variants of its four scheduling/store
# files, alternating, scaling.py at WORKERS workers. variants.sh DATA OUT BUDGET_S WORKERS
set -u
DATA=$1; OUT=$2; END=$((SECONDS + ${3:-190})); WK=${4:-6}; PY=${PYTHON:-python3}
export NUMBA_CACHE_DIR=$PWD/.numba_cache MPLBACKEND=Agg
mkdir -p "$OUT" /tmp/headfiles
FILES="pipeline process_backend schedule store"
for f in $FILES; do cp engine/$f.py /tmp/headfiles/; done
restore() { for f in $FILES; do cp /tmp/headfiles/$f.py engine/; done; }
$PY cli.py preprocess --input "$DATA" --out /tmp/warm.h5 --overwrite --no-progress > "$OUT/warm.log" 2>&1
tail -3 "$OUT/warm.log"
r=1
while (( SECONDS < END )); do
  for v in new old nohungry nosync; do
    (( SECONDS < END )) || break
    restore; [[ $v != new ]] && cp .devdata/variants/$v/engine/*.py engine/
    timeout -k 5 60 $PY benchmarks/scaling.py --input "$DATA" --workers "$WK" --pinned none --repeats 2 \
        --tag "v-$v-$r" --out-dir "$OUT" > "$OUT/v-$v-$r.log" 2>&1
    echo "$(date +%T) $v round $r: $(grep -E '^\| (threads|processes) \| ' "$OUT/v-$v-$r.log" | cut -d'|' -f2-6,12-15 | tr '\n' ' ')"
  done
  r=$((r + 1))
done
restore
git status --short engine/
