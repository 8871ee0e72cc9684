"""Single-core speed and quality of the numba SLIC against its peers, in one run on the same CHAOS slices.

Methods (all on the 256 x 256 CHAOS-T2 slices that have a body, K = 50 segments, compactness 0.1):

* ``ours``: ``engine.superpixels.pseudolabels`` with the engine's defaults (``SlicConfig``: maskSLIC in the
  body mask, 2S x 2S windows, no colour-blind pass, 8 iterations) - what ``cli.py preprocess`` runs - and
  the same with 5 iterations;
* ``ours, scikit-image settings``: ``engine.superpixels.slic`` with scikit-image's algorithm (4S x 4S windows
  and, with the mask, its colour-blind pass), in the body mask and on the full slice: the implementation
  alone against scikit-image, like for like;
* ``skimage``: ``skimage.segmentation.slic(..., channel_axis=None)``, with the mask (maskSLIC) and without;
* ``opencv``: ``cv2.ximgproc`` SLIC (region size 36 = sqrt(65536 / 50), ruler 25.5 = 0.1 x 255 on the uint8
  slice, 10 iterations, connectivity with minimum size 50 %);
* ``fast-slic``: ``fast_slic.Slic`` and ``fast_slic.avx2.SlicAvx2`` (C++ SIMD; 50 components, compactness 25.5,
  min_size_factor 0.5, one thread) on the uint8 slice replicated to 3 channels (it needs 3);
* ``felzenszwalb``: the SSL-ALPNet recipe (``engine.recipes.felzenszwalb_pseudolabels``, scale 1, sigma 1,
  min_size 400, clipped to the body mask).

Speed is slices per CPU-second of the process (``time.process_time``), i.e. per core, with the wall-clock rate
beside it; every method processes the same slices once per round, rounds are interleaved (benchmarks.common:
warm-up, then round-robin) and the median round counts. OpenCV runs with ``cv2.setNumThreads(1)``. The numba
SLIC is also timed with 2 threads (wall clock; the machine may be shared, so the speed-up is a lower bound).
Quality (``engine.quality.evaluate``: boundary recall r = 1, ASA, UE, superpixels per slice) is measured on the
slices with organs, full 256 x 256 maps, as in issue 3's reference points (skimage maskSLIC: ~46 superpixels,
BR 0.724, ASA 0.979). Finally the numba compile time (empty cache) and the start of a new process with a warm
cache are measured in subprocesses.

Usage::

    .venv/bin/python benchmarks/kernels.py              # all slices, 3 rounds (~10 min on a busy 2-core box)
    .venv/bin/python benchmarks/kernels.py --quick      # every 6th slice, 1 round (a smoke run)

Needs the benchmark extras (pyproject ``bench``): opencv-contrib-python-headless, fast-slic (built with
``pip install cython setuptools wheel`` then ``pip install --no-build-isolation fast-slic``); a missing peer
is reported as such and skipped. Writes ``benchmarks/results/kernels-<host>.json`` (``-quick`` suffix with
``--quick``) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402  (sets NUMBA_CACHE_DIR before engine is imported)

import numpy as np  # noqa: E402

from engine.config import PrepareConfig, SuperpixelConfig  # noqa: E402
from engine.superpixels import pseudolabels, slic  # noqa: E402

K_SEGMENTS = 50
COMPACTNESS = 0.1
REGION = 36            # OpenCV region size: round(sqrt(256 * 256 / 50))
RULER = 0.1 * 255      # compactness 0.1 on [0, 1] is 25.5 on a uint8 scale


# --------------------------------------------------------------------------------------------- data
def load_chaos(folder: Path, every: int) -> dict:
    """Raw float32 slices with a non-empty body mask (every ``every``-th), their masks and organ labels."""
    import nibabel as nib

    from engine.prepare import body_mask

    thr = PrepareConfig().fg_threshold
    raws, fgs, gts, names = [], [], [], []
    ids = sorted(int(p.name[6:-7]) for p in folder.glob("image_*.nii.gz"))
    if not ids:
        raise common.BenchmarkError(f"{folder}: no image_<id>.nii.gz files (set CHAOS_T2_DIR)")
    k = 0
    for vid in ids:
        image = np.asarray(nib.load(folder / f"image_{vid}.nii.gz").dataobj, dtype=np.float32)
        label = np.asarray(nib.load(folder / f"label_{vid}.nii.gz").dataobj).astype(np.uint8)
        for z in range(image.shape[2]):
            raw = np.ascontiguousarray(image[:, :, z])
            fg = body_mask(raw, thr)
            if not fg.any():
                continue
            if k % every == 0:
                raws.append(raw)
                fgs.append(fg)
                gts.append(np.ascontiguousarray(label[:, :, z]))
                names.append(f"{vid}:{z}")
            k += 1
    u8 = []
    for raw in raws:
        lo, hi = float(raw.min()), float(raw.max())
        u8.append(np.round((raw - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8))
    return {"raw": raws, "fg": fgs, "gt": gts, "u8": u8, "u8x3": [np.ascontiguousarray(np.repeat(u[:, :, None], 3, 2))
                                                                   for u in u8], "names": names}


# --------------------------------------------------------------------------------------------- methods
def build_methods(data: dict) -> tuple[list[dict], dict]:
    """The timed methods: dicts with ``key``, ``label``, ``fn(i) -> labels`` and ``mask`` (segments the body)."""
    raw, fg = data["raw"], data["fg"]
    methods = _our_methods(raw, fg) + _skimage_methods(raw, fg)
    missing: dict[str, str] = {}
    methods += _opencv_methods(data, missing)
    methods += _fastslic_methods(data, missing)
    methods += _felzenszwalb_methods(raw, fg, missing)
    return methods, missing


def _our_methods(raw: list[np.ndarray], fg: list[np.ndarray]) -> list[dict]:
    """Our SLIC: the engine's defaults (and with 5 iterations), and scikit-image's or the engine's settings."""
    cfg = SuperpixelConfig()
    cfg5 = SuperpixelConfig()
    cfg5.slic.max_num_iter = 5
    return [
        {"key": "ours", "label": "ours (engine defaults)", "mask": True,
         "fn": lambda i: pseudolabels(raw[i], fg[i], cfg)},
        {"key": "ours_it5", "label": "ours, 5 iterations", "mask": True,
         "fn": lambda i: pseudolabels(raw[i], fg[i], cfg5)},
        {"key": "ours_sk_mask", "label": "ours, scikit-image settings, mask", "mask": True,
         "fn": lambda i: slic(raw[i], n_segments=K_SEGMENTS, compactness=COMPACTNESS, mask=fg[i])},
        {"key": "ours_sk_full", "label": "ours, scikit-image settings, full slice", "mask": False,
         "fn": lambda i: slic(raw[i], n_segments=K_SEGMENTS, compactness=COMPACTNESS)},
        {"key": "ours_full", "label": "ours, engine settings, full slice", "mask": False,
         "fn": lambda i: slic(raw[i], n_segments=K_SEGMENTS, compactness=COMPACTNESS,
                              max_num_iter=cfg.slic.max_num_iter, search_radius=cfg.slic.search_radius)},
    ]


