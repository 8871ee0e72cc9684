"""Numba kernels behind :mod:`engine.superpixels` (2D grey-level SLIC / maskSLIC).

Everything here is ``njit(nogil=True, cache=True)`` on plain arrays and scalars, so a call releases the GIL
for its whole duration and several threads can run SLIC on different slices at the same time. The public,
validated entry point is :func:`engine.superpixels.slic`; these functions trust their arguments.

How the SLIC iterations are laid out
------------------------------------
* Work arrays are flat and row-padded: the row stride is at least W + 16 and a multiple of 16, so every row
  segment of a search window is swept in whole 16-lane SIMD blocks. A pixel's internal label is the index
  ``k`` of its centre, -1 for "none" (outside the mask, padding, or never inside a search window).
* Assignment is centre-major: each live centre sweeps its own window and keeps, per pixel, the smallest
  distance seen so far (``best``) and the centre that gave it, with a branch-free select that LLVM turns into
  masked AVX-512 / AVX2 code. Pixels that must never be assigned (outside the mask, padding) start a sweep
  with ``best = -inf``; the columns a SIMD block covers beyond the window get a spatial term of ``+inf``.
  Neither needs a test in the loop. This relies on IEEE infinities, so the sweep is compiled without
  fastmath (which would also contract multiply-adds and round distances differently from scikit-image).
* Centre update: one pass over the runs of equal labels of each row; a run's row and column sums have
  closed forms and its intensity sum is a difference of row prefix sums (computed once per slice).
* Centres are float32 (row, column, intensity), as in scikit-image for a float32 image. Positions are means
  of exact integer sums, so they equal scikit-image's; intensity sums are summed in another order, so a
  centre intensity can differ in its last bit (the parity tests bound the effect).
"""
from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True)

STATUS_OK = 0
STATUS_NAN = 1
STATUS_INF = 2

_I32_MAX = 2147483647
_I32_MIN = -2147483648


@njit(**_JIT)
def _aligned_f32(n):
    """Uninitialised float32 array of ``n`` elements starting on a 64-byte (cache line, AVX-512) boundary."""
    raw = np.empty(n + 16, dtype=np.float32)
    off = ((-raw.ctypes.data) % 64) // 4
    return raw[off:off + n]


@njit(**_JIT)
def _aligned_i32(n):
    """Uninitialised int32 array of ``n`` elements starting on a 64-byte boundary."""
    raw = np.empty(n + 16, dtype=np.int32)
    off = ((-raw.ctypes.data) % 64) // 4
    return raw[off:off + n]


# --------------------------------------------------------------------------------------------- input range
@njit(**_JIT)
def _order_key(bits):
    # float32 bit pattern -> integer with the same order as the float (monotone for all finite values)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@njit(**_JIT)
def masked_range(img, mask, use_mask):
    """Min and max of ``img`` over the mask (or everywhere), its pixel count and a non-finite status.

    Parameters
    ----------
    img : (H, W) float32, C-contiguous
    mask : (H, W) uint8 (read only when ``use_mask``)

    Returns
    -------
    imin, imax : float32
    status : int
        STATUS_NAN or STATUS_INF when such a value lies inside the mask, else STATUS_OK. Values outside
        the mask are ignored, as in scikit-image.
    n : int
        Number of pixels considered.
    """
    h, w = img.shape
    bits = img.reshape(-1).view(np.int32)
    flat_mask = mask.reshape(-1)
    kmin = np.int64(_I32_MAX)
    kmax = np.int64(_I32_MIN)
    bad = False
    n = 0
    # min / max on order-preserving integer keys: integer reductions vectorise without fastmath
    if use_mask:
        for i in range(h * w):
            b = np.int64(bits[i])
            inside = flat_mask[i] != 0
            key = _order_key(b)
            bad = bad | (((b & 0x7F800000) == 0x7F800000) & inside)
            kmin = min(kmin, key if inside else np.int64(_I32_MAX))
            kmax = max(kmax, key if inside else np.int64(_I32_MIN))
            n += inside
    else:
        for i in range(h * w):
            b = np.int64(bits[i])
            key = _order_key(b)
            bad = bad | ((b & 0x7F800000) == 0x7F800000)
            kmin = min(kmin, key)
            kmax = max(kmax, key)
        n = h * w
    status = STATUS_OK
    if bad:
        flat = img.reshape(-1)
        for i in range(h * w):
            if use_mask and flat_mask[i] == 0:
                continue
            v = flat[i]
            if v != v:
                status = STATUS_NAN
                break
            if v == np.inf or v == -np.inf:
                status = STATUS_INF
    tmp = np.empty(2, dtype=np.int32)
    tmp[0] = np.int32(_order_key(kmin))
    tmp[1] = np.int32(_order_key(kmax))
    vals = tmp.view(np.float32)
    return vals[0], vals[1], status, n


# --------------------------------------------------------------------------------------------- seeding
@njit(**_JIT)
def grid_seeds(h, w, start_y, step_y, start_x, step_x, cy, cx):
    """Centres on the regular grid ``start::step`` of each axis (scikit-image ``regular_grid``)."""
    k = 0
    for y in range(start_y, h, step_y):
        for x in range(start_x, w, step_x):
            cy[k] = y
            cx[k] = x
            k += 1
    return k


