#!/usr/bin/env bash
# Engine throughput of several commits side by side: each commit checked out in its own git worktree and
# measured with its own benchmarks/scaling.py, the commits alternating round by round so that a slow spell of a
# shared machine hits them alike. Made for bisecting a change that shows only at many workers (the device
# machine), where each call is short.
#
#   benchmarks/ab_commits.sh DATA_DIR OUT_DIR COMMIT [COMMIT ...]
#
# A COMMIT may also be a folder holding a checkout (e.g. `git archive COMMIT | tar -x -C DIR`): it runs there, named
# by the folder's name, and needs no git repository (for a machine that gets the files without .git).
# Environment: PYTHON (default python3), WORKERS (default 6,16), BACKENDS (default processes), ROUNDS (default
# 3), REPEATS (runs per point and round, default 2), LIMIT_S (no round starts after this many seconds, default
# 400), EXTRA (more scaling.py arguments, e.g. "--copies 3"), WARM (0: no compile of every commit's kernels, all at
# once, before round 1). Per round and commit the scaling.py log and its JSON go to OUT_DIR; the closing table
# gives each commit's median frames/s per backend and worker count, with every round's figure, the medians
# of the workers' waiting and barrier shares, and of the time from a batch's last slice to its commit.
set -u
DATA=${1:?usage: benchmarks/ab_commits.sh DATA_DIR OUT_DIR COMMIT [COMMIT ...]}
OUT=${2:?usage: benchmarks/ab_commits.sh DATA_DIR OUT_DIR COMMIT [COMMIT ...]}
shift 2
(( $# >= 1 )) || { echo "ab_commits: name at least one commit" >&2; exit 2; }
PY=${PYTHON:-python3}
T0=$SECONDS
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
DATA=$(cd "$DATA" 2>/dev/null && pwd) || { echo "ab_commits: $DATA: no such folder" >&2; exit 2; }
WT=$(mktemp -d /tmp/ab-commits.XXXXXX)
ROOT=
trap '[[ -n $ROOT ]] && for d in "$WT"/*/; do git -C "$ROOT" worktree remove --force "$d" >/dev/null 2>&1; done
      rm -rf "$WT"' EXIT
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

names=()                                     # what the table calls each one
trees=()                                     # where each one runs
for c in "$@"; do
    if [[ -d $c ]]; then                     # a checkout already made, e.g. by git archive
        [[ -f $c/benchmarks/scaling.py ]] \
            || { echo "ab_commits: $c: a folder without benchmarks/scaling.py, not a checkout of this project" >&2; exit 2; }
        tree=$(cd "$c" && pwd)
        names+=("$(basename "$tree")")
        trees+=("$tree")
        continue
    fi
    [[ -n $ROOT ]] || ROOT=$(git rev-parse --show-toplevel 2>/dev/null) \
        || { echo "ab_commits: $c: no such folder, and no git repository here to find it as a commit in" >&2; exit 2; }
    short=$(git -C "$ROOT" rev-parse --verify -q --short "$c^{commit}") || { echo "ab_commits: $c: not a commit" >&2; exit 2; }
    git -C "$ROOT" worktree add --detach --force "$WT/$short" "$short" >/dev/null 2>&1 \
        || { echo "ab_commits: cannot check out $c" >&2; exit 2; }
    names+=("$short")
    trees+=("$WT/$short")
done
dup=$(printf '%s\n' "${names[@]}" | sort | uniq -d | head -n 1)
[[ -z $dup ]] || { echo "ab_commits: $dup named twice: its results would overwrite each other" >&2; exit 2; }

scaling_in() {   # scaling_in I ARGS...: scaling.py of the I-th commit, in its tree, with its own numba cache
    local i=$1; shift
    ( cd "${trees[$i]}" && NUMBA_CACHE_DIR="${trees[$i]}/.numba_cache" $PY benchmarks/scaling.py --input "$DATA" \
        --backends "${BACKENDS:-processes}" --pinned none "$@" )
}

# Compile each commit's kernels into its own cache now, all commits at once, so that round 1 does not time
# the compiles one after another (about 20 s each). WARM=0 skips it.
if [[ ${WARM:-1} != 0 ]]; then
    for i in "${!names[@]}"; do
        scaling_in "$i" --max-volumes 1 --workers 1 --repeats 1 --no-warmup --tag warm --out-dir "$WT/warm-$i" \
            > "$OUT/log-${names[$i]}-warm.txt" 2>&1 &
    done
    wait
    echo "== kernels compiled at $(( SECONDS - T0 )) s"
fi

for (( r = 1; r <= ${ROUNDS:-3}; r++ )); do
    for i in "${!names[@]}"; do
        c=${names[$i]}
        if (( SECONDS - T0 > ${LIMIT_S:-400} )); then echo "== time limit: stopping before round $r"; break 2; fi
        # each commit keeps its own numba cache: kernels differ between commits
        scaling_in "$i" --workers "${WORKERS:-6,16}" --repeats "${REPEATS:-2}" ${EXTRA:-} --tag "ab-$c-r$r" \
            --out-dir "$OUT" > "$OUT/log-$c-r$r.txt" 2>&1
        echo "== round $r $c: exit $? at $(( SECONDS - T0 )) s"
    done
done

$PY - "$OUT" "${names[@]}" <<'EOF'
import glob, json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
def med(values):
    values = [x for x in values if x is not None]
    return f"{statistics.median(values):.1f}" if values else "-"

def tail_ms(x):
    c = (x.get("commits") or {}).get("last_slice_to_commit_ms")
    return c["median"] if c else None

print("| commit | backend | workers | frames/s (median) | rounds | workers waiting % (of it: volume / room) "
      "| barrier % | last slice to commit, ms |")
print("|---|---|---:|---:|---|---|---:|---:|")
for c in names:
    points = {}
    for f in sorted(glob.glob(f"{out}/scaling-ab-{c}-r*.json")):
        for p in json.load(open(f))["points"]:
            points.setdefault((p["backend"], p["workers"]), []).append(p)
    for (b, w), ps in sorted(points.items()):
        fps = [p["fps"] for p in ps]
        pr = [p.get("profile") or {} for p in ps]
        waiting = f"{med(x.get('waiting_pct') for x in pr)} ({med(x.get('waiting_volume_pct') for x in pr)} / " \
                  f"{med(x.get('waiting_room_pct') for x in pr)})"
        print(f"| {c} | {b} | {w} | {statistics.median(fps):,.0f} | {', '.join(f'{x:,.0f}' for x in fps)} "
              f"| {waiting} | {med(x.get('barrier_pct') for x in pr)} | {med(tail_ms(x) for x in pr)} |")
EOF
echo "== total $(( SECONDS - T0 )) s"