def _skimage_methods(raw: list[np.ndarray], fg: list[np.ndarray]) -> list[dict]:
    """scikit-image's SLIC, with the body mask (maskSLIC) and on the full slice."""
    from skimage.segmentation import slic as sk_slic

    return [
        {"key": "skimage_mask", "label": "skimage maskSLIC", "mask": True,
         "fn": lambda i: sk_slic(raw[i], n_segments=K_SEGMENTS, compactness=COMPACTNESS, mask=fg[i],
                                 channel_axis=None)},
        {"key": "skimage_full", "label": "skimage SLIC, full slice", "mask": False,
         "fn": lambda i: sk_slic(raw[i], n_segments=K_SEGMENTS, compactness=COMPACTNESS, channel_axis=None)},
    ]


def _opencv_methods(data: dict, missing: dict[str, str]) -> list[dict]:
    """OpenCV's ximgproc SLIC on one thread; none, and why in ``missing``, where OpenCV lacks it."""
    try:
        import cv2

        cv2.setNumThreads(1)

        def opencv(i: int) -> np.ndarray:
            sp = cv2.ximgproc.createSuperpixelSLIC(data["u8"][i], algorithm=cv2.ximgproc.SLIC,
                                                   region_size=REGION, ruler=RULER)
            sp.iterate(10)
            sp.enforceLabelConnectivity(50)
            return sp.getLabels()

        return [{"key": "opencv", "label": f"OpenCV ximgproc SLIC {cv2.__version__}", "mask": False,
                 "fn": opencv}]
    except (ImportError, AttributeError) as exc:
        missing["opencv"] = f"not available ({exc}); pip install opencv-contrib-python-headless"
        return []