@njit(**_JIT)
def _nearest_assign(py, px, n_pts, cy, cx, n_c, best, lab):
    # centre-major like the SLIC sweep; float32 and unsigned indices so the inner loop vectorises
    best[:] = np.inf
    lab[:] = 0
    n = np.uint64(n_pts)
    for k in range(n_c):
        yk = np.float32(cy[k])
        xk = np.float32(cx[k])
        kk = np.int32(k)
        for i in range(n):
            dy = py[i] - yk
            dx = px[i] - xk
            d = dy * dy + dx * dx
            old = best[i]
            m = d < old
            best[i] = d if m else old
            lab[i] = kk if m else lab[i]


@njit(**_JIT)
def mask_box(mask):
    """(pixel count, first row, last row, first column, last column) of a non-empty uint8 mask."""
    h, w = mask.shape
    n_mask = 0
    y0 = h
    y1 = -1
    x0 = w
    x1 = -1
    for y in range(h):
        first = -1
        last = -1
        for x in range(w):
            if mask[y, x]:
                n_mask += 1
                if first < 0:
                    first = x
                last = x
        if first >= 0:
            y0 = min(y0, y)
            y1 = y
            x0 = min(x0, first)
            x1 = max(x1, last)
    return n_mask, y0, y1, x0, x1


@njit(**_JIT)
def mask_seeds(mask, n_want, cy, cx):
    """Seeds spread homogeneously over a mask: k-means on the mask's pixel coordinates (maskSLIC step 1).

    scikit-image draws ``n`` random mask pixels with a fixed seed and refines them with 5 k-means iterations
    over a random subset of ~100 n mask pixels. Here both choices are deterministic: the starting points are
    the first mask pixels hit by the plastic-number (R2) low-discrepancy sequence over the mask's bounding
    box, and the k-means runs on a regular sub-grid of the mask with about 25 n points (a regular sub-grid
    covers the mask evenly with fewer points than a random subset needs). A seed whose
    cluster mean falls outside the mask (a non-convex mask) is moved to the nearest sub-grid point, so every
    seed lies inside the mask.

    Parameters
    ----------
    mask : (H, W) uint8
    n_want : int
        Number of seeds; ``min(n_want, mask.sum())`` are returned.
    cy, cx : (>= n_want,) float64
        Output seed coordinates (row, column), filled in place.

    Returns
    -------
    n : int
        Number of seeds written.
    """
    n_mask, y0, y1, x0, x1 = mask_box(mask)
    return _mask_seeds(mask, n_want, cy, cx, n_mask, y0, y1, x0, x1, 5, 25)


@njit(**_JIT)
def _mask_seeds(mask, n_want, cy, cx, n_mask, y0, y1, x0, x1, lloyd_iter, density):
    """``mask_seeds`` given the mask's pixel count and bounding box (rows y0..y1, columns x0..x1)."""
    n = min(n_want, n_mask)
    if n <= 0:
        return 0
    _starting_points(mask, n, cy, cx, n_mask, y0, y1, x0, x1)
    py, px = _kmeans_points(mask, n, n_mask, y0, y1, x0, x1, density)
    _lloyd(py, px, cy, cx, n, lloyd_iter)
    _snap_into_mask(mask, py, px, cy, cx, n)
    return n


@njit(**_JIT)
def _starting_points(mask, n, cy, cx, n_mask, y0, y1, x0, x1):
    """Fill ``cy`` / ``cx`` with ``n`` distinct mask pixels: the first ones the R2 sequence hits in the box."""
    bh = y1 - y0 + 1
    bw = x1 - x0 + 1
    taken = np.zeros((bh, bw), dtype=np.uint8)
    # R2 sequence (Roberts 2018): alpha = (1/g, 1/g^2), g the plastic number; well spread for any prefix
    g = 1.32471795724474602596
    a1 = 1.0 / g
    a2 = 1.0 / (g * g)
    k = 0
    i = 0
    max_tries = 64 * n + 4 * bh * bw
    while k < n and i < max_tries:
        u = (0.5 + a1 * i) % 1.0
        v = (0.5 + a2 * i) % 1.0
        i += 1
        yy = int(u * bh)
        xx = int(v * bw)
        if mask[y0 + yy, x0 + xx] and not taken[yy, xx]:
            taken[yy, xx] = 1
            cy[k] = y0 + yy
            cx[k] = x0 + xx
            k += 1
    if k < n:
        # a very thin mask: take the remaining seeds at evenly spaced ranks among the unused mask pixels
        free = n_mask - k
        need = n - k
        rank = 0
        nxt = 0
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if mask[y, x] and not taken[y - y0, x - x0]:
                    if k < n and rank == (nxt * free) // need:
                        cy[k] = y
                        cx[k] = x
                        k += 1
                        nxt += 1
                    rank += 1


@njit(**_JIT)
def _kmeans_points(mask, n, n_mask, y0, y1, x0, x1, density):
    """The k-means points (rows, columns; float32): a regular sub-grid of the mask about ``density`` times
    denser than the ``n`` seeds, or every mask pixel when the sub-grid has fewer than ``n`` points."""
    stride = max(1, int(np.sqrt(n_mask / (density * n))))
    off = stride // 2
    n_pts = 0
    for y in range(y0 + off, y1 + 1, stride):
        for x in range(x0 + off, x1 + 1, stride):
            if mask[y, x]:
                n_pts += 1
    if n_pts < n:
        stride = 1
        off = 0
        n_pts = n_mask
    py = np.empty(n_pts, dtype=np.float32)
    px = np.empty(n_pts, dtype=np.float32)
    j = 0
    for y in range(y0 + off, y1 + 1, stride):
        for x in range(x0 + off, x1 + 1, stride):
            if mask[y, x]:
                py[j] = y
                px[j] = x
                j += 1
    return py, px


