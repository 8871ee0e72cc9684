"""Per-volume preparation: NaN/Inf handling, in-plane centre crop/pad, z-scoring, and the body mask.

``prepare_volume`` turns a source ``Volume`` into the two arrays the engine needs (method.md 1.5-1.6):
``raw`` (source intensities, the input of the body mask and of the superpixels) and ``image`` (the
per-volume z-scored copy the trainer reads). ``body_mask`` is the numba kernel of method.md 1.6;
``body_mask_reference`` is the scipy/scikit-image formulation it is tested against.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engine._mask_kernels import body_mask_kernel
from engine._prepare_kernels import (finite_range, place, place_labels, place_scan, shifted_sum_sq_dev, sum_sq_dev,
                                     zscore)
from engine.volume import Volume, VolumeError

if TYPE_CHECKING:
    from engine.config import PrepareConfig


@dataclasses.dataclass
class PreparedVolume:
    """A volume ready for slicing.

    The three arrays are (H, W, Z) views of (Z, H, W) buffers, so ``raw[:, :, z]``, ``image[:, :, z]`` and
    ``label[:, :, z]`` are C-contiguous slices: the engine works slice by slice (body mask, superpixels,
    store writes) and never copies a slice, whatever layout the source file had (NIfTI is column-major).

    Attributes
    ----------
    id : str
        Scan id (``Volume.id``).
    image : ndarray, shape (size, size, Z), float32, or None
        ``raw`` z-scored over the whole volume: ``(raw - mean) / std`` (method.md 1.5). None when the caller's
        buffers had no room for it: ``zscore_slice`` then makes each slice from ``raw`` and ``zstats``.
    raw : ndarray, shape (size, size, Z), float32
        Source intensities with NaN/Inf replaced and the in-plane centre crop/pad applied.
    label : ndarray, shape (size, size, Z), uint8, or None
        Labels cropped/padded like ``raw`` (padding 0). ``Volume.label`` itself when it needs neither a crop,
        a pad nor a copy (uint8, slice by slice in memory, ``size`` x ``size``), and no buffers were given.
    volume : Volume
        The source record (provenance: path, checksum, spacing, orientation).
    zstats : (float32, float32)
        The ``(mean, std)`` of the z-score.
    notes : list of str
        Warnings about what was repaired (one line each, without the path).
    """
    id: str
    image: np.ndarray | None
    raw: np.ndarray
    label: np.ndarray | None
    volume: Volume
    zstats: tuple
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return int(self.raw.shape[2])


# --------------------------------------------------------------------------------------------- crop / pad
def crop_offset(n: int, size: int) -> int:
    """Index in the source axis of output index 0 for a centre crop/pad of length ``n`` to ``size``.

    Same convention as the SSL-ALPNet crop (method.md 1.3): the crop centre is ``n // 2`` and output
    index ``(size + 1) // 2`` lands on it. Negative when the axis is padded.
    """
    return n // 2 - (size + 1) // 2


def _crop_windows(h: int, w: int, size: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(source, destination) in-plane index windows of a centre crop/pad to ``size`` x ``size``."""
    src, dst = [], []
    for n in (h, w):
        off = crop_offset(n, size)
        lo, hi = max(off, 0), min(off + size, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - off, hi - off))
    return (src[0], src[1]), (dst[0], dst[1])


def center_crop_pad(arr: np.ndarray, size: int, pad_value: float) -> np.ndarray:
    """Centre-crop or pad the first two axes of ``arr`` to ``size`` x ``size``.

    Parameters
    ----------
    arr : ndarray, shape (H, W, ...)
    size : int
        Output in-plane size.
    pad_value : float
        Value of the pixels that fall outside ``arr``.

    Returns
    -------
    ndarray, shape (size, size, ...), dtype of ``arr``
        ``arr`` itself when it already has that size.
    """
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    out = np.full((size, size) + arr.shape[2:], pad_value, dtype=arr.dtype)
    src, dst = _crop_windows(h, w, size)
    out[dst] = arr[src]
    return out


