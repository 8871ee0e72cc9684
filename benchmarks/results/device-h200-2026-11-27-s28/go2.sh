#!/usr/bin/env bash
# Stop 28, call 2: volumes loaded ahead (engine.readers, default min(workers, 8)) at 16 workers, 8 / 12 / 16,
# both backends, rounds alternating; this checkout (the early loads of 180cb38).
set -u
T0=$SECONDS
PY=${PYTHON:-python3}
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD/rd"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NUMBA_CACHE_DIR=$PWD/.numba_cache
if [[ -z ${NOWHL:-} ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-site \
        .devdata/whl/*.whl || exit 3
    export PYTHONPATH=/tmp/device-site
fi
D=/tmp/chaos_t2
[[ -d $D ]] || $PY benchmarks/device_data.py unpack .devdata/chaos $D || exit 3
$PY benchmarks/scaling.py --input $D --max-volumes 1 --workers 1 --pinned none --repeats 1 --no-warmup \
    --tag warm --out-dir /tmp/warm > /dev/null 2>&1
echo "== setup $(( SECONDS - T0 )) s"
for r in 1 2 3 4; do
  for k in ${READERS:-8 12 16}; do
    (( SECONDS - T0 > ${LIMIT_S:-200} )) && break 2
    timeout 60 $PY benchmarks/scaling.py --input $D --workers ${W:-16} --pinned none --repeats 2 --readers $k \
        --tag rd$k-r$r --out-dir "$OUTD/rd" > "$OUTD/rd/log-rd$k-r$r.txt" 2>&1
    $PY - "$OUTD/rd/scaling-rd$k-r$r.json" $k $r <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for p in d["points"]:
    pr = p["profile"]
    print(f"readers {sys.argv[2]} r{sys.argv[3]} {p['backend']:9s} {p['workers']}w {p['fps']:7.0f} "
          f"wait {pr['waiting_pct']} ({pr.get('waiting_volume_pct')} / {pr.get('waiting_room_pct')}) "
          f"barrier {pr['barrier_pct']} other {pr.get('other_pct')} rss {p.get('profile', {}).get('peak_rss_mb')}")
PY
  done
done
tar -czf "$OUTD/rd.tar.gz" -C "$OUTD" rd && rm -rf "$OUTD/rd"
echo "== total $(( SECONDS - T0 )) s"
