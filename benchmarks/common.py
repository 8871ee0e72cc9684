"""Shared helpers of the benchmark scripts: data loading, timing, host description, engine runs, output.

Imported as ``benchmarks.common`` by ``benchmarks/table2.py`` and ``benchmarks/scaling.py`` (run them from the
repository root, e.g. ``.venv/bin/python benchmarks/table2.py``; they put the repository root first on
``sys.path``). Importing this module sets ``NUMBA_CACHE_DIR`` (to ``<repo>/.numba_cache``) and ``MPLBACKEND``
(``Agg``) unless they are already set, so it must be imported before ``engine``.

Timing rules used by both scripts
---------------------------------
* Every measured configuration gets an untimed warm-up first (numba kernels loaded, imports done, input files
  in the page cache).
* Repeats are taken **round-robin**: repeat 1 of every configuration, then repeat 2 of every configuration, and
  so on. On a shared machine a burst of background load then hits all configurations alike instead of one of
  them, which keeps the ratios computed inside one run meaningful.
* A configuration is summarised by the median time over its repeats and its spread (min and max).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402  (after the environment above)

#: The CHAOS-T2 volumes (method.md section 8); ``CHAOS_T2_DIR`` overrides, as for the tests.
DEFAULT_CHAOS = Path(os.environ.get("CHAOS_T2_DIR", REPO.parent / "shared" / "data" / "chaos_t2"))

#: Table II of the paper (method.md section 0): frames/s of offline pseudo-label generation, 256 x 256 slices.
PAPER = {
    "machine": "Intel Core i7-10750H (6 cores, 12 threads)",
    "cores": 6,
    "felzenszwalb": 13.0,
    "slic": 28.0,
    "slic_parallel": 91.0,
}


class BenchmarkError(RuntimeError):
    """A benchmark cannot run (missing data, an engine run that failed); the message is one line."""


# --------------------------------------------------------------------------------------------- config
def load_config(config_path: str | None = None, overrides: Sequence[str] | None = None):
    """The project configuration, exactly as ``cli.py`` builds it (YAML file + ``a.b=value`` overrides).

    Returns
    -------
    alpnet.config.Config
        Only its ``data``, ``prepare``, ``superpixels`` and ``engine`` sections are used here.
    """
    from alpnet.config import load  # config dataclasses only: importing it does not import torch
    from engine.config import ConfigError

    try:
        return load(config_path, list(overrides or []))
    except ConfigError as exc:
        raise BenchmarkError(str(exc)) from None


def add_output_args(parser, tag_example: str) -> None:
    """The options every engine benchmark shares: result naming, temporary stores and the config."""
    parser.add_argument("--tag", default=None, help=f"result file name tag (default: host name), e.g. {tag_example}")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="folder of the result files")
    parser.add_argument("--tmp", default=None, help="folder for temporary stores (default: the system's)")
    parser.add_argument("--config", default=None, help="YAML config, as for cli.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for cli.py")


def run_main(name: str, body: Callable[[Any], int], args: Any) -> int:
    """Run a benchmark's body; a bad argument or input ends it with one line on stderr and status 2."""
    try:
        return body(args)
    except (BenchmarkError, ValueError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class SliceSet:
    """Prepared slices held in memory, the input of the in-memory (no file I/O) benchmark rows.

    Attributes
    ----------
    raw : (N, H, W) float32
        Source intensities after ``prepare_volume`` (crop/pad, NaN repair), slice-major: ``raw[i]`` is
        C-contiguous. This is what the engine hands to the body mask and the superpixels.
    volume_ids : list of str
        Volume id of each slice.
    z : (N,) int
        Slice index inside its volume.
    source : str
        The source spec the slices were read from.
    load_s : float
        Seconds spent reading and preparing (not part of any timed row).
    """
    raw: np.ndarray
    volume_ids: list
    z: np.ndarray
    source: str
    load_s: float

    @property
    def n(self) -> int:
        return int(self.raw.shape[0])

    @property
    def n_volumes(self) -> int:
        return len(set(self.volume_ids))

    def subset(self, n: int) -> "SliceSet":
        """The first ``n`` slices (for warm-up passes)."""
        n = max(1, min(n, self.n))
        return SliceSet(self.raw[:n], self.volume_ids[:n], self.z[:n], self.source, 0.0)


def check_source(spec: str) -> None:
    """Raise ``BenchmarkError`` (one line) when ``spec`` is a path that does not exist."""
    if spec == "phantom" or spec.startswith("phantom:"):
        return
    if not Path(spec).exists():
        hint = " (the CHAOS-T2 volumes; set CHAOS_T2_DIR or pass --input)" if Path(spec) == DEFAULT_CHAOS else ""
        raise BenchmarkError(f"{spec}: no such file or folder{hint}")


def load_slices(spec: str, cfg, max_volumes: int | None = None, threads: int | None = None) -> SliceSet:
    """Read and prepare every slice of a source once, as the engine's load jobs do.

    Parameters
    ----------
    spec : str
        Any source spec of ``engine.sources.open_source`` (CHAOS folder, NIfTI file, ``phantom:N``).
    cfg : Config
        ``cfg.prepare`` is applied (crop/pad size, NaN repair).
    max_volumes : int, optional
        Only the first volumes of the source (quick runs).
    threads : int, optional
        Volumes read in parallel (nibabel's zlib releases the GIL); default: all cores.

    Returns
    -------
    SliceSet

    Raises
    ------
    BenchmarkError
        The source is missing, empty, or one of its volumes cannot be read.
    """
    from engine.prepare import prepare_volume
    from engine.sources import open_source
    from engine.volume import VolumeError

    check_source(spec)
    t0 = time.perf_counter()
    try:
        source = open_source(spec, cfg)
        refs = [str(r) for r in source.refs()]
    except VolumeError as exc:
        raise BenchmarkError(str(exc)) from None
    if max_volumes is not None:
        refs = refs[:max(1, max_volumes)]
    if not refs:
        raise BenchmarkError(f"{spec}: no volumes")

    def one(ref: str) -> tuple[str, np.ndarray]:
        try:
            prep = prepare_volume(source.load(ref), cfg.prepare)
        except VolumeError as exc:
            raise BenchmarkError(str(exc)) from None
        return prep.id, np.ascontiguousarray(np.moveaxis(prep.raw, 2, 0), dtype=np.float32)

    with ThreadPoolExecutor(max_workers=threads or n_cores()) as ex:
        loaded = list(ex.map(one, refs))
    raw = np.concatenate([r for _, r in loaded], axis=0)
    ids = [vid for vid, r in loaded for _ in range(r.shape[0])]
    z = np.concatenate([np.arange(r.shape[0]) for _, r in loaded])
    return SliceSet(raw, ids, z, spec, time.perf_counter() - t0)


def engine_input(spec: str, workdir: Path, max_volumes: int | None = None, copies: int = 1) -> str:
    """The ``--input`` for engine runs: ``spec`` itself, or a folder of symbolic links to part of it / copies.

    A NIfTI folder can be cut to its first ``max_volumes`` volumes (quick runs) or repeated ``copies`` times
    (longer runs for many workers: copy ``c`` of volume ``<id>`` is linked as ``image_<c><id:04d>``). The
    links point at the original files, so nothing is copied. A phantom spec ``phantom:N`` becomes
    ``phantom:<min(N, max_volumes) * copies>``.

    Returns
    -------
    str
        The spec to give the engine.
    """
    check_source(spec)
    if spec == "phantom" or spec.startswith("phantom:"):
        n = int(spec.partition(":")[2] or 20)
        if max_volumes is not None:
            n = min(n, max_volumes)
        return f"phantom:{n * max(1, copies)}"
    folder = Path(spec)
    if folder.is_file() or (max_volumes is None and copies <= 1):
        return str(folder)
    pattern = re.compile(r"^image_(\d+)\.nii(\.gz)?$")
    images = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))),
                    key=lambda t: t[0])
    if not images:
        raise BenchmarkError(f"{spec}: no image_<numeric id>.nii[.gz] files to link")
    if max_volumes is not None:
        images = images[:max(1, max_volumes)]
    out = workdir / "input"
    out.mkdir(parents=True, exist_ok=True)
    for c in range(max(1, copies)):
        for vid, image in images:
            new_id = vid if copies <= 1 else (c + 1) * 10000 + vid
            suffix = image.name[len(f"image_{vid}"):]
            (out / f"image_{new_id}{suffix}").symlink_to(image.resolve())
            for label in folder.glob(f"label_{vid}.nii*"):
                (out / f"label_{new_id}{label.name[len(f'label_{vid}'):]}").symlink_to(label.resolve())
    return str(out)


