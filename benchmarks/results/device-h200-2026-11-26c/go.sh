#!/usr/bin/env bash
# the whole device call: DATA OUT
set -u
DATA=$1; OUT=$2; W=/tmp/dr
T0=$SECONDS
STEPS=env,preprocess,scaling benchmarks/device_run.sh "$DATA" $W/a ${B1:-175} 2>&1 | tee $W-a.log
echo "== ab start at $(( SECONDS - T0 )) s"
.devdata/ab16.sh "$DATA" $W/ab "${ABW:-1,6,16}" "${ABR:-2}" "${ABCAP:-60}" 2>&1 | tee $W-ab.log
echo "== engine start at $(( SECONDS - T0 )) s"
STEPS=engine benchmarks/device_run.sh "$DATA" $W/e ${B2:-190} 2>&1 | tee $W-e.log
tar -czf "$OUT/ab.tar.gz" -C $W ab
cp $W/a/device_results.tar.gz "$OUT/a.tar.gz"; cp $W/e/device_results.tar.gz "$OUT/e.tar.gz"
cp $W-a.log $W-ab.log $W-e.log "$OUT/" 2>/dev/null
echo "== total $(( SECONDS - T0 )) s"