@njit(**_JIT)
def _lloyd(py, px, cy, cx, n, lloyd_iter):
    """``lloyd_iter`` k-means iterations of the ``n`` centres ``cy`` / ``cx`` over the points, in place."""
    n_pts = py.shape[0]
    best = np.empty(n_pts, dtype=np.float32)
    lab = np.empty(n_pts, dtype=np.int32)
    sy = np.empty(n, dtype=np.float64)
    sx = np.empty(n, dtype=np.float64)
    cnt = np.empty(n, dtype=np.int64)
    for _ in range(lloyd_iter):
        _nearest_assign(py, px, n_pts, cy, cx, n, best, lab)
        sy[:] = 0.0
        sx[:] = 0.0
        cnt[:] = 0
        for i in range(n_pts):
            c = lab[i]
            sy[c] += py[i]
            sx[c] += px[i]
            cnt[c] += 1
        for c in range(n):
            if cnt[c] > 0:  # an empty cluster keeps its centre, as scipy's kmeans2 does
                cy[c] = sy[c] / cnt[c]
                cx[c] = sx[c] / cnt[c]


@njit(**_JIT)
def _snap_into_mask(mask, py, px, cy, cx, n):
    """Move each centre whose rounded position is outside the mask (the mean of a cluster can fall outside a
    non-convex mask) to the nearest k-means point, so every seed lies inside the mask."""
    h, w = mask.shape
    for c in range(n):
        yy = int(np.floor(cy[c] + 0.5))
        xx = int(np.floor(cx[c] + 0.5))
        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx]:
            continue
        best_d = np.inf
        for i in range(py.shape[0]):
            d = (py[i] - cy[c]) ** 2 + (px[i] - cx[c]) ** 2
            if d < best_d:
                best_d = d
                yy = int(py[i])
                xx = int(px[i])
        cy[c] = yy
        cx[c] = xx


@njit(**_JIT)
def mean_nn_steps(cy, cx, n):
    """Mean absolute row / column offset from each seed to its nearest other seed (scikit-image's ``steps``)."""
    sum_y = 0.0
    sum_x = 0.0
    for i in range(n):
        best = np.inf
        j_best = i
        for j in range(n):
            if j == i:
                continue
            dy = cy[i] - cy[j]
            dx = cx[i] - cx[j]
            d = dy * dy + dx * dx
            if d < best:
                best = d
                j_best = j
        sum_y += abs(cy[i] - cy[j_best])
        sum_x += abs(cx[i] - cx[j_best])
    return sum_y / n, sum_x / n


# --------------------------------------------------------------------------------------------- k-means
@njit(**_JIT)
def _sweep(img, best, lab, stride, lo, hi, cy, cx, cc, alive, n_c, half_y, half_x, h, w, sw, sp_y, sp_x,
           use_color, dxs):
    """One assignment step: every live centre scans its window, keeping each pixel's nearest centre.

    ``half_y`` / ``half_x`` are the window half-widths (float32; scikit-image: 2 * grid step). ``dxs``
    (length >= stride) must hold +inf on entry and is restored before returning. Returns True if any pixel
    was reached.
    """
    any_pixel = False
    one = np.float32(1.0)
    zero = np.float32(0.0)
    inf = np.float32(np.inf)
    hf = np.float32(h)
    wf = np.float32(w)
    for k in range(n_c):
        if not alive[k]:
            continue
        yc = cy[k]
        xc = cx[k]
        c = cc[k]
        kk = np.int32(k)
        # window bounds as scikit-image computes them (float32, truncated toward zero)
        ya = int(max(yc - half_y, zero))
        yb = int(min(yc + half_y + one, hf))
        xa = int(max(xc - half_x, zero))
        xb = int(min(xc + half_x + one, wf))
        if xb <= xa or yb <= ya:
            continue
        for x in range(xa, xb):
            t = sp_x * (xc - np.float32(x))
            dxs[x] = t * t
        for y in range(ya, yb):
            a = max(xa, lo[y])
            b = min(xb, hi[y])
            if b <= a:
                continue
            any_pixel = True
            t = sp_y * (yc - np.float32(y))
            dy2 = t * t
            # whole aligned 16-lane blocks (the arrays are 64-byte aligned, the stride a multiple of 16);
            # unsigned indices: numba then emits no negative-index wrap-around and the loop vectorises
            a &= ~15
            n16 = np.uint64((b - a + 15) & ~15)
            base = np.uint64(y * stride + a)
            da = np.uint64(a)
            if use_color:
                for j in range(n16):
                    i = base + j
                    t2 = img[i] - c
                    d = (dy2 + dxs[da + j]) * sw + t2 * t2
                    old = best[i]
                    m = d < old
                    best[i] = d if m else old
                    lab[i] = kk if m else lab[i]
            else:
                for j in range(n16):
                    i = base + j
                    d = (dy2 + dxs[da + j]) * sw
                    old = best[i]
                    m = d < old
                    best[i] = d if m else old
                    lab[i] = kk if m else lab[i]
        for x in range(xa, xb):
            dxs[x] = inf
    return any_pixel