def _fastslic_methods(data: dict, missing: dict[str, str]) -> list[dict]:
    """fast-slic's plain and AVX2 SLIC on one thread; none, and why in ``missing``, where it is not installed."""
    try:
        import fast_slic
        import fast_slic.avx2

        plain = fast_slic.Slic(num_components=K_SEGMENTS, compactness=RULER, min_size_factor=0.5,
                               convert_to_lab=False, num_threads=1)
        avx2 = fast_slic.avx2.SlicAvx2(num_components=K_SEGMENTS, compactness=RULER, min_size_factor=0.5,
                                       convert_to_lab=False, num_threads=1)
        return [
            {"key": "fastslic", "label": "fast-slic Slic", "mask": False,
             "fn": lambda i: plain.iterate(data["u8x3"][i], max_iter=10)},
            {"key": "fastslic_avx2", "label": "fast-slic SlicAvx2", "mask": False,
             "fn": lambda i: avx2.iterate(data["u8x3"][i], max_iter=10)},
        ]
    except ImportError as exc:
        missing["fast-slic"] = (f"not available ({exc}); pip install cython setuptools wheel, then "
                                "pip install --no-build-isolation fast-slic")
        return []


def _felzenszwalb_methods(raw: list[np.ndarray], fg: list[np.ndarray], missing: dict[str, str]) -> list[dict]:
    """The SSL-ALPNet Felzenszwalb recipe; none, and why in ``missing``, where ``engine.recipes`` is missing."""
    try:
        from engine.recipes import felzenszwalb_pseudolabels

        return [{"key": "felzenszwalb", "label": "Felzenszwalb recipe (SSL-ALPNet)", "mask": True,
                 "fn": lambda i: felzenszwalb_pseudolabels(raw[i], fg[i], 1, 1, 400, False)}]
    except ImportError as exc:
        missing["felzenszwalb"] = f"engine.recipes not available ({exc})"
        return []


# --------------------------------------------------------------------------------------------- timing
def time_methods(methods: list[dict], n: int, repeats: int) -> dict:
    """Round-robin timing of every method over slices 0..n-1: CPU and wall seconds per round."""
    def run_all(m: dict) -> None:
        fn = m["fn"]
        for i in range(n):
            fn(i)

    def measure(m: dict) -> dict:
        c0, t0 = time.process_time(), time.perf_counter()
        run_all(m)
        return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}

    rounds = common.round_robin(methods, warmup=lambda m: m["fn"](0), measure=measure, repeats=repeats,
                                log=common.log, label=lambda m: m["key"])
    out = {}
    for m, rs in zip(methods, rounds):
        wall = common.summarise([r["seconds"] for r in rs], n)
        cpu = common.summarise([r["cpu"] for r in rs], n)
        out[m["key"]] = {"label": m["label"], "per_core_fps": cpu["fps"], "wall_fps": wall["fps"],
                         "cpu_s": cpu["times_s"], "wall_s": wall["times_s"], "spread_pct": cpu["spread_pct"]}
    return out