def uncompressed_copy(spec: str, workdir: Path, max_volumes: int | None) -> str:
    """Uncompressed float32 ``.nii`` copies of a NIfTI folder's volumes (and labels) in ``workdir``.

    The engine reads them as it reads the ``.nii.gz`` files (same loader, same preparation), minus the zlib
    inflation. Written once, before any timing.
    """
    import nibabel as nib

    from engine.sources import open_source
    from engine.volume import VolumeError

    try:
        source = open_source(spec)
    except VolumeError as exc:
        raise BenchmarkError(str(exc)) from None
    if getattr(source, "kind", "") != "nifti-folder":
        raise BenchmarkError(f"{spec}: an uncompressed copy can only be made of a folder of NIfTI files")
    out = workdir / "input-nii"
    out.mkdir(parents=True, exist_ok=True)
    refs = [str(r) for r in source.refs()]
    for ref in refs[:max_volumes] if max_volumes else refs:
        try:
            vol = source.load(ref)
        except VolumeError as exc:
            raise BenchmarkError(str(exc)) from None
        nib.save(nib.Nifti1Image(np.asarray(vol.image, np.float32), vol.affine), out / f"image_{ref}.nii")
        if vol.label is not None:
            nib.save(nib.Nifti1Image(np.asarray(vol.label, np.uint8), vol.affine), out / f"label_{ref}.nii")
    return str(out)