@njit(**_JIT)
def _update(lab, stride, pw, h, lo, hi, prefix, cy, cx, cc, alive, n_c, cnt, s_y, s_x, s_c):
    """Move every centre to the mean (row, column, intensity) of its pixels.

    One pass over the runs of equal labels in each row: a run adds its length, its row and column sums
    (closed forms) and its intensity sum (a difference of the row prefix sums ``prefix``, row stride ``pw``).
    Pixels that no window reached in this sweep still carry their previous label and count for it, as in
    scikit-image. (A branch-free two-phase variant, run ends first, measured slower.)
    """
    cnt[:] = 0
    s_y[:] = 0
    s_x[:] = 0
    s_c[:] = 0.0
    for y in range(h):
        a = lo[y]
        b = hi[y]
        if b <= a:
            continue
        base = y * stride
        pb = y * pw
        k = lab[base + a]
        x0 = a
        for x in range(a + 1, b + 1):
            kn = lab[base + x] if x < b else np.int32(-2)
            if kn != k:
                if k >= 0:
                    n = x - x0
                    cnt[k] += n
                    s_y[k] += n * y
                    s_x[k] += (x0 + x - 1) * n  # twice the column sum
                    s_c[k] += prefix[pb + x] - prefix[pb + x0]
                k = kn
                x0 = x
    for k in range(n_c):
        if cnt[k] == 0:
            # scikit-image divides by zero here and the centre becomes NaN: it never wins a pixel again
            alive[k] = False
            continue
        nf = np.float32(cnt[k])
        cy[k] = np.float32(s_y[k]) / nf
        cx[k] = np.float32(0.5 * s_x[k]) / nf
        cc[k] = np.float32(s_c[k]) / nf


@njit(**_JIT)
def kmeans_passes(img, stride, base_best, lo, hi, prefix, pw, h, w, cy, cx, cc, alive, n_c, n_iter, step,
                  half_y, half_x, sp_y, sp_x, use_color, lab):
    """``n_iter`` SLIC iterations (assign, update) in place on the centres; ``lab`` gets the last assignment.

    ``img``, ``base_best`` and ``lab`` are padded (row stride ``stride``); ``base_best`` is +inf where a
    pixel may be assigned and -inf elsewhere. ``lab`` is reset to -1 once, not per iteration: a pixel that no
    window reaches keeps its previous label, as in scikit-image.
    """
    best = _aligned_f32(h * stride)
    dxs = _aligned_f32(stride)
    dxs[:] = np.inf
    cnt = np.empty(n_c, dtype=np.int64)
    s_y = np.empty(n_c, dtype=np.int64)
    s_x = np.empty(n_c, dtype=np.int64)
    s_c = np.empty(n_c, dtype=np.float64)
    # scikit-image: spatial_weight = 1.0 / (step * step) with a C float step, stored as float32
    sw = np.float32(1.0 / np.float32(np.float32(step) * np.float32(step)))
    lab[:] = -1
    for it in range(n_iter):
        best[:] = base_best
        changed = _sweep(img, best, lab, stride, lo, hi, cy, cx, cc, alive, n_c, half_y, half_x, h, w, sw,
                         np.float32(sp_y), np.float32(sp_x), use_color, dxs)
        if not changed:
            break
        if use_color and it == n_iter - 1:
            break  # the centres after the last sweep of the SLIC pass are never used (scikit-image computes them)
        _update(lab, stride, pw, h, lo, hi, prefix, cy, cx, cc, alive, n_c, cnt, s_y, s_x, s_c)


# --------------------------------------------------------------------------------------------- connectivity
@njit(**_JIT)
def _find(parent, i):
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


@njit(**_JIT)
def _bfs_component(lab, ls, out, h, w, y, x, cur, mask_label, limit, qy, qx):
    """scikit-image's breadth-first search from (y, x): gives up to ``limit`` pixels the label ``cur``.

    ``lab`` has row stride ``ls``, ``out`` row stride ``w``. Returns (size, adjacent): ``adjacent`` is the
    last already-labelled neighbour of another segment met during the search, in scikit-image's neighbour
    order (x+1, x-1, y+1, y-1), or ``cur`` if there is none.
    """
    label = lab[y * ls + x]
    out[y * w + x] = cur
    qy[0] = y
    qx[0] = x
    size = 1
    visited = 0
    adjacent = cur
    while visited < size and size < limit:
        vy = qy[visited]
        vx = qx[visited]
        for d in range(4):
            ny = vy
            nx = vx
            if d == 0:
                nx = vx + 1
            elif d == 1:
                nx = vx - 1
            elif d == 2:
                ny = vy + 1
            else:
                ny = vy - 1
            if nx < 0 or nx >= w or ny < 0 or ny >= h:
                continue
            j = ny * w + nx
            if lab[ny * ls + nx] == label and out[j] == mask_label:
                out[j] = cur
                qy[size] = ny
                qx[size] = nx
                size += 1
                if size >= limit:
                    break
            elif out[j] > mask_label and out[j] != cur:
                adjacent = out[j]
        visited += 1
    return size, adjacent


@njit(**_JIT)
def _connectivity_bfs(lab, ls, out, h, w, min_size, max_size, start_label):
    """scikit-image's connectivity enforcement, pixel by pixel (used when a segment reaches ``max_size``)."""
    mask_label = start_label - 1
    out[:] = mask_label
    qy = np.empty(max_size, dtype=np.int64)
    qx = np.empty(max_size, dtype=np.int64)
    cur = start_label
    for y in range(h):
        for x in range(w):
            if lab[y * ls + x] < 0 or out[y * w + x] != mask_label:
                continue
            size, adjacent = _bfs_component(lab, ls, out, h, w, y, x, cur, mask_label, max_size, qy, qx)
            if size < min_size:
                for q in range(size):
                    out[qy[q] * w + qx[q]] = adjacent
            else:
                cur += 1
    return cur - start_label


