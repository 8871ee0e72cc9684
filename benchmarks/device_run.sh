#!/usr/bin/env bash
# One prepared run on a GPU machine with many cores: issue 5's GPU check (the paper config, 200 iterations:
# steps/s, data-time share, peak GPU memory) and issue 7's many-core scaling, plus the engine benchmark there.
#
#   benchmarks/device_run.sh DATA_DIR OUT_DIR [BUDGET_S]
#
# DATA_DIR: the CHAOS-T2 folder (image_<id>/label_<id>.nii.gz). Each step runs under a time limit, the smaller of
# its own cap and what is left of BUDGET_S (default 450), so that one stuck step cannot eat the others' time;
# a failed step is logged and the next one runs. Logs and result files go to OUT_DIR/work, packed at the end
# into OUT_DIR/device_results.tar.gz. Environment: PYTHON (default python3), TRAIN_DEVICE (default cuda),
# STEPS (comma list, default env,preprocess,train,scaling,engine,evaluate; add probe for the CPU-target probe
# and budget for the perf CPU budget),
# REPEATS (scaling, default 2), QUICK=1 for a smoke run of the script itself (tiny iteration counts, --quick
# benchmarks; any machine), WHEELS (a folder of wheels to install first, into /tmp/device-site: the packages
# that machine's image lacks), PACKED (a folder made by `benchmarks/device_data.py pack`: rebuilt into DATA_DIR
# first, every file checked). Before any step the script checks that every module the project imports is
# there and stops naming the missing ones (exit 3).
set -u
DATA=${1:?usage: benchmarks/device_run.sh DATA_DIR OUT_DIR [BUDGET_S]}
OUT=${2:?usage: benchmarks/device_run.sh DATA_DIR OUT_DIR [BUDGET_S]}
BUDGET=${3:-450}
PY=${PYTHON:-python3}
DEV=${TRAIN_DEVICE:-cuda}
QUICK=${QUICK:-}
STEPS=",${STEPS:-env,preprocess,train,scaling,engine,evaluate},"
W=$OUT/work
mkdir -p "$W/results"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$PWD/.numba_cache}
T0=$SECONDS
NCPU=$(nproc)

