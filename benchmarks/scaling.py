"""Engine throughput and parallel efficiency against the number of workers, both backends, with Amdahl's law.

Reproduce on any machine (from the repository root, after ``make install``)::

    .venv/bin/python benchmarks/scaling.py                          # 1..nproc workers and beyond (to 2 x nproc)
    .venv/bin/python benchmarks/scaling.py --quick                  # 2 volumes, 1 repeat: a smoke run
    .venv/bin/python benchmarks/scaling.py --max-workers 16 --tag 16core    # a 16-core machine
    .venv/bin/python benchmarks/scaling.py --tag i7-10750H          # the paper's 6-core laptop

Writes ``benchmarks/results/scaling-<tag>.json``, ``.md`` and ``.png`` (``<tag>`` defaults to the host name;
``--quick`` adds ``-quick``) and prints the Markdown.

What is measured
----------------
Each point is one end-to-end engine run (``engine.pipeline.preprocess``, what ``cli.py preprocess --threads N
--backend B`` runs) on the CHAOS-T2 volumes (``--input``; ``--copies K`` links the volumes K times for longer
runs on many cores; ``--uncompressed`` reads a temporary float32 ``.nii`` copy instead of the ``.nii.gz``
files) into a fresh temporary store. Throughput is the engine's own figure from its profile
(``STORE.profile.json``: slices / time from the first read to the run's end: the last commit, the
engine's threads joined and, for processes, its workers stopped); the time around the whole
call (store creation and worker start included) is kept as ``end_to_end_fps``. From the same profile: per
worker busy / waiting-for-input / barrier / other time (% of the workers' wall time), CPU utilisation
(psutil, the process and its children) and peak memory. Worker counts go from 1 to the number of cores
and beyond it (to 2 x cores by default) to show what oversubscription does. Each configuration is warmed up
once, then repeats are interleaved round-robin (``benchmarks/common.py``); points are medians with the min-max
range.

Two series per backend. **Per worker**: every run may use all cores; efficiency ``X(n) / (n X(1))``. A
1-worker run then has the other cores for its reader, writer and dispatcher, which makes X(1) more than one
core's worth. **Per core** (strong scaling): below the core count each worker count is also run with the
whole process (every thread and worker process) pinned to as many CPUs as workers (``sched_setaffinity``,
``common.confined_to``); from the core count on the free runs are the points. Efficiency ``X(n on c CPUs) /
(c X(1 on 1 CPU))`` with c = min(n, cores). Amdahl's law ``X(c) = X(1) c / (1 + s (c - 1))`` is fitted (X(1)
and the serial fraction s, least squares on relative errors) to the per-core points, and projected to 6
cores, the paper's i7-10750H, next to its 91 frames/s. The projection keeps this machine's per-core speed;
the paper's own figures (SLIC 28 frames/s serial, 91 on 6 cores) imply s = 0.17.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

_HERE = Path(__file__).resolve().parent
# Python puts a script's folder first on sys.path, and benchmarks/ also holds engine.py (the engine benchmark),
# which would then shadow the ``engine`` package: the repository root goes first and benchmarks/ is dropped.
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, _HERE.parent)]
from benchmarks import common  # noqa: E402  (sets NUMBA_CACHE_DIR before engine is imported)
from benchmarks.common import PAPER, BenchmarkError, fmt, log, markdown_table  # noqa: E402

import numpy as np  # noqa: E402

from engine.figures import save_figure  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes

BACKENDS = common.BACKENDS
EFFICIENCY_TARGETS = {2: 0.90, 6: 0.80}     # issue 7: at 2 workers here, at 6 on a 16-core machine


# --------------------------------------------------------------------------------------------- Amdahl
def amdahl(n, x1: float, s: float):
    """Throughput predicted by Amdahl's law for ``n`` workers: ``x1 * n / (1 + s * (n - 1))``."""
    n = np.asarray(n, dtype=float)
    return x1 * n / (1.0 + s * (n - 1.0))


def implied_serial_fraction(n: float, speedup: float) -> float:
    """The serial fraction s for which Amdahl's law gives ``speedup`` on ``n`` workers."""
    return (n / speedup - 1.0) / (n - 1.0)


