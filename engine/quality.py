"""Superpixel quality against ground-truth label maps (Stutz et al. 2018 definitions).

Stutz, Hermans, Leibe, "Superpixels: an evaluation of the state-of-the-art", CVIU 166 (2018), define the metrics
used here; this module follows the definitions of that paper and of its reference evaluation code, and adds an
optional *region* (typically the body mask) that restricts which pixels are scored.

Conventions (all functions take 2D integer label maps of the same shape):

- Every distinct value of a map is a segment, 0 included: in a ground-truth map the background is a segment like
  any organ, and in a superpixel map 0 (outside the body) is one more region. This is what the reference code does.
- A **boundary pixel** of a label map is a pixel with at least one 4-neighbour (up, down, left, right, inside the
  image) carrying a different label. Both sides of a label change are therefore boundary pixels (a boundary is two
  pixels thick), and the image border is not a boundary.
- **Boundary recall** (BR): the fraction of ground-truth boundary pixels that have a superpixel boundary pixel
  within a (2r+1) x (2r+1) square centred on them, r = round(0.0025 * image diagonal) by default (1 at 256 x 256).
- **Undersegmentation error** (UE, Neubert and Protzel 2012):
  ``(1/N) sum_j sum_{i: |S_j & G_i| > 0} min(|S_j & G_i|, |S_j - G_i|)``.
- **Achievable segmentation accuracy** (ASA): ``(1/N) sum_j max_i |S_j & G_i|``, the pixel accuracy of the best
  labelling that assigns each superpixel one ground-truth label.
- **Compactness** (CO, Schick et al. 2012 as in Stutz): ``(1/N) sum_j |S_j| * 4 pi |S_j| / P_j^2``, where the
  perimeter P_j counts the pixel edges between S_j and anything else (another label, the image border, or a pixel
  outside the region). A square of side a has P = 4a, so its quotient is pi / 4; a 1-pixel segment scores pi / 4.

With ``region`` (a boolean mask) only the pixels inside it are scored: N is the number of region pixels, the
contingency table counts region pixels only, and only ground-truth boundary pixels inside the region have to be
recalled. Boundary pixels themselves are still found on the full maps, so the edge of a superpixel map clipped to the
body mask (id against 0) is a superpixel boundary wherever it lies.

Without a region these conventions reproduce the reference figures of issue 3 on the 558 CHAOS-T2 slices that
contain an organ (per-slice means, r = 1, BR averaged over slices with organ boundaries): the faithful
SSL-ALPNet Felzenszwalb recipe gives 24.1 superpixels per slice, BR 0.679, UE 0.049, ASA 0.975, and scikit-image
maskSLIC (K = 50, m = 0.1) 45.6 per slice, BR 0.724, ASA 0.979 (benchmarks/superpixel_quality.py). Scoring only
inside the body mask (``region=fg``) instead gives, for the Felzenszwalb recipe, BR 0.684, UE 0.083 and ASA 0.959
(N shrinks to the body), so the reference figures were computed over the full slice.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "tolerance", "boundary_pixels", "boundary_recall", "undersegmentation_error",
    "achievable_segmentation_accuracy", "compactness", "n_superpixels", "contingency", "evaluate",
    "downsampled_masks", "feature_stats",
]


# --------------------------------------------------------------------------------------------- helpers
def _check_labels(arr: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(arr)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must hold non-negative labels")
    return a


def _check_pair(superpixels: np.ndarray, gt: np.ndarray | None, region: np.ndarray | None) -> tuple:
    sp = np.asarray(superpixels)
    if sp.ndim != 2:
        raise ValueError(f"superpixels must be a 2D label map, got shape {sp.shape}")
    sp = _check_labels(sp, "superpixels")
    g = None if gt is None else _check_labels(_same_shape(gt, "gt", sp), "gt")
    m = None if region is None else _same_shape(region, "region", sp).astype(bool, copy=False)
    return sp, g, m


def _same_shape(arr, name: str, sp: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.shape != sp.shape:
        raise ValueError(f"{name} shape {a.shape} differs from superpixels shape {sp.shape}")
    return a


def _dense(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Map non-negative labels to indices 0..n-1 cheaply: the labels themselves when they are small (bincount
    needs no sort), else their rank among the distinct values. Absent labels may leave empty indices."""
    v = values.astype(np.int64, copy=False)
    if v.size == 0:
        return v, 0
    top = int(v.max())
    if top < 4 * v.size + 64:
        return v, top + 1
    uniq, inv = np.unique(v, return_inverse=True)
    return inv.reshape(v.shape).astype(np.int64), len(uniq)


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct non-negative labels (int64), by bincount when they are small (no sort needed)."""
    v = values.ravel().astype(np.int64, copy=False)
    if v.size == 0:
        return np.zeros(0, dtype=np.int64)
    top = int(v.max())
    if top < 4 * v.size + 64:
        return np.flatnonzero(np.bincount(v, minlength=top + 1))
    return np.unique(v)


def tolerance(shape: tuple[int, int], fraction: float = 0.0025) -> int:
    """Boundary-recall tolerance ``round(fraction * diagonal)`` in pixels (Stutz: fraction 0.0025).

    Parameters
    ----------
    shape : (H, W)
    fraction : float
        Fraction of the image diagonal.

    Returns
    -------
    int
        1 for 256 x 256 images.
    """
    return int(round(fraction * math.hypot(shape[0], shape[1])))


def boundary_pixels(labels: np.ndarray) -> np.ndarray:
    """Boundary pixels of a label map: pixels with a 4-neighbour of a different label.

    Parameters
    ----------
    labels : (H, W) integer array

    Returns
    -------
    (H, W) bool array
    """
    lab = np.asarray(labels)
    out = np.zeros(lab.shape, dtype=bool)
    dv = lab[1:, :] != lab[:-1, :]      # vertical label changes, marked on both pixels
    out[1:, :] |= dv
    out[:-1, :] |= dv
    dh = lab[:, 1:] != lab[:, :-1]
    out[:, 1:] |= dh
    out[:, :-1] |= dh
    return out


def _intersections(superpixels: np.ndarray, gt: np.ndarray, region: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Non-zero cells of the contingency table: (superpixel index, gt index, count) per cell, plus N.

    Indices are labels (or ranks for very large labels); built by bincount, so no sort for ordinary label maps.
    """
    sp, g, m = _check_pair(superpixels, gt, region)
    s = sp.ravel() if m is None else sp[m]
    t = g.ravel() if m is None else g[m]
    empty = np.zeros(0, dtype=np.int64)
    if s.size == 0:
        return empty, empty, empty, 0
    si, ns = _dense(s)
    gi, ng = _dense(t)
    key = si * ng + gi
    if ns * ng <= 16 * key.size + 1024:
        cells = np.bincount(key, minlength=ns * ng)
        nz = np.flatnonzero(cells)
        counts = cells[nz]
    else:                                        # many distinct labels on both sides: sort instead
        nz, counts = np.unique(key, return_counts=True)
    return nz // ng, nz % ng, counts.astype(np.int64), int(s.size)


