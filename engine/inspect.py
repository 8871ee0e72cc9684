"""``cli.py inspect STORE``: one-screen summary and integrity check of a store; optional overlay PNG."""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import h5py
import numpy as np

from engine.figures import save_figure
from engine.store_format import (DATASETS, StoreError, error_text, lock_path, parts_dir, shard_name,
                                  slice_organ_bits)
from engine.store_lock import describe_holder
from engine.store_reader import StoreReader


def _disk_size(path: Path) -> int:
    total = path.stat().st_size if path.exists() else 0
    parts = parts_dir(path)
    if parts.is_dir():
        total += sum(p.stat().st_size for p in parts.iterdir() if p.is_file())
    return total


def _run_history(path: Path) -> dict:
    """How the store was built, from ``runs.jsonl``: how many runs, their statuses in order, the last one.

    History, not content: a line torn by a kill while it was appended is skipped, a missing file is no runs.
    """
    runs = []
    try:
        lines = (parts_dir(path) / "runs.jsonl").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            runs.append(json.loads(line))
        except ValueError:
            continue
    return {"count": len(runs), "statuses": [r.get("status") for r in runs], "last": runs[-1] if runs else None}


def _last_profile(path: Path) -> dict | None:
    """The throughput in ``STORE.profile.json``, which the last run that reached its end wrote (None: none)."""
    profile = path.with_name(path.name + ".profile.json")
    try:
        p = json.loads(profile.read_text())
        return {"path": str(profile), "slices": int(p["slices"]), "wall_s": float(p["wall_s"]),
                "slices_per_s": float(p["slices_per_s"]), "backend": p.get("backend"), "workers": p.get("workers"),
                "status": p.get("status")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _writer_holding(path: Path) -> dict | None:
    """Who is writing the store right now, from its lock file (None when nobody is).

    The lock is only read, never taken: a reader must not make a starting writer fail. A lock file left by a
    killed run names a process that no longer exists and is ignored.
    """
    import platform

    import psutil
    lp = lock_path(path)
    try:
        holder = json.loads(lp.read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not holder:
        return None
    if holder.get("host") == platform.node() and not psutil.pid_exists(int(holder.get("pid", -1))):
        return None
    return holder


# a store damaged throughout would otherwise be read to its end to list the same fault on every slice
MAX_PROBLEMS = 50
STOPPED_NOTE = f"... (the pixel check stopped at {MAX_PROBLEMS} problems)"


def check_integrity(reader: StoreReader, read_pixels: bool = True) -> list[str]:
    """Problems found in a store snapshot (empty list: consistent).

    Checks that every shard the index names exists and agrees with the index (slice count, volume, z), that
    the virtual datasets map every shard, that each volume's slices are z = 0, 1, ... without gap or
    duplicate (a partly written last volume is allowed while the store is incomplete), and, with
    ``read_pixels``, that every slice decodes and is consistent (finite image, superpixel ids 1..n inside
    the body only, label present exactly when recorded). The pixel check stops after ``MAX_PROBLEMS``
    findings; the list then ends with ``STOPPED_NOTE``.
    """
    problems, truncated = integrity_problems(reader, read_pixels)
    return problems + [STOPPED_NOTE] if truncated else problems


def integrity_problems(reader: StoreReader, read_pixels: bool = True) -> tuple[list[str], bool]:
    """``check_integrity``'s findings without the note: ``(problems, truncated)``, where ``truncated`` says
    the pixel check stopped at ``MAX_PROBLEMS``."""
    problems = _check_shards_and_index(reader)
    more, truncated = _check_volumes_and_pixels(reader, read_pixels)
    return problems + more, truncated


def _check_shards_and_index(reader: StoreReader) -> list[str]:
    problems: list[str] = []
    sl = reader.slices
    n = reader.n_slices
    shards = np.asarray([reader.shard_of(i)[0] for i in range(n)], dtype=np.int64)
    rows = np.asarray([reader.shard_of(i)[1] for i in range(n)], dtype=np.int64)
    # shards: contiguous, each one agreeing with the index
    if n:
        for k in np.unique(shards):
            idx = np.flatnonzero(shards == k)
            path = reader.parts / shard_name(int(k))
            if not np.array_equal(rows[idx], np.arange(len(idx))):
                problems.append(f"shard {k}: rows in the index are not 0..{len(idx) - 1}")
            try:
                with h5py.File(path, "r") as f:
                    vols = [v.decode() if isinstance(v, bytes) else str(v) for v in f["slices/volume"][()]]
                    zs = f["slices/z"][()]
                    if len(vols) != len(idx):
                        problems.append(f"{path}: holds {len(vols)} slices, the index maps {len(idx)}")
                    elif list(sl["volume"][idx]) != vols or not np.array_equal(sl["z"][idx], zs):
                        problems.append(f"{path}: its slice table differs from the index")
                    for name in DATASETS:
                        if f[name].shape[0] != len(vols):
                            problems.append(f"{path}: dataset {name} has {f[name].shape[0]} rows for "
                                            f"{len(vols)} slices")
            except (OSError, KeyError) as exc:
                problems.append(f"{path}: missing or unreadable ({error_text(exc)})")
    # the virtual datasets of the index (what h5py / HDFView users read)
    try:
        with h5py.File(reader.path, "r") as f:
            if int(f.attrs.get("n_slices", -1)) != n:
                # A run has published a newer index since this snapshot was taken; its mapping is not ours.
                return problems
            unmapped: set[str] = set()
            for name in DATASETS:
                d = f[name]
                if d.shape[0] != n:
                    problems.append(f"index dataset {name} has {d.shape[0]} rows, the slice table {n}")
                elif n and d.is_virtual:
                    sources = d.virtual_sources()
                    mapped = sum(int(np.prod([s.stop - s.start for s in _vslices(vs)][:1])) for vs in sources)
                    if mapped != n:
                        problems.append(f"index dataset {name}: virtual mapping covers {mapped} of {n} slices")
                    unmapped |= {vs.file_name for vs in sources if not (reader.path.parent / vs.file_name).is_file()}
            if unmapped:
                # HDF5 reads a missing source as zeros, silently: h5py and HDFView users would get blank slices
                problems.append(f"the index maps its datasets onto {len(unmapped)} file(s) that are not there (e.g. "
                                f"{min(unmapped)}); the preprocess command that made the store rebuilds the index "
                                f"from {reader.parts.name}")
    except OSError as exc:
        problems.append(f"{reader.path}: cannot reopen the index ({error_text(exc)})")
    return problems


def _check_volumes_and_pixels(reader: StoreReader, read_pixels: bool) -> tuple[list[str], bool]:
    problems: list[str] = []
    truncated = False
    sl = reader.slices
    n = reader.n_slices
    # per volume: z = 0..n-1 once each
    complete = bool(reader.meta.get("complete", False))
    last_volume = sl["volume"][-1] if n else None
    for row in reader.volumes:
        idx = reader.slices_of(row["id"])
        zs = sl["z"][idx]
        expected = row["n_slices"]
        if len(np.unique(zs)) != len(zs):
            problems.append(f"volume {row['id']}: duplicated slices")
        elif not np.array_equal(zs, np.arange(len(zs))):
            problems.append(f"volume {row['id']}: slices are not z = 0..{len(zs) - 1} in order (gap)")
        elif len(zs) != expected and (complete or row["id"] != last_volume):
            problems.append(f"volume {row['id']}: {len(zs)} of its {expected} slices in the store")
    if read_pixels:
        unreadable: dict[str, list[int]] = {}          # reason -> slices (a damaged shard fails all of its slices)
        has_label = {row["id"]: bool(row["has_label"]) for row in reader.volumes}
        for i in range(n):
            try:
                d = reader.read(i)
            except Exception as exc:  # any decoding failure is a finding, not a crash
                unreadable.setdefault(error_text(exc), []).append(i)
                continue
            tag = f"slice {i} (volume {sl['volume'][i]} z={sl['z'][i]})"
            sp, fg = d["superpixels"], d["fg"]
            if not np.isfinite(d["image"]).all():
                problems.append(f"{tag}: image has NaN/Inf")
            nsp = int(sl["n_superpixels"][i])
            if int(sp.max(initial=0)) != nsp:
                problems.append(f"{tag}: max superpixel id {int(sp.max(initial=0))}, table says {nsp}")
            elif nsp and len(np.unique(sp[sp > 0])) != nsp:
                problems.append(f"{tag}: superpixel ids are not consecutive 1..{nsp}")
            if (sp[~fg] != 0).any():
                problems.append(f"{tag}: superpixels outside the body mask")
            # the reader derives d["label"] from labels_present: compare with the volume's own record instead
            if has_label.get(sl["volume"][i]) != bool(sl["labels_present"][i]):
                problems.append(f"{tag}: label presence differs from the table")
            # training picks setting 2's slices by this column without reading the label maps
            elif "organs" in sl and int(sl["organs"][i]) != (0 if d["label"] is None else slice_organ_bits(d["label"])):
                problems.append(f"{tag}: the organs column differs from the label map's values")
            if len(problems) >= MAX_PROBLEMS:
                truncated = True
                break
        for reason, rows in unreadable.items():
            first = rows[0]
            where = (f"slice {first}" if len(rows) == 1 else f"{len(rows)} slices ({first}..{rows[-1]})")
            problems.append(f"{where}, from volume {sl['volume'][first]} z={sl['z'][first]}: unreadable ({reason})")
    return problems, truncated


def _vslices(vs) -> list:
    sel = vs.vspace.get_select_bounds()
    return [slice(lo, hi + 1) for lo, hi in zip(*sel)]


def summarize(reader: StoreReader, path: Path, check_pixels: bool = True) -> dict:
    """Everything ``inspect`` shows, as a JSON-able dict."""
    meta = reader.meta
    nsp = reader.slices["n_superpixels"]
    problems, truncated = integrity_problems(reader, read_pixels=check_pixels)
    counts = {}
    for v in reader.slices["volume"]:
        counts[v] = counts.get(v, 0) + 1
    volumes = [{"id": r["id"], "n_slices": r["n_slices"], "slices_in_store": counts.get(r["id"], 0),
                "has_label": r["has_label"], "spacing": r["spacing"], "orientation": r["orientation"],
                "path": r["path"], "checksum": r["checksum"], "notes": r["notes"]} for r in reader.volumes]
    size = _disk_size(path)
    holder = _writer_holding(path)
    return {
        "store": str(path), "schema_version": meta.get("schema_version"), "complete": bool(meta.get("complete"))
        and not problems, "recorded_complete": bool(meta.get("complete")), "being_written_by": holder,
        "volumes": volumes, "n_volumes": len(volumes), "slices": reader.n_slices,
        "shards": int(meta.get("n_shards", 0)), "method": meta.get("method"), "params": meta.get("params"),
        "prepare": meta.get("prepare"), "source": meta.get("source"), "settings_hash": meta.get("settings_hash"),
        "code_version": meta.get("code_version"), "code_versions": meta.get("code_versions"),
        "created": meta.get("created"), "updated": meta.get("updated"),
        "superpixels_per_slice": {
            "min": int(nsp.min()) if nsp.size else 0, "median": float(np.median(nsp)) if nsp.size else 0.0,
            "max": int(nsp.max()) if nsp.size else 0, "mean": round(float(nsp.mean()), 2) if nsp.size else 0.0,
            "empty_slices": int((nsp == 0).sum())},
        "size_bytes": size, "bytes_per_slice": round(size / reader.n_slices) if reader.n_slices else None,
        "log": meta.get("log", []), "problems": problems, "problems_truncated": truncated,
        "pixels_checked": check_pixels, "runs": _run_history(path), "profile": _last_profile(path),
    }


def _print_summary(s: dict) -> None:
    state = "complete" if s["complete"] else ("INCOMPLETE" if not s["problems"] else "DAMAGED")
    if s["being_written_by"]:
        state += f", being written now ({describe_holder(s['being_written_by'])})"
    params = " ".join(f"{k}={v}" for k, v in (s["params"] or {}).items())
    prep = " ".join(f"{k}={v}" for k, v in (s["prepare"] or {}).items())
    src = s["source"] or {}
    with_label = sum(1 for v in s["volumes"] if v["has_label"])
    sp = s["superpixels_per_slice"]
    print(f"store        {s['store']}  ({state})")
    code = s["code_version"] or "- (no batch committed yet)"       # the index names the first shard's
    print(f"written      schema {s['schema_version']}, code {code}, created {s['created']}, "
          f"updated {s['updated']}")
    print(f"source       {src.get('input', '?')} ({src.get('n_refs', '?')} volumes listed)")
    print(f"volumes      {s['n_volumes']} ({with_label} with labels)   slices {s['slices']}   batches {s['shards']}")
    print(f"method       {s['method']}  {params}")
    print(f"prepare      {prep}")
    print(f"superpixels  per slice: min {sp['min']}, median {sp['median']:g}, max {sp['max']} "
          f"(mean {sp['mean']:g}; {sp['empty_slices']} slices with no body)")
    per = f", {s['bytes_per_slice'] / 1e3:.0f} kB per slice" if s["bytes_per_slice"] else ""
    print(f"on disk      {s['size_bytes'] / 1e6:.1f} MB{per}")
    if s["problems"]:
        n, cut = len(s["problems"]), s.get("problems_truncated")
        print(f"integrity    {n} problem(s)" + (f", maybe more (the check stops at {MAX_PROBLEMS})" if cut else "")
              + ":")
        for p in s["problems"][:10]:
            print(f"  {p}")
        if n > 10:
            print(f"  ... and {n - 10} more (--json lists {'these' if cut else 'all'} {n})")
    elif not s["pixels_checked"]:
        print(f"integrity    OK: {s['slices']} slices consistent in the tables, no gaps, every batch mapped "
              f"(pixels not read: --quick)")
    else:
        print(f"integrity    OK: {s['slices']} slices read and consistent, no gaps, every batch mapped")
    _print_runs(s["runs"], s["profile"])
    if s["log"]:
        print(f"failures     {len(s['log'])} volume(s) could not be used:")
        for f in s["log"][:8]:
            print(f"  {f.get('path')}: {f.get('reason')}")
        if len(s["log"]) > 8:
            print(f"  ... and {len(s['log']) - 8} more (--json lists all)")
    else:
        print("failures     none")


def _print_runs(runs: dict, profile: dict | None) -> None:
    if runs["count"]:
        counts = collections.Counter(map(str, runs["statuses"]))     # in order of first appearance
        last = runs["last"]
        started, finished = str(last.get("started")), str(last.get("finished"))
        if finished[:10] == started[:10]:            # the same day: the time of day says it
            finished = finished[11:]
        print(f"runs         {runs['count']} ({', '.join(f'{n} {k}' for k, n in counts.items())}); last "
              f"{started} -> {finished}, {last.get('backend')} x{last.get('workers')}, "
              f"{last.get('slices_committed')} slices committed, {last.get('status')}")
    else:
        print("runs         none recorded (runs.jsonl missing or empty)")
    if profile:
        print(f"profile      {profile['slices']} slices in {profile['wall_s']:.2f} s = {profile['slices_per_s']:.1f} "
              f"slices/s, {profile['backend']} x{profile['workers']}, {profile['status']} ({profile['path']})")


def write_overlay(reader: StoreReader, volume: str, z: int, png: str | Path) -> Path:
    """PNG of one slice: superpixel boundaries on the image (left), labels on the image (right).

    Raises
    ------
    KeyError
        No slice ``z`` of ``volume`` in the store.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries, mark_boundaries

    idx = reader.slices_of(volume)
    hit = [int(i) for i in idx if int(reader.slices["z"][i]) == int(z)]
    if not hit:
        have = f"z 0..{len(idx) - 1}" if len(idx) else "no such volume"
        raise KeyError(f"volume {volume!r} slice {z} is not in the store ({have})")
    d = reader.read(hit[0])
    img = d["image"]
    lo, hi = np.percentile(img, [0.5, 99.5])
    grey = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    sp_view = mark_boundaries(np.dstack([grey] * 3), d["superpixels"], color=(1, 0.85, 0), mode="inner")
    body = find_boundaries(d["fg"], mode="inner")
    sp_view[body] = (0, 0.8, 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    axes[0].imshow(sp_view)
    axes[0].set_title(f"{int(reader.slices['n_superpixels'][hit[0]])} superpixels ({reader.meta.get('method')}), "
                      f"body outline", fontsize=9)
    axes[1].imshow(grey, cmap="gray")
    if d["label"] is not None and d["label"].any():
        from matplotlib.patches import Patch
        lab = np.ma.masked_equal(d["label"], 0)
        cmap = plt.get_cmap("tab10")
        axes[1].imshow(lab % 10, cmap=cmap, alpha=0.45, vmin=0, vmax=9, interpolation="nearest")
        values = [int(v) for v in np.unique(d["label"]) if v]
        axes[1].legend(handles=[Patch(color=cmap(v % 10), alpha=0.6, label=f"label {v}") for v in values],
                       loc="lower right", fontsize=7, framealpha=0.6)
        axes[1].set_title(f"labels {', '.join(map(str, values))}", fontsize=9)
    else:
        axes[1].set_title("no label" if d["label"] is None else "label: background only", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{reader.path.name}: volume {volume}, slice z={z}", fontsize=10)
    return save_figure(fig, png, dpi=100)


def inspect_store(path: str, as_json: bool = False, volume: str | None = None, z: int | None = None,
                  png: str | None = None, read_pixels: bool = True) -> int:
    """``cli.py inspect STORE``: print the summary (or JSON) and optionally write an overlay PNG.

    ``read_pixels=False`` (``--quick``) checks the tables, the shards and the index's mapping but reads no
    slice's chunks: seconds instead of minutes on a large store, and blind to a damaged chunk.

    Returns
    -------
    int
        0: consistent (complete, or a consistent snapshot of a run in progress); 1: integrity problems;
        2: not a readable store, or the overlay slice does not exist.
    """
    p = Path(path)
    try:
        reader = StoreReader(p)
    except StoreError as exc:
        print(f"inspect: {exc}", file=sys.stderr)
        return 2
    with reader:
        if png is not None:
            try:
                out = write_overlay(reader, str(volume), int(z), png)
            except KeyError as exc:
                print(f"inspect: {p}: {exc.args[0]}", file=sys.stderr)
                return 2
            print(f"overlay written: {out}", file=sys.stderr)
        s = summarize(reader, p, check_pixels=read_pixels)
    if as_json:
        print(json.dumps(s, indent=1, default=str))
    else:
        _print_summary(s)
    return 1 if s["problems"] else 0
