"""The 1-way 1-shot test protocol of Roy et al. as coded in SSL-ALPNet (method.md 5.1-5.3), in plain numpy.

Everything here is model-free and deterministic: which scans form a fold, which support slice serves which
part of the organ, which query slices are scored, and the 3D Dice bookkeeping. ``alpnet.evaluate`` drives a
predictor (the network or the support-copy reference) through these pieces.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


class ProtocolError(ValueError):
    """The protocol cannot be set up as asked (bad fold, too few scans, no class to evaluate)."""


# --------------------------------------------------------------------------------------------- folds
def numeric_key(scan_id: str) -> tuple:
    """Sort key that orders ids by their numbers (``"2" < "10"``, ``"phantom_2" < "phantom_10"``)."""
    parts = re.split(r"(\d+)", str(scan_id))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold of the cross-validation: ``queries`` are scored, ``support`` gives the annotated slices."""
    index: int
    queries: tuple[str, ...]
    support: str

    @property
    def scans(self) -> tuple[str, ...]:
        """Every scan the fold uses at test time (queries, then the support scan)."""
        return self.queries + (self.support,)


def make_fold(scan_ids: Sequence[str], n_folds: int, fold: int) -> Fold:
    """Queries and support scan of ``fold`` (method.md 5.2), generalised to any number of scans.

    The ids are sorted numerically and treated as a circular list, split into ``n_folds`` contiguous groups
    whose sizes differ by at most one (the larger groups first). Fold k's queries are group k and its support
    scan is the scan right after the group, i.e. the first scan of the next group (circularly). With 20
    scans and 5 folds this is the paper's layout: fold k = positions 4k .. 4k+4, the 5th is the support, and
    fold 4 wraps around to scan 1.

    Parameters
    ----------
    scan_ids : sequence of str
        Ids of the labelled scans (any order; duplicates rejected).
    n_folds : int
        Number of folds, 2 <= n_folds <= len(scan_ids) (one fold needs a support scan outside its queries).
    fold : int
        0 <= fold < n_folds.

    Returns
    -------
    Fold
    """
    ids = sorted((str(s) for s in scan_ids), key=numeric_key)
    n = len(ids)
    if len(set(ids)) != n:
        raise ProtocolError(f"duplicate scan ids: {ids}")
    if n_folds < 2:
        raise ProtocolError(f"evaluate.n_folds = {n_folds}: need at least 2 folds (the support scan of a "
                            "fold must lie outside its query scans)")
    if n < n_folds:
        raise ProtocolError(f"{n} labelled scan(s) cannot form {n_folds} folds (evaluate.n_folds); "
                            "need at least one scan per fold: "
                            + (f"set fewer, e.g. --set evaluate.n_folds={n}" if n >= 2 else
                               "the protocol needs 2 labelled scans at least"))
    if not 0 <= fold < n_folds:
        raise ProtocolError(f"fold {fold} is out of range 0..{n_folds - 1}")
    base, extra = divmod(n, n_folds)
    sizes = [base + (1 if k < extra else 0) for k in range(n_folds)]
    start = sum(sizes[:fold])
    queries = tuple(ids[start:start + sizes[fold]])
    support = ids[(start + sizes[fold]) % n]
    return Fold(index=fold, queries=queries, support=support)


def parse_folds(text: str | int, n_folds: int) -> list[int]:
    """``"all"`` -> [0 .. n_folds-1]; ``"3"`` or 3 -> [3]; anything else raises ``ProtocolError``."""
    s = str(text).strip().lower()
    if s == "all":
        return list(range(n_folds))
    try:
        k = int(s)
    except ValueError:
        raise ProtocolError(f"evaluate.fold = {text!r}: expected an integer 0..{n_folds - 1} or 'all'") from None
    if not 0 <= k < n_folds:
        raise ProtocolError(f"evaluate.fold = {k}: out of range 0..{n_folds - 1} (evaluate.n_folds = {n_folds})")
    return [k]


# --------------------------------------------------------------------------------------------- slices
def organ_slices(label: np.ndarray, value: int) -> np.ndarray:
    """Sorted z indices of the slices of ``label`` (H, W, Z) that hold at least one voxel equal to ``value``.

    Returns
    -------
    ndarray, shape (n,), int64
    """
    if label.ndim != 3:
        raise ProtocolError(f"label must be (H, W, Z), got shape {label.shape}")
    return np.flatnonzero((label == value).any(axis=(0, 1))).astype(np.int64)


def support_fractions(n_chunks: int) -> list[float]:
    """Relative positions of the support slices: pct_p = 1/(2C) + p (1 - 1/C) / (C - 1); [0.5] for C = 1."""
    if n_chunks < 1:
        raise ProtocolError(f"evaluate.chunks = {n_chunks}: must be >= 1")
    if n_chunks == 1:
        return [0.5]
    half = 1.0 / (2 * n_chunks)
    step = (1.0 - 1.0 / n_chunks) / (n_chunks - 1)
    return [half + p * step for p in range(n_chunks)]


def support_slice_indices(z_support: Sequence[int], n_chunks: int) -> list[int]:
    """Support slice (a z index of the support scan) for each chunk: ``z_S[int(pct_p * len(z_S))]``.

    Parameters
    ----------
    z_support : sequence of int
        Sorted z indices of the support scan's slices that contain the organ; must not be empty.
    n_chunks : int
        C.

    Returns
    -------
    list of int, length C
        Several chunks share one slice when the organ spans fewer slices than C.
    """
    z = list(z_support)
    if not z:
        raise ProtocolError("the organ is absent from the support scan")
    return [int(z[min(int(pct * len(z)), len(z) - 1)]) for pct in support_fractions(n_chunks)]