# --------------------------------------------------------------------------------------------- timing
def n_cores() -> int:
    """Cores this process may run on (the engine's default worker count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def first_cpus(n: int) -> list[int]:
    """The first ``n`` CPUs this process may run on (all of them when ``n`` exceeds their number)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[:max(1, min(n, len(allowed)))]


@contextlib.contextmanager
def confined_to(cpus: Sequence[int] | None):
    """Run the body with every thread of this process confined to ``cpus`` (None: no change).

    A strong-scaling point ("n workers on n cores") needs the engine's reader, writer and dispatcher on the
    same cores as its workers; without it, a 1-worker run gets the other cores for them for free.
    ``sched_setaffinity`` applies to one thread, so every thread that exists is set; threads and worker
    processes started inside the body inherit the mask from the thread that starts them. Each thread's
    mask is restored afterwards.
    """
    if cpus is None:
        yield
        return
    cpus = set(cpus)
    before = {}
    for tid in _thread_ids():
        with contextlib.suppress(OSError):  # a thread that ended in between
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield
    finally:
        for tid, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: only the calling thread
        return [0]


def summarise(times: Sequence[float], items: int) -> dict:
    """Median and spread of repeated timings of ``items`` frames.

    Parameters
    ----------
    times : seconds of each timed repeat (warm-up excluded)
    items : frames processed per repeat

    Returns
    -------
    dict
        ``fps`` (items / median time), ``fps_min`` / ``fps_max`` (from the slowest / fastest repeat),
        ``spread_pct`` ((max - min) / median time, in percent), ``median_s``, ``times_s``, ``repeats``.
    """
    times = [float(t) for t in times]
    if not times:
        raise ValueError("summarise: no timings")
    med = statistics.median(times)
    lo, hi = min(times), max(times)
    return {"fps": items / med if med > 0 else float("inf"), "fps_min": items / hi if hi > 0 else float("inf"),
            "fps_max": items / lo if lo > 0 else float("inf"), "spread_pct": 100.0 * (hi - lo) / med if med else 0.0,
            "median_s": med, "times_s": [round(t, 5) for t in times], "repeats": len(times), "frames": items}


