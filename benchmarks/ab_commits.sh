#!/usr/bin/env bash
# Engine throughput of several commits side by side: each commit checked out in its own git worktree and
# measured with its own benchmarks/scaling.py, the commits alternating round by round so that a slow spell of a
# shared machine hits them alike. Made for bisecting a change that shows only at many workers (the device
# machine), where each call is short.
#
#   benchmarks/ab_commits.sh DATA_DIR OUT_DIR COMMIT [COMMIT ...]
#
# Environment: PYTHON (default python3), WORKERS (default 6,16), BACKENDS (default processes), ROUNDS (default
# 3), REPEATS (runs per point and round, default 2), LIMIT_S (no round starts after this many seconds, default
# 400), EXTRA (more scaling.py arguments, e.g. "--copies 3"). Per round and commit the scaling.py log and its
# JSON go to OUT_DIR; the closing table gives each commit's median frames/s per backend and worker count, with
# every round's figure. Needs the repository's .git (the device tool sends it).
set -u
DATA=${1:?usage: benchmarks/ab_commits.sh DATA_DIR OUT_DIR COMMIT [COMMIT ...]}
OUT=${2:?usage: benchmarks/ab_commits.sh DATA_DIR OUT_DIR COMMIT [COMMIT ...]}
shift 2
(( $# >= 1 )) || { echo "ab_commits: name at least one commit" >&2; exit 2; }
PY=${PYTHON:-python3}
T0=$SECONDS
ROOT=$(git rev-parse --show-toplevel) || exit 2
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
DATA=$(cd "$DATA" 2>/dev/null && pwd) || { echo "ab_commits: $DATA: no such folder" >&2; exit 2; }
WT=$(mktemp -d /tmp/ab-commits.XXXXXX)
trap 'for d in "$WT"/*/; do git -C "$ROOT" worktree remove --force "$d" >/dev/null 2>&1; done; rm -rf "$WT"' EXIT
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

names=()
for c in "$@"; do
    short=$(git -C "$ROOT" rev-parse --verify -q --short "$c^{commit}") || { echo "ab_commits: $c: not a commit" >&2; exit 2; }
    git -C "$ROOT" worktree add --detach --force "$WT/$short" "$short" >/dev/null 2>&1 \
        || { echo "ab_commits: cannot check out $c" >&2; exit 2; }
    names+=("$short")
done

for (( r = 1; r <= ${ROUNDS:-3}; r++ )); do
    for c in "${names[@]}"; do
        if (( SECONDS - T0 > ${LIMIT_S:-400} )); then echo "== time limit: stopping before round $r"; break 2; fi
        # each commit keeps its own numba cache: kernels differ between commits
        ( cd "$WT/$c" && NUMBA_CACHE_DIR="$WT/$c/.numba_cache" $PY benchmarks/scaling.py --input "$DATA" \
            --backends "${BACKENDS:-processes}" --workers "${WORKERS:-6,16}" --pinned none \
            --repeats "${REPEATS:-2}" ${EXTRA:-} --tag "ab-$c-r$r" --out-dir "$OUT" ) > "$OUT/log-$c-r$r.txt" 2>&1
        echo "== round $r $c: exit $? at $(( SECONDS - T0 )) s"
    done
done

$PY - "$OUT" "${names[@]}" <<'EOF'
import glob, json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
print("| commit | backend | workers | frames/s (median) | rounds |")
print("|---|---|---:|---:|---|")
for c in names:
    fps = {}
    for f in sorted(glob.glob(f"{out}/scaling-ab-{c}-r*.json")):
        for p in json.load(open(f))["points"]:
            fps.setdefault((p["backend"], p["workers"]), []).append(p["fps"])
    for (b, w), v in sorted(fps.items()):
        print(f"| {c} | {b} | {w} | {statistics.median(v):,.0f} | {', '.join(f'{x:,.0f}' for x in v)} |")
EOF
echo "== total $(( SECONDS - T0 )) s"
