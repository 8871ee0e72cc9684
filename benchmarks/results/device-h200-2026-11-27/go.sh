#!/usr/bin/env bash
# The whole device call of stop 27: bring the CHAOS data and the missing wheels in, then the 16-core
# scaling and engine benchmarks on HEAD, then the GPU training and evaluation smoke checks.
set -u
T0=$SECONDS
PY=${PYTHON:-python3}
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
if [[ -z ${NOWHL:-} ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devdata/whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 1
fi
$PY -c "
import importlib.util
miss = [m for m in 'numpy scipy skimage numba h5py psutil yaml nibabel pydicom tqdm matplotlib PIL isal deflate torch torchvision'.split()
        if importlib.util.find_spec(m) is None]
print('missing modules:', miss); raise SystemExit(1 if miss else 0)" || exit 1
D=/tmp/chaos_t2; rm -rf $D; mkdir -p $D
$PY .devdata/unpack.py .devdata/data $D || exit 1
echo "== setup $(( SECONDS - T0 )) s; git $(git rev-parse --short HEAD 2>/dev/null)"
export PYTHON=$PY REPEATS=${REPEATS:-3}
STEPS=env,preprocess,scaling,engine benchmarks/device_run.sh $D /tmp/dr1 ${B1:-420} 2>&1 | tee "$OUTD/run1.log"
cp /tmp/dr1/device_results.tar.gz "$OUTD/bench.tar.gz"
echo "== part 2 at $(( SECONDS - T0 )) s"
STEPS=preprocess,train,evaluate benchmarks/device_run.sh $D /tmp/dr2 ${B2:-150} 2>&1 | tee "$OUTD/run2.log"
cp /tmp/dr2/device_results.tar.gz "$OUTD/gpu.tar.gz"
echo "== total $(( SECONDS - T0 )) s"