def _run_part(fn: Callable[[int], np.ndarray], part: list[int]) -> None:
    for i in part:
        fn(i)


def thread_scaling(fn: Callable[[int], np.ndarray], n: int, repeats: int) -> dict:
    """Wall-clock slices/s of ``fn`` over slices 0..n-1: 1 thread, 2 threads, and 2 forked processes.

    The processes are the reference for what two workers can get on this machine at this moment: when
    threads match processes, the GIL is not what limits them (the kernels release it); when both stay near
    1x, the second core was busy with other work.
    """
    import multiprocessing as mp

    def run(mode: str) -> dict:
        parts = [list(range(k, n, 2)) for k in range(2)]
        c0, t0, ch0 = time.process_time(), time.perf_counter(), os.times()
        if mode == "1 thread":
            _run_part(fn, list(range(n)))
        elif mode == "2 threads":
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda part: _run_part(fn, part), parts))
        else:
            ctx = mp.get_context("fork")
            procs = [ctx.Process(target=_run_part, args=(fn, part)) for part in parts]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        wall = time.perf_counter() - t0
        ch1 = os.times()
        cpu = time.process_time() - c0 + (ch1.children_user + ch1.children_system
                                           - ch0.children_user - ch0.children_system)
        return {"seconds": wall, "cores_busy": cpu / wall}

    modes = ["1 thread", "2 threads", "2 processes"]
    rounds = common.round_robin(modes, warmup=lambda m: run(m), measure=run, repeats=repeats, log=common.log)
    out = {}
    for m, rs in zip(modes, rounds):
        key = m.replace(" ", "_")
        out[f"fps_{key}"] = common.summarise([r["seconds"] for r in rs], n)["fps"]
        # CPU seconds per wall second: ~2 when both workers really ran at once
        out[f"cores_busy_{key}"] = float(np.median([r["cores_busy"] for r in rs]))
    out["speedup_threads"] = out["fps_2_threads"] / out["fps_1_thread"]
    out["speedup_processes"] = out["fps_2_processes"] / out["fps_1_thread"]
    return out


# --------------------------------------------------------------------------------------------- quality
def measure_quality(methods: list[dict], data: dict) -> dict:
    """Mean quality metrics of every method on the slices with organs (full maps, engine.quality)."""
    from engine import quality

    organ = [i for i, g in enumerate(data["gt"]) if g.any()]
    out = {}
    for m in methods:
        rows = [quality.evaluate(np.asarray(m["fn"](i)), data["gt"][i]) for i in organ]
        out[m["key"]] = {k: float(np.nanmean([r[k] for r in rows])) for k in ("br", "asa", "ue", "co", "n")}
        out[m["key"]]["slices"] = len(organ)
        common.log(f"  quality {m['key']}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[m["key"]].items()))
    return out


# --------------------------------------------------------------------------------------------- start-up
_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from engine.superpixels import slic
t1 = time.perf_counter()
img = np.random.default_rng(0).random((256, 256)).astype(np.float32)
mask = np.zeros((256, 256), bool); mask[40:220, 30:230] = True
slic(img, n_segments=50, compactness=0.1, mask=mask, search_radius=1.0, spread_iter=0)
t2 = time.perf_counter()
slic(img, n_segments=50, compactness=0.1)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}))
"""


def startup_times() -> dict:
    """Numba compile time with an empty cache, then a new process with that (now warm) cache."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="numba-cold-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        for name in ("cold_cache", "warm_cache"):
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=900)
            wall = time.perf_counter() - t0
            if res.returncode != 0:
                out[name] = {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
                continue
            out[name] = json.loads(res.stdout.strip().splitlines()[-1])
            out[name]["process_wall_s"] = wall
            common.log(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in out[name].items()))
    return out


