"""Superpixel pseudo-labels: a numba SLIC / maskSLIC for grey slices, and the per-slice dispatch of the engine.

``slic`` takes the parameters of ``skimage.segmentation.slic`` with the same names and meaning, restricted to
2D single-channel images. With its defaults it runs scikit-image's algorithm step for step (grid seeding,
4S x 4S search windows, the distance, the centre update, connectivity enforcement) and gives the same labels
up to float32 rounding of the centre intensities (tests/test_superpixels.py bounds the difference on CHAOS).
Deliberate differences:

* the arithmetic is float32 whatever the input dtype (scikit-image uses float64 for float64 input);
* with a ``mask``, the seeds come from a deterministic k-means (low-discrepancy start, regular sub-grid of the
  mask) instead of scikit-image's randomly drawn start and subset; what follows is maskSLIC as in
  scikit-image (a colour-blind pass that spreads the seeds over the mask, then SLIC);
* mask pixels that no search window reaches (possible with a narrow ``search_radius``) are segmented like
  the rest instead of being left unlabelled, so every mask pixel gets a superpixel;
* labels are int32; an empty mask, NaN/Inf inside the mask or an invalid parameter raise ``ValueError`` with
  a one-line message instead of failing deep inside the algorithm; ``max_num_iter`` must be >= 1, and a
  single seed in a mask covers the whole mask (in scikit-image it gets a zero step and labels nothing);
* two keyword-only options, ``search_radius`` (window size) and ``spread_iter`` (length of maskSLIC's
  colour-blind pass), whose defaults are scikit-image's behaviour; the engine's pseudo-labels use the
  values chosen by measurement in ``SlicConfig``.

The hot loops are in :mod:`engine._kernels` (numba, ``nogil``): a call holds the GIL only for the argument
checks, so several threads run them truly in parallel. The engine's workers call ``pseudolabels_u16``, the
same labels in one kernel call per slice (uint16, with their largest value), which keeps their GIL
handoffs per slice few when many threads share the interpreter.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import numpy as np

from . import _kernels as K
from . import ranges

__all__ = ["slic", "pseudolabels", "pseudolabels_u16", "felzenszwalb_pseudolabels", "meanshift_pseudolabels"]

_NO_MASK = np.ones((1, 1), dtype=np.uint8)  # placeholder argument: one compiled signature for both modes


# --------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=1024)
def _grid(h: int, w: int, n: int) -> tuple[int, int, int, int]:
    """(start_y, step_y, start_x, step_x) of scikit-image's ``regular_grid((1, h, w), n)``.

    The same arithmetic as scikit-image (tested equal), written out so that a new process does not import
    scikit-image for it: steps of (pixels / n) ** (1/3) per axis, and where an axis is shorter than its step it
    takes its full length and the other axes share the rest; start = step // 2, step rounded half to even.
    """
    dims = [1, h, w]
    order = sorted(range(3), key=lambda i: dims[i])          # axes from shortest to longest (stable)
    sdims = [float(dims[i]) for i in order]
    size = float(h) * float(w)
    if size <= n:
        return (0, 1, 0, 1)
    steps = [(size / n) ** (1.0 / 3)] * 3
    if any(d < s for d, s in zip(sdims, steps)):
        for dim in range(3):
            steps[dim] = sdims[dim]
            rest = math.prod(sdims[dim + 1:])
            for j in range(dim + 1, 3):
                steps[j] = (rest / n) ** (1.0 / (3 - dim - 1))
            if all(d >= s for d, s in zip(sdims, steps)):
                break
    start = [0] * 3
    step = [1] * 3
    for rank, axis in enumerate(order):
        start[axis] = int(steps[rank] // 2)
        step[axis] = int(np.round(steps[rank]))
    return (start[1], step[1], start[2], step[2])


def _pair(value: Any, name: str, positive: bool) -> tuple[float, float]:
    """A number or a sequence of 2 numbers as two finite floats (>= 0, or > 0 when ``positive``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        vals = [float(value)] * 2
    else:
        try:
            vals = [float(v) for v in np.asarray(value, dtype=np.float64).ravel()]
        except (TypeError, ValueError):
            vals = []
        if len(vals) != 2:
            raise ValueError(f"slic: {name} must be a number or 2 numbers (rows, columns), got {value!r}")
    if not all(math.isfinite(v) and (v > 0 if positive else v >= 0) for v in vals):
        raise ValueError(f"slic: {name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return vals[0], vals[1]


def _check_number(value: Any, name: str) -> None:
    rng = ranges.SLIC[name]
    if not rng.is_kind(value):
        raise ValueError(f"slic: {name} must be a finite {'integer' if rng.integer else 'number'}, got {value!r}")
    if not rng.holds(value):
        raise ValueError(f"slic: {name} must be {rng.text()}, got {value!r}")


def _check_slic_numbers(n_segments, compactness, max_num_iter, min_size_factor, max_size_factor, search_radius,
                        spread_iter) -> None:
    """The ranges of ``engine.ranges.SLIC`` (sigma goes through ``_pair``: it may be a pair)."""
    for name, value in (("n_segments", n_segments), ("compactness", compactness), ("max_num_iter", max_num_iter),
                        ("min_size_factor", min_size_factor), ("max_size_factor", max_size_factor),
                        ("search_radius", search_radius), ("spread_iter", spread_iter)):
        if value is not None or name not in ("search_radius", "spread_iter"):
            _check_number(value, name)


# --------------------------------------------------------------------------------------------- SLIC
def slic(
    image: np.ndarray,
    n_segments: int = 100,
    compactness: float = 10.0,
    max_num_iter: int = 10,
    sigma: float | tuple[float, float] = 0,
    spacing: tuple[float, float] | None = None,
    mask: np.ndarray | None = None,
    enforce_connectivity: bool = True,
    min_size_factor: float = 0.5,
    max_size_factor: float = 3,
    start_label: int = 1,
    channel_axis: int | None = None,
    *,
    search_radius: float | None = None,
    spread_iter: int | None = None,
) -> np.ndarray:
    """SLIC superpixels of a 2D grey image; drop-in for ``skimage.segmentation.slic(..., channel_axis=None)``.

    Parameters
    ----------
    image : (H, W) array_like, real
        Grey image. It is rescaled to [0, 1] by its min and max (over the mask when one is given), so any
        affine change of the intensities gives the same superpixels. Values outside the mask may be NaN/Inf.
    n_segments : int
        Approximate number of superpixels: the number of seeds (a regular grid, or k-means seeds in the mask).
    compactness : float
        Weight m of space against intensity: D^2 = (d_c / m)^2 + (d_s / S)^2, d_c on the [0, 1] scale.
    max_num_iter : int
        Number of k-means iterations (assign, then move the centres), >= 1.
    sigma : float or (2,) floats
        Gaussian pre-smoothing width per axis in pixels (divided by ``spacing`` when scalar); 0 = none.
    spacing : (2,) floats, optional
        Pixel size along rows and columns; weights the spatial distance. Default (1, 1).
    mask : (H, W) bool array_like, optional
        maskSLIC: seeds are placed inside the mask and pixels outside it are labelled ``start_label - 1``.
    enforce_connectivity : bool
        Make every superpixel 4-connected; fragments under ``min_size_factor`` times the expected size join
        an adjacent superpixel.
    min_size_factor, max_size_factor : float
        Bounds of the connectivity step as fractions of the expected superpixel size (pixels / seeds).
    start_label : {0, 1}
        First label.
    channel_axis : None
        Must be None: only single-channel 2D images are supported.
    search_radius : float or None, keyword-only
        Half-width of each centre's search window. None: scikit-image's window, 2 grid steps of the full
        image for that many seeds on each side (4S x 4S), hence the same labels. A number r: r * S on each
        side with S = sqrt(segmented pixels / seeds), the seed spacing in the mask (or the image); r = 1 is
        the 2S x 2S window of Achanta et al., 2-4 times less work per iteration.
    spread_iter : int or None, keyword-only
        With a mask: iterations of the colour-blind pass that spreads the seeds over the mask before SLIC
        proper. None = ``max_num_iter`` (scikit-image); 0 uses the k-means seeds as they are.

    Returns
    -------
    labels : (H, W) int32
        Superpixel labels from ``start_label``; ``start_label - 1`` outside the mask.

    Raises
    ------
    ValueError
        Non-2D or multichannel input, NaN/Inf inside the mask, an empty mask, a mask of another shape, or a
        parameter out of range; the one-line message names the argument.
    """
    arr = _checked_image(image, channel_axis)
    _check_slic_numbers(n_segments, compactness, max_num_iter, min_size_factor, max_size_factor, search_radius,
                        spread_iter)
    if isinstance(start_label, bool) or start_label not in (0, 1):
        raise ValueError(f"slic: start_label must be 0 or 1, got {start_label!r}")
    sp_y, sp_x = _pair(1.0 if spacing is None else spacing, "spacing", positive=True)
    sig_y, sig_x = _pair(sigma, "sigma", positive=False)
    if np.ndim(sigma) == 0:  # a scalar sigma is in physical units, as in scikit-image
        sig_y, sig_x = sig_y / sp_y, sig_x / sp_x

    h, w = arr.shape
    img = np.ascontiguousarray(arr, dtype=np.float32)
    use_mask = mask is not None
    m8 = _mask_u8(mask, arr.shape) if use_mask else _NO_MASK
    imin, imax, n_pix = _checked_range(img, m8, use_mask)
    if sig_y > 0 or sig_x > 0:
        img = _smoothed(img, imin, imax, use_mask, sig_y, sig_x)
        imin, imax = np.float32(0.0), np.float32(1.0)

    if use_mask:
        n_c = min(int(n_segments), int(n_pix))
        gy0 = gst_y = gx0 = gst_x = 0
        seg_size = n_pix / n_c
        grid_step = 0.0
    else:
        gy0, gst_y, gx0, gst_x = _grid(h, w, int(n_segments))
        n_c = len(range(gy0, h, gst_y)) * len(range(gx0, w, gst_x))
        seg_size = h * w / n_c
        grid_step = float(max(1, gst_y, gst_x))
    # scikit-image sizes the search window from the full-image grid for the actual number of seeds
    _, win_y, _, win_x = _grid(h, w, n_c)
    if search_radius is None:
        half_y, half_x = 2.0 * win_y, 2.0 * win_x
    else:
        half_y = half_x = float(search_radius) * math.sqrt(seg_size)
    out = np.empty(h * w, dtype=np.int32)
    K.slic_core(img, m8, use_mask, imin, imax, 1.0 / float(compactness), n_c, gy0, gst_y, gx0, gst_x,
                grid_step, float(max(win_y, win_x)), half_y, half_x,
                int(max_num_iter), int(max_num_iter if spread_iter is None else spread_iter), sp_y, sp_x,
                bool(enforce_connectivity), int(min_size_factor * seg_size), max(1, int(max_size_factor * seg_size)),
                int(start_label), out)
    return out.reshape(h, w)


def _checked_image(image: Any, channel_axis: Any) -> np.ndarray:
    """``image`` as an array, refused unless it is a non-empty 2D array of real numbers."""
    if channel_axis is not None:
        raise ValueError(f"slic: channel_axis={channel_axis!r} means a multichannel image; this SLIC segments "
                         "2D grey images only, use channel_axis=None")
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"slic: image must be a 2D single-channel array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"slic: image is empty (shape {arr.shape})")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"slic: image must hold real numbers, got dtype {arr.dtype}")
    return arr


def _mask_u8(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """A C-contiguous uint8 view (1 inside) of a mask of ``shape``; any nonzero value counts as inside."""
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"slic: mask shape {m.shape} differs from image shape {shape}")
    return np.ascontiguousarray(m if m.dtype == np.bool_ else m != 0).view(np.uint8)


def _checked_range(img: np.ndarray, m8: np.ndarray, use_mask: bool) -> tuple[np.float32, np.float32, int]:
    """(min, max, pixel count) of ``img`` over the mask (or everywhere); refuses an empty mask and NaN/Inf."""
    imin, imax, status, n_pix = K.masked_range(img, m8, use_mask)
    where = " inside the mask" if use_mask else ""
    if use_mask and n_pix == 0:
        raise ValueError("slic: mask is empty: there is no pixel to segment")
    if status == K.STATUS_NAN:
        raise ValueError(f"slic: image contains NaN values{where}")
    if status == K.STATUS_INF:
        raise ValueError(f"slic: image contains infinite values{where}")
    return imin, imax, n_pix


def _smoothed(img: np.ndarray, imin: np.float32, imax: np.float32, use_mask: bool, sig_y: float,
              sig_x: float) -> np.ndarray:
    """The [0, 1]-rescaled image smoothed as scikit-image does (reflect borders, truncate 4), float32."""
    from scipy.ndimage import gaussian_filter

    # (outside a mask, values take part in the smoothing as in scikit-image; NaN/Inf there count as the min)
    base = np.where(np.isfinite(img), img, np.float32(imin)) if use_mask else img
    base = base - np.float32(imin)
    if imax != imin:
        base = base / np.float32(imax - imin)
    return np.ascontiguousarray(gaussian_filter(base, (sig_y, sig_x), mode="reflect", truncate=4.0),
                                dtype=np.float32)


# --------------------------------------------------------------------------------------------- dispatch
def pseudolabels(raw_slice: np.ndarray, fg: np.ndarray, cfg: Any) -> np.ndarray:
    """Superpixel pseudo-label map of one slice, restricted to the body mask.

    Parameters
    ----------
    raw_slice : (H, W) float32
        Source intensities of the slice (``PreparedVolume.raw[:, :, z]``), not z-scored. SLIC gets no other
        normalisation: ``slic`` rescales the slice to [0, 1] by its min and max inside the body mask, as
        scikit-image's maskSLIC does. So a per-volume z-score or any affine rescaling gives the same labels,
        and with scikit-image itself this input reproduces the reference figures on CHAOS (K = 50, m = 0.1:
        ~46 superpixels per slice, boundary recall 0.724, ASA 0.979; 558 slices with organs, r = 1).
    fg : (H, W) bool
        Body mask (method.md 1.6).
    cfg : engine.config.SuperpixelConfig
        ``cfg.method`` picks ``slic`` | ``felzenszwalb`` | ``meanshift``; the sub-section of that name holds
        its parameters. ``slic.mask`` False runs SLIC on the whole slice and clips the result to the body.

    Returns
    -------
    labels : (H, W) int32
        0 outside the body, consecutive ids 1..K inside it; all zeros when ``fg`` is empty. The same input
        and parameters give the same labels whatever the number of threads calling at once.

    Raises
    ------
    ValueError
        A slice that is not 2D, a mask of another shape, NaN/Inf inside the body, an unknown method.
    """
    raw = np.asarray(raw_slice)
    fgm = np.asarray(fg)
    if raw.ndim != 2:
        raise ValueError(f"pseudolabels: raw_slice must be 2D, got shape {raw.shape}")
    if fgm.shape != raw.shape:
        raise ValueError(f"pseudolabels: fg mask shape {fgm.shape} differs from slice shape {raw.shape}")
    if fgm.dtype != np.bool_:
        fgm = fgm != 0
    method = cfg.method
    if method not in ("slic", "felzenszwalb", "meanshift"):
        raise ValueError(f"pseudolabels: unknown method {method!r} (slic, felzenszwalb, meanshift)")
    if not fgm.any():
        return np.zeros(raw.shape, dtype=np.int32)
    if method == "slic":
        s = cfg.slic
        labels = slic(raw, n_segments=s.n_segments, compactness=s.compactness, max_num_iter=s.max_num_iter,
                      sigma=s.sigma, mask=fgm if s.mask else None, enforce_connectivity=True,
                      min_size_factor=s.min_size_factor, max_size_factor=s.max_size_factor, start_label=1,
                      search_radius=s.search_radius, spread_iter=s.spread_iter)
        # with the mask, every body pixel already has one of the consecutive labels 1..K and the rest is 0
        return labels if s.mask else _clip_consecutive(labels, fgm)
    if method == "felzenszwalb":
        f = cfg.felzenszwalb
        return felzenszwalb_pseudolabels(raw, fgm, f.scale, f.sigma, f.min_size, f.faithful)
    ms = cfg.meanshift
    return meanshift_pseudolabels(raw, fgm, ms.kernel_size, ms.max_dist, ms.ratio, ms.sigma)


def pseudolabels_u16(raw_slice: np.ndarray, fg: np.ndarray, cfg: Any) -> tuple[np.ndarray, int]:
    """``pseudolabels`` as the engine stores them: uint16 labels and their number.

    maskSLIC without smoothing (the default) runs in one GIL-free call (``_kernels.masked_slic_u16``: the
    range check, the parameters, SLIC and the uint16 copy), with the labels of ``pseudolabels``; with many
    worker threads every extra call costs a wait for the GIL. Other settings go through ``pseudolabels``.

    Parameters
    ----------
    raw_slice, fg, cfg : as ``pseudolabels``

    Returns
    -------
    labels : (H, W) uint16, or int32 when there are more than 65535 superpixels
    n : int
        The largest label (labels start at 1 inside the body mask, 0 outside; 0 for an empty mask), which
        the store records as the slice's number of superpixels.

    Raises
    ------
    ValueError
        As ``pseudolabels``.
    """
    args = engine_slic_args(raw_slice, cfg)
    fast = (args is not None and isinstance(fg, np.ndarray) and fg.dtype == np.bool_ and fg.shape == raw_slice.shape
            and fg.flags.c_contiguous)
    if not fast:
        labels = pseudolabels(raw_slice, fg, cfg)
        n = int(labels.max()) if labels.size else 0
        return (labels.astype(np.uint16) if n <= 0xFFFF else labels), n
    h, w = raw_slice.shape
    out = np.empty(h * w, dtype=np.int32)
    out16 = np.empty((h, w), dtype=np.uint16)
    n, status = K.masked_slic_u16(raw_slice, fg.view(np.uint8), *args, out, out16.reshape(-1))
    check_slic_status(status)
    return (out16 if n <= 0xFFFF else out.reshape(h, w)), int(n)


def engine_slic_args(raw_slice: Any, cfg: Any) -> tuple | None:
    """The settings arguments of ``_kernels.masked_slic_u16`` (from ``n_segments`` to ``max_size_factor``) for
    ``raw_slice``, or None when the engine's one-call path does not apply: another method, smoothing, SLIC
    without the mask, or a slice that is not a non-empty C-contiguous 2D float32 array."""
    s = cfg.slic
    if not (cfg.method == "slic" and s.mask and s.sigma == 0 and isinstance(raw_slice, np.ndarray)
            and raw_slice.ndim == 2 and raw_slice.dtype == np.float32 and raw_slice.flags.c_contiguous
            and raw_slice.size > 0):
        return None
    h, w = raw_slice.shape
    table = _slic_plan(h, w, s.n_segments, s.compactness, s.max_num_iter, s.min_size_factor, s.max_size_factor,
                       s.search_radius, s.spread_iter)
    return (int(s.n_segments), 1.0 / float(s.compactness), table,
            -1.0 if s.search_radius is None else float(s.search_radius), int(s.max_num_iter),
            int(s.max_num_iter if s.spread_iter is None else s.spread_iter), float(s.min_size_factor),
            float(s.max_size_factor))


def check_slic_status(status: int) -> None:
    """Raise the ``slic`` error for a ``masked_slic_u16`` status other than OK."""
    if status == K.STATUS_NAN:
        raise ValueError("slic: image contains NaN values inside the mask")
    if status == K.STATUS_INF:
        raise ValueError("slic: image contains infinite values inside the mask")


@functools.lru_cache(maxsize=64)
def _slic_plan(h: int, w: int, n_segments, compactness, max_num_iter, min_size_factor, max_size_factor,
               search_radius, spread_iter) -> np.ndarray:
    """Checks the SLIC settings once per run and tabulates ``_grid(h, w, k)`` for every number of seeds k a
    slice can get (1..min(n_segments, h * w)), which ``masked_slic_u16`` looks up."""
    _check_slic_numbers(n_segments, compactness, max_num_iter, min_size_factor, max_size_factor, search_radius,
                        spread_iter)
    k_max = min(int(n_segments), h * w)
    table = np.zeros((k_max + 1, 4), dtype=np.int64)
    for k in range(1, k_max + 1):
        table[k] = _grid(h, w, k)
    table.flags.writeable = False
    return table


def _clip_consecutive(labels: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Labels outside ``fg`` -> 0, the rest renumbered 1..K in raster order of first appearance."""
    lab = (np.where(fg, labels, 0).astype(np.int32) - 1).ravel()  # 0 -> -1: "no superpixel"
    out = np.empty_like(lab)
    K.relabel_consecutive(lab, out, 1)
    return out.reshape(labels.shape)


def felzenszwalb_pseudolabels(*args: Any, **kwargs: Any) -> np.ndarray:
    """The SSL-ALPNet Felzenszwalb recipe (method.md 1.7): ``engine.recipes.felzenszwalb_pseudolabels``.

    Imported on first use, so this module works while ``engine.recipes`` is absent.
    """
    from . import recipes

    return recipes.felzenszwalb_pseudolabels(*args, **kwargs)


def meanshift_pseudolabels(*args: Any, **kwargs: Any) -> np.ndarray:
    """The MeanShift pseudo-label recipe: ``engine.recipes.meanshift_pseudolabels`` (imported on first use)."""
    from . import recipes

    return recipes.meanshift_pseudolabels(*args, **kwargs)