@njit(**_JIT)
def _adjacent_of(order, n, rix, root_of, fin, pad, cur):
    """The ``adjacent`` label scikit-image's search would end with for a component visited in ``order``.

    scikit-image keeps the last labelled neighbour of another segment met while it visits the pixels
    (neighbours in the order x+1, x-1, y+1, y-1); scanning the visit order backwards and the neighbours in
    reverse gives the same answer at the first hit. A neighbour is labelled when its component was met
    earlier in the raster scan, and then carries that component's final label ``fin`` (-1: not yet met).
    """
    for t in range(n - 1, -1, -1):
        i = order[t]
        for d in range(4):
            if d == 0:
                q = i - pad
            elif d == 1:
                q = i + pad
            elif d == 2:
                q = i - 1
            else:
                q = i + 1
            root = root_of[rix[q]]
            if root >= 0:
                f = fin[root]
                if f >= 0 and f != cur:
                    return f
    return cur


@njit(**_JIT)
def _row_runs(lab, ls, h, w, rix, pad):
    """Runs of equal label along each row of ``lab`` (row stride ``ls``), and every pixel's run in ``rix``.

    Run 0 is a dummy standing for "no segment" (outside the mask, and the frame of ``rix``, whose rows have
    a stride of ``pad`` = w + 1 and which has an extra row above and below, so the searches need no bounds
    tests). Returns (x0, x1 (exclusive), row, label) per run, ``row_start`` (H + 1,) and the number of runs.
    """
    cap = h * w + 2
    run_x0 = np.empty(cap, dtype=np.int32)
    run_x1 = np.empty(cap, dtype=np.int32)
    run_y = np.empty(cap, dtype=np.int32)
    run_k = np.empty(cap, dtype=np.int32)
    row_start = np.empty(h + 1, dtype=np.int64)
    run_k[0] = -1
    run_x0[0] = 0
    run_x1[0] = 0
    run_y[0] = -1
    n_runs = 1
    uw = np.uint64(w)
    one = np.uint64(1)
    for y in range(h):
        row_start[y] = n_runs
        lb = np.uint64(y * ls)
        rb = np.uint64((y + 1) * pad)
        # branch-free: every pixel gets the index of its run (the count of label changes so far)
        r = np.uint64(n_runs)
        run_x0[r] = 0
        rix[rb] = np.int32(r)
        for x in range(one, uw):
            run_x0[r + one] = np.int32(x)  # start of the next run, kept only if the label changes here
            r += np.uint64(lab[lb + x] != lab[lb + x - one])
            rix[rb + x] = np.int32(r)
        n_row = np.int64(r) + 1
        for q in range(n_runs, n_row):
            run_x1[q] = run_x0[q + 1] if q + 1 < n_row else np.int32(w)
            run_y[q] = y
            run_k[q] = lab[lb + np.uint64(run_x0[q])]
        n_runs = n_row
    row_start[h] = n_runs
    return run_x0, run_x1, run_y, run_k, row_start, n_runs


@njit(**_JIT)
def _union_runs(run_x0, run_x1, run_k, row_start, h, n_runs):
    """Union-find over runs: a run joins the runs of the row above that overlap it with the same label.
    Returns ``parent`` (n_runs,) int32, -1 for runs outside the mask."""
    parent = np.empty(n_runs, dtype=np.int32)
    for r in range(n_runs):
        parent[r] = r if run_k[r] >= 0 else -1
    for y in range(1, h):
        p = row_start[y - 1]
        p_end = row_start[y]
        for r in range(row_start[y], row_start[y + 1]):
            k = run_k[r]
            if k < 0:
                continue
            x0 = run_x0[r]
            x1 = run_x1[r]
            while p < p_end and run_x1[p] <= x0:
                p += 1
            q = p
            pr = np.int32(-1)  # root of r so far (r itself is never the root once it touches a run above)
            while q < p_end and run_x0[q] < x1:
                if run_k[q] == k:
                    rq = _find(parent, q)
                    if pr < 0:
                        pr = rq
                    elif rq != pr:
                        # the root is always the component's first run in raster order
                        if rq < pr:
                            parent[pr] = rq
                            pr = rq
                        else:
                            parent[rq] = pr
                q += 1
            if pr >= 0:
                parent[r] = pr
            if q > p and run_x1[q - 1] > x1:
                p = q - 1  # the last overlapping run may also overlap the next run of this row
    return parent


@njit(**_JIT)
def _component_sizes(parent, run_x0, run_x1, n_runs, max_size):
    """Flatten ``parent`` to roots; return each root's pixel count, whether it spans several runs, and
    whether any component reaches ``max_size``."""
    size = np.zeros(n_runs, dtype=np.int64)
    multi = np.zeros(n_runs, dtype=np.bool_)
    big = False
    for r in range(1, n_runs):
        if parent[r] < 0:
            continue
        root = _find(parent, r)
        parent[r] = root
        size[root] += run_x1[r] - run_x0[r]
        if root != r:
            multi[root] = True
        if size[root] >= max_size:
            big = True
    return size, multi, big