def round_ratios(num: Sequence[float], den: Sequence[float], scale: float = 1.0) -> list[float]:
    """``num[r] / (scale * den[r])`` for every round ``r`` measured on both sides.

    A ratio of medians hides how far one round's pair can fall from it; pairing the rounds of an interleaved
    run (both sides timed within the same minute of a drifting machine) shows whether a target near its line
    is met by the machine's state or by the code.
    """
    return [a / (scale * b) for a, b in zip(num, den) if b > 0]


def rounds_verdict(values: Sequence[float], at_least: float) -> dict | None:
    """Spread of a ratio over its rounds against a lower bound: ``min``, ``max`` (3 decimals, more where 3 would
    put an end on the bound's other side), ``met`` (rounds at or above the bound) and ``rounds``; None for fewer
    than two rounds (no spread to show)."""
    if len(values) < 2:
        return None
    end = (lambda x: float(fmt_vs_bound(x, at_least, 3)))
    return {"min": end(min(values)), "max": end(max(values)),
            "met": sum(v >= at_least for v in values), "rounds": len(values)}


def rounds_text(v: dict | None, scale: float = 1.0, unit: str = "", bound: float | None = None) -> str:
    """``0.474-0.541, met in 3 of 7`` for a :func:`rounds_verdict` (bounds times ``scale``, then ``unit``; 1
    decimal from 10 up, else 3 significant digits; with ``bound``, more digits where these would put an end on
    the bound's other side); ``-`` when there is none."""
    if not v:
        return "-"

    def num(x: float) -> str:
        text = f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"
        if bound is not None and (float(text) >= scale * bound) != (x >= scale * bound):
            text = fmt_vs_bound(x, scale * bound, 1 if abs(x) >= 10 else 3)
        return text
    return f"{num(scale * v['min'])}-{num(scale * v['max'])}{unit}, met in {v['met']} of {v['rounds']}"


def round_robin(configs: Sequence[Any], warmup: Callable[[Any], None], measure: Callable[[Any], dict],
                repeats: int, log: Callable[[str], None] | None = None, label: Callable[[Any], str] = str
                ) -> list[list[dict]]:
    """Warm up each configuration once, then time ``repeats`` rounds over all of them (see module docstring).

    Parameters
    ----------
    configs : the configurations, in display order
    warmup : untimed call per configuration
    measure : one timed repeat of a configuration; returns a dict with at least ``seconds``
    repeats : timed rounds (>= 1)
    log : progress messages (one line per configuration and round)
    label : name of a configuration in the messages

    Returns
    -------
    list of lists
        ``out[i]`` holds the ``repeats`` dicts measured for ``configs[i]``.
    """
    say = log or (lambda _msg: None)
    for c in configs:
        t0 = time.perf_counter()
        warmup(c)
        say(f"  warm-up {label(c)} ({time.perf_counter() - t0:.1f} s)")
    out: list[list[dict]] = [[] for _ in configs]
    repeats = max(1, repeats)
    for r in range(repeats):
        t0 = time.perf_counter()
        for i, c in enumerate(configs):
            res = measure(c)
            out[i].append(res)
            say(f"  round {r + 1}/{repeats} {label(c)}: {res['seconds']:.3f} s")
        took = time.perf_counter() - t0
        if r + 1 < repeats:
            say(f"  round {r + 1} took {took:.0f} s; about {took * (repeats - r - 1):.0f} s to go")
    return out


# --------------------------------------------------------------------------------------------- host
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_tag() -> str:
    """Short host name usable in a file name."""
    name = socket.gethostname().split(".")[0] or "host"
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


BUSY_SAMPLE_S = 0.5          # how long host_info watches the CPUs before a run