def fit_amdahl(ns, xs) -> dict | None:
    """Least-squares fit of Amdahl's law to throughput points.

    Parameters
    ----------
    ns : sequence of int
        Worker counts (at least two distinct values).
    xs : sequence of float
        Throughput at each count (frames/s).

    Returns
    -------
    dict or None
        ``x1`` (fitted one-worker throughput), ``serial_fraction`` (s in [0, 1]), ``rms_rel_error`` and
        ``points``; None with fewer than two distinct worker counts.
    """
    from scipy.optimize import least_squares

    ns = np.asarray(ns, dtype=float)
    xs = np.asarray(xs, dtype=float)
    if len(set(ns.tolist())) < 2:
        return None
    x1_guess = float(xs[np.argmin(ns)] / ns.min())

    def resid(p):
        return amdahl(ns, p[0], p[1]) / xs - 1.0

    fit = least_squares(resid, x0=[x1_guess, 0.05], bounds=([1e-9, 0.0], [np.inf, 1.0]))
    x1, s = (float(v) for v in fit.x)
    return {"x1": x1, "serial_fraction": s, "rms_rel_error": float(np.sqrt(np.mean(resid(fit.x) ** 2))),
            "points": [int(n) for n in ns]}


def fit_quality_text(fit: dict) -> str:
    """How well ``fit_amdahl``'s curve describes its points, in words. Two worker counts and two parameters: the
    curve passes through both, and a residual would say nothing about how well the law holds."""
    n = len(set(fit["points"]))
    if n == 2:
        return "exact through its 2 points, so no fit error to show"
    return f"rms error {100 * fit['rms_rel_error']:.1f}% over {n} worker counts"