@njit(**_JIT)
def _visit_order(r, run_x0, run_x1, run_y, multi, parent, rix, seen, order, pad):
    """Fill ``order`` with the pixels (``rix`` indices) of the small component rooted at run ``r`` in the
    order scikit-image's search visits them; returns their number."""
    base = (run_y[r] + 1) * pad
    if not multi[r]:
        m = 0
        for x in range(run_x0[r], run_x1[r]):
            order[m] = base + x
            m += 1
        return m
    # breadth-first (neighbours x+1, x-1, y+1, y-1 as in scikit-image); membership: the pixel's run belongs
    # to this component
    order[0] = base + run_x0[r]
    seen[order[0]] = 1
    m = 1
    v = 0
    while v < m:
        i = order[v]
        q = i + 1
        if seen[q] == 0 and parent[rix[q]] == r:
            seen[q] = 1
            order[m] = q
            m += 1
        q = i - 1
        if seen[q] == 0 and parent[rix[q]] == r:
            seen[q] = 1
            order[m] = q
            m += 1
        q = i + pad
        if seen[q] == 0 and parent[rix[q]] == r:
            seen[q] = 1
            order[m] = q
            m += 1
        q = i - pad
        if seen[q] == 0 and parent[rix[q]] == r:
            seen[q] = 1
            order[m] = q
            m += 1
        v += 1
    return m


@njit(**_JIT)
def _final_labels(parent, size, multi, run_x0, run_x1, run_y, rix, n_runs, h, pad, min_size, start_label):
    """Final label of every component (indexed by its root run), in raster order of its first pixel; a small
    component takes the neighbour scikit-image's search would merge it into. Returns (fin, next label)."""
    fin = np.full(n_runs, -1, dtype=np.int32)
    order = np.empty(max(min_size, 1), dtype=np.int64)
    seen = np.zeros((h + 2) * pad, dtype=np.uint8)
    cur = start_label
    for r in range(1, n_runs):
        if parent[r] != r:
            continue
        if size[r] >= min_size:
            fin[r] = cur
            cur += 1
            continue
        m = _visit_order(r, run_x0, run_x1, run_y, multi, parent, rix, seen, order, pad)
        fin[r] = cur  # its own pixels read as "cur" during the search, as in scikit-image
        fin[r] = _adjacent_of(order, m, rix, parent, fin, pad, cur)
    return fin, cur


@njit(**_JIT)
def _write_run_labels(rix, parent, fin, n_runs, out, h, w, pad, mask_label):
    """``out`` (H*W int32) = the final label of each pixel's component: one table lookup per pixel."""
    run_lab = np.empty(n_runs, dtype=np.int32)
    run_lab[0] = mask_label
    for r in range(1, n_runs):
        run_lab[r] = fin[parent[r]] if parent[r] >= 0 else mask_label
    uw = np.uint64(w)
    for y in range(h):
        ob = np.uint64(y * w)
        rb = np.uint64((y + 1) * pad)
        for x in range(uw):
            out[ob + x] = run_lab[rix[rb + x]]


@njit(**_JIT)
def enforce_connectivity(lab, ls, out, h, w, min_size, max_size, start_label):
    """Split labels into 4-connected segments and merge the segments under ``min_size`` into a neighbour.

    Same result as scikit-image's ``_enforce_label_connectivity_cython``: segments are numbered in raster
    order of their first pixel from ``start_label``; a small segment takes the label of the last labelled
    neighbour its breadth-first search meets (or, with none, the next label without using it up). Here the
    components come from a union-find over horizontal runs; only small segments spanning several rows need
    a per-pixel search (for its visiting order), and it tests membership only. scikit-image cuts a component
    at ``max_size`` pixels; that rare case runs the pixel-by-pixel algorithm instead.

    Parameters
    ----------
    lab : (H * ls,) int32
        Centre index per pixel with row stride ``ls`` (>= W); -1 where there is none (outside the mask).
    out : (H * W,) int32
        Output labels; ``start_label - 1`` where ``lab`` is -1.

    Returns
    -------
    n_labels : int
        Number of segments that took a label of their own (``start_label .. start_label + n_labels - 1``); a
        small segment with no labelled neighbour takes ``start_label + n_labels`` without using it up, so
        the largest label can be one more.
    """
    mask_label = start_label - 1
    pad = w + 1
    rix = np.zeros((h + 2) * pad, dtype=np.int32)
    run_x0, run_x1, run_y, run_k, row_start, n_runs = _row_runs(lab, ls, h, w, rix, pad)
    parent = _union_runs(run_x0, run_x1, run_k, row_start, h, n_runs)
    size, multi, big = _component_sizes(parent, run_x0, run_x1, n_runs, max_size)
    if big:
        return _connectivity_bfs(lab, ls, out, h, w, min_size, max_size, start_label)
    fin, cur = _final_labels(parent, size, multi, run_x0, run_x1, run_y, rix, n_runs, h, pad, min_size,
                             start_label)
    _write_run_labels(rix, parent, fin, n_runs, out, h, w, pad, mask_label)
    return cur - start_label


@njit(**_JIT)
def relabel_consecutive(lab, out, start):
    """Renumber the labels >= 0 of ``lab`` as ``start, start + 1, ...`` in raster order of first appearance;
    negative labels become ``start - 1``. Returns the number of distinct labels."""
    m = 0
    for i in range(lab.size):
        if lab[i] > m:
            m = lab[i]
    table = np.full(m + 1, -1, dtype=np.int64)
    nxt = 0
    for i in range(lab.size):
        v = lab[i]
        if v < 0:
            out[i] = start - 1
            continue
        if table[v] < 0:
            table[v] = nxt
            nxt += 1
        out[i] = start + table[v]
    return nxt