# --------------------------------------------------------------------------------------------- report
def report(res: dict) -> str:
    speed, qual = res["speed"], res["quality"]
    ours = speed["ours"]["per_core_fps"]
    rows = []
    for key, s in speed.items():
        q = qual.get(key, {})
        rows.append([s["label"], common.fmt(s["per_core_fps"]), common.fmt(s["wall_fps"]),
                     "1.0" if key == "ours" else common.fmt(ours / s["per_core_fps"], 2),
                     common.fmt(q.get("n")), common.fmt(q.get("br"), 3), common.fmt(q.get("asa"), 3),
                     common.fmt(q.get("ue"), 3)])
    lines = [common.markdown_table(["method", "slices/s per core", "slices/s wall", "ours / method",
                                    "superpixels/slice", "BR", "ASA", "UE"], rows), ""]
    for t in res["targets"]:
        value = common.fmt_vs_bound(t["value"], float(t["target"].split()[-1]), 2)
        lines.append(f"- {t['name']}: {value} (target {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    for line in res["verdicts"]:
        lines.append(f"- {line}")
    ts = res.get("threads")
    if ts:
        lines.append(f"- 2 threads: {ts['fps_2_threads']:.0f} slices/s vs {ts['fps_1_thread']:.0f} with 1 "
                     f"(x{ts['speedup_threads']:.2f}, wall clock, {ts['cores_busy_2_threads']:.2f} cores busy); "
                     f"2 processes for reference: x{ts['speedup_processes']:.2f} "
                     f"({ts['cores_busy_2_processes']:.2f} cores busy)")
    st = res.get("startup", {})
    if "first_call_s" in st.get("cold_cache", {}):
        lines.append(f"- numba compile, empty cache: {st['cold_cache']['first_call_s']:.1f} s; new process with a "
                     f"warm cache: {st['warm_cache'].get('process_wall_s', float('nan')):.2f} s in all "
                     f"(import {st['warm_cache'].get('import_s', float('nan')):.2f} s, first call "
                     f"{st['warm_cache'].get('first_call_s', float('nan')) * 1000:.0f} ms)")
    for name, why in res["missing"].items():
        lines.append(f"- {name}: {why}")
    if res.get("busy"):
        lines.append(f"- note: {res['busy']}")
    return "\n".join(lines)


def verdicts(speed: dict, qual: dict) -> tuple[list[dict], list[str]]:
    """The issue's targets, and a line for every peer that beats us on speed or quality."""
    ours = speed["ours"]["per_core_fps"]
    targets = []
    if "skimage_mask" in speed:
        targets.append({"name": "ours / skimage maskSLIC, per core", "target": ">= 15",
                        "value": ours / speed["skimage_mask"]["per_core_fps"]})
    if "skimage_full" in speed:
        targets.append({"name": "ours / skimage SLIC (full slice), per core", "target": ">= 15",
                        "value": ours / speed["skimage_full"]["per_core_fps"]})
    if "fastslic_avx2" in speed:
        targets.append({"name": "ours / fast-slic AVX2, per core", "target": ">= 1.3",
                        "value": ours / speed["fastslic_avx2"]["per_core_fps"]})
    for t in targets:
        t["met"] = t["value"] >= float(t["target"].split()[-1])
    if "skimage_mask" in qual:
        for k in ("br", "asa"):
            d = qual["ours"][k] - qual["skimage_mask"][k]
            targets.append({"name": f"{k.upper()} ours - skimage maskSLIC", "target": ">= -0.01", "value": d,
                            "met": d >= -0.01})
    lines = []
    peers = {k: s for k, s in speed.items() if not k.startswith("ours")}
    for key, s in peers.items():
        if s["per_core_fps"] > ours:
            lines.append(f"we lose on speed to {s['label']}: {s['per_core_fps']:.0f} vs {ours:.0f} slices/s per core")
        lines += _quality_losses(s["label"], qual.get(key), qual.get("ours"))
    # our other settings against the fastest peer, like for like where the peer segments the full slice
    if peers:
        fastest = max(peers, key=lambda k: peers[k]["per_core_fps"])
        for key, s in speed.items():
            if key.startswith("ours") and key != "ours" and s["per_core_fps"] < peers[fastest]["per_core_fps"]:
                lines.append(f"{s['label']} is slower than {peers[fastest]['label']}: {s['per_core_fps']:.0f} vs "
                             f"{peers[fastest]['per_core_fps']:.0f} slices/s per core")
    return targets, lines


def _quality_losses(label: str, q: dict | None, ours: dict | None) -> list[str]:
    """A line for each of BR and ASA where a peer's quality ``q`` beats ours by more than 0.005."""
    if not q or not ours:
        return []
    return [f"{label} has a higher {k.upper()} ({q[k]:.3f} vs {ours[k]:.3f}, "
            f"at {q['n']:.1f} vs {ours['n']:.1f} superpixels per slice)"
            for k in ("br", "asa") if q[k] > ours[k] + 0.005]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(common.DEFAULT_CHAOS), help="CHAOS-T2 folder (image_<id>.nii.gz)")
    ap.add_argument("--quick", action="store_true", help="every 6th slice, 1 round, no start-up probe")
    ap.add_argument("--repeats", type=common.positive_int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--every", type=common.positive_int, default=None, help="use every N-th slice (default 1, quick 6)")
    ap.add_argument("--tag", default=None, help="result file tag (default: host name)")
    ap.add_argument("--threads-only", action="store_true",
                    help="only the 1 vs 2 thread measurement of our kernel "
                         "(prints it and writes kernels-threads-TAG.json)")
    return common.run_main("kernels", _body, ap.parse_args(argv))


def _body(args) -> int:
    every = args.every or (6 if args.quick else 1)
    repeats = 1 if args.quick else args.repeats

    info = common.host_info()
    common.log(f"loading CHAOS slices from {args.data} (every {every})")
    data = load_chaos(Path(args.data), every)
    n = len(data["raw"])
    if args.threads_only:
        cfg = SuperpixelConfig()
        ts = thread_scaling(lambda i: pseudolabels(data["raw"][i], data["fg"][i], cfg), n, repeats)
        out = common.jsonable({**ts, "load_average": os.getloadavg(), "slices": n,
                               "settings": dataclasses.asdict(cfg.slic), "host": info})
        print(json.dumps({k: v for k, v in out.items() if k != "host"}))
        path = common.RESULTS_DIR / f"kernels-threads-{args.tag or info['host']}.json"
        path.write_text(json.dumps(out, indent=1))
        common.log(f"wrote {path}")
        return 0
    common.log(f"{n} slices with a body; {sum(g.any() for g in data['gt'])} with organs")
    methods, missing = build_methods(data)
    common.log("timing (single thread)")
    speed = time_methods(methods, n, repeats)
    common.log("quality")
    qual = measure_quality(methods, data)
    common.log("threads")
    ours_fn = next(m["fn"] for m in methods if m["key"] == "ours")
    threads = thread_scaling(ours_fn, n, repeats)
    startup = {} if args.quick else startup_times()
    targets, lines = verdicts(speed, qual)
    res = {"host": common.finish_host_info(info), "slices": n, "every": every, "repeats": repeats,
           "settings": {"n_segments": K_SEGMENTS, "compactness": COMPACTNESS, "engine": {
               k: getattr(SuperpixelConfig().slic, k) for k in ("n_segments", "compactness", "max_num_iter",
                                                                "search_radius", "spread_iter", "mask")},
               "opencv_region_size": REGION, "opencv_ruler": RULER, "fastslic_compactness": RULER},
           "speed": speed, "quality": qual, "threads": threads, "startup": startup, "targets": targets,
           "verdicts": lines, "missing": missing, "busy": common.busy_warning(info)}
    path = common.write_json(common.RESULTS_DIR / f"{common.result_stem('kernels', args.tag, args.quick)}.json", res)
    print(report(res))
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
