"""``cli.py evaluate``: 1-way 1-shot evaluation with the Roy et al. C-chunk protocol (method.md 5).

For every fold and every test organ: the support scan gives C annotated slices (one per chunk of the organ's
extent), every query scan's slices inside the organ's ground-truth extent are segmented with the support slice
of their chunk, and a 3D Dice per scan is computed from TP/FP/FN summed over those slices. Scores are averaged
over scans, then over organs, and written to ``evaluate.out`` as ``results.json``, ``results.md`` and overlay
PNGs.

Two predictors share the protocol: the network of a checkpoint (test-time ALP pooling with L = 2, no
augmentation, support features encoded once per chunk and reused for every query slice) and the model-free
``support-copy`` reference, which predicts the support slice's mask unchanged.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alpnet.protocol import (Counts, Fold, ProtocolError, held_out_labels, make_fold, numeric_key,
                             organ_slices, parse_folds, query_plan, select_classes, summarise,
                             support_slice_indices)
from engine.sources import sha256_file

BASELINES = ("support-copy",)
METHOD_NAMES = {"slic": "SLIC", "felzenszwalb": "Felzenszwalb", "meanshift": "MeanShift"}


class EvaluationError(Exception):
    """The evaluation cannot start or go on; ``str`` is one line naming the input and the problem."""


class ReportWriteError(Exception):
    """The scores were computed (and printed) but the report folder could not take them (exit status 1)."""


# --------------------------------------------------------------------------------------------- predictors
class Predictor:
    """Segments query slices given the C support slices of one organ.

    ``set_support`` is called once per (fold, organ) with the support images and masks of the C chunks;
    ``predict`` then segments a stack of query slices that all belong to one chunk.
    """
    name = "predictor"

    def set_support(self, images: np.ndarray, masks: np.ndarray) -> None:
        """``images``: (C, H, W) float32 z-scored support slices; ``masks``: (C, H, W) bool organ masks."""
        raise NotImplementedError

    def predict(self, chunk: int, queries: np.ndarray) -> np.ndarray:
        """``queries``: (N, H, W) float32 z-scored slices of chunk ``chunk`` -> (N, H, W) bool masks."""
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-ready description of the predictor (recorded in ``results.json``)."""
        return {"name": self.name}


class SupportCopy(Predictor):
    """Reference without a model: each query slice gets its chunk's support mask, pixel for pixel.

    It measures how much of the Dice comes from the anatomy being in the same place in every scan and from
    the protocol handing over the organ's extent; the network must beat it to have learnt anything.
    """
    name = "support-copy"

    def set_support(self, images: np.ndarray, masks: np.ndarray) -> None:
        self._masks = np.asarray(masks, dtype=bool)

    def predict(self, chunk: int, queries: np.ndarray) -> np.ndarray:
        n = queries.shape[0]
        return np.broadcast_to(self._masks[chunk], (n,) + self._masks.shape[1:]).copy()


