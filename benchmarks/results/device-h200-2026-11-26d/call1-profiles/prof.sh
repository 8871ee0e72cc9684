#!/usr/bin/env bash
# py-spy profiles of preprocess on 10x CHAOS at WORKERS workers, both backends: GIL holders and all threads.
# prof.sh DATA OUT WORKERS
set -u
DATA=$(realpath "$1"); OUT=$2; WK=${3:-16}; PY=${PYTHON:-python3}; SPY=.devdata/py-spy
export NUMBA_CACHE_DIR=$PWD/.numba_cache MPLBACKEND=Agg
mkdir -p "$OUT" /tmp/c10
for r in 0 1 2 3 4 5 6 7 8 9; do for f in "$DATA"/*.nii.gz; do b=$(basename "$f"); ln -sf "$f" /tmp/c10/${b%%_*}_${r}${b#*_}; done; done
ls /tmp/c10 | wc -l
$PY cli.py preprocess --input "$DATA" --out /tmp/warm.h5 --overwrite --no-progress > "$OUT/warm.log" 2>&1; tail -2 "$OUT/warm.log"
for be in ${BACKENDS:-threads processes}; do
  rm -rf /tmp/p.h5*; timeout 60 $PY cli.py preprocess --backend $be --threads $WK --input /tmp/c10 --out /tmp/p.h5 --overwrite --no-progress > "$OUT/plain-$be.log" 2>&1
  echo "$be plain: $(grep -E 'workers: busy|slices/s in' "$OUT/plain-$be.log" | tail -2 | tr '\n' ' ')"
  for mode in ${MODES:-gil idle}; do
    flag=--gil; [[ $mode == idle ]] && flag="--idle --threads"
    rm -rf /tmp/p.h5*; timeout 90 $SPY record $flag --nonblocking -r 250 -f raw -o "$OUT/$be-$mode.txt" -- $PY cli.py preprocess --backend $be --threads $WK \
        --input /tmp/c10 --out /tmp/p.h5 --overwrite --no-progress > "$OUT/$be-$mode.log" 2>&1
    echo "$be $mode rc=$? $(grep -iE 'slices/s' "$OUT/$be-$mode.log" | head -1) $(tail -1 "$OUT/$be-$mode.log")"
    cp /tmp/p.h5.profile.json "$OUT/$be-$mode.profile.json" 2>/dev/null
  done
done
