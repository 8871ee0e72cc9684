#!/usr/bin/env bash
# Stop 32's second device call: the batch at 16 workers, 128 / 256 (the automatic one) / 512, both backends,
# rounds alternating (scaling.py --workers 16 --pinned none --repeats 2 --set engine.batch=B), this checkout.
set -u
T0=$SECONDS
PY=${PYTHON:-python3}
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD/batch"
LIMIT=${LIMIT_S:-300}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NUMBA_CACHE_DIR=$PWD/.numba_cache
if [[ -z ${NOWHL:-} ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-site \
        .devdata/whl/*.whl || exit 3
    export PYTHONPATH=/tmp/device-site
fi
D=${DATA:-/tmp/chaos_t2}
[[ -d $D ]] || $PY benchmarks/device_data.py unpack .devdata/chaos $D || exit 3
$PY benchmarks/scaling.py --input $D --max-volumes 1 --workers 1 --pinned none --repeats 1 --no-warmup \
    --tag warm --out-dir /tmp/warm > /dev/null 2>&1          # kernels compiled once, before any timing
echo "== setup $(( SECONDS - T0 )) s; $(nproc) CPUs; sources $($PY -m engine.runinfo)"
left() { echo $(( LIMIT - (SECONDS - T0) )); }
for r in 1 2 3 4; do
  for b in ${BATCHES:-256 512 128}; do
    (( $(left) < 30 )) && { echo "== stops before round $r batch $b: $(left) s left"; break 2; }
    timeout 40 $PY benchmarks/scaling.py --input $D --workers ${B_WORKERS:-16} --pinned none --repeats 2 \
        --set engine.batch=$b --tag b$b-r$r --out-dir "$OUTD/batch" > "$OUTD/batch/log-b$b-r$r.txt" 2>&1
    $PY - "$OUTD/batch/scaling-b$b-r$r.json" $b $r <<'PY' || echo "batch $b r$r: no result"
import json, sys
d = json.load(open(sys.argv[1]))
for p in d["points"]:
    pr = p["profile"]
    c = (pr.get("commits") or {}).get("last_slice_to_commit_ms") or {}
    print(f"batch {sys.argv[2]} r{sys.argv[3]} {p['backend']:9s} {p['workers']}w {p['fps']:7.0f} "
          f"wait {pr['waiting_pct']} barrier {pr['barrier_pct']} other {pr.get('other_pct')} "
          f"last slice to commit {c.get('median')} ms rss {pr.get('peak_rss_mb')}")
PY
  done
done
rm -f "$OUTD"/batch/*.png
echo "== total $(( SECONDS - T0 )) s"
