"""zlib streams of label-like maps (superpixels, body mask, organ labels) made without the GIL.

``deflate_map`` encodes one piecewise-constant (H, W) map as a standard zlib stream, which HDF5's deflate
filter and every zlib inflater read. On CHAOS-T2 maps it is faster than ISA-L at level 1 and about 10% smaller
(measured in ``engine.store_codec``'s notes), and since it is a numba kernel the engine also calls it from inside
its one GIL-free call per slice (``engine._slice_kernels``). How it works: ``engine._deflate_kernels``.
"""
from __future__ import annotations

import functools
import sys
import threading
from typing import Sequence

import numpy as np

from engine._deflate_kernels import MAX_DISTANCE, deflate_map_kernel, deflate_maps_kernel

# Worst case of the encoder (no match anywhere): 9 bits per byte. Streams that would not fit in the raw size
# plus this margin are left to a general deflater (``stream_capacity``).
MARGIN_BYTES = 64


def supported(arr: np.ndarray) -> bool:
    """Whether ``deflate_map`` can encode ``arr``: a C-contiguous 2D array of 1-, 2-, 4- or 8-byte integers or
    booleans with rows of at most 32 kB, on a little-endian machine."""
    return (sys.byteorder == "little" and isinstance(arr, np.ndarray) and arr.ndim == 2
            and arr.dtype.kind in "biu" and arr.dtype.itemsize in (1, 2, 4, 8) and arr.flags.c_contiguous
            and arr.shape[1] * arr.dtype.itemsize <= MAX_DISTANCE)


def _require_supported(arr) -> None:
    if not supported(arr):
        raise ValueError(f"deflate_map: expected a C-contiguous 2D integer map with rows of at most "
                         f"{MAX_DISTANCE} bytes on a little-endian machine, got "
                         f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}")


def stream_capacity(nbytes: int) -> int:
    """Bytes of output room ``deflate_map`` is given for a map of ``nbytes`` bytes."""
    return int(nbytes) + MARGIN_BYTES


def deflate_map(arr: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
    """The zlib stream of one label-like map, or None when it would be larger than the map plus a margin.

    Parameters
    ----------
    arr : ndarray, shape (H, W), integer or bool dtype, C-contiguous (``supported``)
        A map whose elements mostly repeat their left or upper neighbour; any content is encoded correctly,
        only the size depends on it.
    out : ndarray, uint8, optional
        Where to write the stream (at least ``stream_capacity(arr.nbytes)`` bytes are used when given);
        default: this thread's scratch buffer, and the stream is returned as a new array of its own size.

    Returns
    -------
    ndarray of uint8 or None
        The stream (a view of ``out`` when given; ``zlib.decompress`` of it gives ``arr.tobytes()``); None when
        the map does not compress below ``stream_capacity`` (noise-like content): the caller deflates it
        otherwise.

    Raises
    ------
    ValueError
        ``arr`` is not ``supported``, or ``out`` is not a writable contiguous uint8 array.
    """
    _require_supported(arr)
    cap = stream_capacity(arr.nbytes)
    if out is None:
        out = scratch(cap)
        fresh = True
    elif not (isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 1 and out.flags.c_contiguous
              and out.flags.writeable):
        raise ValueError("deflate_map: out must be a writable contiguous 1D uint8 array")
    else:
        fresh = False
    x = arr.reshape(-1).view(np.uint8)
    n = deflate_map_kernel(x, arr.dtype.itemsize, arr.shape[1] * arr.dtype.itemsize, out[:cap])
    if n < 0:
        return None
    # without ``out``, a compact copy: the stream is a few kB of a buffer the size of the map
    return out[:n].copy() if fresh else out[:n]


def deflate_maps(maps: Sequence[np.ndarray]) -> list[bytes | None]:
    """``deflate_map`` of several maps in one GIL-free call (a worker thread then waits for the GIL once for
    them all, not once per map).

    Parameters
    ----------
    maps : sequence of ndarray, each as ``deflate_map``'s ``arr``

    Returns
    -------
    list of (bytes or None)
        Per map, its stream, or None when it does not compress below ``stream_capacity`` (as ``deflate_map``).

    Raises
    ------
    ValueError
        A map is not ``supported``.
    """
    for arr in maps:
        _require_supported(arr)
    if not maps:
        return []
    elem, rows, caps, starts = layout(tuple((a.shape, a.dtype.itemsize) for a in maps))
    out = scratch(int(starts[-1] + caps[-1]))
    lens = np.empty(len(maps), np.int64)
    deflate_maps_kernel(tuple(a.reshape(-1).view(np.uint8) for a in maps), elem, rows, caps, out, lens)
    return streams(out, starts, lens)


def streams(out: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> list[bytes | None]:
    """The streams a kernel wrote into ``out`` from ``starts`` (``lens[i]`` < 0: none), copied out: a few kB,
    so that ``out`` can be a buffer the thread reuses (``scratch``) rather than a new one of the maps' size."""
    return [None if n < 0 else out[s:s + n].tobytes() for s, n in zip(starts.tolist(), lens.tolist())]


_scratch = threading.local()


def scratch(nbytes: int) -> np.ndarray:
    """This thread's reusable output buffer for streams, at least ``nbytes`` long."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _scratch.buf = np.empty(nbytes, np.uint8)
    return buf


@functools.lru_cache(maxsize=16)
def layout(shapes: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Element sizes, row lengths, stream capacities and stream offsets (int64 arrays) for maps of ``shapes``
    (a tuple of ((H, W), itemsize)), their streams one after the other."""
    elem = np.array([size for _, size in shapes], np.int64)
    rows = np.array([shape[1] * size for shape, size in shapes], np.int64)
    caps = np.array([stream_capacity(shape[0] * shape[1] * size) for shape, size in shapes], np.int64)
    starts = np.concatenate(([0], np.cumsum(caps)[:-1])).astype(np.int64)
    return elem, rows, caps, starts