# --------------------------------------------------------------------------------------------- driver
@njit(**_JIT)
def _scale_rows(img, mask, use_mask, imin, div, r32, stride, scaled, base_best, lo, hi):
    """Fill the padded ``scaled`` intensities and ``base_best`` (+inf where a pixel may be assigned, -inf
    elsewhere) and each row's mask span ``lo[y]:hi[y]``; returns the number of mask pixels."""
    h, w = img.shape
    inf = np.float32(np.inf)
    zero = np.float32(0.0)
    imgf = img.reshape(-1)
    maskf = mask.reshape(-1)
    uw = np.uint64(w)
    n_mask = 0
    for y in range(h):
        ib = np.uint64(y * w)
        ob = np.uint64(y * stride)
        if use_mask:
            cnt = 0
            for x in range(uw):
                inside = maskf[ib + x] != 0
                # scikit-image's order of operations: subtract the minimum, divide by the range, weight
                v = ((imgf[ib + x] - imin) / div) * r32
                scaled[ob + x] = v if inside else zero
                base_best[ob + x] = inf if inside else -inf
                cnt += np.int64(inside)
            if cnt > 0:
                n_mask += cnt
                first = 0
                while maskf[ib + np.uint64(first)] == 0:
                    first += 1
                last = w - 1
                while maskf[ib + np.uint64(last)] == 0:
                    last -= 1
                lo[y] = first
                hi[y] = last + 1
        else:
            for x in range(uw):
                scaled[ob + x] = ((imgf[ib + x] - imin) / div) * r32
                base_best[ob + x] = inf
            lo[y] = 0
            hi[y] = w
        for x in range(uw, np.uint64(stride)):
            scaled[ob + x] = zero
            base_best[ob + x] = -inf
    return n_mask


@njit(**_JIT)
def _row_prefix_sums(scaled, stride, h, w):
    """(H * (W + 1),) float64 prefix sums of each row of ``scaled``: a run's intensity sum in O(1) in the
    update. Four rows at a time: four independent addition chains instead of one long one."""
    pw = w + 1
    prefix = np.empty(h * pw, dtype=np.float64)
    for y0 in range(0, h, 4):
        rows = min(4, h - y0)
        if rows < 4:
            for y in range(y0, h):
                acc = 0.0
                prefix[y * pw] = 0.0
                for x in range(w):
                    acc += scaled[y * stride + x]
                    prefix[y * pw + x + 1] = acc
            break
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        p0 = y0 * pw
        s0 = y0 * stride
        prefix[p0] = 0.0
        prefix[p0 + pw] = 0.0
        prefix[p0 + 2 * pw] = 0.0
        prefix[p0 + 3 * pw] = 0.0
        for x in range(w):
            a0 += scaled[s0 + x]
            a1 += scaled[s0 + stride + x]
            a2 += scaled[s0 + 2 * stride + x]
            a3 += scaled[s0 + 3 * stride + x]
            prefix[p0 + x + 1] = a0
            prefix[p0 + pw + x + 1] = a1
            prefix[p0 + 2 * pw + x + 1] = a2
            prefix[p0 + 3 * pw + x + 1] = a3
    return prefix


@njit(**_JIT)
def _spans_box(lo, hi, h, w):
    """(first row, last row, first column, last column) of a non-empty mask given its row spans."""
    y0 = 0
    while hi[y0] <= lo[y0]:
        y0 += 1
    y1 = h - 1
    while hi[y1] <= lo[y1]:
        y1 -= 1
    x0 = w
    x1 = 0
    for y in range(y0, y1 + 1):
        if hi[y] > lo[y]:
            x0 = min(x0, lo[y])
            x1 = max(x1, hi[y] - 1)
    return y0, y1, x0, x1


@njit(**_JIT)
def _seed_centres(mask, use_mask, n_mask, lo, hi, h, w, n_c, gy0, gsy, gx0, gsx, grid_step, fallback_step):
    """The ``n_c`` starting centres (rows, columns; float64) and the distance scale: k-means seeds in the
    mask and their mean nearest-neighbour offset, or the regular grid ``gy0::gsy`` x ``gx0::gsx`` and
    ``grid_step``."""
    sy64 = np.empty(n_c, dtype=np.float64)
    sx64 = np.empty(n_c, dtype=np.float64)
    if use_mask:
        y0, y1, x0, x1 = _spans_box(lo, hi, h, w)
        _mask_seeds(mask, n_c, sy64, sx64, n_mask, y0, y1, x0, x1, 5, 25)
        my, mx = mean_nn_steps(sy64, sx64, n_c)
        step = max(my, mx)
        if not step > 0.0:
            step = fallback_step
    else:
        grid_seeds(h, w, gy0, gsy, gx0, gsx, sy64, sx64)
        step = grid_step
    return sy64, sx64, step


@njit(**_JIT)
def _label_orphans(labp, base_best, n, n_c):
    """Give the mask pixels that no search window ever reached (possible when the window is narrower than
    scikit-image's) the extra cluster ``n_c`` rather than leaving them unlabelled; connectivity enforcement
    then merges its small pieces into neighbours like any other fragment."""
    orphan = np.int32(n_c)
    zero = np.float32(0.0)
    for i in range(np.uint64(n)):
        k = labp[i]
        labp[i] = orphan if (k < 0) & (base_best[i] > zero) else k


@njit(**_JIT)
def _write_centre_labels(labp, stride, out, h, w, start_label):
    """``out`` (H*W int32) = centre index + ``start_label``; ``start_label - 1`` where there is none."""
    uw = np.uint64(w)
    s0 = np.int32(start_label)
    for y in range(h):
        ib = np.uint64(y * stride)
        ob = np.uint64(y * w)
        for x in range(uw):
            k = labp[ib + x]
            out[ob + x] = k + s0 if k >= 0 else s0 - np.int32(1)


