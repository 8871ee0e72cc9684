"""Superpixel quality study on CHAOS-T2: SLIC parameter grid vs the Felzenszwalb and MeanShift recipes.

For every slice of the 20 CHAOS-T2 volumes this computes, per pseudo-label method and parameter set, the
metrics of ``engine.quality`` against the 4 organ labels (boundary recall, undersegmentation error, achievable
segmentation accuracy, compactness, superpixels per slice) and how the superpixels look to ALPNet as support
masks: the fraction that vanish when down-sampled bilinearly to 32 x 32, the fraction that get local foreground
prototypes (some 4 x 4-pooled feature window with mask >= 0.95) and the mean number of such prototypes
(method.md 3.2-3.3).

Conventions (they reproduce the reference points of issue 3, see ``--check``): metrics over the full 256 x 256
slice, the superpixel map's 0 (outside the body) counted as one segment and the ground-truth background as one
label, boundary tolerance r = 1, averages over slices (boundary recall over slices that have organ boundaries).
Each figure is given for the slices with at least one organ pixel (558) and for all 718 slices.

ALPNet statistics are over the ids a training episode can draw: 1..K for the clean maps, and 1..max_id-1 for
the faithful SSL-ALPNet Felzenszwalb maps (its sampler never draws the largest id and can draw empty ids).

Usage::

    .venv/bin/python benchmarks/superpixel_quality.py                # full study: ~660 s of worker CPU,
                                                                     # 592 s wall on 2 shared cores (load 6)
    .venv/bin/python benchmarks/superpixel_quality.py --quick        # every 6th slice, reduced grid

Writes ``benchmarks/results/superpixel_quality.json`` and ``superpixel_quality.png`` (``_quick`` suffix with
``--quick``), plus the run provenance, and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402  (sets NUMBA_CACHE_DIR and MPLBACKEND before engine is imported)
from engine import quality  # noqa: E402
from engine.config import MeanShiftConfig, PrepareConfig, SlicConfig  # noqa: E402
from engine.figures import save_figure  # noqa: E402
from engine.prepare import body_mask, prepare_volume  # noqa: E402
from engine.recipes import consecutive_ids, felzenszwalb_pseudolabels, meanshift_pseudolabels  # noqa: E402
from engine.sources import open_source  # noqa: E402

try:    # the project's numba SLIC; scikit-image's when it is missing (much slower, same parameters)
    from engine.superpixels import slic as project_slic
    SLIC_IMPL = "engine.superpixels.slic"
except ImportError:  # pragma: no cover - only before engine.superpixels exists
    from skimage.segmentation import slic as _sk_slic

    def project_slic(image, **kw):
        return _sk_slic(np.asarray(image, dtype=np.float64), channel_axis=None, **kw)
    SLIC_IMPL = "skimage.segmentation.slic (fallback)"

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "chaos_t2"
N_SEGMENTS = (20, 30, 50, 75, 100, 150)
COMPACTNESS = (0.03, 0.1, 0.3, 1.0)
ITERATIONS = (3, 5, 8)                  # extra runs at K = 30, 50 (mask, m = 0.1) besides the grid's 10
QUICK_N, QUICK_C = (30, 50, 100), (0.1, 0.3)
FEATURE_SIZE, POOL, THRESHOLD = 32, 4, 0.95

# Reference points of issue 3 (558 slices with organs, r = 1): what the metric code must reproduce.
REFERENCE = {
    "felzenszwalb_faithful": {"n": 24.0, "br": 0.679, "ue": 0.049, "asa": 0.975},
    "skimage_maskslic_K50_m0.1": {"n": 46.0, "br": 0.724, "asa": 0.979},
}


# --------------------------------------------------------------------------------------------- methods
def method_list(quick: bool) -> list[dict]:
    """Every (name, kind, parameters) evaluated on each slice."""
    ns, cs = (QUICK_N, QUICK_C) if quick else (N_SEGMENTS, COMPACTNESS)
    out = []
    for mask in (True, False):
        for c in cs:
            for n in ns:
                out.append({"name": f"slic_{'mask' if mask else 'full'}_K{n}_m{c:g}", "kind": "slic",
                            "mask": mask, "n_segments": n, "compactness": c, "max_num_iter": 10})
    for it in ITERATIONS:
        for n in (30, 50):
            out.append({"name": f"slic_mask_K{n}_m0.1_it{it}", "kind": "slic", "mask": True, "n_segments": n,
                        "compactness": 0.1, "max_num_iter": it})
    d = SlicConfig()                    # always evaluate the engine's current defaults too
    if default_slic_name() not in {m["name"] for m in out}:
        out.append({"name": default_slic_name(), "kind": "slic", "mask": d.mask, "n_segments": d.n_segments,
                    "compactness": d.compactness, "max_num_iter": d.max_num_iter})
    for n in (50, 30):
        out.append({"name": f"skimage_maskslic_K{n}_m0.1", "kind": "skimage_slic", "mask": True, "n_segments": n,
                    "compactness": 0.1, "max_num_iter": 10})
    # What the engine stores: engine.superpixels.pseudolabels with SlicConfig (2S x 2S windows, no
    # colour-blind pass), at several K; the grid above runs our SLIC in its scikit-image-compatible mode.
    for n in ((30, 50) if quick else (20, 30, 50, 75)):
        out.append({"name": f"engine_K{n}_m{d.compactness:g}_it{d.max_num_iter}", "kind": "engine",
                    "n_segments": n, "compactness": d.compactness, "max_num_iter": d.max_num_iter,
                    "search_radius": d.search_radius, "spread_iter": d.spread_iter})
    out.append({"name": "felzenszwalb_faithful", "kind": "felzenszwalb", "faithful": True})
    out.append({"name": "felzenszwalb", "kind": "felzenszwalb", "faithful": False})
    ms = MeanShiftConfig()
    out.append({"name": "meanshift", "kind": "meanshift", "kernel_size": ms.kernel_size, "max_dist": ms.max_dist,
                "ratio": ms.ratio, "sigma": ms.sigma})
    return out


def _segment(m: dict, raw: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """The pseudo-label map of method ``m``: 0 outside the body, ids inside (as the engine stores it)."""
    if not fg.any():
        return np.zeros(raw.shape, dtype=np.int32)
    kind = m["kind"]
    if kind == "slic":
        lab = project_slic(raw, n_segments=m["n_segments"], compactness=m["compactness"],
                           max_num_iter=m["max_num_iter"], mask=fg if m["mask"] else None, start_label=1)
        return np.asarray(lab, dtype=np.int32) if m["mask"] else consecutive_ids(np.asarray(lab), fg)
    if kind == "skimage_slic":
        from skimage.segmentation import slic as sk_slic
        lab = sk_slic(raw.astype(np.float64), n_segments=m["n_segments"], compactness=m["compactness"],
                      max_num_iter=m["max_num_iter"], mask=fg, channel_axis=None, start_label=1)
        return lab.astype(np.int32)
    if kind == "engine":
        from engine.config import SuperpixelConfig
        from engine.superpixels import pseudolabels
        cfg = SuperpixelConfig()
        for key in ("n_segments", "compactness", "max_num_iter", "search_radius", "spread_iter"):
            setattr(cfg.slic, key, m[key])
        return pseudolabels(raw, fg, cfg)
    if kind == "felzenszwalb":
        return felzenszwalb_pseudolabels(raw, fg, faithful=m["faithful"])
    if kind == "meanshift":
        return meanshift_pseudolabels(raw, fg, kernel_size=m["kernel_size"], max_dist=m["max_dist"],
                                      ratio=m["ratio"], sigma=m["sigma"])
    raise ValueError(f"unknown method kind {kind!r}")


FIELDS = ("br", "ue", "asa", "co", "n", "ue_body", "asa_body", "drawable", "vanished", "fg_local", "n_local",
          "area_median")


def _slice_stats(sp: np.ndarray, gt: np.ndarray, fg: np.ndarray, faithful: bool) -> dict:
    ev = quality.evaluate(sp, gt)
    ue_body = quality.undersegmentation_error(sp, gt, fg)
    asa_body = quality.achievable_segmentation_accuracy(sp, gt, fg)
    top = int(sp.max())
    drawable = np.arange(1, top) if faithful else np.arange(1, top + 1)
    fs = quality.feature_stats(sp, FEATURE_SIZE, POOL, THRESHOLD)
    present = np.isin(drawable, fs["ids"])
    pos = np.searchsorted(fs["ids"], drawable[present])
    vanished = int((~present).sum()) + int(fs["vanished"][pos].sum())  # empty ids vanish too
    areas = np.bincount(sp.ravel())[1:]
    areas = areas[areas > 0]
    return {"br": ev["br"], "ue": ev["ue"], "asa": ev["asa"], "co": ev["co"], "n": ev["n"],
            "ue_body": ue_body, "asa_body": asa_body, "drawable": float(len(drawable)),
            "vanished": float(vanished), "fg_local": float(fs["fg_local"][pos].sum()),
            "n_local": float(fs["n_local"][pos].sum()),
            "area_median": float(np.median(areas)) if areas.size else math.nan}


def run_volume(task: tuple) -> dict:
    """Worker: load and prepare one volume, evaluate every method on each (sub-sampled) slice."""
    data, ref, methods, step, offset = task
    src = open_source(str(data))
    vol = prepare_volume(src.load(ref), PrepareConfig())
    thr = PrepareConfig().fg_threshold
    zs = [z for z in range(vol.n_slices) if (offset + z) % step == 0]
    out = {"volume": vol.id, "z": zs, "organs": [], "body": [],
           "stats": {m["name"]: {f: [] for f in FIELDS} for m in methods},
           "seconds": {m["name"]: 0.0 for m in methods}}
    for z in zs:
        raw = np.ascontiguousarray(vol.raw[:, :, z])
        gt = vol.label[:, :, z].astype(np.int32)
        fg = body_mask(raw, thr)
        out["organs"].append(bool(gt.any()))
        out["body"].append(int(fg.sum()))
        for m in methods:
            t0 = time.perf_counter()
            sp = _segment(m, raw, fg)
            out["seconds"][m["name"]] += time.perf_counter() - t0
            st = _slice_stats(sp, gt, fg, m.get("faithful", False))
            for f in FIELDS:
                out["stats"][m["name"]][f].append(st[f])
    return out


# --------------------------------------------------------------------------------------------- summary
def summarise(parts: list[dict], methods: list[dict]) -> dict:
    organs = np.concatenate([np.asarray(p["organs"], dtype=bool) for p in parts])
    n_slices = len(organs)
    result = {}
    for m in methods:
        name = m["name"]
        cols = {f: np.concatenate([np.asarray(p["stats"][name][f], dtype=float) for p in parts]) for f in FIELDS}
        seconds = sum(p["seconds"][name] for p in parts)
        entry = {"params": {k: v for k, v in m.items() if k != "name"},
                 "ms_per_slice": 1e3 * seconds / max(n_slices, 1)}
        for subset, sel in (("organ_slices", organs), ("all_slices", np.ones(n_slices, dtype=bool))):
            c = {f: v[sel] for f, v in cols.items()}
            has = c["drawable"] > 0
            with np.errstate(invalid="ignore", divide="ignore"):
                entry[subset] = {
                    "slices": int(sel.sum()),
                    "n": float(np.mean(c["n"])),
                    "br": float(np.nanmean(c["br"])) if np.isfinite(c["br"]).any() else math.nan,
                    "ue": float(np.nanmean(c["ue"])), "asa": float(np.nanmean(c["asa"])),
                    "co": float(np.nanmean(c["co"])),
                    "ue_body": float(np.nanmean(c["ue_body"])), "asa_body": float(np.nanmean(c["asa_body"])),
                    "area_median": float(np.nanmedian(c["area_median"])),
                    # per-episode view, averaged over slices that have something to draw
                    "vanish_frac": float(np.mean(c["vanished"][has] / c["drawable"][has])),
                    "fg_local_frac": float(np.mean(c["fg_local"][has] / c["drawable"][has])),
                    "fg_local_per_episode": float(np.mean(c["n_local"][has] / c["drawable"][has])),
                }
        result[name] = entry
    return result


def check_reference(res: dict) -> list[str]:
    lines = []
    for name, ref in REFERENCE.items():
        if name not in res:
            continue
        got = res[name]["organ_slices"]
        cells = ", ".join(f"{k} {got[k]:.4g} (ref {v:g})" for k, v in ref.items())
        lines.append(f"- {name}: {cells}")
    return lines


def markdown(res: dict, subset: str) -> str:
    head = ("| method | sp/slice | median px | BR | UE | ASA | CO | vanish@32 | local fg | fg protos | ms/slice |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, e in res.items():
        s = e[subset]
        rows.append(f"| {name} | {s['n']:.1f} | {s['area_median']:.0f} | {s['br']:.3f} | {s['ue']:.3f} | "
                    f"{s['asa']:.4f} | {s['co']:.3f} | {s['vanish_frac']:.3f} | {s['fg_local_frac']:.3f} | "
                    f"{s['fg_local_per_episode']:.2f} | {e['ms_per_slice']:.1f} |")
    return head + "\n" + "\n".join(rows)


def default_slic_name() -> str:
    """Name of the study's entry that matches the engine's current SLIC defaults (``SlicConfig``)."""
    d = SlicConfig()
    suffix = "" if d.max_num_iter == 10 else f"_it{d.max_num_iter}"
    return f"slic_{'mask' if d.mask else 'full'}_K{d.n_segments}_m{d.compactness:g}{suffix}"


def plot(res: dict, path: Path, subset: str = "organ_slices") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    keys = (("br", "boundary recall (r = 1)"), ("asa", "achievable segmentation accuracy"),
            ("fg_local_frac", "episodes with local fg prototypes"))
    cs = sorted({e["params"]["compactness"] for n, e in res.items()
                 if e["params"]["kind"] == "slic" and e["params"]["max_num_iter"] == 10})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes, keys):
        for i, c in enumerate(cs):
            for mask, style in ((True, "-o"), (False, "--s")):
                pts = sorted((e[subset]["n"], e[subset][key]) for e in res.values()
                             if e["params"]["kind"] == "slic" and e["params"]["mask"] == mask
                             and e["params"]["compactness"] == c and e["params"]["max_num_iter"] == 10)
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, style, color=colours[i % len(colours)], ms=4, lw=1.2,
                            label=f"SLIC {'mask' if mask else 'full'} m={c:g}")
        for name, marker, colour in (("felzenszwalb_faithful", "*", "k"), ("felzenszwalb", "P", "0.4"),
                                     ("meanshift", "X", "m"), ("skimage_maskslic_K50_m0.1", "D", "c")):
            if name in res:
                s = res[name][subset]
                ax.plot([s["n"]], [s[key]], marker, color=colour, ms=11, label=name)
        chosen = default_slic_name()
        if chosen in res:
            s = res[chosen][subset]
            ax.plot([s["n"]], [s[key]], "o", mfc="none", mec="r", ms=16, mew=2, label=f"default ({chosen})")
        ax.set_xscale("log")
        ax.set_xlabel("superpixels per slice (inside the body)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"CHAOS-T2 superpixel quality vs organ labels ({subset.replace('_', ' ')})")
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Evaluate every method on the (sub-sampled) slices, write the result files and print the summary."""
    args = _parse_args(argv)
    data = Path(args.data)
    refs = _volume_refs(data)
    if refs is None:
        return 2
    step = args.step or (6 if args.quick else 1)
    methods = method_list(args.quick)
    t0 = time.perf_counter()
    parts = _run_volumes(data, refs, methods, step, args.workers, t0)
    res = summarise(parts, methods)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)     # the workers' CPU time, independent of load
    cpu = usage.ru_utime + usage.ru_stime
    doc = _result_doc(parts, res, step, args.workers, wall, cpu)
    _write_outputs(args, data, step, methods, doc)
    _print_summary(doc, wall, cpu)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder of the CHAOS-T2 NIfTI volumes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    ap.add_argument("--workers", type=common.positive_int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--quick", action="store_true", help="every 6th slice and a reduced grid (development)")
    ap.add_argument("--step", type=common.positive_int, default=None, help="evaluate every STEP-th slice (default 1, quick 6)")
    return ap.parse_args(argv)


def _volume_refs(data: Path) -> list | None:
    """The volumes of the source; None, after one line on stderr, where it cannot be opened."""
    try:
        return open_source(str(data)).refs()
    except Exception as exc:        # a VolumeError names the path and the problem in one line
        print(f"error: {exc}", file=sys.stderr)
        return None


def _run_volumes(data: Path, refs: list, methods: list[dict], step: int, workers: int, t0: float) -> list[dict]:
    """Every volume evaluated by a pool of worker processes, progress printed; the parts in the source's order."""
    tasks = [(data, ref, methods, step, i) for i, ref in enumerate(refs)]
    print(f"{len(refs)} volumes, {len(methods)} methods, every {step}. slice, {workers} workers, "
          f"SLIC = {SLIC_IMPL}", flush=True)
    parts: list[dict] = []
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers) as pool:
        for part in pool.imap_unordered(run_volume, tasks):
            parts.append(part)
            print(f"  volume {part['volume']:>3}: {len(part['z'])} slices  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    parts.sort(key=lambda p: refs.index(p["volume"]) if p["volume"] in refs else 0)
    return parts


def _result_doc(parts: list[dict], res: dict, step: int, workers: int, wall: float, cpu: float) -> dict:
    """The JSON result: conventions, slice counts, run figures, the engine's default, references and results."""
    n_slices = sum(len(p["z"]) for p in parts)
    return {"description": "superpixel quality vs CHAOS-T2 organ labels; see benchmarks/superpixel_quality.py",
            "conventions": {"region": "full slice", "superpixel_zero": "one segment (outside the body)",
                            "gt_background": "one label", "tolerance_px": quality.tolerance((256, 256)),
                            "boundary": "4-neighbour label change, both sides",
                            "alpnet": f"bilinear to {FEATURE_SIZE}x{FEATURE_SIZE}, {POOL}x{POOL} pooling, "
                                      f"threshold {THRESHOLD}"},
            "slic_impl": SLIC_IMPL, "slices": n_slices,
            "organ_slices": int(sum(sum(p["organs"]) for p in parts)), "step": step, "workers": workers,
            "wall_seconds": wall, "worker_cpu_seconds": cpu, "load_average_1min_at_end": os.getloadavg()[0],
            "engine_default": default_slic_name(), "reference": REFERENCE, "results": res}


def _write_outputs(args: argparse.Namespace, data: Path, step: int, methods: list[dict], doc: dict) -> None:
    """The JSON result, its figure and the run provenance, in the results folder."""
    suffix = "_quick" if args.quick else ""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"superpixel_quality{suffix}.json").write_text(json.dumps(doc, indent=1))
    plot(doc["results"], out / f"superpixel_quality{suffix}.png")
    try:
        from engine.runinfo import write_run_info
        write_run_info(out, {"data": str(data), "step": step, "workers": args.workers, "quick": args.quick,
                             "methods": methods}, f"superpixel_quality{suffix}")
    except Exception as exc:  # provenance must not lose the results
        print(f"warning: run info not written ({exc})", file=sys.stderr)


def _print_summary(doc: dict, wall: float, cpu: float) -> None:
    """The run's size and cost, the reference points and the Markdown tables of both slice subsets."""
    res = doc["results"]
    print(f"\n{doc['slices']} slices ({doc['organ_slices']} with organs) in {wall:.0f} s wall, {cpu:.0f} s worker "
          f"CPU (load average {os.getloadavg()[0]:.1f})\n")
    print("Reference points (slices with organs):")
    print("\n".join(check_reference(res)))
    for subset in ("organ_slices", "all_slices"):
        print(f"\n### {subset.replace('_', ' ')}\n")
        print(markdown(res, subset))


if __name__ == "__main__":
    sys.exit(main())