# --------------------------------------------------------------------------------------------- prepare
def prepare_volume(vol: Volume, cfg: PrepareConfig,
                   buffers: Callable[[int, bool], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] | None = None
                   ) -> PreparedVolume:
    """Repair, crop/pad and z-score one volume (method.md 1.5).

    Parameters
    ----------
    vol : Volume
        ``vol.image`` must be (H, W, Z); any real dtype. Never modified.
    cfg : PrepareConfig
        ``cfg.size`` is the in-plane output size; ``cfg.zscore`` the statistics of the z-score: ``"volume"``
        (mean / std of every voxel, method.md 1.5) or ``"robust"`` (median / (IQR / 1.349) of the voxels above
        ``cfg.fg_threshold``).
    buffers : callable, optional
        ``buffers(n_slices, has_label)`` returns the (Z, size, size) arrays to fill: raw and image float32,
        label uint8 or None; image None leaves the z-score to ``zscore_slice``, slice by slice. Default: new
        arrays. (The engine's worker processes prepare raw and label straight into shared memory.)

    Returns
    -------
    PreparedVolume
        ``image``, ``raw`` and ``label`` are (size, size, Z) views of (Z, size, size) buffers:
        ``raw[:, :, z]`` is a C-contiguous (size, size) slice.

    Raises
    ------
    VolumeError
        The image is not 3D, is empty, has no finite voxel, or is constant (no z-score possible).
    """
    size = int(cfg.size)
    img = np.asarray(vol.image)
    if img.ndim != 3:
        raise VolumeError(vol.path, f"expected a 3D image (H, W, Z), got shape {tuple(img.shape)}")
    if img.size == 0:
        raise VolumeError(vol.path, f"empty image (shape {tuple(img.shape)})")
    if not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise VolumeError(vol.path, f"image dtype {img.dtype} is not a real number type")
    if vol.label is not None and tuple(vol.label.shape) != tuple(img.shape):
        raise VolumeError(vol.path, f"label shape {tuple(vol.label.shape)} differs from image shape "
                                    f"{tuple(img.shape)}")
    notes: list[str] = []
    src = img if img.dtype in (np.float32, np.float64) else img.astype(np.float32)
    h, w, n_z = img.shape

    def new_buffers() -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if buffers is None:
            return np.empty((n_z, size, size), np.float32), np.empty((n_z, size, size), np.float32), None
        return buffers(n_z, vol.label is not None)

    # ``flat`` is the slice-major (Z, size, size) buffer; ``raw`` its (size, size, Z) view. A private copy: the
    # source is never modified. Padding and non-finite voxels get the finite minimum.
    (flat, image, label_out), lo, n_bad, total, sq = _place_volume(src, size, new_buffers, vol.path)
    raw = flat.transpose(1, 2, 0)
    if n_bad:
        notes.append(f"{n_bad} NaN/Inf voxel(s) replaced by the finite minimum {lo:g}")
    if (h, w) != (size, size):
        notes.append(f"in-plane size {h}x{w} centre-cropped/padded to {size}x{size}")
    label = None
    if vol.label is not None:
        lab = np.asarray(vol.label, dtype=np.uint8)
        if label_out is None and (h, w) == (size, size) and lab.transpose(2, 0, 1).flags.c_contiguous:
            label = lab            # uint8, slice-major and the right size already (the NIfTI reader's): no copy
        else:
            if label_out is None:
                label_out = np.empty((n_z, size, size), np.uint8)
            place_labels(lab, label_out, crop_offset(h, size), crop_offset(w, size))
            label = label_out.transpose(1, 2, 0)
    mean, std = _robust_stats(flat, cfg, notes) if getattr(cfg, "zscore", "volume") == "robust" else (None, None)
    if mean is None:
        # Statistics in float64: a float32 accumulator loses ~1e-4 relative accuracy on 3M voxels.
        mean = total / flat.size
        if sq is None:
            sq = sum_sq_dev(flat, mean)
        std = float(np.sqrt(sq / flat.size))
    if not std > 0:
        raise VolumeError(vol.path, f"constant after the centre crop to {size}x{size}: cannot be z-scored")
    zstats = (np.float32(mean), np.float32(std))
    if image is not None:
        # float32 arithmetic, as the original ``(x - x.mean()) / x.std()`` on a float32 array
        zscore(flat, *zstats, image)
    return PreparedVolume(id=vol.id, image=None if image is None else image.transpose(1, 2, 0), raw=raw, label=label,
                          volume=vol, notes=notes, zstats=zstats)


def zscore_slice(raw_slice: np.ndarray, zstats: tuple, out: np.ndarray) -> np.ndarray:
    """One slice of ``PreparedVolume.image`` from its ``raw`` slice: (H, W) float32 into ``out`` (H, W) float32.

    The same kernel and arithmetic as the whole-volume z-score, so the slice is bit-identical to it.
    """
    zscore(raw_slice[None], zstats[0], zstats[1], out[None])
    return out