class NetworkPredictor(Predictor):
    """ALPNet at test time: eval mode, L = ``model.local_size_test``, no augmentation, 3 tiled channels.

    The C support slices are encoded once per (fold, organ) and their features reused for every query slice
    (the reference code re-encodes the support for each query slice; the result is the same since BatchNorm
    runs in eval mode). Query slices go through the encoder in batches of ``batch``.
    """
    name = "network"

    def __init__(self, model: Any, device: str, batch: int = 8):
        import torch
        self.torch = torch
        self.model = model.to(device).eval()
        self.device = device
        self.batch = max(1, int(batch))
        self._support = None
        self.counters: dict[str, int] = {}      # prototype cases summed over every query slice

    def _tensor(self, slices: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(self.device)
        return t[:, None].expand(-1, 3, -1, -1)  # 3 identical channels, as in training

    def set_support(self, images: np.ndarray, masks: np.ndarray) -> None:
        with self.torch.inference_mode():
            feats = self.model.encode(self._tensor(images))
        fg = self.torch.from_numpy(np.asarray(masks, dtype=np.float32)).to(self.device)
        self._support = (feats, fg)

    def logits(self, chunk: int, queries: np.ndarray) -> np.ndarray:
        """(N, H, W) query slices of chunk ``chunk`` -> (N, 2, H, W) float32 logits [background, organ]."""
        return np.concatenate([r["logits"].float().cpu().numpy() for r in self._forward(chunk, queries)])

    def predict(self, chunk: int, queries: np.ndarray) -> np.ndarray:
        return np.concatenate([(r["pred"] == 1).cpu().numpy() for r in self._forward(chunk, queries)])

    def _forward(self, chunk: int, queries: np.ndarray):
        if self._support is None:
            raise RuntimeError("set_support must be called before predict")
        feats, fg = self._support
        with self.torch.inference_mode():
            for i in range(0, queries.shape[0], self.batch):
                q = self._tensor(queries[i:i + self.batch])
                n = q.shape[0]
                res = self.model.predict(None, fg[chunk:chunk + 1].expand(n, -1, -1), q,
                                         support_feats=feats[chunk:chunk + 1].expand(n, -1, -1, -1))
                for k, v in res.get("counters", {}).items():
                    self.counters[k] = self.counters.get(k, 0) + int(v)
                yield res

    def describe(self) -> dict:
        return {"name": self.name, "device": self.device, "batch": self.batch,
                "prototype_counters": dict(self.counters)}


# --------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Scan:
    """One prepared, labelled scan: ``image`` (H, W, Z) float32 z-scored, ``label`` (H, W, Z) uint8."""
    id: str
    image: np.ndarray
    label: np.ndarray
    path: str
    checksum: str
    notes: list[str] = dataclasses.field(default_factory=list)


class ScanLoader:
    """Lists the labelled scans of a source and loads/prepares them on demand (a few kept in memory)."""

    def __init__(self, spec: str, cfg: Any, keep: int = 6):
        from engine.sources import open_source
        self.spec = spec
        self.cfg = cfg
        self.source = open_source(spec, cfg)
        self.refs = {str(r): r for r in self.source.refs()}      # refs are the scan ids
        self._cache: dict[str, Scan] = {}
        self._keep = keep
        self.load_s = 0.0                      # time spent reading and preparing volumes

    @property
    def ids(self) -> list[str]:
        """Scan ids of the source, sorted numerically."""
        return sorted(self.refs, key=numeric_key)

    def load(self, scan_id: str) -> Scan:
        """Read and prepare scan ``scan_id`` (z-scored image, cropped/padded to ``prepare.size``).

        Raises ``EvaluationError`` for an unknown id or a scan without labels, and lets the source's
        one-line ``VolumeError`` through for an unreadable file.
        """
        if scan_id in self._cache:
            return self._cache[scan_id]
        from engine.prepare import prepare_volume
        if scan_id not in self.refs:
            raise EvaluationError(f"{self.spec}: no scan with id {scan_id!r}")
        t0 = time.perf_counter()
        vol = self.source.load(self.refs[scan_id])
        prep = prepare_volume(vol, self.cfg.prepare)
        if prep.label is None:
            raise EvaluationError(f"{vol.path}: scan {scan_id} has no label volume; evaluation needs labels")
        scan = Scan(id=scan_id, image=np.asarray(prep.image, dtype=np.float32),
                    label=np.asarray(prep.label), path=str(vol.path), checksum=str(vol.checksum),
                    notes=list(prep.notes))
        self.load_s += time.perf_counter() - t0
        if len(self._cache) >= self._keep:
            self._cache.pop(next(iter(self._cache)))
        self._cache[scan_id] = scan
        return scan


# --------------------------------------------------------------------------------------------- protocol
def evaluate_fold(fold: Fold, classes: Mapping[str, int], n_chunks: int, predictor: Predictor,
                  load: Callable[[str], Scan], overlay_scans: int = 0,
                  on_organ: Callable[[str, dict], None] | None = None
                  ) -> tuple[dict, dict]:
    """Run the protocol on one fold.

    Parameters
    ----------
    fold : Fold
    classes : mapping name -> label value
        Organs to evaluate.
    n_chunks : int
        C.
    predictor : Predictor
    load : callable scan id -> Scan
    overlay_scans : int
        For the first ``overlay_scans`` query scans of each organ, keep the middle slice of each chunk
        (image, truth, prediction) for the overlay PNGs.
    on_organ : callable, optional
        ``on_organ(name, progress)`` once each organ is done (the progress of a long evaluation):
        ``progress`` holds ``mean`` (its mean Dice in [0, 1], NaN when no scan was scored), ``scans``
        (scans scored), ``slices`` and ``seconds`` (its query slices and their prediction time), and
        ``skipped`` (the reason, or None).

    Returns
    -------
    result : dict
        JSON-ready: queries, support, and per organ its support slices and per-scan Dice/TP/FP/FN (or the
        reason a scan or the organ was skipped).
    overlays : dict
        ``{(organ, scan id, chunk): dict(z, image, truth, pred, support_image, support_mask, dice)}``.
    """
    t0 = time.perf_counter()
    support = load(fold.support)
    queries = [load(q) for q in fold.queries]
    t_load = time.perf_counter() - t0
    organs: dict[str, Any] = {}
    overlays: dict = {}
    clock = _Clock()
    for name, value in classes.items():
        organs[name], progress = _evaluate_organ(fold, name, int(value), support, queries, n_chunks, predictor,
                                                 overlay_scans, overlays, clock)
        if on_organ is not None:
            on_organ(name, progress)
    per_scan = {n: _dices(e) for n, e in organs.items()}
    result = {"fold": fold.index, "queries": list(fold.queries), "support": fold.support,
              "scan_files": {s.id: {"path": s.path, "checksum": s.checksum, "notes": s.notes}
                             for s in [*queries, support]},
              "organs": organs, "summary": summarise(per_scan, list(classes)),
              "timings": {"load_s": t_load, "support_s": clock.support_s, "query_s": clock.query_s,
                          "query_slices": clock.slices, "total_s": time.perf_counter() - t0}}
    return result, overlays


@dataclasses.dataclass
class _Clock:
    """A fold's prediction time: the supports' encoding, the queries' and how many query slices."""
    support_s: float = 0.0
    query_s: float = 0.0
    slices: int = 0


def _evaluate_organ(fold: Fold, name: str, value: int, support: Scan, queries: list[Scan], n_chunks: int,
                    predictor: Predictor, overlay_scans: int, overlays: dict, clock: _Clock) -> tuple[dict, dict]:
    """One organ of a fold: its entry of the result (support slices, per-scan scores or why skipped) and the
    progress that ``evaluate_fold``'s ``on_organ`` receives; overlays of the first query scans go to
    ``overlays``."""
    z_sup = organ_slices(support.label, value)
    entry: dict[str, Any] = {"label": value, "support_extent": None, "support_slices": None, "skipped": None,
                             "scans": {}}
    if z_sup.size == 0:
        reason = f"absent from the support scan {fold.support}"
        entry["skipped"] = reason
        entry["scans"] = {q.id: {"skipped": reason} for q in queries}
        return entry, {"mean": float("nan"), "scans": 0, "slices": 0, "seconds": 0.0, "skipped": reason}
    slices0, query_s0 = clock.slices, clock.query_s
    entry["support_extent"] = [int(z_sup[0]), int(z_sup[-1])]
    sup_z = support_slice_indices(z_sup, n_chunks)
    entry["support_slices"] = sup_z
    sup_img = np.stack([support.image[:, :, z] for z in sup_z])
    sup_mask = np.stack([support.label[:, :, z] == value for z in sup_z])
    ts = time.perf_counter()
    predictor.set_support(sup_img, sup_mask)
    clock.support_s += time.perf_counter() - ts
    for qi, q in enumerate(queries):
        plan = query_plan(q.label, value, n_chunks)
        if plan is None:
            entry["scans"][q.id] = {"skipped": f"absent from the query scan {q.id}"}
            continue
        keep = overlays if qi < overlay_scans else None
        entry["scans"][q.id] = _score_scan(q, name, value, plan, n_chunks, predictor, (sup_z, sup_img, sup_mask),
                                           keep, clock)
    organ_summary = summarise({name: _dices(entry)}, [name])
    entry["mean"] = organ_summary["organs"][name]
    return entry, {"mean": entry["mean"], "scans": organ_summary["n_scans"][name],
                   "slices": clock.slices - slices0, "seconds": clock.query_s - query_s0, "skipped": None}


def _score_scan(q: Scan, name: str, value: int, plan: Any, n_chunks: int, predictor: Predictor,
                supports: tuple, overlays: dict | None, clock: _Clock) -> dict:
    """A query scan's 3D Dice for one organ from TP/FP/FN summed over its chunks, with each chunk's counts;
    with ``overlays``, each chunk's middle slice is kept there for the overlay PNGs."""
    sup_z, sup_img, sup_mask = supports
    counts = Counts()
    per_chunk = []
    for p in range(n_chunks):
        zs = plan.slices_of_chunk(p)
        if not zs:
            per_chunk.append({"slices": [], "tp": 0, "fp": 0, "fn": 0})
            continue
        tq = time.perf_counter()
        pred = predictor.predict(p, np.stack([q.image[:, :, z] for z in zs]))
        clock.query_s += time.perf_counter() - tq
        clock.slices += len(zs)
        truth = np.stack([q.label[:, :, z] == value for z in zs])
        c = Counts().add(pred, truth)
        counts.tp += c.tp
        counts.fp += c.fp
        counts.fn += c.fn
        per_chunk.append({"slices": [int(z) for z in zs], "support_slice": int(sup_z[p]),
                          "tp": c.tp, "fp": c.fp, "fn": c.fn})
        if overlays is not None:
            m = len(zs) // 2
            overlays[(name, q.id, p)] = dict(
                z=int(zs[m]), image=q.image[:, :, zs[m]], truth=truth[m], pred=np.asarray(pred[m]),
                support_image=sup_img[p], support_mask=sup_mask[p], support_z=int(sup_z[p]),
                dice=Counts().add(pred[m], truth[m]).dice)
    return {"dice": counts.dice, "tp": counts.tp, "fp": counts.fp, "fn": counts.fn, "z_min": plan.z_min,
            "z_max": plan.z_max, "n_slices": len(plan.slices), "chunks": per_chunk}


def _organ_line(fold_index: int) -> Callable[[str, dict], None]:
    """The progress line printed as each organ of a fold is done."""
    def show(name: str, progress: dict) -> None:
        if progress["skipped"]:
            print(f"  fold {fold_index}, {name}: skipped ({progress['skipped']})", flush=True)
            return
        mean = progress["mean"]
        dice = f"{100 * mean:.2f}" if np.isfinite(mean) else "-"
        rate = progress["slices"] / progress["seconds"] if progress["seconds"] > 0 else 0.0
        print(f"  fold {fold_index}, {name}: Dice {dice} over {progress['scans']} scan(s); {progress['slices']} "
              f"query slices in {progress['seconds']:.1f} s ({rate:.1f} slices/s)", flush=True)
    return show


def _dices(entry: Mapping) -> dict[str, float]:
    """{scan id: Dice} of the scored scans of one organ entry."""
    return {sid: s["dice"] for sid, s in entry["scans"].items() if "dice" in s}


def overall_summary(folds: Sequence[Mapping], classes: Sequence[str]) -> dict:
    """Mean over every scored (fold, scan) per organ, then over organs; plus the per-fold means.

    With equal-sized folds (CHAOS: 4 queries per fold) the mean over scans equals the paper's mean over
    fold means.
    """
    per_scan: dict[str, dict[str, float]] = {c: {} for c in classes}
    for f in folds:
        for c in classes:
            if c in f["organs"]:
                for sid, d in _dices(f["organs"][c]).items():
                    per_scan[c][f"{f['fold']}:{sid}"] = d
    out = summarise(per_scan, classes)
    out["folds"] = {str(f["fold"]): f["summary"] for f in folds}
    return out


# --------------------------------------------------------------------------------------------- main
def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``; ``"cuda"`` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise EvaluationError(f"--device {device!r}: not one of auto, cpu, cuda")
    if device == "cpu":
        return "cpu"
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: no CUDA device is available")
    return "cuda" if torch.cuda.is_available() else "cpu"


def training_volumes(ckpt_cfg: Mapping, meta: Mapping) -> tuple[list[dict] | None, str]:
    """Volumes (id, checksum) the checkpoint trained on, read from its store when the store is still there.

    Training drops the held-out fold's scans (``episodes.fold`` with ``episodes.holdout``) from the store's
    volumes: those its checkpoint records (``store.held_out``), else by the same fold function as here. Returns
    (None, reason) when the store cannot be read.
    """
    store = (meta or {}).get("store") or {}
    path = store.get("path")
    if not path or not Path(path).exists():
        return None, f"training store {path!r} not found"
    try:
        from engine.store_reader import StoreReader
        with StoreReader(path) as reader:
            vols = [{"id": str(v["id"]), "checksum": str(v.get("checksum", ""))} for v in reader.volumes]
    except Exception as exc:  # any unreadable store: fall back to the config rule, say why
        return None, f"training store {path} unreadable ({type(exc).__name__})"
    ep = ckpt_cfg.get("episodes", {})
    if store.get("held_out") is not None:
        # what training actually held out: recomputing it from the store as it is now gives another fold when
        # the training ran on an incomplete store (fewer volumes, so other fold groups)
        held = {str(v) for v in store["held_out"]}
        vols = [v for v in vols if v["id"] not in held]
    elif ep.get("holdout", True):
        n_folds = int(ckpt_cfg.get("evaluate", {}).get("n_folds", 5))
        try:
            held = set(make_fold([v["id"] for v in vols], n_folds, int(ep.get("fold", 0))).scans)
        except ProtocolError:
            held = set()
        vols = [v for v in vols if v["id"] not in held]
    return vols, f"volumes of the training store {path}"


def training_overlap(ckpt_cfg: Mapping, train_vols: list[dict] | None, fold: Fold,
                     scans: Mapping[str, str], n_folds: int) -> list[str]:
    """Scans of ``fold`` the checkpoint may have trained on.

    Parameters
    ----------
    ckpt_cfg : the checkpoint's config dict
    train_vols : list of {"id", "checksum"} or None
        From :func:`training_volumes`. A fold scan overlaps when its checksum is among them (the same file,
        whatever its id). None: judged from the config alone, assuming the evaluation data is the training
        data: every scan outside the checkpoint's held-out fold was a training scan.
    fold : Fold
    scans : mapping scan id -> checksum of the evaluation data
    n_folds : int
    """
    if train_vols is not None:
        sums = {v["checksum"] for v in train_vols if v["checksum"]}
        ids = {v["id"] for v in train_vols}
        return [s for s in fold.scans if scans.get(s) in sums or (not sums and s in ids)]
    ep = ckpt_cfg.get("episodes", {})
    if not ep.get("holdout", True):
        return list(fold.scans)
    ckpt_folds = int(ckpt_cfg.get("evaluate", {}).get("n_folds", n_folds))
    try:
        held = set(make_fold(list(scans), ckpt_folds, int(ep.get("fold", 0))).scans)
    except ProtocolError:
        return list(fold.scans)
    return [s for s in fold.scans if s not in held]


def main(cfg: Any, checkpoint: str | None = None, baseline: str | None = None, setting: int | None = None,
         device: str = "auto") -> int:
    """Evaluate a checkpoint or a baseline with the C-chunk protocol and write the report.

    Parameters
    ----------
    cfg : alpnet.config.Config
        ``cfg.evaluate`` gives the data, fold(s), C, classes and output folder; ``cfg.prepare`` the slice
        preparation (z-scoring, crop/pad).
    checkpoint : str or None
        A ``train`` checkpoint; exactly one of ``checkpoint`` and ``baseline``.
    baseline : {"support-copy"} or None
    setting : {1, 2} or None
        None: the checkpoint's own setting. 2: the checkpoint's label group decides the organs.
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    int
        0 on success, 1 when nothing could be scored, 2 for bad input (one line on stderr).
    """
    try:
        return _run(cfg, checkpoint, baseline, setting, device)
    except (EvaluationError, ProtocolError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    except ReportWriteError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for bad inputs raised by the data layer
        from engine.volume import VolumeError
        if isinstance(exc, VolumeError):
            print(f"evaluate: {exc}", file=sys.stderr)
            return 2
        raise


@dataclasses.dataclass
class _Choice:
    """What the evaluation runs: the predictor, the setting it is judged in and what the report says of it."""
    predictor: Predictor
    setting: int | None                  # None for the support copy
    test_labels: Any                     # setting 2: the checkpoint's held-out organs; None: every class
    label: str                           # default row name in results.md
    notes: list[str]
    ckpt_info: dict[str, Any] | None = None
    ckpt_cfg: dict = dataclasses.field(default_factory=dict)
    meta: Any = None


def _check_request(ev: Any, checkpoint: str | None, baseline: str | None, setting: int | None) -> None:
    if (checkpoint is None) == (baseline is None):
        raise EvaluationError("give exactly one of --checkpoint CKPT and --baseline support-copy")
    if baseline is not None and baseline not in BASELINES:
        raise EvaluationError(f"--baseline {baseline!r}: not one of {', '.join(BASELINES)}")
    if setting not in (None, 1, 2):
        raise EvaluationError(f"--setting {setting!r}: must be 1 or 2")
    if ev.chunks < 1:
        raise EvaluationError(f"evaluate.chunks = {ev.chunks}: must be >= 1")


def _network(cfg: Any, checkpoint: str, setting: int | None, device: str) -> _Choice:
    """The checkpoint's network, the setting it can be judged in, and its description for the report.

    Sets ``cfg.prepare.zscore`` to the training store's: test scans must be normalised as the training slices
    were, whatever the evaluation config says."""
    from alpnet import report
    from alpnet.checkpoint import CheckpointError, load_checkpoint
    from alpnet.model import smallest_slice

    path = Path(checkpoint)
    if path.is_dir():                 # most often the run folder: its checkpoint.pt is the file meant
        raise EvaluationError(f"{checkpoint}: a folder, not a checkpoint file (a run folder holds "
                              f"{Path(checkpoint) / 'checkpoint.pt'})")
    if not path.is_file():
        raise EvaluationError(f"{checkpoint}: checkpoint file not found")
    dev = resolve_device(device)
    try:
        model, ckpt_cfg, meta = load_checkpoint(str(path), dev)
    except CheckpointError as exc:
        raise EvaluationError(str(exc)) from None
    ep = ckpt_cfg.get("episodes", {})
    stride = int(ep.get("feature_stride", 8))
    need = smallest_slice(model.cfg, stride)
    if cfg.prepare.size < need:              # it ended in torch's pooling, after the scans were loaded
        raise EvaluationError(f"prepare.size = {cfg.prepare.size}: slices too small for the checkpoint's model: "
                              f"its {need // stride}-cell windows at feature stride {stride} need at least "
                              f"{need} x {need} px")
    ckpt_setting = int(ep.get("setting", 1))
    eff_setting = ckpt_setting if setting is None else int(setting)
    if eff_setting == 2 and ckpt_setting != 2:
        raise EvaluationError(f"{checkpoint}: trained in setting 1 (test organs seen in training "
                              "slices); it cannot give a setting-2 result")
    ckpt_info = {"path": str(path.resolve()), "sha256": sha256_file(path), "device": dev,
                 "setting": ckpt_setting, "label_group": ep.get("label_group"),
                 "exclude_labels": ep.get("exclude_labels"), "train_fold": ep.get("fold"),
                 "holdout": ep.get("holdout", True), "encoder": ckpt_cfg.get("model", {}).get("encoder"),
                 "meta": report.jsonable(meta)}
    notes = []
    store = (meta or {}).get("store") or {}
    zscore = (store.get("prepare") or {}).get("zscore", "volume")
    if zscore != cfg.prepare.zscore:
        notes.append(f"prepare.zscore={zscore} taken from the checkpoint's training store (config: "
                     f"{cfg.prepare.zscore})")
        cfg.prepare.zscore = zscore
    method = store.get("method") or ckpt_cfg.get("superpixels", {}).get("method")
    method = METHOD_NAMES.get(str(method), method)
    if ckpt_setting == 1 and ep.get("exclude_labels"):
        # setting 1 takes every class as seen in training; this training did not see these organs' slices
        notes.append(f"the checkpoint (setting 1) was trained without the slices holding labels "
                     f"{sorted(ep['exclude_labels'])} (episodes.exclude_labels): those organs are scored as "
                     "setting 1 all the same, though their training was nearer setting 2's")
    if setting == 1 and ckpt_setting == 2:
        notes.append("setting 1 asked of a setting-2 checkpoint: every class is evaluated; the organs its "
                     "training excluded are held out more strictly than setting 1 requires")
    return _Choice(NetworkPredictor(model, dev, batch=cfg.evaluate.batch), eff_setting,
                   held_out_labels(ep) if eff_setting == 2 else None,
                   f"{method}-ALPNet (this run)" if method else "ALPNet (this run)", notes, ckpt_info, ckpt_cfg,
                   meta)


def _support_copy(setting: int | None) -> _Choice:
    note = ("support-copy needs no training: every configured class is evaluated"
            + (f" (--setting {setting} does not apply)" if setting is not None else ""))
    return _Choice(SupportCopy(), None, None, "support copy (no model)", [note])


def _training_overlaps(choice: _Choice, loader: ScanLoader, fold_objs: list[Fold], ev: Any,
                       checkpoint: str) -> dict[int, list[str]]:
    """Per fold, the query or support scans the checkpoint may have trained on; refused unless
    ``evaluate.allow_train_overlap``, then each is a warning in the notes."""
    info = choice.ckpt_info
    train_vols, basis = training_volumes(choice.ckpt_cfg, choice.meta)
    info["overlap_basis"] = basis if train_vols is not None else f"checkpoint config ({basis})"
    overlaps: dict[int, list[str]] = {}
    for f in fold_objs:
        # checksums identify the files whatever their ids; only needed when the store's list is known
        sums = ({sid: loader.load(sid).checksum for sid in f.scans} if train_vols is not None
                else dict.fromkeys(loader.ids, ""))
        ov = training_overlap(choice.ckpt_cfg, train_vols, f, sums, ev.n_folds)
        if not ov:
            continue
        overlaps[f.index] = ov
        msg = (f"fold {f.index}: scan(s) {', '.join(ov)} may be training scans of this checkpoint "
               f"(trained for fold {info['train_fold']}, holdout={info['holdout']}; judged "
               f"from the {info['overlap_basis']}), so its Dice is not a held-out result")
        if not ev.allow_train_overlap:
            raise EvaluationError(f"{checkpoint}: {msg}; set evaluate.allow_train_overlap=true to "
                                  "evaluate anyway (the report marks it)")
        choice.notes.append("WARNING " + msg)
    return overlaps


def _evaluate_folds(fold_objs: list[Fold], classes: Mapping[str, int], ev: Any, predictor: Predictor,
                    loader: ScanLoader, overlaps: dict[int, list[str]],
                    notes: list[str]) -> tuple[list[dict], dict]:
    """Every fold's results and overlays, a console line per fold and organ; the scans' and skipped organs'
    notes go to ``notes``."""
    fold_results = []
    all_overlays: dict = {}
    for f in fold_objs:
        print(f"fold {f.index}: queries {', '.join(f.queries)}, support {f.support}; "
              f"organs {', '.join(classes)}; C = {ev.chunks}", flush=True)
        res, ovl = evaluate_fold(f, classes, ev.chunks, predictor, loader.load, overlay_scans=ev.overlays,
                                 on_organ=_organ_line(f.index))
        res["train_overlap"] = overlaps.get(f.index, [])
        fold_results.append(res)
        all_overlays.update({(f.index,) + k: v for k, v in ovl.items()})
        for sid, info in res["scan_files"].items():
            notes += [f"fold {f.index}, scan {sid}: {n}" for n in info["notes"]]
        for organ, e in res["organs"].items():
            for sid, s in e["scans"].items():
                if "skipped" in s:
                    notes.append(f"fold {f.index}, {organ}, scan {sid}: skipped ({s['skipped']})")
    return fold_results, all_overlays


def _run(cfg: Any, checkpoint: str | None, baseline: str | None, setting: int | None, device: str) -> int:
    from engine.config import to_dict
    from engine.runinfo import write_run_info

    from alpnet import report

    ev = cfg.evaluate
    t_start = time.perf_counter()
    _check_request(ev, checkpoint, baseline, setting)
    folds = parse_folds(ev.fold, ev.n_folds)
    choice = _network(cfg, checkpoint, setting, device) if checkpoint is not None else _support_copy(setting)
    classes = select_classes(ev.classes, choice.test_labels)

    loader = ScanLoader(ev.data, cfg)
    for line in loader.source.warnings:
        print(f"evaluate: warning: {line}", file=sys.stderr)
    fold_objs = [make_fold(loader.ids, ev.n_folds, k) for k in folds]
    overlaps = _training_overlaps(choice, loader, fold_objs, ev, checkpoint) if checkpoint is not None else {}

    out = Path(ev.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = choice.notes
    fold_results, all_overlays = _evaluate_folds(fold_objs, classes, ev, choice.predictor, loader, overlaps,
                                                 notes)
    summary = overall_summary(fold_results, list(classes))
    results = {
        "schema": 1, "label": ev.label or choice.label, "predictor": choice.predictor.name, "baseline": baseline,
        "setting": choice.setting, "data": str(ev.data), "classes": dict(classes),
        "all_classes": dict(ev.classes), "chunks": ev.chunks, "n_folds": ev.n_folds, "folds_evaluated": folds,
        "checkpoint": choice.ckpt_info, "predictor_info": choice.predictor.describe(), "summary": summary,
        "folds": fold_results, "notes": notes,
        "timings": {"total_s": time.perf_counter() - t_start,
                    "query_slices": sum(f["timings"]["query_slices"] for f in fold_results),
                    "query_s": sum(f["timings"]["query_s"] for f in fold_results),
                    "support_s": sum(f["timings"]["support_s"] for f in fold_results),
                    "load_s": loader.load_s},
        "config": to_dict(cfg), "checkpoint_config": choice.ckpt_cfg or None,
    }
    print(report.results_table(results))    # first: on a full disk it is what keeps the scores
    try:
        report.write_report(out, results, all_overlays)
        write_run_info(out, to_dict(cfg), name="evaluate")
    except OSError as exc:
        from engine.store_format import error_text
        raise ReportWriteError(f"{out}: cannot write the report ({error_text(exc)}); the scores are the table "
                               "above") from None
    print(f"report: {out / 'results.md'}, {out / 'results.json'}, {out / 'overlays'}/")
    if sum(summary["n_scans"].values()) == 0:
        print("evaluate: no (organ, scan) pair could be scored; see the notes in results.md", file=sys.stderr)
        return 1
    return 0