# --------------------------------------------------------------------------------------------- the sweep
def default_workers(ncores: int, max_workers: int | None = None) -> list[int]:
    """Every count from 1 to ``ncores``, then steps of ``ncores // 2`` up to ``max_workers`` (default 2 x cores)."""
    top = max_workers or 2 * ncores
    out = list(range(1, min(top, ncores) + 1))
    step = max(1, ncores // 2)
    n = ncores + step
    while n <= top:
        out.append(n)
        n += step
    if top > ncores and out[-1] != top:
        out.append(top)
    return out


def run_scaling(cfg, spec: str, workers: list[int], backends: list[str], repeats: int, tmp_root: Path,
                readers: int | None = None, warmup: bool = True, ncores: int | None = None,
                say: Callable[[str], None] | None = None, pinned: list[int] | None = None) -> dict:
    """Run the engine at every (backend, worker count) and derive speed-up, efficiency and the Amdahl fit.

    Parameters
    ----------
    cfg : Config
        ``cli.py``'s config (superpixel, preparation and engine settings).
    spec : str
        Engine input.
    workers : list of int
        Worker counts.
    backends : list of str
        ``threads`` and/or ``processes``.
    repeats : int
        Timed runs per configuration.
    tmp_root : Path
        Folder for the temporary stores.
    readers : int, optional
        ``engine.readers``; default: the config's.
    warmup : bool
        One untimed run per configuration first.
    ncores : int, optional
        Cores of this machine (default: those this process may use).
    say : callable, optional
        Progress messages.
    pinned : list of int, optional
        Worker counts also run pinned to as many CPUs (only those below the core count); default: every
        count in ``workers`` below the core count; ``[]``: none (no per-core series below the cores).

    Returns
    -------
    dict
        ``points`` (one dict per backend and worker count), ``fits`` (per backend: Amdahl fit and 6-core
        projection), ``slices``, ``settings``.
    """
    ncores = ncores or common.n_cores()
    # (backend, workers, pinned): every count with all cores free, and below the core count also confined to
    # as many CPUs as workers, so that the reader and the writer share the workers' cores (strong scaling)
    pin_counts = {n for n in (workers if pinned is None else pinned) if n < ncores}
    configs = [(b, n, pin) for b in backends for n in workers for pin in ((False, True) if n in pin_counts
                                                                           else (False,))]
    run = (lambda c: common.run_engine(cfg, spec, c[1], c[0], tmp_root, readers,
                                       cpus=common.first_cpus(c[1]) if c[2] else None))
    results = common.round_robin(configs, warmup=(run if warmup else (lambda c: None)), measure=run,
                                 repeats=repeats, log=say, label=config_label)
    points = [summarise_point(backend, n, pin, res, ncores) for (backend, n, pin), res in zip(configs, results)]
    fits = {}
    for backend in backends:
        pts = [p for p in points if p["backend"] == backend]
        add_speedups(pts, ncores)
        per_core = [p for p in pts if p["per_core_series"] and p["workers"] <= ncores]
        fit = fit_amdahl([p["cpus"] for p in per_core], [p["fps"] for p in per_core])
        if fit is not None:
            fit["projected_fps_6"] = float(amdahl(PAPER["cores"], fit["x1"], fit["serial_fraction"]))
            fit["projected_vs_paper"] = fit["projected_fps_6"] / PAPER["slic_parallel"]
            fit["projected_fps_6_ideal"] = fit["x1"] * PAPER["cores"]
        free = [p for p in pts if not p["pinned"]]
        measured6 = next((p for p in free if p["workers"] == PAPER["cores"]), None)
        fits[backend] = {"amdahl": fit, "measured_fps_6": measured6["fps"] if measured6 else None,
                         "best": max(free, key=lambda p: p["fps"])["workers"]}
    return {"points": points, "fits": fits, "ncores": ncores,
            "paper": {**PAPER, "implied_serial_fraction": implied_serial_fraction(
                PAPER["cores"], PAPER["slic_parallel"] / PAPER["slic"]),
                "efficiency_6": PAPER["slic_parallel"] / (PAPER["cores"] * PAPER["slic"])},
            "settings": {"input": spec, "workers": workers, "backends": backends, "repeats": repeats,
                         "warmup": warmup, "readers": readers or cfg.engine.readers,
                         "batch": cfg.engine.batch or "auto", "compression": cfg.engine.compression,
                         "superpixels": common.jsonable(dataclasses.asdict(cfg.superpixels))}}


def config_label(c: tuple) -> str:
    backend, n, pinned = c
    return f"{backend} x{n}" + (f" on {n} CPU(s)" if pinned else "")


def summarise_point(backend: str, n: int, pinned: bool, res: list[dict], ncores: int) -> dict:
    """One configuration's repeats as a point: median throughput, spread, and the median run's profile."""
    slices = res[0]["slices"]
    engine_walls = [r["profile"]["wall_s"] for r in res]
    summ = common.summarise(engine_walls, slices)
    outer = common.summarise([r["seconds"] for r in res], slices)
    order = np.argsort(engine_walls)
    median_run = res[int(order[len(order) // 2])]
    return {"backend": backend, "workers": n, "pinned": pinned, "cpus": min(n, ncores) if pinned else ncores,
            "per_core_series": pinned or n >= ncores, "slices": slices, "fps": summ["fps"],
            "fps_min": summ["fps_min"], "fps_max": summ["fps_max"], "spread_pct": summ["spread_pct"],
            "engine_wall_s": summ["times_s"], "fps_rounds": [round(slices / t, 2) for t in engine_walls if t > 0],
            "end_to_end_fps": outer["fps"], "end_to_end_s": outer["times_s"],
            "cpu_pct_median": float(np.median([r["profile"]["cpu"]["utilisation_pct"] for r in res])),
            "profile": common.profile_summary(median_run["profile"])}


def add_speedups(pts: list[dict], ncores: int) -> None:
    """Speed-up and efficiency of one backend's points, in place, on two scales.

    Per worker (all cores free): ``X(n) / X(1)`` and ``X(n) / (n X(1))``; a 1-worker run then has the other
    cores for its reader and writer. Per core (strong scaling, n workers on min(n, cores) CPUs): ``X(n on c)
    / (c X(1 on 1))``; every part of the engine then shares the cores it is given (no run on one CPU: no
    per-core figures). Points outside a series get None for its fields.

    Both efficiencies are also given round by round (``efficiency_rounds``, ``efficiency_per_core_rounds``):
    each round's run against the baseline's run of the same round, timed within the same minute.
    """
    free = [p for p in pts if not p["pinned"]]
    per_core = [p for p in pts if p["per_core_series"]]
    for p in pts:
        for key in ("speedup", "efficiency", "speedup_per_core", "efficiency_per_core"):
            p[key] = None
        p["efficiency_rounds"], p["efficiency_per_core_rounds"] = [], []
    if free:
        base = min(free, key=lambda p: p["workers"])
        for p in free:
            p["speedup"] = p["fps"] / base["fps"] * base["workers"]
            p["efficiency"] = p["speedup"] / p["workers"]
            p["efficiency_rounds"] = common.round_ratios(p["fps_rounds"], base["fps_rounds"],
                                                         p["workers"] / base["workers"])
    base = next((p for p in per_core if p["cpus"] == 1), None)   # per core needs a run on one CPU
    if base is not None:
        for p in per_core:
            p["speedup_per_core"] = p["fps"] / base["fps"] * base["cpus"]
            p["efficiency_per_core"] = p["speedup_per_core"] / p["cpus"]
            p["efficiency_per_core_rounds"] = common.round_ratios(p["fps_rounds"], base["fps_rounds"], p["cpus"])


# --------------------------------------------------------------------------------------------- output
def plot_scaling(result: dict, path: Path) -> Path:
    """Throughput, efficiency and the workers' time split against the worker count (PNG), paper points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncores, paper = result["ncores"], result["paper"]
    backends = list(dict.fromkeys(p["backend"] for p in result["points"]))
    colours = {"threads": "tab:blue", "processes": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax, ax_e, ax_t = axes
    nmax = max(max(p["workers"] for p in result["points"]), paper["cores"])
    grid = np.linspace(1, nmax, 200)
    for b in backends:
        pts = sorted((p for p in result["points"] if p["backend"] == b), key=lambda p: p["workers"])
        _plot_throughput_series(ax, pts, b, colours.get(b, None), result["fits"][b]["amdahl"], grid, paper)
        _plot_efficiency_series(ax_e, pts, b, colours.get(b, None))
    _plot_throughput_references(ax, result, grid)
    _finish_throughput(ax, ncores)
    _finish_efficiency(ax_e, paper, ncores)
    # where the workers' time went, from the engine's profile
    _plot_time_split(ax_t, result, backends)
    host = result.get("host", {})
    fig.suptitle(f"Engine scaling on {host.get('cpu', '?')} ({ncores} cores), {result['slices_label']}"
                 + ("  [quick run: noisy]" if result.get("quick") else ""), fontsize=11)
    return save_figure(fig, path, dpi=110)


def _plot_throughput_series(ax: Axes, pts: list[dict], b: str, c: str | None, fit: dict | None,
                            grid: np.ndarray, paper: dict) -> None:
    """One backend's frames/s (all cores free, and n workers on n CPUs), its Amdahl fit and 6-core projection."""
    free = [p for p in pts if not p["pinned"]]
    per_core = [p for p in pts if p.get("per_core_series")]
    ax.errorbar(*_xy_err(free), marker="o", color=c, capsize=3, label=f"engine, {b}, all cores free")
    if any(p["pinned"] for p in per_core):
        ax.errorbar(*_xy_err(per_core), marker="s", mfc="none", ls="-.", color=c, capsize=3,
                    label=f"engine, {b}, n workers on n CPUs")
    if fit:
        ax.plot(grid, amdahl(grid, fit["x1"], fit["serial_fraction"]), "--", color=c, alpha=0.7,
                label=f"Amdahl fit ({b}): s = {fit['serial_fraction']:.3f}")
        ax.plot([paper["cores"]], [fit["projected_fps_6"]], marker="D", mfc="none", color=c, ls="none",
                label=f"projected on {paper['cores']} cores ({b}): {fit['projected_fps_6']:.0f}/s")


def _plot_efficiency_series(ax_e: Axes, pts: list[dict], b: str, c: str | None) -> None:
    """One backend's parallel efficiency, per core (where it has a 1-CPU run) and per worker."""
    free = [p for p in pts if not p["pinned"]]
    per_core = [p for p in pts if p.get("per_core_series") and p["efficiency_per_core"] is not None]
    if per_core:
        ax_e.errorbar(*_efficiency_err(per_core, "efficiency_per_core"), marker="s", mfc="none", color=c,
                      capsize=3, label=f"{b}, per core (n workers on min(n, cores) CPUs)")
    ax_e.errorbar(*_efficiency_err(free, "efficiency"), marker=".", ls=":", color=c, capsize=3,
                  label=f"{b}, per worker (all cores free)")


def _plot_throughput_references(ax: Axes, result: dict, grid: np.ndarray) -> None:
    """Linear scaling from the slowest-CPU point up to the cores, and the paper's frames/s."""
    ncores, paper = result["ncores"], result["paper"]
    first = min(result["points"], key=lambda p: (p["cpus"], p["workers"]))
    x1 = first["fps"] / first["cpus"]
    ax.plot(grid, x1 * np.minimum(grid, ncores), ":", color="grey", label="linear up to the cores")
    ax.plot([1], [paper["felzenszwalb"]], "kx", ms=9, label=f"paper: Felzenszwalb {paper['felzenszwalb']:.0f}/s")
    ax.plot([1], [paper["slic"]], "ks", mfc="none", ms=8, label=f"paper: SLIC {paper['slic']:.0f}/s")
    ax.plot([paper["cores"]], [paper["slic_parallel"]], "k*", ms=12,
            label=f"paper: SLIC-parallel {paper['slic_parallel']:.0f}/s")


def _worker_axis(a: Axes, ncores: int) -> None:
    """Worker counts on x, the core count as a dashed line."""
    a.axvline(ncores, color="grey", lw=0.8, ls="--")
    a.set_xlabel("workers")
    a.grid(alpha=0.3)


def _finish_throughput(ax: Axes, ncores: int) -> None:
    """Log frames/s axis with plain tick labels, title and legend."""
    from matplotlib.ticker import FuncFormatter

    _worker_axis(ax, ncores)
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("slices / s (engine profile)")
    ax.set_title(f"Throughput ({ncores} cores here; dashed line = core count)")
    ax.legend(fontsize=7, loc="lower right")


def _finish_efficiency(ax_e: Axes, paper: dict, ncores: int) -> None:
    """The paper's efficiency, the issue's targets, axis labels and legend."""
    _worker_axis(ax_e, ncores)
    ax_e.plot([1, paper["cores"]], [100, 100 * paper["efficiency_6"]], "k*", ms=10,
              label=f"paper SLIC-parallel ({100 * paper['efficiency_6']:.0f}% on {paper['cores']} cores)")
    ax_e.axhline(90, color="green", lw=0.8, ls="-.", label="target 90% at 2 workers")
    ax_e.axhline(80, color="olive", lw=0.8, ls=":", label="target 80% at 6 workers")
    ax_e.set_ylim(0, 115)
    ax_e.set_ylabel("parallel efficiency, % (bars: its rounds)")
    ax_e.set_title("Efficiency")
    ax_e.legend(fontsize=7, loc="lower left")


def _plot_time_split(ax_t: Axes, result: dict, backends: list[str]) -> None:
    """Per worker count, one stacked bar per backend of the free runs' time split, with their CPU use."""
    ncores = result["ncores"]
    width = 0.8 / max(1, len(backends))
    allw = sorted({p["workers"] for p in result["points"] if not p["pinned"]})
    pos = {w: i for i, w in enumerate(allw)}
    labelled: set[str | None] = set()
    for j, b in enumerate(backends):
        pts = [p for p in result["points"] if p["backend"] == b and not p["pinned"]]
        xs = np.array([pos[p["workers"]] for p in pts]) + (j - (len(backends) - 1) / 2) * width
        _time_bars(ax_t, pts, xs, width, "//" if b == "processes" else None, labelled)
        ax_t.plot(xs, [min(100.0, p["cpu_pct_median"] / min(p["workers"], ncores)) for p in pts], "k.",
                  label="CPU % per core in use" if j == 0 else None)
    ax_t.set_xticks(range(len(allw)), [str(w) for w in allw])
    ax_t.set_xlabel("workers (left/plain: threads, right/hatched: processes)" if len(backends) > 1 else "workers")
    ax_t.set_ylabel("% of the workers' wall time")
    ax_t.set_ylim(0, 110)
    ax_t.set_title("Where the workers' time went (all cores free)")
    ax_t.legend(fontsize=7, loc="lower left")


def _time_bars(ax_t: Axes, pts: list[dict], xs: np.ndarray, width: float, hatch: str | None,
               labelled: set[str | None]) -> None:
    """One backend's stacked bars of ``_time_parts``; each part named in the legend once, where it shows."""
    names = ("busy, on a core", "busy, waiting for a core", "busy, asleep (GIL, lock, I/O)",
             "busy, off a core (not split)", "waiting for input", "batch barrier",
             "other (handing results over, the run's end)")
    shades = ("#4c72b0", "#a1c9f4", "#c44e52", "#ccb974", "#dd8452", "#8c8c8c", "#dddddd")
    bottom = np.zeros(len(pts))
    for k, (name, shade) in enumerate(zip(names, shades)):
        vals = np.array([_time_parts(p["profile"])[k] for p in pts])
        label = name if vals.any() and name not in labelled else None
        labelled.add(label)
        ax_t.bar(xs, vals, width * 0.95, bottom=bottom, color=shade, hatch=hatch, edgecolor="white", label=label)
        bottom += vals


def _time_parts(pr: dict) -> tuple[float, ...]:
    """% of the workers' wall time: busy on a core, busy waiting for a core, busy asleep, busy off a core but
    not split (profiles from before the split), waiting for input, barrier, other (0 in profiles from before
    it was recorded)."""
    busy, on_core, core_wait = pr["busy_pct"], pr.get("busy_on_cpu_pct"), pr.get("busy_core_wait_pct")
    on = busy if on_core is None else busy * min(on_core, 100.0) / 100
    rest = (pr["waiting_pct"], pr["barrier_pct"], pr.get("other_pct", 0.0))
    if core_wait is None:
        return (on, 0.0, 0.0, busy - on) + rest
    wait = min(busy - on, busy * core_wait / 100)
    return (on, wait, busy - on - wait, 0.0) + rest


def _xy_err(pts: list[dict]) -> tuple:
    """Worker counts, median frames/s and the (below, above) spread of points, for ``errorbar``."""
    return ([p["workers"] for p in pts], [p["fps"] for p in pts],
            np.array([[p["fps"] - p["fps_min"] for p in pts], [p["fps_max"] - p["fps"] for p in pts]]))


def _efficiency_err(pts: list[dict], key: str) -> tuple:
    """Worker counts, efficiency in % and the (below, above) spread of its rounds (none without rounds)."""
    y = [100 * p[key] for p in pts]
    rounds = [[100 * v for v in p.get(key + "_rounds") or [p[key]]] for p in pts]
    return ([p["workers"] for p in pts], y,
            np.array([[max(0.0, v - min(r)) for v, r in zip(y, rounds)], [max(0.0, max(r) - v)
                                                                          for v, r in zip(y, rounds)]]))


def _ends_text(ends: dict | None) -> str:
    """The run's two ends (the profile's ``ends``) for a table cell; '-' for profiles without them."""
    if not ends or ends.get("first_result_ms") is None:
        return "-"
    return f"{ends['first_result_ms']:.0f} / {ends['after_last_result_ms']:.0f}"


def _waiting_parts(pr: dict) -> str:
    """'volume / room' percentages of a point's profile, or '-' for results from before they were recorded."""
    if pr.get("waiting_volume_pct") is None:
        return "-"
    return f"{fmt(pr['waiting_volume_pct'])} / {fmt(pr['waiting_room_pct'])}"


def render_markdown(result: dict) -> str:
    """The sweep as a Markdown table plus the Amdahl fits and the 6-core projection."""
    host, ncores, paper = result.get("host", {}), result["ncores"], result["paper"]
    lines = _title_lines(result, host, ncores)
    lines += _points_table_lines(result["points"])
    lines += target_lines(result["points"])
    lines += _paper_lines(paper)
    lines += _fit_lines(result["fits"], ncores, paper)
    if host:
        lines += _host_lines(host)
    return "\n".join(lines)


def _title_lines(result: dict, host: dict, ncores: int) -> list[str]:
    """The heading, the quick-run and busy-machine notes, and the paragraph on what the table shows."""
    lines = [f"# Engine scaling on {host.get('cpu', '?')} ({ncores} cores), {host.get('date', '')}", ""]
    if result.get("quick"):
        lines += ["**Quick run** (few slices, 1 repeat): a smoke test of the script, not a measurement.", ""]
    if result.get("warning"):
        lines += [f"**Note:** {result['warning']}.", ""]
    return lines + [f"{result['slices_label']}; {result['settings']['repeats']} timed runs per point after a "
                    "warm-up, interleaved round-robin; frames/s from the engine profile (first read to the run's "
                    "end), median and slowest..fastest run. \"CPUs\": those the run could use. Per worker: all "
                    "cores free, so a 1-worker run has the other cores for its reader and writer. Per core (strong "
                    "scaling): below the core count the whole run (workers, reader, writer) is pinned to as many "
                    "CPUs as workers. Busy, waiting, barrier and other: % of the workers' wall time (other: "
                    "handing results over, the run's end after a worker's last job).", ""]


def _points_table_lines(points: list[dict]) -> list[str]:
    """The table of the sweep, one line per point, and a blank line."""
    head = ["backend", "workers", "CPUs", "frames/s", "range", "speed-up / worker", "eff./worker %",
            "speed-up / core", "eff./core %",
            "end-to-end frames/s", "busy %", "on a core, % of busy", "waiting for a core, % of busy", "waiting %",
            "of it: volume loading / ring or queue full %", "barrier %", "other %",
            "ends: first result ms / ms after the last", "CPU %", "peak RSS MB"]
    return [markdown_table(head, [_point_row(p) for p in points]), ""]


def _point_row(p: dict) -> list:
    """One point's line of the sweep table."""
    pr = p["profile"]
    pct = (lambda v: "-" if v is None else fmt(100 * v))
    return [p["backend"], p["workers"], f"{p['cpus']}" + (" (pinned)" if p["pinned"] else ""),
            fmt(p["fps"]), f"{fmt(p['fps_min'])}..{fmt(p['fps_max'])}",
            "-" if p["speedup"] is None else fmt(p["speedup"], 2), pct(p["efficiency"]),
            "-" if p["speedup_per_core"] is None else fmt(p["speedup_per_core"], 2),
            pct(p["efficiency_per_core"]),
            fmt(p["end_to_end_fps"]), fmt(pr["busy_pct"]),
            "-" if pr.get("busy_on_cpu_pct") is None else fmt(pr["busy_on_cpu_pct"]),
            "-" if pr.get("busy_core_wait_pct") is None else fmt(pr["busy_core_wait_pct"]),
            fmt(pr["waiting_pct"]), _waiting_parts(pr), fmt(pr["barrier_pct"]), fmt(pr.get("other_pct", 0.0)),
            _ends_text(pr.get("ends")), fmt(p["cpu_pct_median"]), fmt(pr["peak_rss_mb"])]


def _paper_lines(paper: dict) -> list[str]:
    """The paper's Table II figures: serial and parallel SLIC, their efficiency and Amdahl serial fraction."""
    return [f"Paper (Table II, {paper['machine']}): SLIC {paper['slic']:.0f} frames/s serial, SLIC-parallel "
            f"{paper['slic_parallel']:.0f} on {paper['cores']} cores = {100 * paper['efficiency_6']:.0f}% "
            f"efficiency, Amdahl serial fraction {paper['implied_serial_fraction']:.3f}.", ""]


def _fit_lines(fits: dict, ncores: int, paper: dict) -> list[str]:
    """One line per backend on its Amdahl fit and 6-core projection, then a blank line."""
    return [_fit_line(b, f, ncores, paper) for b, f in fits.items()] + [""]


def _fit_line(b: str, f: dict, ncores: int, paper: dict) -> str:
    """One backend's Amdahl fit, its projection on the paper's core count and its best worker count."""
    fit = f["amdahl"]
    if fit is None:
        return f"- {b}: fewer than two worker counts within the {ncores} cores: no Amdahl fit."
    meas = f" (measured on {paper['cores']} workers: {fmt(f['measured_fps_6'])}/s)" if f["measured_fps_6"] else ""
    quality = fit_quality_text(fit)
    return (f"- {b}: Amdahl fit on 1..{ncores} CPUs (per-core series): X(1) = {fmt(fit['x1'])}/s, "
            f"serial fraction s = {fit['serial_fraction']:.3f} ({quality}); projected on "
            f"{paper['cores']} cores at this machine's "
            f"per-core speed: **{fmt(fit['projected_fps_6'])} frames/s** vs the paper's "
            f"{paper['slic_parallel']:.0f} "
            f"(x{fit['projected_vs_paper']:.1f}){meas}; best measured at {f['best']} workers.")


def _host_lines(host: dict) -> list[str]:
    """The host the sweep ran on (CPU, memory, load, code) and its command line."""
    return [f"Host: `{host.get('host')}`, {host.get('cpu')}, {host.get('physical_cores')} physical / "
            f"{host.get('logical_cpus')} logical CPUs, {host.get('memory_gb')} GB; load average "
            f"{host.get('load_average_start')} at start, {host.get('load_average_end')} at end; code "
            f"{host.get('git')} (sources {host.get('sources', '?')}).", f"Command: `{host.get('command')}`", ""]


def target_lines(points: list[dict]) -> list[str]:
    """The issues' efficiency targets (90% at 2 workers, 80% at 6) for the points that have them: the median
    figure and its spread over the rounds, per core and per worker."""
    lines = []
    for p in points:
        bound = EFFICIENCY_TARGETS.get(p["workers"])
        if bound is None:
            continue
        for scale, key in (("per core", "efficiency_per_core"), ("per worker", "efficiency")):
            value = p[key]
            if value is None:
                continue
            rounds = common.rounds_verdict(p.get(key + "_rounds", []), bound)          # older files: none
            spread = "" if rounds is None else f"; round by round {common.rounds_text(rounds, 100, '%', bound)}"
            lines.append(f"- {p['backend']}, {p['workers']} workers, {scale}: efficiency "
                         f"{common.fmt_vs_bound(100 * value, 100 * bound)}% "
                         f"(target {100 * bound:.0f}%: {'met' if value >= bound else 'not met'}{spread})")
    return lines + [""] if lines else []


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(common.DEFAULT_CHAOS), help="engine input (default: the CHAOS-T2 folder)")
    p.add_argument("--quick", action="store_true", help="2 volumes, 1 repeat: checks the script, numbers are noisy")
    p.add_argument("--max-workers", type=common.positive_int, default=None,
                   help="largest worker count (default 2 x cores: every count up to the cores, then steps)")
    p.add_argument("--workers", default=None, help="explicit worker counts, e.g. 1,2,4,8 or 1-16")
    p.add_argument("--backends", default=",".join(BACKENDS), help="threads,processes (default both)")
    p.add_argument("--repeats", type=common.positive_int, default=None, help="timed runs per point (default 3, quick 1)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed run of each configuration")
    p.add_argument("--copies", type=common.positive_int, default=1, help="link the input volumes K times (longer runs)")
    p.add_argument("--max-volumes", type=common.positive_int, default=None, help="use only the first volumes of the input")
    p.add_argument("--uncompressed", action="store_true",
                   help="read a temporary uncompressed float32 .nii copy of the input instead of .nii.gz")
    p.add_argument("--readers", type=common.positive_int, default=None, help="engine.readers (default: the config's)")
    p.add_argument("--pinned", default=None,
                   help="worker counts also run pinned to as many CPUs, e.g. 1,2,6, or 'none' (default: every "
                        "count below the core count)")
    common.add_output_args(p, "16core")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return common.run_main("scaling", _main, parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    ncores = common.n_cores()
    cfg = common.load_config(args.config, args.set)
    cfg.superpixels.method = "slic"
    repeats = args.repeats or (1 if args.quick else 3)
    max_volumes = args.max_volumes or (2 if args.quick else None)
    if args.workers:
        workers = common.parse_int_list(args.workers)
    else:
        workers = default_workers(ncores, args.max_workers)
    pinned = None if args.pinned is None else ([] if args.pinned.strip().lower() == "none"
                                                 else common.parse_int_list(args.pinned))
    backends = common.parse_choices(args.backends, BACKENDS, "--backends")
    common.check_source(args.input)
    info = common.host_info()
    t_start = time.perf_counter()
    tmp_root = Path(tempfile.mkdtemp(prefix="scaling-", dir=args.tmp))
    try:
        source = args.input
        if args.uncompressed:
            source = common.uncompressed_copy(args.input, tmp_root, max_volumes)
        spec = common.engine_input(source, tmp_root, max_volumes=None if args.uncompressed else max_volumes,
                                   copies=args.copies)
        log(f"scaling: workers {workers}, backends {backends}, {repeats} repeat(s), input {spec}")
        result = run_scaling(cfg, spec, workers, backends, repeats, tmp_root, readers=args.readers,
                             warmup=not args.no_warmup, ncores=ncores, say=log, pinned=pinned)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    n_slices = result["points"][0]["slices"]
    result["slices_label"] = (f"{n_slices} slices from {args.input}" + (f" x{args.copies} (linked copies)"
                              if args.copies > 1 else "") + (f", first {max_volumes} volumes" if max_volumes else "")
                              + (", read from an uncompressed .nii copy" if args.uncompressed else ", .nii.gz"))
    result["host"] = common.finish_host_info(info)
    result["quick"] = bool(args.quick)
    result["total_s"] = time.perf_counter() - t_start
    result["warning"] = common.busy_warning(info)
    md = render_markdown(result)
    result["markdown"] = md
    stem = common.result_stem("scaling", args.tag, args.quick)
    out_dir = Path(args.out_dir)
    common.write_json(out_dir / f"{stem}.json", result)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    plot_scaling(result, out_dir / f"{stem}.png")
    print(md)
    log(f"scaling: done in {result['total_s']:.0f} s; wrote {out_dir / stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