def host_info() -> dict:
    """What the numbers depend on: CPU, cores, memory, load, library versions, code revision and source digest
    (``engine.runinfo.source_digest``: the code itself, where a copied checkout's git metadata may be stale)."""
    import psutil

    from engine.runinfo import git_revision, source_digest, versions

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    # What other work keeps the CPUs busy right now: the load average lags by a minute, so a benchmark that
    # starts just after another one would see the previous run's load in it.
    busy = round(psutil.cpu_percent(interval=BUSY_SAMPLE_S) / 100 * (psutil.cpu_count() or 1), 2)
    return {"host": socket.gethostname(), "cpu": cpu_model(), "machine": platform.machine(),
            "os": f"{platform.system()} {platform.release()}", "logical_cpus": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False), "usable_cpus": n_cores(),
            "memory_gb": round(psutil.virtual_memory().total / 2 ** 30, 1), "load_average_start": load,
            "cores_busy_start": busy,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_revision(), "sources": source_digest(),
            "versions": versions(),
            "command": " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
            if sys.argv and sys.argv[0].endswith(".py") else None}


_TOUCH_SCRIPT = """
import mmap, sys, time
import numpy as np
n = int(sys.argv[1]) << 20
out, keep = [], []
for advice in (mmap.MADV_NOHUGEPAGE, mmap.MADV_HUGEPAGE):
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # fresh memory, like a large malloc
    m.madvise(advice)
    a = np.frombuffer(m, np.uint8)
    t0 = time.perf_counter()
    a[:] = 1
    t1 = time.perf_counter()
    a[:] = 2                        # the same pages again: no fault
    out += [t1 - t0, time.perf_counter() - t1]
    keep.append(a)                  # kept mapped, so that the second round cannot reuse the first one's pages
print(*out)
"""


def memory_touch_check(mb: int = 256) -> dict:
    """GB/s of writing memory a fresh process has never touched (4 kB pages, then 2 MB pages), against again.

    On a virtual machine whose balloon driver reports free memory to its host in whole 2 MB blocks, a page the
    guest takes from such a block costs a host-side fault. A huge page always takes a whole free block, 4 kB
    pages mostly come from partly used ones; numpy asks for huge pages for arrays of 4 MB and more. Blocks freed
    in the last seconds are not reported yet and come back fast, so back-to-back runs can see anything between
    the two (measured on this project's VM: 4 kB pages ~2.5 GB/s; huge pages 0.4 GB/s after a pause, 14 GB/s
    right after another process freed its memory; 33-38 GB/s for pages already mapped).
    """
    import subprocess

    time.sleep(3.0)           # guests report freed memory after ~2 s: measure what a run starting later finds
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, "-c", _TOUCH_SCRIPT, str(mb)], capture_output=True, text=True,
                         env=env, timeout=120)
    small, small_again, huge, huge_again = (float(v) for v in out.stdout.split())
    rate = (lambda t: round(mb / 1024 / t, 2))
    return {"mb": mb, "first_touch_4k_gb_s": rate(small), "again_4k_gb_s": rate(small_again),
            "first_touch_huge_gb_s": rate(huge), "again_huge_gb_s": rate(huge_again)}


def busy_warning(info: dict) -> str | None:
    """A line saying the machine was busy (more than half its cores) when the run started, else None.

    Only the start counts: the end mostly measures the benchmark's own work. The CPU busy time sampled just
    before the run decides when the run recorded it; the 1-minute load average (older results) otherwise."""
    start = info.get("load_average_start")
    load = start[0] if start else 0.0
    cores = info.get("usable_cpus") or 1
    busy = info.get("cores_busy_start")
    if busy is not None:
        if busy <= 0.5 * cores:
            return None
        return (f"the machine was busy when this run started ({busy:.1f} of {cores} cores busy in the "
                f"{BUSY_SAMPLE_S:g} s before it, 1-minute load average {load:.1f}): absolute numbers are noisy; "
                f"ratios within the run are less affected")
    if load > 0.5 * cores:
        return (f"the machine was busy when this run started (1-minute load average {load:.1f} on {cores} "
                f"cores): absolute numbers are noisy; ratios within the run are less affected")
    return None


def finish_host_info(info: dict) -> dict:
    """Add the load average at the end of a run."""
    try:
        info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["load_average_end"] = None
    return info


