#!/usr/bin/env bash
# device call 3: A/B (session-start engine files at batch 128 / final / final with the old per-slice path /
# switch interval 0.5 ms, threads 16), then benchmarks/engine.py on the final code. go3.sh DATA OUT
set -u
DATA=$1; OUT=$2; T0=$SECONDS
export NUMBA_CACHE_DIR=$PWD/.numba_cache
# both per-slice paths compiled before any timed run (the variants share this cache)
${PYTHON:-python3} -c "
from alpnet.config import load; from engine.slice_worker import warm_slice; from engine.prepare import body_mask
from engine.superpixels import pseudolabels, pseudolabels_u16
cfg = load(None, []); w = warm_slice(256, cfg.prepare.fg_threshold); fg = body_mask(w, cfg.prepare.fg_threshold)
pseudolabels(w, fg, cfg.superpixels); print('warm', pseudolabels_u16(w, fg, cfg.superpixels)[1])"
.devdata/ab2.sh "$DATA" /tmp/ab3/o ${ABB:-130} 6,16 3 "base:128 new:0 split:0 swi500:0" 2>&1 | tee "$OUT/ab3.log"
cp /tmp/ab3/ab2.tar.gz "$OUT/ab3.tar.gz"
echo "== engine at $(( SECONDS - T0 )) s"
STEPS=engine benchmarks/device_run.sh "$DATA" /tmp/e3 ${EB:-200} 2>&1 | tee "$OUT/e3.log"
cp /tmp/e3/device_results.tar.gz "$OUT/e3.tar.gz"
echo "== total $(( SECONDS - T0 )) s"
