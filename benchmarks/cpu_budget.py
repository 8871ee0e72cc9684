"""Where the engine's CPU goes, by library and system call: ``perf`` samples of whole ``cli.py preprocess`` runs.

    .venv/bin/python benchmarks/cpu_budget.py                        # 10x CHAOS; threads 1 and 2, processes 2
    .venv/bin/python benchmarks/cpu_budget.py --runs threads:16,processes:16 --tag 16core

Each run is one ``cli.py preprocess`` under ``perf record -e cpu-clock -g`` (every thread and worker process).
The samples of the engine's steady state (from 0.5 s after the engine started to 0.3 s before the process
ended, less on short runs; the imports before it are left out) are grouped by the library the sampled
instruction lies in, and kernel samples by the system call the user-space code was in (pwrite, fsync, ...).
Multiplying a group's share by the run's CPU time per slice (its profile) gives milliseconds per slice: the
budget that issue 4's "end to end >= 50% of the bare kernel" constrains (everything but SLIC may cost as much
CPU as SLIC).

numba's machine code has no symbols for ``perf``, so SLIC, the body mask and the preparation passes share one
group. The engine's profile (``STORE.profile.json``, per-stage wall times) separates them.

Needs Linux ``perf`` with permission to sample (``kernel.perf_event_paranoid`` <= 2 for one's own processes).
Writes ``benchmarks/results/cpu-budget-<tag>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

# (group, test on the shared object's file name); the first match wins
LIBRARIES = (
    ("numba kernels (SLIC, body mask, preparation)", lambda dso: dso.startswith("perf-") or dso.startswith("[JIT]")),
    ("inflate .nii.gz (libdeflate)", lambda dso: dso.startswith("_deflate")),
    ("deflate chunks (ISA-L)", lambda dso: dso.startswith("isal")),
    ("sha256 of the inputs (libcrypto)", lambda dso: dso.startswith("libcrypto")),
    ("HDF5", lambda dso: dso.startswith("libhdf5") or dso.startswith("h5")),
    ("Python interpreter", lambda dso: dso.startswith("libpython")),
    ("libc (malloc, memcpy)", lambda dso: dso.startswith("libc.so") or dso.startswith("libc-")),
    ("numpy", lambda dso: "multiarray" in dso),
)
# kernel samples, by the user-space function that entered the kernel
SYSCALLS = (
    ("kernel: pwrite (store chunks)", re.compile(r"pwrite")),
    ("kernel: fsync / fdatasync", re.compile(r"sync")),
    ("kernel: posix_fadvise (dropping written pages)", re.compile(r"fadvise")),
    ("kernel: read (input files, pipes)", re.compile(r"^(__libc_|__GI___libc_)?read")),
    ("kernel: futex (locks, wake-ups)", re.compile(r"futex|cond_|sem_|lll_")),
    ("kernel: write, poll (pipes)", re.compile(r"write|poll")),
)
KERNEL_OTHER = "kernel: page faults, interrupts, other"
OTHER = "other libraries"


def parse_perf_script(lines) -> list[tuple[int, float, list[tuple[str, str]]]]:
    """Samples of ``perf script -F pid,tid,time,ip,sym,dso`` (with call chains): (pid, time s, stack).

    A stack is a list of (symbol, shared object file name), innermost frame first.
    """
    samples, stack = [], None
    head = re.compile(r"\s*(\d+)/\d+\s+(\d+\.\d+):")
    frame = re.compile(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")
    for line in lines:
        m = head.match(line)
        if m:
            stack = []
            samples.append((int(m.group(1)), float(m.group(2)), stack))
            continue
        m = frame.match(line)
        if m and stack is not None:
            stack.append((m.group(1), m.group(2).rsplit("/", 1)[-1]))
    return samples


def classify(stack: list[tuple[str, str]]) -> str:
    """The group of one sample (see ``LIBRARIES`` and ``SYSCALLS``)."""
    if not stack:
        return OTHER
    sym, dso = stack[0]
    if dso.startswith("[kernel"):
        user = next((s for s, d in stack if not d.startswith("[kernel")), "")
        return next((name for name, pat in SYSCALLS if pat.search(user)), KERNEL_OTHER)
    return next((name for name, test in LIBRARIES if test(dso)), OTHER)


def budget(samples, start: float, end: float) -> dict:
    """Share (%) of each group among the samples with ``start <= t <= end``, and the sample count."""
    groups = Counter(classify(st) for _, t, st in samples if start <= t <= end)
    n = sum(groups.values())
    if n == 0:
        raise common.BenchmarkError(f"no perf samples between {start:.3f} and {end:.3f} s")
    pids = Counter(pid for pid, t, _ in samples if start <= t <= end)
    return {"samples": n, "share_pct": {k: 100.0 * v / n for k, v in groups.most_common()},
            "process_share_pct": [100.0 * v / n for _, v in pids.most_common()]}


def perf_run(spec: str, backend: str, workers: int, freq: int, tmp: Path, extra: list[str]) -> dict:
    """One ``cli.py preprocess`` under ``perf record``: its profile and the CPU budget of its steady state."""
    data = tmp / "perf.data"
    tmp.mkdir(parents=True, exist_ok=True)
    perf = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "-g", "-o", str(data), "--"]
    prof = common.cli_preprocess(spec, tmp / "run", workers, backend, extra, prefix=perf)["profile"]
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,tid,time,ip,sym,dso"],
                            capture_output=True, text=True)
    samples = parse_perf_script(script.stdout.splitlines())
    data.unlink(missing_ok=True)
    if not samples:
        raise common.BenchmarkError(f"perf recorded no samples ({script.stderr.strip()[:200]})")
    end = samples[-1][1]
    wall = prof["wall_s"]
    out = budget(samples, end - wall + min(0.5, wall / 10), end - min(0.3, wall / 10))
    cpu_ms = 1000.0 * prof["cpu"]["cpu_s"] / max(prof["slices"], 1)
    out.update(backend=backend, workers=workers, slices=prof["slices"], slices_per_s=prof["slices_per_s"],
               cpu_ms_per_slice=cpu_ms, cpu_pct=prof["cpu"]["utilisation_pct"],
               ms_per_slice={k: v * cpu_ms / 100.0 for k, v in out["share_pct"].items()})
    return out


def render(result: dict) -> str:
    runs = result["runs"]
    names = list(dict.fromkeys(k for r in runs for k in r["share_pct"]))
    head = ["where the CPU goes"] + [f"{r['backend']} x{r['workers']}: % / ms per slice" for r in runs]
    rows = [[name] + [f"{r['share_pct'].get(name, 0.0):.1f}% / {r['ms_per_slice'].get(name, 0.0):.3f}" for r in runs]
            for name in names]
    rows.append(["all (CPU ms per slice, engine profile)"] + [f"{r['cpu_ms_per_slice']:.2f}" for r in runs])
    rows.append(["slices/s (engine), CPU %"] + [f"{r['slices_per_s']:.0f}, {r['cpu_pct']:.0f}%" for r in runs])
    rows.append(["share of each process"] + [" / ".join(f"{p:.0f}%" for p in r["process_share_pct"]) for r in runs])
    return (f"## CPU budget: {result['input_slices']} slices ({result['host']['cpu']}, "
            f"{result['host']['usable_cpus']} CPUs)\n\n" + common.markdown_table(head, rows) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(common.DEFAULT_CHAOS), help="NIfTI folder (default: CHAOS-T2)")
    ap.add_argument("--copies", type=common.positive_int, default=10, help="link the volumes this many times (default 10)")
    ap.add_argument("--runs", default="threads:1,threads:2,processes:2", help="backend:workers, comma-separated")
    ap.add_argument("--freq", type=common.positive_int, default=1000, help="samples per second per CPU (default 1000)")
    common.add_output_args(ap, "16core")
    return common.run_main("cpu_budget", _body, ap.parse_args(argv))


def _runs(text: str) -> list[tuple[str, int]]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        backend, _, n = part.partition(":")
        if backend not in ("threads", "processes") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--runs: {part!r} is not backend:workers (threads:2, processes:16, ...)")
        out.append((backend, int(n)))
    if not out:
        raise ValueError("--runs: nothing to run")
    return out


def _body(args) -> int:
    runs = _runs(args.runs)
    if shutil.which("perf") is None:
        raise common.BenchmarkError("the Linux 'perf' tool is not installed (package linux-perf / linux-tools)")
    extra = [x for kv in args.set for x in ("--set", kv)] + (["--config", args.config] if args.config else [])
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        spec = common.engine_input(args.input, Path(tmp) / "in", copies=args.copies)
        result = {"host": common.host_info(), "input": args.input, "copies": args.copies, "runs": []}
        for backend, n in runs:
            common.log(f"perf: {backend} x{n} ...")
            result["runs"].append(perf_run(spec, backend, n, args.freq, Path(tmp) / "perf", extra))
        result["input_slices"] = result["runs"][0]["slices"]
    stem = common.result_stem("cpu-budget", args.tag, quick=False)
    out_dir = Path(args.out_dir)
    common.write_json(out_dir / f"{stem}.json", result)
    text = render(result)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
