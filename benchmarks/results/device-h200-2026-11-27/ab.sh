#!/usr/bin/env bash
# A/B of the processes backend's ring and answer runs at 6 and 16 workers (variants by environment, see the hooks).
set -u
T0=$SECONDS; LIMIT=${LIMIT:-230}
PY=${PYTHON:-python3}; OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD/ab"
if [[ -z ${NOWHL:-} ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devdata/whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
D=/tmp/chaos_t2; rm -rf $D; mkdir -p $D
$PY .devdata/unpack.py .devdata/data $D || exit 1
export NUMBA_CACHE_DIR=$PWD/.numba_cache PYTHONUNBUFFERED=1 MPLBACKEND=Agg
$PY cli.py preprocess --input $D --threads ${NCPU:-16} --out /tmp/warm.h5 --no-progress 2>&1 | tail -3
echo "== setup $(( SECONDS - T0 )) s"
W=${WORKERS:-6,16}
for r in 1 2 3 4; do
  for v in A B C; do
    (( SECONDS - T0 > LIMIT )) && break 2
    case $v in A) E="";; B) E="AB_RING=wide";; C) E="AB_RESULT_RUN=1";; esac
    env $E timeout 70 $PY benchmarks/scaling.py --input $D --backends processes --workers $W --pinned none \
        --repeats 2 --tag ab-$v-$r --out-dir "$OUTD/ab" > "$OUTD/ab/log-$v-$r.txt" 2>&1
    $PY -c "
import json,sys; d=json.load(open('$OUTD/ab/scaling-ab-$v-$r.json'))
print('$v r$r', ' '.join(f\"{p['workers']}w {p['fps']:.0f} [{min(p['fps_rounds']):.0f}-{max(p['fps_rounds']):.0f}] wait {p['profile']['waiting_pct']} bar {p['profile']['barrier_pct']} busy {p['profile']['busy_pct']}\" for p in d['points']), f't={$SECONDS - $T0}')
" 2>&1 | tail -1
  done
  tar -czf "$OUTD/ab.tar.gz" -C "$OUTD" ab
done
tar -czf "$OUTD/ab.tar.gz" -C "$OUTD" ab; rm -rf "$OUTD/ab"
echo "== total $(( SECONDS - T0 )) s"
