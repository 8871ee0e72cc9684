"""The engine's one GIL-free call per slice: body mask, maskSLIC and the deflate of the three label-like maps.

A worker thread that leaves the GIL must take it back, and with many threads that wait outlasts a short call:
on 16 threads the body mask and the three ISA-L deflates around SLIC took ~17% of a worker's time
(``benchmarks/results/device-h200-2026-11-26d/profiles.md``). Here all of it is one call, which times its
own stages with the monotonic clock (``clock_gettime``, called from the compiled code), so the profile still
shows where a slice's time goes.
"""
from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from engine import _deflate_kernels, _kernels, _mask_kernels
from engine._deflate_kernels import deflate_map_kernel
from engine._kernels import STATUS_OK, masked_slic_u16
from engine._mask_kernels import body_mask_kernel

# Where the compiled code can read the monotonic clock (the clock of ``time.perf_counter`` there).
AVAILABLE = sys.platform.startswith("linux") or sys.platform == "darwin"
_CLOCK_MONOTONIC = 6 if sys.platform == "darwin" else 1


@intrinsic
def _monotonic_ns(typingctx):
    """Nanoseconds of the monotonic clock (``clock_gettime``; 64-bit ``struct timespec``)."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        i64, i32 = ir.IntType(64), ir.IntType(32)
        timespec = ir.LiteralStructType([i64, i64])
        fn = builder.module.globals.get("clock_gettime")
        if fn is None:
            fn = ir.Function(builder.module, ir.FunctionType(i32, [i32, timespec.as_pointer()]), "clock_gettime")
        ts = builder.alloca(timespec)
        builder.store(ir.Constant(timespec, [0, 0]), ts)     # a failed call then reads as 0, not as garbage
        builder.call(fn, [ir.Constant(i32, _CLOCK_MONOTONIC), ts])
        zero = ir.Constant(i32, 0)
        sec = builder.load(builder.gep(ts, [zero, zero]))
        nsec = builder.load(builder.gep(ts, [zero, ir.Constant(i32, 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)
    return sig, codegen


@njit(nogil=True, cache=True)
def mask_slic_deflate(raw, thr, n_segments, ratio, grid, search_radius, n_iter, n_spread, min_size_factor,
                      max_size_factor, label, fg, scratch, sp16, out, caps, lens, times):
    """Body mask of ``raw`` into ``fg`` (``body_mask_kernel``), maskSLIC into ``sp16``
    (``masked_slic_u16``, ``scratch`` its int32 work array), then the zlib streams of the superpixels, the
    mask and ``label`` (when it has pixels) into ``out``: stream i from ``sum(caps[:i])``, its length in
    ``lens[i]`` (-1: not written, when it did not fit or the slice failed). ``times`` gets the nanoseconds of
    the three steps. Returns ``masked_slic_u16``'s (n, status); nothing is encoded unless status is OK and
    n fits in uint16.
    """
    t0 = _monotonic_ns()
    body_mask_kernel(raw, thr, fg)
    t1 = _monotonic_ns()
    fg8 = fg.view(np.uint8)
    n, status = masked_slic_u16(raw, fg8, n_segments, ratio, grid, search_radius, n_iter, n_spread,
                                min_size_factor, max_size_factor, scratch, sp16)
    t2 = _monotonic_ns()
    lens[:] = -1
    if status == STATUS_OK and n <= 0xFFFF:
        w = raw.shape[1]
        lens[0] = deflate_map_kernel(sp16.view(np.uint8), 2, 2 * w, out[0:caps[0]])
        lens[1] = deflate_map_kernel(fg8.reshape(-1), 1, w, out[caps[0]:caps[0] + caps[1]])
        if label.size:
            lens[2] = deflate_map_kernel(label.reshape(-1), 1, w, out[caps[0] + caps[1]:caps[0] + caps[1] + caps[2]])
    t3 = _monotonic_ns()
    times[0] = t1 - t0
    times[1] = t2 - t1
    times[2] = t3 - t2
    return n, status


@njit(nogil=True, cache=True)
def mask_slic_deflate_run(raw3, zs, thr, n_segments, ratio, grid, search_radius, n_iter, n_spread, min_size_factor,
                          max_size_factor, label3, no_label, fg, scratch, sp16, out, caps, lens, times, ns, statuses):
    """``mask_slic_deflate`` on the slices ``raw3[zs[i]]`` of one volume one after the other, in one GIL-free
    call: a worker thread then takes the GIL back once per run of slices instead of once per slice. Slice i
    uses ``label3[zs[i]]`` (``no_label`` when ``label3`` has no slices) and writes ``fg[i]``, ``sp16[i]``,
    ``out[i]``, ``lens[i]``, ``times[i]``, and its (n, status) into ``ns[i]``, ``statuses[i]``; the run stops
    after a slice whose status is not OK (the later ones keep status -1).
    """
    statuses[:] = -1
    for i in range(zs.shape[0]):
        lab = label3[zs[i]] if label3.shape[0] > 0 else no_label
        n, status = mask_slic_deflate(raw3[zs[i]], thr, n_segments, ratio, grid, search_radius, n_iter, n_spread,
                                      min_size_factor, max_size_factor, lab, fg[i], scratch, sp16[i], out[i], caps,
                                      lens[i], times[i])
        ns[i] = n
        statuses[i] = status
        if status != STATUS_OK:
            break


def _follow_callees(dispatcher, modules) -> bool:
    """Make ``dispatcher``'s numba cache stale when a file it calls into changes, not only its own.

    numba keys a cached function on its own source file, and the machine code it caches has the functions it
    calls compiled in: after an edit of ``_kernels.py`` (say), the cached one-call kernel would go on running
    the old SLIC. The cache's source stamp is extended with a digest of the callees' files. False when this
    numba keeps its cache differently (a test fails then, so that a numba upgrade cannot pass unnoticed).
    """
    try:
        cache_file = dispatcher._cache._cache_file
        own = cache_file._source_stamp
    except AttributeError:
        return False
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    cache_file._source_stamp = (own, digest.hexdigest())
    return True


CACHE_FOLLOWS_CALLEES = all(_follow_callees(kernel, (_deflate_kernels, _kernels, _mask_kernels))
                            for kernel in (mask_slic_deflate, mask_slic_deflate_run))
if not CACHE_FOLLOWS_CALLEES:
    warnings.warn("engine._slice_kernels: this numba's cache does not follow the kernels the one-call kernel "
                  "calls; after editing engine/_kernels.py, _mask_kernels.py or _deflate_kernels.py, clear the "
                  "numba cache (NUMBA_CACHE_DIR)", RuntimeWarning, stacklevel=1)