if [[ -n ${WHEELS:-} ]]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-site \
        "$WHEELS"/*.whl || { echo "== preflight: installing the wheels of $WHEELS failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/device-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -n ${PACKED:-} ]]; then
    $PY benchmarks/device_data.py unpack "$PACKED" "$DATA" || exit 3
fi
$PY - <<'PREFLIGHT' || exit 3
import importlib.util, sys
need = "numpy scipy skimage numba h5py psutil yaml nibabel pydicom tqdm matplotlib PIL isal deflate torch torchvision"
missing = [m for m in need.split() if importlib.util.find_spec(m) is None]
if missing:
    sys.exit("== preflight: modules missing on this machine: " + " ".join(missing)
             + " (bring them as wheels: WHEELS=folder, see the README's Results section)")
print("== preflight: every module the project imports is there")
PREFLIGHT
# Which code runs: the .git that reaches that machine can be older than its files (stop 28), the digest cannot.
echo "== code: git $(git rev-parse --short HEAD 2>/dev/null || echo none), sources $($PY -m engine.runinfo)"

step() {   # step NAME CAP_S CMD...: run CMD, output in $W/NAME.log, limited to min(CAP_S, time left)
    local name=$1 cap=$2; shift 2
    [[ $STEPS == *",${name%%_*},"* ]] || return 0
    local lim=$(( BUDGET - (SECONDS - T0) ))
    (( lim > cap )) && lim=$cap
    if (( lim < 15 )); then echo "== $name: skipped (${lim} s left of the budget)"; return 1; fi
    echo "== $(date +%T) $name (limit ${lim} s): $*"
    local t=$SECONDS rc
    timeout -k 5 "$lim" "$@" > "$W/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( SECONDS - t )) s"
    tail -n 6 "$W/$name.log"
    return $rc
}

if [[ -n $QUICK ]]; then ITERS=6; LOGN=3; SCALE=(--quick --workers 1,2); ENG=(--quick --workers 1,2)
else ITERS=200; LOGN=50; SCALE=(--workers 1,2,4,6,8,12,16,24 --pinned 1,6 --repeats "${REPEATS:-2}")
     ENG=(--workers 1,2,6,$NCPU --skip compression)
fi

step env 60 bash -c "nvidia-smi || true; nproc; free -g; lscpu || true; $PY -c 'import sys, torch, numba, numpy, h5py, \
skimage, nibabel, llvmlite.binding as ll; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", \
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"-\"); print(\"numba\", \
numba.__version__, \"numpy\", numpy.__version__, \"h5py\", h5py.__version__, \"skimage\", skimage.__version__, \
\"nibabel\", nibabel.__version__); print(\"llvm host cpu\", ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten())'"

# The store every later step reads; its profile is the engine at all cores (numba compiles here, first run).
step preprocess 150 $PY cli.py preprocess --input "$DATA" --threads "$NCPU" --out "$W/chaos.h5" --no-progress
[[ -f $W/chaos.h5 ]] && $PY cli.py inspect "$W/chaos.h5" --json > "$W/inspect.json" 2>&1

# Why the numba kernel ran ~4x slower per core on the first device machine (Xeon) than on the 2-core VM (EPYC)
# while the C Felzenszwalb ran only 1.7x slower: the same 1-vs-2-thread kernel timing compiled for several LLVM
# CPU targets (NUMBA_CPU_NAME; empty = the host's), side by side, each pinned to its own 2 CPUs. Answered on
# 2026-11-26 (README, "On 16 cores": the machine, not the target), so it runs only when STEPS names it.
PROBE='i=0; for t in "$@"; do
    NUMBA_CPU_NAME=$t NUMBA_CACHE_DIR="$W/numba-$i" taskset -c "${PIN:-$((2 * i)),$((2 * i + 1))}" \
        $PY benchmarks/kernels.py --data "$DATA" --threads-only --every 8 --tag "probe-${t:-host}" \
        > "$W/probe-${t:-host}.log" 2>&1 &
    i=$((i + 1)); done; wait
for t in "$@"; do echo "target ${t:-host}: $(grep "^{" "$W/probe-${t:-host}.log")"; done'
TARGETS=("" generic haswell skylake-avx512 icelake-server sapphirerapids)
PIN=; (( NCPU < 2 * ${#TARGETS[@]} )) && { TARGETS=("" generic); PIN=0-$((NCPU - 1)); }
export DATA W PY PIN
step probe 90 bash -c "$PROBE" probe "${TARGETS[@]}"
cp benchmarks/results/kernels-threads-probe-* "$W/results/" 2>/dev/null

# Issue 5: the paper config (ResNet-101, all paper constants, no pretrained file on that machine), 200 iterations,
# in float32 and in bf16 autocast + channels_last.
TRAIN=(cli.py train --store "$W/chaos.h5" --config configs/paper.yaml --device "$DEV" --set model.pretrained=
       --set "train.iterations=$ITERS" --set "train.log_every=$LOGN" --set "train.ckpt_every=$ITERS"
       --set train.keep_checkpoints=false)
step train_fp32 150 $PY "${TRAIN[@]}" --out "$W/paper_fp32"
step train_bf16 150 $PY "${TRAIN[@]}" --out "$W/paper_bf16" --set train.amp=true --set train.channels_last=true

# Issue 7 (and 4): scaling per worker count, both backends (1 and 6 workers also pinned to as many CPUs, for the
# per-core efficiency at 6); the engine benchmark at 1, 2, 6 and all workers (the bare kernel's own
# scaling at 6 threads is the machine's share of the 6-worker efficiency).
step scaling 200 $PY benchmarks/scaling.py --input "$DATA" "${SCALE[@]}" --tag 16core --out-dir "$W/results"
step engine 240 $PY benchmarks/engine.py --input "$DATA" "${ENG[@]}" --tag 16core --out-dir "$W/results"
# Where the CPU goes at all workers (perf samples by library; needs Linux perf there): only when STEPS names it.
step budget 120 $PY benchmarks/cpu_budget.py --input "$DATA" --runs "threads:1,threads:$NCPU,processes:$NCPU" \
    --tag 16core --out-dir "$W/results"

# The evaluation protocol on the GPU with the fp32 checkpoint (200 iterations: a check of the path, not a Dice).
step evaluate 120 $PY cli.py evaluate --config configs/paper.yaml --checkpoint "$W/paper_fp32/checkpoint.pt" \
    --data "$DATA" --device "$DEV" --out "$W/eval_fp32"

echo "== total $(( SECONDS - T0 )) s"
rm -f "$W/chaos.h5" "$W"/*/checkpoint*.pt
rm -rf "$W/chaos.h5.parts"
tar -czf "$OUT/device_results.tar.gz" -C "$OUT" work && ls -la "$OUT"
