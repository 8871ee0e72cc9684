#!/usr/bin/env bash
# A/B on one machine (same paths, one numba cache): working-tree engine against variants, scaling.py.
# ab2.sh DATA OUT BUDGET_S WORKERS COPIES CONFIGS   (CONFIGS e.g. "head:128 new:128 new:256")
set -u
DATA=$1; OUT=$2; END=$((SECONDS + ${3:-150})); WK=${4:-6,16}; CP=${5:-3}; CONFIGS=${6:-"head:128 new:128 new:256"}
PY=${PYTHON:-python3}
export NUMBA_CACHE_DIR=$PWD/.numba_cache MPLBACKEND=Agg
mkdir -p "$OUT" /tmp/newfiles
FILES="pipeline store slice_worker"
for f in $FILES; do cp engine/$f.py /tmp/newfiles/; done
restore() { for f in $FILES; do cp /tmp/newfiles/$f.py engine/; done; }
$PY cli.py preprocess --input "$DATA" --out /tmp/warm.h5 --overwrite --no-progress > "$OUT/warm.log" 2>&1
tail -1 "$OUT/warm.log"
r=1
while (( SECONDS < END )); do
  for c in $CONFIGS; do
    (( SECONDS < END )) || break
    v=${c%%:*}; b=${c##*:}
    restore; [[ $v != new && $v != swi* ]] && cp .devdata/variants/$v/engine/*.py engine/
    RUN=(benchmarks/scaling.py --workers "$WK"); 
    # swiN: the working tree, threads at the largest worker count, switch interval N microseconds
    [[ $v == swi* ]] && RUN=(-c "import sys, runpy; sys.setswitchinterval(${v#swi} * 1e-6); sys.argv = sys.argv[1:]; \
runpy.run_path(sys.argv[0], run_name='__main__')" benchmarks/scaling.py --workers "${WK##*,}" --backends threads)
    timeout -k 5 90 $PY "${RUN[@]}" --input "$DATA" --pinned none --repeats 2 --no-warmup \
        --copies "$CP" --set engine.batch=$b --tag "ab-$v-$b-$r" --out-dir "$OUT" > "$OUT/ab-$v-$b-$r.log" 2>&1
    echo "$(date +%T) $v batch $b round $r: $(grep -E '^\| (threads|processes) \| ' "$OUT/ab-$v-$b-$r.log" | cut -d'|' -f2-6,12-15 | tr '\n' ' ')"
  done
  r=$((r + 1))
done
restore
tar -czf "$OUT/../ab2.tar.gz" -C "$OUT" .