# --------------------------------------------------------------------------------------------- engine
def engine_config(cfg, spec: str, out: Path, workers: int, backend: str, readers: int | None = None):
    """A copy of ``cfg`` set up for one engine run into ``out``."""
    import copy

    c = copy.deepcopy(cfg)
    c.data.input = spec
    c.engine.out = str(out)
    c.engine.threads = int(workers)
    c.engine.backend = backend
    if readers is not None:
        c.engine.readers = int(readers)
    return c


def cli_preprocess(spec: str, out_dir: Path, workers: int, backend: str, extra: Sequence[str],
                   cpus: Sequence[int] | None = None, prefix: Sequence[str] = ()) -> dict:
    """One ``cli.py preprocess`` in a fresh subprocess into ``out_dir`` (emptied first, removed after): its
    profile, the process' own wall time and the store's size on disk.

    With ``cpus`` the subprocess (all its threads and worker processes) runs pinned to those CPUs; ``prefix``
    goes before the Python command (e.g. ``perf record ... --``).
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    store = out_dir / "store.h5"
    cmd = [*prefix, sys.executable, str(REPO / "cli.py"), "preprocess", "--input", spec, "--out", str(store),
           "--threads", str(workers), "--backend", backend, "--no-progress", *extra]
    with confined_to(cpus):  # the child inherits the mask of the thread that starts it
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(cmd)} exited {proc.returncode}: "
                             f"{' | '.join(proc.stderr.strip().splitlines()[-3:])}")
    prof = json.loads(store.with_name("store.h5.profile.json").read_text())
    size = store.stat().st_size + sum(p.stat().st_size for p in (out_dir / "store.h5.parts").iterdir())
    shutil.rmtree(out_dir)
    return {"seconds": wall, "profile": prof, "store_bytes": size}


def run_engine(cfg, spec: str, workers: int, backend: str, tmp_root: Path, readers: int | None = None,
               cpus: Sequence[int] | None = None) -> dict:
    """One end-to-end engine run (``engine.pipeline.preprocess``) into a fresh temporary store.

    The store and everything written next to it are deleted afterwards; the engine's own profile
    (``STORE.profile.json``) is read back first.

    Parameters
    ----------
    cfg : Config
    spec : str
        Engine input (folder of ``.nii.gz``, ``phantom:N``).
    workers : int
        Compute workers (``engine.threads``).
    backend : {"threads", "processes"}
    tmp_root : Path
        Folder for the temporary store.
    readers : int, optional
        ``engine.readers`` (volumes loaded ahead, at most); default: the config's.
    cpus : sequence of int, optional
        Confine the whole run (every thread, worker processes included) to these CPUs (``confined_to``);
        default: all this process may use.

    Returns
    -------
    dict
        ``seconds`` (wall time of the whole ``preprocess`` call: source listing, store creation, kernel
        warm-up, worker start, compute, commits, profile), ``slices`` and ``profile`` (the profile dict).

    Raises
    ------
    BenchmarkError
        The run did not complete (its exit status and last message lines are in the message).
    """
    from engine.pipeline import preprocess

    run_dir = Path(tempfile.mkdtemp(prefix=f"engine-{backend}-{workers}-", dir=tmp_root))
    store = run_dir / "store.h5"
    c = engine_config(cfg, spec, store, workers, backend, readers)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), confined_to(cpus):
            t0 = time.perf_counter()
            rc = preprocess(c, overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
        profile_path = store.with_name(store.name + ".profile.json")
        if rc != 0 or not profile_path.is_file():
            tail = " | ".join((err.getvalue() + out.getvalue()).strip().splitlines()[-3:])
            raise BenchmarkError(f"engine run ({backend}, {workers} workers, input {spec}) exited with status "
                                 f"{rc}: {tail}")
        profile = json.loads(profile_path.read_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds": seconds, "slices": int(profile["slices"]), "profile": profile}


def worker_time_pcts(wt: dict) -> dict:
    """``busy_pct``, ``waiting_pct``, ``barrier_pct``, ``other_pct``: the engine profile's shares of the workers'
    wall time (``engine.profile.worker_time_pcts``), to one decimal; 0 for a profile without worker time. Also
    ``waiting_volume_pct`` and ``waiting_room_pct``, the parts of waiting while the producer waited for a volume
    to load / for room (None for a profile from before they were recorded)."""
    from engine.profile import WAITING_PARTS, WORKER_TIME_PARTS, worker_time_pcts as shares

    pcts = shares(wt)
    out = {f"{k}_pct": round(pcts[k], 1) if pcts else 0.0 for k in WORKER_TIME_PARTS}
    for k in WAITING_PARTS:
        out[f"{k}_pct"] = None if f"{k}_s" not in wt else round(pcts[k], 1) if pcts else 0.0
    return out


def profile_summary(p: dict) -> dict:
    """The fields of an engine profile that the benchmark tables show."""
    wt = p["worker_time"]
    return {"engine_fps": p["slices_per_s"], "engine_wall_s": p["wall_s"], **worker_time_pcts(wt),
            "busy_on_cpu_pct": wt.get("busy_on_cpu_pct"), "busy_core_wait_pct": wt.get("busy_core_wait_pct"),
            "busy_s": wt["busy_s"], "waiting_s": wt["waiting_s"], "barrier_s": wt["barrier_s"],
            "other_s": wt.get("other_s", 0.0),
            # sampled during this run (process + children): ``peak_rss_mb`` also holds ru_maxrss, which is the
            # benchmark process's maximum over all earlier runs too
            "cpu_pct": p["cpu"]["utilisation_pct"],
            "peak_rss_mb": p["memory"].get("peak_rss_sampled_total_mb", p["memory"]["peak_rss_mb"]),
            "per_slice_ms": p.get("per_slice_ms", {}),
            "producer_wait_s": p.get("producer_wait_s"),
            # per batch: the commit and the time from its last slice computed to the commit point (ms)
            "commits": p.get("commits"),
            # the run's two ends: first slice result, after the last one (ms), and slices/s between them
            "ends": p.get("ends"),
            "per_worker": [{k: w.get(k, 0.0) for k in ("slices", "busy_s", "waiting_s", "waiting_volume_s",
                                                       "waiting_room_s", "barrier_s", "other_s")}
                           for w in p.get("per_worker", [])]}


# --------------------------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell; '-' for None."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def fmt_vs_bound(value: float, bound: float, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, or more where fewer would print a figure on the other side of
    ``bound`` than the value itself (0.89966 against 0.9 reads "0.8997", not "0.900" next to "not met")."""
    for d in range(digits, digits + 5):
        text = f"{value:.{d}f}"
        if (float(text) >= bound) == (value >= bound):
            return text
    return text


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars, tuples and paths turned into JSON types (non-finite floats -> None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return round(v, 6) if np.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` as indented JSON (atomically: temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(data), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def result_stem(prefix: str, tag: str | None, quick: bool) -> str:
    """``<prefix>-<tag or host>[-quick]``: quick runs never overwrite the full results."""
    return f"{prefix}-{tag or host_tag()}" + ("-quick" if quick else "")


def parse_int_list(text: str) -> list[int]:
    """``"1,2,4"`` or ``"1-4"`` (or a mix) -> sorted unique positive integers."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError:
        out = set()                          # int()'s own message names the piece, not the option's form
    if not out or min(out) < 1:
        raise ValueError(f"{text!r}: expected positive integers such as 1,2,4 or 1-6")
    return sorted(out)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low}")
        return value
    parse.__name__ = f"integer >= {low}"     # argparse names the type in some of its messages
    return parse


# argparse types: a count of 0 or below is refused with the option's name (exit status 2), where the scripts'
# ``args.x or default`` would have taken 0 for "not given" and a negative --max-volumes sliced from the end.
positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)


BACKENDS = ("threads", "processes")


def parse_choices(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """``"threads,processes"`` -> the named choices in order; an unknown or empty list names the option."""
    picked = [part.strip() for part in text.split(",") if part.strip()]
    if not picked or any(part not in allowed for part in picked):
        raise BenchmarkError(f"{option} {text!r}: choose among {', '.join(allowed)}")
    return picked


def log(msg: str) -> None:
    """Progress messages go to stderr, results to stdout."""
    print(msg, file=sys.stderr, flush=True)