def contingency(superpixels: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Intersection counts ``|S_j & G_i|`` of the region pixels, as an (n_sp, n_gt) int64 array.

    Rows and columns are indexed by label when labels are small (else by rank among the labels present);
    rows and columns of labels absent from the region are all zero. Meant for inspection and small maps; the
    metrics use the non-zero cells only.
    """
    rows, cols, counts, _ = _intersections(superpixels, gt, region)
    if counts.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    table = np.zeros((int(rows.max()) + 1, int(cols.max()) + 1), dtype=np.int64)
    table[rows, cols] = counts
    return table


def _ue_asa(rows: np.ndarray, counts: np.ndarray, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    k = int(rows.max()) + 1
    size = np.bincount(rows, weights=counts, minlength=k)
    ue = np.minimum(counts, size[rows] - counts).sum() / n
    best = np.zeros(k)
    np.maximum.at(best, rows, counts)
    return float(ue), float(best.sum() / n)


# --------------------------------------------------------------------------------------------- metrics
def boundary_recall(superpixels: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None,
                    r: int | None = None) -> float:
    """Boundary recall of ``superpixels`` against ``gt`` (see module docstring).

    Parameters
    ----------
    superpixels, gt : (H, W) integer arrays
    region : (H, W) bool array, optional
        Only ground-truth boundary pixels inside it have to be recalled.
    r : int, optional
        Tolerance in pixels (square window, Chebyshev distance); default ``tolerance(shape)``.

    Returns
    -------
    float
        In [0, 1]; NaN when there is no ground-truth boundary pixel to recall (e.g. a slice without organs),
        so averages over slices can skip it (the reference code returns 0 there).
    """
    sp, g, m = _check_pair(superpixels, gt, region)
    if r is None:
        r = tolerance(sp.shape)
    if r < 0:
        raise ValueError(f"tolerance r must be >= 0, got {r}")
    gb = boundary_pixels(g)
    if m is not None:
        gb &= m
    n = int(gb.sum())
    if n == 0:
        return float("nan")
    sb = boundary_pixels(sp)
    if r > 0:
        sb = ndimage.maximum_filter(sb, size=2 * r + 1, mode="constant", cval=False)
    return float((gb & sb).sum()) / n


def undersegmentation_error(superpixels: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Neubert-Protzel undersegmentation error (lower is better; see module docstring).

    Returns
    -------
    float
        In [0, 1]; NaN for an empty region.
    """
    rows, _, counts, n = _intersections(superpixels, gt, region)
    return _ue_asa(rows, counts, n)[0]


def achievable_segmentation_accuracy(superpixels: np.ndarray, gt: np.ndarray,
                                     region: np.ndarray | None = None) -> float:
    """Achievable segmentation accuracy (higher is better; see module docstring).

    Returns
    -------
    float
        In [0, 1]; NaN for an empty region.
    """
    rows, _, counts, n = _intersections(superpixels, gt, region)
    return _ue_asa(rows, counts, n)[1]


def compactness(superpixels: np.ndarray, region: np.ndarray | None = None) -> float:
    """Schick compactness: area-weighted isoperimetric quotient 4 pi A / P^2 (see module docstring).

    Parameters
    ----------
    superpixels : (H, W) integer array
    region : (H, W) bool array, optional
        Score only the superpixels' parts inside it; edges to pixels outside it count as perimeter.

    Returns
    -------
    float
        In [0, pi/4] for 4-connected perimeters; NaN for an empty region.
    """
    sp, _, m = _check_pair(superpixels, None, region)
    if m is None:
        m = np.ones(sp.shape, dtype=bool)
    n = int(m.sum())
    if n == 0:
        return float("nan")
    # A pixel edge is perimeter unless the neighbour exists, is in the region and has the same label.
    pad_l = np.pad(sp, 1, mode="constant", constant_values=-1)
    pad_m = np.pad(m, 1, mode="constant", constant_values=False)
    centre = pad_l[1:-1, 1:-1]
    edges = np.zeros(sp.shape, dtype=np.int64)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nl = pad_l[1 + dy:pad_l.shape[0] - 1 + dy, 1 + dx:pad_l.shape[1] - 1 + dx]
        nm = pad_m[1 + dy:pad_m.shape[0] - 1 + dy, 1 + dx:pad_m.shape[1] - 1 + dx]
        edges += ~(nm & (nl == centre))
    inv, k = _dense(sp[m])
    area = np.bincount(inv, minlength=k).astype(np.float64)
    perim = np.bincount(inv, weights=edges[m], minlength=k)
    present = area > 0
    return float(np.sum(area[present] * 4.0 * math.pi * area[present] / perim[present] ** 2)) / n


def n_superpixels(superpixels: np.ndarray, region: np.ndarray | None = None, ignore_zero: bool = True) -> int:
    """Number of distinct superpixels present (inside ``region`` if given).

    ``ignore_zero`` (default) does not count label 0, the "outside the body" label of pseudo-label maps.
    """
    sp, _, m = _check_pair(superpixels, None, region)
    v = sp.ravel() if m is None else sp[m]
    if ignore_zero:
        v = v[v != 0]
    if v.size == 0:
        return 0
    inv, k = _dense(v)
    return int(np.count_nonzero(np.bincount(inv, minlength=k)))


def evaluate(superpixels: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None,
             r: int | None = None) -> dict[str, float]:
    """All metrics of one slice: ``br``, ``ue``, ``asa``, ``co`` (floats) and ``n`` (superpixels, 0 not counted).

    Average ``n`` over slices to get the mean number of superpixels per slice.
    """
    rows, _, counts, n = _intersections(superpixels, gt, region)     # shared by UE and ASA
    ue, asa = _ue_asa(rows, counts, n)
    return {
        "br": boundary_recall(superpixels, gt, region, r),
        "ue": ue,
        "asa": asa,
        "co": compactness(superpixels, region),
        "n": float(n_superpixels(superpixels, region)),
    }


# --------------------------------------------------------------------------------------------- ALPNet view
def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1D bilinear resizing with align_corners=False and no antialias."""
    scale = n_in / n_out
    c = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)   # torch clamps negative coordinates to 0
    i0 = np.minimum(np.floor(c).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = c - i0
    return i0, i1, w1


def downsampled_masks(superpixels: np.ndarray, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=False, no antialias) down-sampling of every superpixel's binary mask at once.

    This is how ALPNet brings a support mask to feature resolution (method.md 3.2).

    Parameters
    ----------
    superpixels : (H, W) integer array, ids 0..K
    size : int
        Output side (32 for 256 x 256 slices and an output-stride-8 encoder).

    Returns
    -------
    ids : (K',) int64 array
        The non-zero ids present in ``superpixels``.
    soft : (K', size, size) float64 array
        ``soft[k]`` is the down-sampled mask of ``ids[k]``.
    """
    sp, _, _ = _check_pair(superpixels, None, None)
    ids = _distinct(sp)
    ids = ids[ids != 0]
    soft = np.zeros((len(ids), size * size))
    if len(ids) == 0:
        return ids, soft.reshape(0, size, size)
    r0, r1, wr = _bilinear_taps(sp.shape[0], size)
    c0, c1, wc = _bilinear_taps(sp.shape[1], size)
    cell = np.arange(size * size).reshape(size, size)
    for rows, w_r in ((r0, 1.0 - wr), (r1, wr)):
        for cols, w_c in ((c0, 1.0 - wc), (c1, wc)):
            lab = sp[np.ix_(rows, cols)]
            w = np.outer(w_r, w_c)
            keep = (lab != 0) & (w > 0)
            rowk = np.searchsorted(ids, lab[keep])
            np.add.at(soft, (rowk, cell[keep]), w[keep])
    return ids, soft.reshape(len(ids), size, size)


def feature_stats(superpixels: np.ndarray, size: int = 32, pool: int = 4, threshold: float = 0.95) -> dict:
    """How each superpixel looks to ALPNet as a foreground support mask (method.md 3.2-3.3).

    Parameters
    ----------
    superpixels : (H, W) integer array
    size : int
        Feature-map side (32).
    pool : int
        Local-prototype pooling window (4 in training).
    threshold : float
        Pooled-mask threshold of ALPNet (0.95).

    Returns
    -------
    dict
        ``ids`` (K',), ``vanished`` (K',) bool: the down-sampled mask is all zero; ``fg_local`` (K',) bool: some
        pool x pool window has pooled mask >= threshold (ALPNet then uses local fg prototypes);
        ``n_local`` (K',) int: windows with pooled mask > threshold (the local prototypes kept).
    """
    ids, soft = downsampled_masks(superpixels, size)
    k = len(ids)
    if size % pool:
        raise ValueError(f"feature size {size} is not a multiple of the pooling window {pool}")
    pooled = soft.reshape(k, size // pool, pool, size // pool, pool).mean(axis=(2, 4))
    flat = pooled.reshape(k, (size // pool) ** 2)
    return {
        "ids": ids,
        "vanished": ~(soft.reshape(k, size * size) > 0).any(axis=1),
        "fg_local": (flat >= threshold).any(axis=1) if k else np.zeros(0, dtype=bool),
        "n_local": (flat > threshold).sum(axis=1) if k else np.zeros(0, dtype=np.int64),
    }
