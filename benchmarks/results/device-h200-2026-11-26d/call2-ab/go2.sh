#!/usr/bin/env bash
# device call 2: A/B of the barrier change and batch size, then a py-spy view of 16 threads. go2.sh DATA OUT
set -u
DATA=$1; OUT=$2; T0=$SECONDS
.devdata/ab2.sh "$DATA" /tmp/ab2/o ${ABB:-170} 6,16 3 "head:128 new:128 new:256" 2>&1 | tee "$OUT/ab2.log"
cp /tmp/ab2/ab2.tar.gz "$OUT/"
echo "== prof at $(( SECONDS - T0 )) s"
BACKENDS=threads .devdata/prof.sh "$DATA" /tmp/prof16 16 2>&1 | tee "$OUT/prof.log"
tar -czf "$OUT/prof16.tar.gz" -C /tmp prof16
echo "== total $(( SECONDS - T0 )) s"
