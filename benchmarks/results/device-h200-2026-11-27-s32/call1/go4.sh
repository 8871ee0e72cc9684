#!/usr/bin/env bash
# Stop 32's device call (one call, at most ~570 s): wheels and data in, then on this checkout
# (1) device_run.sh steps env, preprocess, scaling (REPEATS rounds, default 3) and engine: issue 4's end-to-end
#     ratio at 16 workers and issue 7's 6-worker efficiency with the current engine;
# (2) with the time left: part D of go3.sh (GIL switch interval 0.5 against 5 ms at 16 threads), else nothing.
# Run: OUT=$OUT NEW=d5725f7 bash .devdata/go4.sh   (carry [".devdata"])
set -u
T0=$SECONDS
PY=${PYTHON:-python3}
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
LIMIT=${LIMIT_S:-565}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NUMBA_CACHE_DIR=$PWD/.numba_cache
if [[ -z ${NOWHL:-} ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-site \
        .devdata/whl/*.whl || exit 3
    export PYTHONPATH=/tmp/device-site
fi
D=${DATA:-/tmp/chaos_t2}
[[ -d $D ]] || $PY benchmarks/device_data.py unpack .devdata/chaos $D || exit 3
echo "== setup $(( SECONDS - T0 )) s; $(nproc) CPUs"
B=$(( LIMIT - 50 - (SECONDS - T0) ))
PYTHON=$PY REPEATS=${REPEATS:-3} QUICK=${QUICK:-} STEPS=${STEPS:-env,preprocess,engine,scaling} \
    benchmarks/device_run.sh $D /tmp/dr $B 2>&1 | tee "$OUTD/run.log"
cp /tmp/dr/device_results.tar.gz "$OUTD/bench.tar.gz" 2>/dev/null || tar -czf "$OUTD/bench.tar.gz" -C /tmp dr/work
left() { echo $(( LIMIT - (SECONDS - T0) )); }
part_D() {   # the GIL switch interval at 16 threads: the engine's 0.5 ms against the interpreter's 5 ms
    (( $(left) < 60 )) && { echo "== part D skipped: $(left) s left"; return; }
    echo "== part D at $(( SECONDS - T0 )) s"
    local src=.devdata/trees/${NEW:?NEW=<tree name>} t5=/tmp/swi5
    rm -rf $t5 && cp -r "$src" $t5 && sed -i 's/^SWITCH_INTERVAL_S = 0.0005/SWITCH_INTERVAL_S = 0.005/' $t5/engine/pipeline.py
    grep -q "^SWITCH_INTERVAL_S = 0.005$" $t5/engine/pipeline.py || { echo "== part D: patch failed"; return; }
    mkdir -p "$OUTD/swi"
    for r in 1 2 3 4; do
      for v in 0.5 5; do
        (( $(left) < 22 )) && { echo "== part D stops: $(left) s left"; return; }
        local tree=$PWD/$src; [[ $v == 5 ]] && tree=$t5
        ( cd "$tree" && timeout 30 $PY benchmarks/scaling.py --input $D --workers ${D_WORKERS:-16} --backends threads \
            --pinned none --repeats 2 --tag swi$v-r$r --out-dir "$OUTD/swi" > "$OUTD/swi/log-swi$v-r$r.txt" 2>&1 )
        $PY -c "import json,sys; d=json.load(open(sys.argv[1])); p=d['points'][0]; print('switch', sys.argv[2], 'ms r'+sys.argv[3], round(p['fps']), 'busy on core', p['profile'].get('busy_on_cpu_pct'))" \
            "$OUTD/swi/scaling-swi$v-r$r.json" $v $r 2>/dev/null || echo "switch $v r$r: no result"
      done
    done
}
part_D
echo "== total $(( SECONDS - T0 )) s"