def _place_volume(src: np.ndarray, size: int, new_buffers, path: str) -> tuple[tuple, float, int, float,
                                                                              float | None]:
    """Range checks and centre crop/pad of ``src`` (H, W, Z) into the first of ``new_buffers()``.

    Returns (buffers, finite minimum, number of repaired voxels, float64 sum of the placed voxels, their sum of
    squared deviations from the mean or None). A volume already ``size`` x ``size`` is scanned and placed in
    one pass, which also gives the squared deviations (None when its shifted sums are not accurate enough);
    one that needs a crop, a pad or repairs takes two (range first: padding and repairs need the minimum),
    and its squared deviations are left to ``sum_sq_dev``.
    """
    h, w, _ = src.shape
    bufs = None
    if (h, w) == (size, size):
        bufs = new_buffers()
        ok, lo, hi, total, s1, s2 = place_scan(src, bufs[0])
        if ok:
            _check_not_constant(float(lo), float(hi), path)
            return bufs, float(lo), 0, total, shifted_sum_sq_dev(src.size, s1, s2)
    n_finite, lo, hi = finite_range(src)
    if n_finite == 0:
        raise VolumeError(path, "no finite voxel (all NaN/Inf)")
    _check_not_constant(float(lo), float(hi), path)
    bufs = bufs or new_buffers()
    total = place(src, bufs[0], crop_offset(h, size), crop_offset(w, size), float(lo))
    return bufs, float(lo), src.size - int(n_finite), total, None


def _check_not_constant(lo: float, hi: float, path: str) -> None:
    if lo == hi:
        raise VolumeError(path, f"constant volume (every voxel = {lo:g}): cannot be z-scored")


# IQR / 1.349 is the standard deviation of a normal distribution: robust z-scores keep the usual scale.
_IQR_TO_STD = 1.349
_MIN_BODY_VOXELS = 1000


def _robust_stats(flat: np.ndarray, cfg, notes: list[str]) -> tuple[float | None, float | None]:
    """(median, IQR / 1.349) of the body voxels (raw > ``cfg.fg_threshold``); (None, None) with a note when the
    body is too small or flat for them, and the caller falls back to the whole-volume statistics."""
    body = flat[flat > np.float32(cfg.fg_threshold)]
    if body.size >= _MIN_BODY_VOXELS:
        q1, median, q3 = np.percentile(body, [25, 50, 75])
        if q3 > q1:
            return float(median), float(q3 - q1) / _IQR_TO_STD
    notes.append(f"prepare.zscore=robust: {body.size} body voxel(s) give no spread; z-scored over the whole "
                 "volume instead")
    return None, None


# --------------------------------------------------------------------------------------------- body mask
def _slice_and_threshold(raw_slice: np.ndarray, threshold: float) -> tuple[np.ndarray, np.floating]:
    """Validate a slice; return it as a float array and the threshold in that float type.

    The comparison ``slice > threshold`` is made in the slice's precision, as numpy does for a float32
    array and a Python float, so the kernel and the reference agree bit for bit.
    """
    arr = np.asarray(raw_slice)
    if arr.ndim != 2:
        raise ValueError(f"body_mask: expected a 2D slice, got shape {arr.shape}")
    if arr.dtype != np.float32 and arr.dtype != np.float64:
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"body_mask: slice dtype {arr.dtype} is not a real number type")
        arr = arr.astype(np.float64)
    return arr, arr.dtype.type(threshold)


def body_mask(raw_slice: np.ndarray, threshold: float) -> np.ndarray:
    """Body (foreground) mask of one slice, method.md 1.6.

    Pixels ``> threshold`` form the foreground; the largest 8-connected component is kept (ties: the
    component whose first pixel comes first in row-major order, as scikit-image's label + argmax picks)
    and its holes are filled (4-connected background not reaching the border). Releases the GIL.

    Parameters
    ----------
    raw_slice : ndarray, shape (H, W), float32 (any real dtype accepted)
        Source intensities, not z-scored. NaN counts as background.
    threshold : float
        CHAOS-T2: 50 + 1e-4 (``PrepareConfig.fg_threshold``).

    Returns
    -------
    ndarray, shape (H, W), bool
        All False when no pixel passes the threshold.
    """
    arr, thr = _slice_and_threshold(raw_slice, threshold)
    out = np.empty(arr.shape, dtype=np.bool_)
    if arr.size:
        body_mask_kernel(np.ascontiguousarray(arr), thr, out)
    return out


def body_mask_reference(raw_slice: np.ndarray, threshold: float) -> np.ndarray:
    """The SSL-ALPNet formulation of ``body_mask`` (scikit-image + scipy), for tests and benchmarks.

    Parameters and result as ``body_mask``.
    """
    from scipy import ndimage
    from skimage.measure import label as sk_label

    arr, thr = _slice_and_threshold(raw_slice, threshold)
    fg = arr > thr
    if not fg.any():
        return np.zeros(arr.shape, dtype=bool)
    labels = sk_label(fg)                      # default connectivity: 8-connected in 2D
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return ndimage.binary_fill_holes(largest)