@njit(**_JIT)
def slic_core(img, mask, use_mask, imin, imax, ratio, n_c, gy0, gsy, gx0, gsx, grid_step, fallback_step,
              half_y, half_x, n_iter, n_iter_spatial, sp_y, sp_x, enforce, min_size, max_size, start_label, out):
    """The whole SLIC / maskSLIC of one slice in one GIL-free call (arguments prepared by ``slic``).

    Grid mode (``use_mask`` False): ``n_c`` centres on the grid ``gy0::gsy`` x ``gx0::gsx`` with intensity 0,
    distance scale ``grid_step``. Mask mode: ``n_c`` k-means seeds in the mask, distance scale = their mean
    nearest-neighbour offset (``fallback_step`` for a single seed), then ``n_iter_spatial`` colour-blind
    iterations (maskSLIC's seed spreading) before the ``n_iter`` SLIC iterations. ``half_y`` / ``half_x``:
    search window half-widths in pixels; ``ratio`` = 1 / compactness. ``out`` (H*W int32) receives the labels.

    Returns
    -------
    int
        The number of labels when connectivity is enforced, else the number of centres.
    """
    h, w = img.shape
    stride = (w + 31) & ~15  # >= w + 16 and a multiple of the 16-lane SIMD width
    scaled = _aligned_f32(h * stride)
    base_best = _aligned_f32(h * stride)
    lo = np.zeros(h, dtype=np.int64)
    hi = np.zeros(h, dtype=np.int64)
    rng = imax - imin
    div = rng if rng != np.float32(0.0) else np.float32(1.0)
    n_mask = _scale_rows(img, mask, use_mask, imin, div, np.float32(ratio), stride, scaled, base_best, lo, hi)
    prefix = _row_prefix_sums(scaled, stride, h, w)
    sy64, sx64, step = _seed_centres(mask, use_mask, n_mask, lo, hi, h, w, n_c, gy0, gsy, gx0, gsx, grid_step,
                                     fallback_step)
    cy = sy64.astype(np.float32)
    cx = sx64.astype(np.float32)
    cc = np.zeros(n_c, dtype=np.float32)
    alive = np.ones(n_c, dtype=np.bool_)
    labp = _aligned_i32(h * stride)
    hy = np.float32(half_y)
    hx = np.float32(half_x)
    pw = w + 1
    if use_mask and n_iter_spatial > 0:
        kmeans_passes(scaled, stride, base_best, lo, hi, prefix, pw, h, w, cy, cx, cc, alive, n_c,
                      n_iter_spatial, step, hy, hx, sp_y, sp_x, False, labp)
    kmeans_passes(scaled, stride, base_best, lo, hi, prefix, pw, h, w, cy, cx, cc, alive, n_c, n_iter, step,
                  hy, hx, sp_y, sp_x, True, labp)
    _label_orphans(labp, base_best, h * stride, n_c)
    if enforce:
        return enforce_connectivity(labp, stride, out, h, w, min_size, max_size, start_label)
    _write_centre_labels(labp, stride, out, h, w, start_label)
    return n_c


# --------------------------------------------------------------------------------------------- engine path
@njit(**_JIT)
def masked_slic_u16(img, mask, n_segments, ratio, grid, search_radius, n_iter, n_spread, min_size_factor,
                    max_size_factor, out, out16):
    """maskSLIC of one slice as ``superpixels.slic`` runs it (no smoothing, unit spacing, connectivity
    enforced, labels from 1), with its parameter arithmetic, in one GIL-free call: the engine's workers then
    take the GIL once per slice for SLIC instead of around every step.

    ``grid[k]`` = ``superpixels._grid(h, w, k)`` for k = 1..min(n_segments, H*W); ``search_radius`` <= 0 means
    scikit-image's window. ``out`` (H*W int32) is scratch; ``out16`` (H*W uint16) receives the labels.

    Returns
    -------
    n : int
        The largest label (labels start at 1 inside the mask, 0 outside); 0 for an empty mask. Above 65535
        ``out16`` holds nothing useful (the caller refuses such a slice).
    status : int
        ``masked_range``'s status: STATUS_NAN or STATUS_INF for such a value inside the mask (nothing computed).
    """
    h, w = img.shape
    imin, imax, status, n_pix = masked_range(img, mask, True)
    if n_pix == 0 or status != STATUS_OK:
        out16[:] = 0
        return 0, status
    n_c = min(n_segments, n_pix)
    seg_size = n_pix / n_c
    win_y = grid[n_c, 1]
    win_x = grid[n_c, 3]
    if search_radius <= 0.0:
        half_y = 2.0 * win_y
        half_x = 2.0 * win_x
    else:
        half_y = half_x = search_radius * np.sqrt(seg_size)
    min_size = int(min_size_factor * seg_size)
    max_size = max(1, int(max_size_factor * seg_size))
    # float64 bounds, as ``slic`` passes them (numba hands them to Python as floats): the same arithmetic
    slic_core(img, mask, True, np.float64(imin), np.float64(imax), ratio, n_c, 0, 0, 0, 0, 0.0,
              float(max(win_y, win_x)), half_y, half_x, n_iter, n_spread, 1.0, 1.0, True, min_size, max_size, 1,
              out)
    # the largest label, not slic_core's count: a lone small fragment may take the label after the last one
    n = np.int32(0)
    for i in range(h * w):
        v = out[i]
        n = max(n, v)
        out16[i] = np.uint16(v)                      # wraps above 65535, where the caller refuses the slice
    return n, status
