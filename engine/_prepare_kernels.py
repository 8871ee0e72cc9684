"""Numba kernels of volume preparation (method.md 1.5): range, centre crop/pad, z-score, label ids.

``engine.prepare.prepare_volume`` used six numpy passes and two temporary volumes per scan (finite mask,
min, max, crop/transpose copy, float64 mean, float64 std). These kernels do the same in two passes (four
when a volume needs a crop, a pad or repairs) without temporaries and without the GIL, so that worker threads
loading volumes do not stall the others. Sums are accumulated in float64, as the numpy version did.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def finite_range(img):
    """(number of finite voxels, min, max of the finite voxels) of a 3D array of any layout. Finite means finite
    once converted to float32, the prepared dtype: float64 values beyond its range are repaired like Inf."""
    n = 0
    lo = np.inf
    hi = -np.inf
    h, w, d = img.shape
    for z in range(d):
        for x in range(w):
            for y in range(h):
                v = img[y, x, z]
                if np.isfinite(np.float32(v)):
                    n += 1
                    if v < lo:
                        lo = v
                    if v > hi:
                        hi = v
    return n, lo, hi


@njit(nogil=True, cache=True)
def place(img, out, oy, ox, pad):
    """Centre crop/pad ``img`` (H, W, Z) into ``out`` (Z, S, S) float32, non-finite voxels and padding set to
    ``pad``; returns the float64 sum of ``out``. ``oy``, ``ox``: source index of output index 0 (may be < 0)."""
    d, s, _ = out.shape
    h, w = img.shape[0], img.shape[1]
    p = np.float32(pad)
    total = 0.0
    for z in range(d):
        acc = 0.0
        for y in range(s):
            sy = y + oy
            for x in range(s):
                sx = x + ox
                v = p
                if 0 <= sy < h and 0 <= sx < w:
                    v = np.float32(img[sy, sx, z])
                    if not np.isfinite(v):
                        v = p
                out[z, y, x] = v
                acc += v
        total += acc
    return total


@njit(nogil=True, cache=True)
def place_scan(img, out):
    """:func:`finite_range` and :func:`place` in one pass, for a volume that needs no crop or pad (``img``
    (S, S, Z), ``out`` (Z, S, S) float32).

    Returns (True, min, max, float64 sum of ``out``, s1, s2): the sum is added up in :func:`place`'s order;
    ``s1`` and ``s2`` are the float64 sums of ``out - shift`` and of its squares, ``shift`` being the first
    voxel, so that the sum of squared deviations needs no second pass over the volume
    (``shifted_sum_sq_dev``). Returns (False, ...) at the first voxel that is not finite once in float32; the
    caller then takes the two-pass path, which repairs such voxels."""
    d, s, _ = out.shape
    lo = np.inf
    hi = -np.inf
    total = 0.0
    shift = np.float64(np.float32(img[0, 0, 0]))
    s1 = 0.0
    s2 = 0.0
    for z in range(d):
        acc = 0.0
        b1 = 0.0
        b2 = 0.0
        for y in range(s):
            for x in range(s):
                v = img[y, x, z]
                f = np.float32(v)
                if not np.isfinite(f):
                    return False, lo, hi, total, s1, s2
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
                out[z, y, x] = f
                acc += f
                dv = f - shift
                b1 += dv
                b2 += dv * dv
        total += acc
        s1 += b1
        s2 += b2
    return True, lo, hi, total, s1, s2


# Beyond this ratio of (mean - shift)^2 to the variance, the shifted sums could lose digits that matter to a
# float32 standard deviation (their rounding error grows with it): the exact second pass is taken instead.
SHIFT_RATIO_LIMIT = 1e4


def shifted_sum_sq_dev(n: int, s1: float, s2: float) -> float | None:
    """Sum of squared deviations from the mean, from ``place_scan``'s shifted sums ``s1``, ``s2`` over ``n``
    voxels; None when the shift lies too far from the mean for them to be accurate (then ``sum_sq_dev``)."""
    d = s1 / n
    sq = s2 - s1 * d
    if not sq > 0 or d * d > SHIFT_RATIO_LIMIT * (sq / n):
        return None
    return sq


@njit(nogil=True, cache=True)
def sum_sq_dev(flat, mean):
    """Float64 sum of ``(flat - mean) ** 2`` over a float32 array (Z, H, W)."""
    total = 0.0
    for z in range(flat.shape[0]):
        # four independent sums: one chain of float64 additions left this pass waiting on its latency
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        for y in range(flat.shape[1]):
            w = flat.shape[2]
            w4 = w - w % 4
            for x in range(0, w4, 4):
                d0 = flat[z, y, x] - mean
                d1 = flat[z, y, x + 1] - mean
                d2 = flat[z, y, x + 2] - mean
                d3 = flat[z, y, x + 3] - mean
                a0 += d0 * d0
                a1 += d1 * d1
                a2 += d2 * d2
                a3 += d3 * d3
            for x in range(w4, w):
                d0 = flat[z, y, x] - mean
                a0 += d0 * d0
        total += (a0 + a1) + (a2 + a3)
    return total


@njit(nogil=True, cache=True)
def zscore(flat, mean, std, out):
    """``out = (flat - mean) / std`` in float32 arithmetic (``mean``, ``std`` are float32)."""
    for z in range(flat.shape[0]):
        for y in range(flat.shape[1]):
            for x in range(flat.shape[2]):
                out[z, y, x] = (flat[z, y, x] - mean) / std


@njit(nogil=True, cache=True)
def labels_to_u8(src, out):
    """Copy label ids ``src`` (H, W, Z, any real dtype and layout) into ``out`` (uint8, same shape, any layout);
    False, with ``out`` partly written, when a value is not an integer in 0..255 (NaN included).

    One pass against three numpy passes (cast, cast back, compare) for CHAOS's float64 labels. Each slice is
    read in the column-major order of a NIfTI file into a small uint8 buffer, checked without a branch per
    voxel (so the loop vectorises), then transposed into ``out``: 0.049-0.055 against 0.065-0.066 ms per CHAOS
    slice for the voxel-by-voxel version with an early exit. The engine passes an ``out`` stored slice by
    slice, so that :func:`place_labels` then copies contiguous rows.
    """
    h, w, d = src.shape
    tmp = np.empty((w, h), np.uint8)
    for z in range(d):
        bad = 0
        for x in range(w):
            for y in range(h):
                v = src[y, x, z]
                # out-of-range values are clamped before the cast (whose result would be undefined) and
                # still fail the comparison below, as NaN does
                c = v if (v >= 0 and v <= 255) else 0.0
                u = np.uint8(c)
                bad += u != v
                tmp[x, y] = u
        if bad:
            return False
        for y in range(h):
            for x in range(w):
                out[y, x, z] = tmp[x, y]
    return True


@njit(nogil=True, cache=True)
def place_labels(lab, out, oy, ox):
    """Centre crop/pad uint8 ``lab`` (H, W, Z) into ``out`` (Z, S, S), padding with 0; ``oy``, ``ox`` as in
    :func:`place`."""
    d, s, _ = out.shape
    h, w = lab.shape[0], lab.shape[1]
    for z in range(d):
        for y in range(s):
            sy = y + oy
            for x in range(s):
                sx = x + ox
                v = np.uint8(0)
                if 0 <= sy < h and 0 <= sx < w:
                    v = lab[sy, sx, z]
                out[z, y, x] = v