def chunk_of(z: int, z_min: int, z_max: int, n_chunks: int) -> int:
    """Chunk p of query slice ``z``: floor((z - z_min) / ((z_max - z_min) / C)), clamped to 0 .. C-1.

    The floating-point floor division is the reference code's expression, kept so that slices on a chunk
    boundary land where they land there. ``z_max == z_min`` (a one-slice organ) gives chunk 0.
    """
    if z_max == z_min:
        return 0
    p = int((z - z_min) // ((z_max - z_min) / n_chunks))
    return min(max(p, 0), n_chunks - 1)


@dataclasses.dataclass(frozen=True)
class QueryPlan:
    """Scored slices of one query scan for one organ: z_min .. z_max and the chunk of each."""
    z_min: int
    z_max: int
    slices: tuple[int, ...]
    chunks: tuple[int, ...]

    def slices_of_chunk(self, p: int) -> list[int]:
        return [z for z, c in zip(self.slices, self.chunks) if c == p]


def query_plan(label: np.ndarray, value: int, n_chunks: int) -> QueryPlan | None:
    """Which slices of a query scan are scored for organ ``value`` and with which chunk's support.

    Only z_min <= z <= z_max is scored (the organ's ground-truth extent; slices inside it without the organ
    still count). Returns None when the organ is absent from the scan (no extent: the scan is skipped for
    this organ and the caller records why).
    """
    z = organ_slices(label, value)
    if z.size == 0:
        return None
    z_min, z_max = int(z[0]), int(z[-1])
    slices = tuple(range(z_min, z_max + 1))
    return QueryPlan(z_min, z_max, slices, tuple(chunk_of(s, z_min, z_max, n_chunks) for s in slices))


# --------------------------------------------------------------------------------------------- Dice
@dataclasses.dataclass
class Counts:
    """Voxel counts summed over the scored slices of one scan (3D Dice = 2TP / (2TP + FP + FN))."""
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> "Counts":
        """Accumulate one slice (or a stack): ``pred`` and ``truth`` are boolean arrays of one shape."""
        pred = np.asarray(pred, dtype=bool)
        truth = np.asarray(truth, dtype=bool)
        if pred.shape != truth.shape:
            raise ProtocolError(f"prediction shape {pred.shape} != ground truth shape {truth.shape}")
        tp = int(np.count_nonzero(pred & truth))
        self.tp += tp
        self.fp += int(np.count_nonzero(pred)) - tp
        self.fn += int(np.count_nonzero(truth)) - tp
        return self

    @property
    def dice(self) -> float:
        """Dice in [0, 1]; NaN when prediction and truth are both empty (undefined, never scored as 1)."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2.0 * self.tp / denom if denom else float("nan")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays of equal shape (all voxels pooled)."""
    return Counts().add(pred, truth).dice


def nanmean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none (an organ with no scored scan)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(per_scan: Mapping[str, Mapping[str, float]], classes: Sequence[str]) -> dict:
    """Mean Dice over scans per organ, then over organs.

    Parameters
    ----------
    per_scan : mapping organ -> {scan id -> Dice}
        Skipped scans are simply absent (or NaN).
    classes : sequence of str
        Organs in display order.

    Returns
    -------
    dict
        ``{"organs": {organ: mean Dice or NaN}, "n_scans": {organ: int}, "mean": mean over organs with a
        value}``.
    """
    organs = {c: nanmean(per_scan.get(c, {}).values()) for c in classes}
    n_scans = {c: sum(1 for v in per_scan.get(c, {}).values() if v is not None and math.isfinite(v))
               for c in classes}
    return {"organs": organs, "n_scans": n_scans, "mean": nanmean(organs.values())}


# --------------------------------------------------------------------------------------------- classes
# Setting 2 (method.md 2.3): the label group a checkpoint was trained for decides its test organs.
LABEL_GROUPS = {0: (2, 3), 1: (1, 4)}


def held_out_labels(episodes: Mapping) -> tuple[int, ...] | None:
    """Label values a setting-2 checkpoint is tested on: its explicit exclusion list, else its group's.

    ``episodes`` is the checkpoint config's ``episodes`` section (a dict). Returns None for setting 1
    (no exclusion: every class is a valid test class).
    """
    if int(episodes.get("setting", 1)) != 2:
        return None
    explicit = [int(v) for v in episodes.get("exclude_labels") or []]
    if explicit:
        return tuple(explicit)
    group = int(episodes.get("label_group", 0))
    if group not in LABEL_GROUPS:
        raise ProtocolError(f"episodes.label_group = {group}: not one of {sorted(LABEL_GROUPS)}")
    return LABEL_GROUPS[group]


def select_classes(classes: Mapping[str, int], test_labels: Iterable[int] | None) -> dict[str, int]:
    """The configured classes (name -> label value) restricted to ``test_labels`` (None = all), in order."""
    if not classes:
        raise ProtocolError("evaluate.classes is empty: nothing to evaluate")
    values = list(classes.values())
    if len(set(values)) != len(values):
        raise ProtocolError(f"evaluate.classes: two names share one label value ({dict(classes)})")
    for name, v in classes.items():
        if not 1 <= int(v) <= 255:
            raise ProtocolError(f"evaluate.classes.{name} = {v}: label values must be 1..255 (0 is background)")
    if test_labels is None:
        return dict(classes)
    wanted = {int(v) for v in test_labels}
    chosen = {n: v for n, v in classes.items() if int(v) in wanted}
    if not chosen:
        raise ProtocolError(f"none of the configured classes {dict(classes)} has a test label of the "
                            f"checkpoint ({sorted(wanted)})")
    return chosen
