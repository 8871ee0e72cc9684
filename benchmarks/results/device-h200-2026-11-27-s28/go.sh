#!/usr/bin/env bash
# The device call of stop 28: wheels and data in, then (A) the processes backend of three commits side by side
# at 6 and 16 workers (stop 16's b603f9a, stop 27's a1af2e7, and 180cb38 with loads started early), each from
# a git-archive folder in .devdata/trees, then (B) scaling.py and engine.py on this checkout via device_run.sh.
set -u
T0=$SECONDS
PY=${PYTHON:-python3}
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [[ -z ${NOWHL:-} ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-site \
        .devdata/whl/*.whl || exit 3
    export PYTHONPATH=/tmp/device-site
fi
D=/tmp/chaos_t2
[[ -d $D ]] || $PY benchmarks/device_data.py unpack .devdata/chaos $D || exit 3
echo "== setup $(( SECONDS - T0 )) s; $(nproc) CPUs"
PYTHON=$PY WORKERS=${AB_WORKERS:-6,16} BACKENDS=processes ROUNDS=${AB_ROUNDS:-4} REPEATS=2 LIMIT_S=${AB_LIMIT:-170} \
    benchmarks/ab_commits.sh $D /tmp/ab .devdata/trees/b603f9a .devdata/trees/a1af2e7 .devdata/trees/180cb38 \
    2>&1 | tee "$OUTD/ab.log"
tar -czf "$OUTD/ab.tar.gz" -C /tmp ab
echo "== part B at $(( SECONDS - T0 )) s"
B=$(( ${TOTAL:-550} - (SECONDS - T0) ))
PYTHON=$PY REPEATS=2 STEPS=${B_STEPS:-env,preprocess,scaling,engine} benchmarks/device_run.sh $D /tmp/dr $B 2>&1 \
    | tee "$OUTD/run.log"
cp /tmp/dr/device_results.tar.gz "$OUTD/bench.tar.gz"
echo "== total $(( SECONDS - T0 )) s"
