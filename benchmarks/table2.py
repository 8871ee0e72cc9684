"""The paper's Table II on this machine: pseudo-label frames/s of every scheme, measured in ONE run.

Reproduce on any machine (from the repository root, after ``make install``)::

    .venv/bin/python benchmarks/table2.py                  # all 718 CHAOS-T2 slices, 3 repeats (a few minutes)
    .venv/bin/python benchmarks/table2.py --quick          # 2 volumes, 1 repeat: a smoke run, numbers noisy
    .venv/bin/python benchmarks/table2.py --tag i7-10750H  # name the result files after the machine

Writes ``benchmarks/results/table2-<tag>.json`` and ``.md`` (``<tag>`` defaults to the host name; ``--quick``
adds ``-quick``) and prints the Markdown table. ``--input`` takes any source of ``cli.py preprocess``
(default: ``../shared/data/chaos_t2`` or ``$CHAOS_T2_DIR``); ``--config`` / ``--set`` change the superpixel and
preparation settings exactly as for ``cli.py``.

What each row times (frames = slices of 256 x 256)
--------------------------------------------------
In memory (every slice read, cropped and NaN-repaired once beforehand, as the engine's load jobs do; no file I/O
inside the timing):

* **Felzenszwalb recipe, serial** (the baseline, 1.0x): SSL-ALPNet's body mask (scipy/skimage: threshold,
  largest component, fill holes) + ``skimage.segmentation.felzenszwalb`` (scale 1, sigma 1, min_size 400) +
  clipping/renumbering to the body (``engine.recipes.felzenszwalb_pseudolabels``).
* **skimage SLIC, serial**: the same scipy/skimage body mask + ``skimage.segmentation.slic`` (maskSLIC: the body
  mask as ``mask``, the project's SLIC parameters, ``channel_axis=None``). When the config uses maskSLIC (the
  default), a second row runs skimage's SLIC on the whole slice (no mask) and clips the result to the body
  (plain SLIC, as the paper may have run it; skimage's maskSLIC spends extra time placing its seeds).
* **our SLIC, serial**: our numba body mask (``engine.prepare.body_mask``) + ``engine.superpixels.pseudolabels_u16``
  (numba maskSLIC, consecutive ids) -- exactly the per-slice work of the engine's workers minus the encoding.
* **one image per Python thread** (the paper's SLIC-parallel scheme): a ``ThreadPoolExecutor`` with N threads
  mapping the serial step above over the slices; with skimage SLIC (maskSLIC; the paper's scheme, as a
  reference) and with our SLIC.

The serial rows also time the body mask and the superpixel kernel separately inside the same loop, so the table
shows "kernel only" frames/s (superpixels with the mask already computed) next to the full step.

End to end (the product, ``engine.pipeline.preprocess``, exactly what ``cli.py preprocess --threads N
--backend B`` runs): from the source files to a committed HDF5 store (reading and inflating the NIfTI files,
z-scoring, body mask, SLIC, chunk compression, crash-safe commits), timed around the whole call (store creation
and worker start included) into a fresh temporary store each time:

* **engine from .nii.gz**: the CHAOS files as shipped;
* **engine from .nii**: an uncompressed float32 copy of the same volumes written to a temporary folder before
  timing, to show what zlib inflation of the input costs.

Each is run with the ``threads`` and ``processes`` backends at 1..nproc workers. Their profile (the engine's
``STORE.profile.json``) is summarised in a second table: the engine's own slices/s (first read to the run's end),
where the workers' time went (busy / waiting for input / held at the batch barrier), CPU utilisation and
peak memory.

Ratios are against the serial Felzenszwalb recipe of the same run. The paper's column gives its Table II
(Intel Core i7-10750H, 6 cores): Felzenszwalb 13, SLIC 28, SLIC-parallel 91 frames/s; its SLIC-parallel figure is
placed beside our rows that use every core of this machine. Warm-up is excluded; repeats are interleaved
round-robin (see ``benchmarks/common.py``) and reported as the median with the min-max range.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

_HERE = Path(__file__).resolve().parent
# Python puts a script's folder first on sys.path, and benchmarks/ also holds engine.py (the engine benchmark),
# which would then shadow the ``engine`` package: the repository root goes first and benchmarks/ is dropped.
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, _HERE.parent)]
from benchmarks import common  # noqa: E402  (sets NUMBA_CACHE_DIR before engine is imported)
from benchmarks.common import PAPER, BenchmarkError, fmt, log, markdown_table  # noqa: E402

import numpy as np  # noqa: E402

BACKENDS = common.BACKENDS
INPUT_FORMATS = ("nii.gz", "nii")


# --------------------------------------------------------------------------------------------- per-slice steps
def slic_config(cfg):
    """``cfg.superpixels`` with the method forced to SLIC (the table's SLIC rows use its SLIC parameters)."""
    sp = copy.deepcopy(cfg.superpixels)
    sp.method = "slic"
    return sp


def felzenszwalb_step(cfg) -> tuple[Callable, Callable]:
    """(mask, kernel) of the SSL-ALPNet recipe: scipy/skimage body mask, skimage Felzenszwalb, clip/renumber."""
    from engine.prepare import body_mask_reference
    from engine.recipes import felzenszwalb_pseudolabels

    thr, f = cfg.prepare.fg_threshold, cfg.superpixels.felzenszwalb
    return (lambda raw: body_mask_reference(raw, thr),
            lambda raw, fg: felzenszwalb_pseudolabels(raw, fg, f.scale, f.sigma, f.min_size, f.faithful))


def skimage_slic_step(cfg) -> tuple[Callable, Callable]:
    """(mask, kernel) with scikit-image: scipy/skimage body mask, ``skimage.segmentation.slic`` as maskSLIC."""
    from skimage.segmentation import slic as sk_slic

    from engine.prepare import body_mask_reference

    thr, s = cfg.prepare.fg_threshold, cfg.superpixels.slic

    def kernel(raw: np.ndarray, fg: np.ndarray) -> np.ndarray:
        if not fg.any():                       # as pseudolabels: an empty body gets no superpixels
            return np.zeros(raw.shape, np.int32)
        return sk_slic(raw, n_segments=s.n_segments, compactness=s.compactness, max_num_iter=s.max_num_iter,
                       sigma=s.sigma, mask=fg if s.mask else None, enforce_connectivity=True,
                       min_size_factor=s.min_size_factor, max_size_factor=s.max_size_factor, start_label=1,
                       channel_axis=None)

    return (lambda raw: body_mask_reference(raw, thr)), kernel


def skimage_slic_full_step(cfg) -> tuple[Callable, Callable]:
    """(mask, kernel): scipy/skimage body mask, ``skimage.segmentation.slic`` on the whole slice (no mask),
    then clipped to the body and renumbered -- plain SLIC, as the paper may have run it."""
    from skimage.segmentation import slic as sk_slic

    from engine.prepare import body_mask_reference
    from engine.recipes import consecutive_ids

    thr, s = cfg.prepare.fg_threshold, cfg.superpixels.slic

    def kernel(raw: np.ndarray, fg: np.ndarray) -> np.ndarray:
        labels = sk_slic(raw, n_segments=s.n_segments, compactness=s.compactness, max_num_iter=s.max_num_iter,
                         sigma=s.sigma, enforce_connectivity=True, min_size_factor=s.min_size_factor,
                         max_size_factor=s.max_size_factor, start_label=1, channel_axis=None)
        return consecutive_ids(labels, fg)

    return (lambda raw: body_mask_reference(raw, thr)), kernel


def our_slic_step(cfg) -> tuple[Callable, Callable]:
    """(mask, kernel) of the engine's workers: numba body mask, ``engine.superpixels.pseudolabels_u16`` (SLIC)."""
    from engine.prepare import body_mask
    from engine.superpixels import pseudolabels_u16

    thr, sp = cfg.prepare.fg_threshold, slic_config(cfg)
    return (lambda raw: body_mask(raw, thr)), (lambda raw, fg: pseudolabels_u16(raw, fg, sp)[0])


def serial_pass(raw: np.ndarray, mask_fn: Callable, kernel_fn: Callable) -> dict:
    """Mask + kernel over every slice in one thread; the two parts are also timed separately.

    Parameters
    ----------
    raw : (N, H, W) float32
    mask_fn : (H, W) float32 -> (H, W) bool
    kernel_fn : ((H, W) float32, (H, W) bool) -> (H, W) int32

    Returns
    -------
    dict
        ``seconds`` (whole loop), ``mask_s`` and ``kernel_s`` (sums over the slices).
    """
    clock = time.perf_counter
    mask_s = kernel_s = 0.0
    start = clock()
    for r in raw:
        t0 = clock()
        fg = mask_fn(r)
        t1 = clock()
        kernel_fn(r, fg)
        t2 = clock()
        mask_s += t1 - t0
        kernel_s += t2 - t1
    return {"seconds": clock() - start, "mask_s": mask_s, "kernel_s": kernel_s}


def threads_pass(raw: np.ndarray, mask_fn: Callable, kernel_fn: Callable, n: int) -> dict:
    """The paper's scheme: a pool of ``n`` Python threads, one slice per task (mask + kernel).

    The pool is created inside the timing: it is part of the scheme, and costs well under a millisecond.
    """
    def step(r: np.ndarray) -> None:
        kernel_fn(r, mask_fn(r))

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as ex:
        for _ in ex.map(step, raw):
            pass
    return {"seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass
class Row:
    """One line of the table: how to run it once, and how to describe it."""
    key: str
    label: str
    timed: str
    workers: int
    kind: str                        # serial | python-threads | engine
    paper: str | None                # the paper's row it corresponds to: felzenszwalb | slic | slic_parallel
    run: Callable[[], dict]
    warm: Callable[[], dict]
    backend: str | None = None
    input_format: str | None = None


def build_rows(cfg, slices: common.SliceSet, engine_specs: dict, workers: list[int], backends: list[str],
               tmp_root: Path, warmup_slices: int, skimage_threads: bool = True) -> list[Row]:
    """The rows of one run (see the module docstring for what each times)."""
    nproc = common.n_cores()
    raw = slices.raw
    warm_raw = slices.subset(warmup_slices).raw
    rows: list[Row] = []
    steps = {"felzenszwalb": felzenszwalb_step(cfg), "skimage": skimage_slic_step(cfg),
             "skimage_full": skimage_slic_full_step(cfg), "ours": our_slic_step(cfg)}

    def serial(key, label, timed, step, paper):
        m, k = steps[step]
        rows.append(Row(key, label, timed, 1, "serial", paper, run=lambda: serial_pass(raw, m, k),
                        warm=lambda: serial_pass(warm_raw, m, k)))

    def pythreads(key, label, timed, step, n, paper):
        m, k = steps[step]
        rows.append(Row(key, label, timed, n, "python-threads", paper, run=lambda: threads_pass(raw, m, k, n),
                        warm=lambda: threads_pass(warm_raw, m, k, n)))

    serial("felzenszwalb_serial", "Felzenszwalb recipe (SSL-ALPNet), serial",
           "mask (scipy/skimage) + skimage felzenszwalb + clip to body", "felzenszwalb", "felzenszwalb")
    serial("skimage_slic_serial", "skimage SLIC (maskSLIC), serial",
           "mask (scipy/skimage) + skimage slic(mask=body)", "skimage", "slic")
    if cfg.superpixels.slic.mask:
        serial("skimage_slic_full_serial", "skimage SLIC (whole slice), serial",
               "mask (scipy/skimage) + skimage slic(no mask) + clip to body", "skimage_full", "slic")
    serial("our_slic_serial", "our SLIC (maskSLIC), serial",
           "mask (numba) + engine.superpixels.pseudolabels_u16", "ours", "slic")
    if skimage_threads:
        pythreads(f"skimage_slic_pythreads_{nproc}", f"skimage SLIC, one image per Python thread, {nproc} threads",
                  "as skimage SLIC serial, ThreadPoolExecutor.map", "skimage", nproc, "slic_parallel")
    for n in workers:
        pythreads(f"our_slic_pythreads_{n}", f"our SLIC, one image per Python thread, {n} thread{'s' * (n > 1)}",
                  "as our SLIC serial, ThreadPoolExecutor.map", "ours", n,
                  "slic_parallel" if n == nproc else None)
    for fmt_name, spec in engine_specs.items():
        for backend in backends:
            for n in workers:
                def go(spec=spec, n=n, backend=backend):
                    return common.run_engine(cfg, spec, n, backend, tmp_root)
                rows.append(Row(f"engine_{backend}_{fmt_name.replace('.', '')}_{n}",
                                f"SLIC-parallel: engine, {backend} backend, {n} worker{'s' * (n > 1)}, "
                                f"from .{fmt_name}",
                                f"end to end: .{fmt_name} files -> committed store", n, "engine",
                                "slic_parallel" if n == nproc else None, run=go, warm=go, backend=backend,
                                input_format=fmt_name))
    return rows


def run_table2(cfg, slices: common.SliceSet, engine_specs: dict, workers: list[int], backends: list[str],
               repeats: int, tmp_root: Path, warmup_slices: int = 32, skimage_threads: bool = True,
               say: Callable[[str], None] | None = None) -> dict:
    """Measure every row in one run and compute the ratios.

    Parameters
    ----------
    cfg : Config
        Superpixel, preparation and engine settings (``cli.py``'s config).
    slices : SliceSet
        The in-memory slices (all rows that do not run the engine).
    engine_specs : dict
        Input format name (``"nii.gz"``, ``"nii"``) -> engine input spec; empty: no engine rows.
    workers : list of int
        Worker counts of the parallel rows.
    backends : list of str
        Engine backends.
    repeats : int
        Timed repeats per row (after one untimed warm-up).
    tmp_root : Path
        Folder for temporary stores.
    warmup_slices : int
        Slices of the warm-up pass of in-memory rows (engine rows warm up with a full run).
    skimage_threads : bool
        Include the (slow) skimage one-image-per-thread row.
    say : callable, optional
        Progress messages.

    Returns
    -------
    dict
        ``rows`` (list of dicts: key, label, timed, workers, kind, fps, fps_min, fps_max, spread_pct,
        x_felzenszwalb, per_worker_fps, kernel_fps, mask_ms, paper_fps, paper_x, engine profile summary),
        ``targets`` (issue targets: measured value, target, pass), ``slices``, ``settings``.
    """
    rows = build_rows(cfg, slices, engine_specs, workers, backends, tmp_root, warmup_slices, skimage_threads)
    results = common.round_robin(rows, warmup=lambda r: r.warm(), measure=lambda r: r.run(), repeats=repeats,
                                 log=say, label=lambda r: r.key)
    out_rows = []
    for row, res in zip(rows, results):
        frames = res[0].get("slices", slices.n)
        d = {"key": row.key, "label": row.label, "timed": row.timed, "workers": row.workers, "kind": row.kind,
             "backend": row.backend, "input_format": row.input_format, "paper_row": row.paper,
             **common.summarise([r["seconds"] for r in res], frames),
             "fps_rounds": [round(frames / r["seconds"], 2) for r in res if r["seconds"] > 0]}
        if "kernel_s" in res[0]:
            d["kernel_fps"] = frames / float(np.median([r["kernel_s"] for r in res]))
            d["kernel_fps_rounds"] = [round(frames / r["kernel_s"], 2) for r in res if r["kernel_s"] > 0]
            d["mask_ms"] = 1000.0 * float(np.median([r["mask_s"] for r in res])) / frames
        if "profile" in res[0]:
            order = np.argsort([r["seconds"] for r in res])
            median_run = res[int(order[len(order) // 2])]       # the repeat whose time is the median
            d["engine"] = common.profile_summary(median_run["profile"])
            d["engine"]["engine_fps_median"] = float(np.median([r["profile"]["slices_per_s"] for r in res]))
        out_rows.append(d)
    base = next(d for d in out_rows if d["key"] == "felzenszwalb_serial")
    for d in out_rows:
        d["x_felzenszwalb"] = d["fps"] / base["fps"]
        d["per_worker_fps"] = d["fps"] / d["workers"]
        if "kernel_fps" in d:
            d["kernel_x_felzenszwalb"] = d["kernel_fps"] / base["kernel_fps"]
        if d["paper_row"]:
            d["paper_fps"] = PAPER[d["paper_row"]]
            d["paper_x"] = PAPER[d["paper_row"]] / PAPER["felzenszwalb"]
    return {"rows": out_rows, "targets": targets(out_rows, common.n_cores()),
            "slices": {"n": slices.n, "volumes": slices.n_volumes, "source": slices.source,
                       "shape": list(slices.raw.shape[1:]), "load_s": slices.load_s},
            "settings": {"repeats": repeats, "warmup": "1 untimed pass per row (in-memory rows: "
                         f"{min(warmup_slices, slices.n)} slices; engine rows: a full run)",
                         "workers": workers, "backends": backends, "engine_inputs": engine_specs,
                         "superpixels": common.jsonable(dataclasses.asdict(cfg.superpixels)),
                         "prepare": common.jsonable(dataclasses.asdict(cfg.prepare)),
                         "engine": common.jsonable(dataclasses.asdict(cfg.engine))}}


def _measured_text(t: dict) -> str:
    """A target's measured figure with one decimal, or more where one would round it across its goal."""
    if t["goal"] is None or abs(t["measured"]) >= 100:
        return fmt(t["measured"], 1)
    return common.fmt_vs_bound(t["measured"], t["goal"], 1)


def targets(rows: list[dict], nproc: int) -> list[dict]:
    """The issue's targets, evaluated on this run's ratios (only those whose rows were measured)."""
    get = {d["key"]: d for d in rows}
    out = []

    def add(name, value, target, unit="x", rounds=()):
        # rounds: the same ratio for each round of the interleaved run (both rows timed within one round)
        out.append({"target": name, "measured": value, "goal": target, "unit": unit, "met": bool(value >= target),
                    "rounds": common.rounds_verdict(list(rounds), target)})

    base = get.get("felzenszwalb_serial")
    for d in rows:
        if d["workers"] == nproc and (d["kind"] == "engine" or d["key"].startswith("our_slic_pythreads")):
            add(f"{d['label']} vs serial Felzenszwalb recipe", d["x_felzenszwalb"], 40.0,
                rounds=common.round_ratios(d["fps_rounds"], base["fps_rounds"]) if base else ())
    ours = get.get("our_slic_serial")
    for key in ("skimage_slic_serial", "skimage_slic_full_serial"):
        sk = get.get(key)
        if sk and ours:
            name = sk["label"].split(",")[0]
            add(f"our SLIC kernel vs {name} kernel, per core", ours["kernel_fps"] / sk["kernel_fps"], 15.0,
                rounds=common.round_ratios(ours["kernel_fps_rounds"], sk["kernel_fps_rounds"]))
            add(f"our SLIC step (mask + SLIC) vs {name} step, per core", ours["fps"] / sk["fps"], 15.0,
                rounds=common.round_ratios(ours["fps_rounds"], sk["fps_rounds"]))
    for d in rows:
        if d["workers"] == 2 and d["key"].endswith("_2"):
            one = get.get(d["key"][:-len("_2")] + "_1")
            if d["kind"] == "engine":
                name = f"engine, {d['backend']} backend, from .{d['input_format']}"
            elif d["key"].startswith("our_slic_pythreads"):
                name = "our SLIC, one image per Python thread"
            else:
                continue
            if one:
                add(f"efficiency at 2 workers: {name}", 100.0 * d["fps"] / (2 * one["fps"]), 90.0, "%",
                    rounds=common.round_ratios(d["fps_rounds"], one["fps_rounds"], 2 / 100))
    return out


# --------------------------------------------------------------------------------------------- output
def render_markdown(result: dict) -> str:
    """The run as Markdown: main table, engine profile table, targets, and the host it ran on."""
    host, rows = result.get("host", {}), result["rows"]
    nproc = host.get("usable_cpus") or common.n_cores()
    lines = _title_lines(result, host, nproc)
    lines += _scheme_table_lines(rows)
    lines += _mask_lines(rows)
    lines += _engine_profile_lines(rows)
    lines += _targets_lines(result["targets"])
    if host:
        lines += _host_lines(host, nproc)
    return "\n".join(lines)


def _title_lines(result: dict, host: dict, nproc: int) -> list[str]:
    """The heading, the quick-run and busy-machine notes, and the paragraph on the slices and the repeats."""
    sl = result["slices"]
    lines = [f"# Table II on {host.get('cpu', '?')} ({nproc} cores), {host.get('date', '')}", ""]
    if result.get("quick"):
        lines += ["**Quick run** (few slices, 1 repeat): a smoke test of the script, not a measurement.", ""]
    if result.get("warning"):
        lines += [f"**Note:** {result['warning']}.", ""]
    return lines + [f"{sl['n']} slices of {sl['shape'][0]} x {sl['shape'][1]} from {sl['volumes']} volumes "
                    f"(`{sl['source']}`); {result['settings']['repeats']} timed repeats per row after a warm-up, "
                    "interleaved round-robin; frames/s = slices / median time, range = slowest..fastest repeat.",
                    ""]


def _scheme_table_lines(rows: list[dict]) -> list[str]:
    """The main table: one line per scheme, beside the paper's figures."""
    head = ["scheme", "timed", "workers", "frames/s", "range", "x Felzenszwalb", "per worker",
            "kernel only frames/s", f"paper frames/s ({PAPER['cores']}-core i7)", "paper x"]
    table = []
    for d in rows:
        table.append([d["label"], d["timed"], d["workers"], fmt(d["fps"]),
                      f"{fmt(d['fps_min'])}..{fmt(d['fps_max'])}", fmt(d["x_felzenszwalb"], 2),
                      fmt(d["per_worker_fps"]), fmt(d.get("kernel_fps")),
                      fmt(d.get("paper_fps"), 0) if d.get("paper_fps") else "",
                      fmt(d.get("paper_x"), 1) if d.get("paper_x") else ""])
    return [markdown_table(head, table), ""]


def _mask_lines(rows: list[dict]) -> list[str]:
    """The body mask's time per slice inside each serial row; nothing without serial rows."""
    serial = [d for d in rows if d["kind"] == "serial"]
    if not serial:
        return []
    return ["Body mask per slice inside the serial rows: " + "; ".join(
        f"{d['label'].split(',')[0]}: {d['mask_ms']:.2f} ms" for d in serial) + ".", ""]


def _engine_profile_lines(rows: list[dict]) -> list[str]:
    """The engine profile table of the engine rows, after a paragraph on its columns; nothing without them."""
    eng = [d for d in rows if d["kind"] == "engine"]
    if not eng:
        return []
    eh = ["backend", "input", "workers", "end-to-end frames/s", "engine frames/s", "busy %", "waiting %",
          "barrier %", "other %", "CPU %", "peak RSS MB", "ms/slice read+prepare", "ms/slice mask+SLIC+encode",
          "ms/slice write"]
    return ["Engine profile (the median repeat's `STORE.profile.json`): engine frames/s = first read to "
            "the run's end (last commit, threads joined); the worker split is over all workers' wall "
            "time; peak RSS is sampled during the run (every 0.25 s) over the benchmark process and its "
            "workers, and includes the in-memory "
            "slices of the other rows (`scaling.py` measures the engine alone).", "",
            markdown_table(eh, [_engine_profile_row(d) for d in eng]), ""]


def _engine_profile_row(d: dict) -> list:
    """One engine row's line of the engine profile table."""
    e, ps = d["engine"], d["engine"]["per_slice_ms"]
    return [d["backend"], "." + d["input_format"], d["workers"], fmt(d["fps"]), fmt(e["engine_fps"]),
            fmt(e["busy_pct"]), fmt(e["waiting_pct"]), fmt(e["barrier_pct"]), fmt(e.get("other_pct", 0.0)),
            fmt(e["cpu_pct"]),
            fmt(e["peak_rss_mb"]), fmt(ps.get("load", 0) + ps.get("prepare", 0), 2),
            fmt(ps.get("mask", 0) + ps.get("superpixels", 0) + ps.get("encode", 0), 2),
            fmt(ps.get("write", 0) + ps.get("index", 0), 2)]


def _targets_lines(targets: list[dict]) -> list[str]:
    """The issues' targets as a table with its heading; nothing without targets."""
    if not targets:
        return []
    return ["Targets (issue 7 / issue 3), from this run's ratios:", "",
            markdown_table(["target", "measured", "goal", "met", "round by round"], [
                [t["target"], f"{_measured_text(t)} {t['unit']}", "" if t["goal"] is None else
                 f">= {fmt(t['goal'], 0)} {t['unit']}", "" if t["met"] is None else ("yes" if t["met"] else "**no**"),
                 common.rounds_text(t.get("rounds"), bound=t["goal"])]
                for t in targets]), ""]


def _host_lines(host: dict, nproc: int) -> list[str]:
    """The host the run was on (CPU, memory, load, versions, code) and its command line."""
    v = host.get("versions", {})
    return [f"Host: `{host.get('host')}`, {host.get('cpu')}, {host.get('physical_cores')} physical / "
            f"{host.get('logical_cpus')} logical CPUs ({nproc} usable), {host.get('memory_gb')} GB; "
            f"load average {host.get('load_average_start')} at start, {host.get('load_average_end')} at "
            f"end; python {v.get('python')}, numpy {v.get('numpy')}, numba {v.get('numba')}, scikit-image "
            f"{v.get('scikit-image')}; code {host.get('git')} (sources {host.get('sources', '?')}).",
            f"Command: `{host.get('command')}`", ""]


# --------------------------------------------------------------------------------------------- main
def default_workers(nproc: int) -> list[int]:
    """1..nproc on small machines; powers of two and nproc on large ones (the scaling script does every count)."""
    if nproc <= 8:
        return list(range(1, nproc + 1))
    return sorted({1 << k for k in range(nproc.bit_length()) if (1 << k) <= nproc} | {nproc})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(common.DEFAULT_CHAOS),
                   help="source of slices (default: the CHAOS-T2 folder)")
    p.add_argument("--quick", action="store_true",
                   help="2 volumes, 1 repeat, workers 1 and nproc: checks the script, numbers are noisy")
    p.add_argument("--repeats", type=common.positive_int, default=None, help="timed repeats per row (default 3, quick 1)")
    p.add_argument("--max-volumes", type=common.positive_int, default=None, help="use only the first volumes of the source")
    p.add_argument("--workers", default=None, help="worker counts of the parallel rows, e.g. 1,2,4 or 1-6 "
                                                   "(default: 1..nproc)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="engine backends (threads,processes)")
    p.add_argument("--engine-inputs", default=",".join(INPUT_FORMATS),
                   help="engine rows from nii.gz, nii (uncompressed copy) or both; 'none' skips the engine rows")
    p.add_argument("--no-skimage-threads", action="store_true", help="skip the slow skimage threads row")
    common.add_output_args(p, "i7-10750H")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return common.run_main("table2", _main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    """Check the options, measure every row in one run, then write and print the result files."""
    opts = _options(args)
    info = common.host_info()
    t_start = time.perf_counter()
    result = _measure(args, opts)
    _add_run_info(result, args, info, t_start)
    _write_results(args, result)
    return 0


@dataclasses.dataclass
class _Options:
    """The command line resolved: config, repeats, volumes, worker counts, backends and engine input formats."""
    cfg: Any
    repeats: int
    max_volumes: int | None
    workers: list[int]
    backends: list[str]
    formats: list[str]


def _options(args: argparse.Namespace) -> _Options:
    """The options resolved, each checked before any work (config, worker counts, backends, inputs, source)."""
    nproc = common.n_cores()
    cfg = common.load_config(args.config, args.set)
    repeats = args.repeats or (1 if args.quick else 3)
    max_volumes = args.max_volumes or (2 if args.quick else None)
    if args.workers:
        workers = common.parse_int_list(args.workers)
    else:
        workers = sorted({1, nproc}) if args.quick else default_workers(nproc)
    backends = common.parse_choices(args.backends, BACKENDS, "--backends")
    formats = [] if args.engine_inputs.strip() == "none" else \
        [f.strip().lstrip(".") for f in args.engine_inputs.split(",") if f.strip()]
    if any(f not in INPUT_FORMATS for f in formats):
        raise BenchmarkError(f"--engine-inputs {args.engine_inputs!r}: choose among nii.gz, nii, none")
    common.check_source(args.input)
    return _Options(cfg, repeats, max_volumes, workers, backends, formats)


def _measure(args: argparse.Namespace, opts: _Options) -> dict:
    """The slices loaded and every row measured, with the temporary stores and copies removed afterwards."""
    tmp_root = Path(tempfile.mkdtemp(prefix="table2-", dir=args.tmp))
    try:
        log(f"table2: reading {args.input} ...")
        slices = common.load_slices(args.input, opts.cfg, max_volumes=opts.max_volumes)
        log(f"table2: {slices.n} slices from {slices.n_volumes} volumes in {slices.load_s:.1f} s")
        specs = _engine_specs(args.input, opts.formats, tmp_root, opts.max_volumes)
        return run_table2(opts.cfg, slices, specs, opts.workers, opts.backends, opts.repeats, tmp_root,
                          warmup_slices=8 if args.quick else 32, skimage_threads=not args.no_skimage_threads,
                          say=log)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _engine_specs(source: str, formats: list[str], tmp_root: Path, max_volumes: int | None) -> dict:
    """Input format -> engine input of the engine rows: the source itself and/or an uncompressed copy."""
    specs = {}
    if "nii.gz" in formats:
        specs["nii.gz"] = common.engine_input(source, tmp_root, max_volumes=max_volumes)
    if "nii" in formats:
        specs["nii"] = common.uncompressed_copy(source, tmp_root, max_volumes)
    return specs


def _add_run_info(result: dict, args: argparse.Namespace, info: dict, t_start: float) -> None:
    """The host, the run's kind and duration, the paper's figures and any busy-machine warning, into ``result``."""
    result["host"] = common.finish_host_info(info)
    result["quick"] = bool(args.quick)
    result["total_s"] = time.perf_counter() - t_start
    result["paper"] = PAPER
    result["warning"] = common.busy_warning(info)


def _write_results(args: argparse.Namespace, result: dict) -> None:
    """The JSON and Markdown result files (the Markdown also kept in the JSON); the Markdown printed."""
    md = render_markdown(result)
    result["markdown"] = md
    stem = common.result_stem("table2", args.tag, args.quick)
    out_dir = Path(args.out_dir)
    common.write_json(out_dir / f"{stem}.json", result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    print(md)
    log(f"table2: done in {result['total_s']:.0f} s; wrote {out_dir / stem}.json and .md")


if __name__ == "__main__":
    sys.exit(main())
