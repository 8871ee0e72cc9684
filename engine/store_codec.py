"""How a store's chunks are encoded: ``Codec`` (a deflate level, or raw, for each dataset), ``deflate`` and
``inflate``.

Encoding (chosen by measurement: ``benchmarks/engine.py``, section "compression", 144 real CHAOS-T2 slices of
256 x 256 on this shared 2-core machine; two runs, the second under twice the background load, so writer
rates are given as "run 1 / run 2"; the CPU times are stable; the last run is in
``benchmarks/results/engine-<host>.json``)::

    one writer thread applying HDF5 filters   slices/s      kB per slice (image f32 + superpixels + fg + label)
    none, superpixels int32                   2520 / 1250   656
    none, superpixels uint16                  2910 /  475   525
    lzf                                        880 /  420   129
    lzf + shuffle                              640 /  300   186
    gzip-1                                     455 /  230    95
    gzip-2 / gzip-3 / gzip-4                   410 / 270 / 290 (run 1)   92 / 89 / 87
    gzip-1 + shuffle                           270 /  130   164   (shuffle hurts z-scored MR floats)

    encoding in the workers, CPU ms per slice -> kB:   image f32   superpixels u16   fg      label
    zlib level 1                                       1.58 -> 85   0.23 -> 6.5      0.07    0.06
    zlib level 4                                       2.55 -> 80   0.37 -> 4.4      0.15    0.13
    ISA-L (isal) level 1                               0.47 -> 97   0.07 -> 6.2      0.02    0.01
    the engine's map encoder (``map_deflate``)         -            0.043 -> 4.5     0.015   0.011
      (stop 30, the maps of 359 CHAOS slices; ISA-L level 1 beside it: 0.064 -> 5.4, 0.020, 0.014;
      kB for fg / label: 1.3 / 0.7 against ISA-L's 1.35 / 0.61)

    writer with ready chunks (write_direct_chunk), slices/s: none 5900 / 3000 (525 kB), maps-gzip-1
    11000 / 6000 (271 kB), gzip-1 18600 / 7900 (106 kB)

A single writer applying gzip or lzf caps the engine at 270-880 slices/s, below the SLIC kernel on two cores
(~1000 slices/s per core). Encoding in the workers scales with them and leaves the writer only copying
ready chunks (``write_direct_chunk``). The image is the expensive part: deflating it costs about half (ISA-L)
to one and a half (zlib) times the SLIC kernel's ~1 ms per slice for a 2.6x smaller store. The default
``maps-gzip-1`` therefore stores the z-scored image as raw float32 (lossless, no CPU) and deflates the three
label-like maps in the workers (0.07 ms per slice with the engine's own encoder, 0.1 with ISA-L, 0.35 with
zlib; ~7 kB instead of 260 kB); ``gzip-1`` deflates everything (smallest store, ~100 kB per slice); ``none``
deflates nothing. Superpixel ids are uint16 (uint8 would cap K at 255; int32 doubles the bytes). Only the
standard deflate filter is used, so every HDF5 reader opens the store without plugins. The label-like maps
at level 1 go through ``map_deflate``, a numba encoder made for piecewise-constant maps (matches one element
or one row back, fixed Huffman codes), which a worker runs inside its one GIL-free call per slice
(``slice_worker.compute_slice``); everything else through ISA-L (package ``isal``) when installed, because
it writes the same zlib streams several times faster than zlib, and zlib otherwise.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import zlib

import numpy as np

from engine.store_format import DATASETS, DTYPES, MAP_DATASETS

try:  # ISA-L writes and reads the same zlib streams as zlib, 4-10x faster at levels 0-3 (measured below)
    from isal import isal_zlib as _fast_zlib
except ImportError:  # optional: zlib gives the same store, only slower
    _fast_zlib = None


# --------------------------------------------------------------------------------------------- codec
@dataclasses.dataclass(frozen=True)
class Codec:
    """How each dataset's chunks are encoded: ``levels[name]`` is a deflate level (1-9) or None (raw).

    Workers call ``encode`` (zlib releases the GIL, so threads compress in parallel); the writer hands the
    bytes to HDF5 unchanged with ``write_direct_chunk``; the datasets declare the standard deflate filter so
    any HDF5 reader decodes them.
    """
    spec: str
    levels: dict

    @staticmethod
    def parse(spec: str) -> "Codec":
        """``none`` | ``gzip-N`` (every dataset) | ``maps-gzip-N`` (superpixels, fg, label; image raw)."""
        m = re.fullmatch(r"(none)|(maps-)?gzip-([1-9])", spec or "")
        if not m:
            raise ValueError(f"engine.compression: {spec!r} is not one of none, gzip-1..9, maps-gzip-1..9")
        if m.group(1):
            levels = {name: None for name in DATASETS}
        else:
            level = int(m.group(3))
            levels = {name: level for name in DATASETS}
            if m.group(2):
                levels["image"] = None
        return Codec(spec, levels)

    def encode(self, name: str, arr: np.ndarray) -> bytes | np.ndarray:
        """One chunk of dataset ``name``: ``arr`` (H, W) in its store dtype -> bytes for write_direct_chunk.

        The label-like maps at level 1 go through ``map_deflate`` (faster than ISA-L and ~10% smaller on
        CHAOS maps), other levels and the image through ``deflate``."""
        arr = np.ascontiguousarray(arr, dtype=DTYPES[name])
        level = self.levels[name]
        if level is None:
            return arr
        if self.map_fast(name):
            from engine.map_deflate import deflate_map    # numba: not imported by the store's readers
            stream = deflate_map(arr)
            if stream is not None:
                return stream
        return self.general_deflate(name, arr)

    def general_deflate(self, name: str, arr: np.ndarray) -> bytes:
        """Dataset ``name``'s chunk deflated at its level by ISA-L or zlib (``deflate``): the image, levels
        above 1, and the maps that ``map_deflate`` could not shrink below their size."""
        return deflate(np.ascontiguousarray(arr, dtype=DTYPES[name]), self.levels[name])

    def encode_maps(self, maps: dict) -> dict:
        """``encode`` of several datasets' chunks (``name -> (H, W) array``); the maps that ``map_deflate``
        encodes go through it in one GIL-free call."""
        fast = {name: np.ascontiguousarray(arr, dtype=DTYPES[name]) for name, arr in maps.items()
                if self.map_fast(name)}
        out = {}
        if fast:
            from engine.map_deflate import deflate_maps    # numba: not imported by the store's readers
            for (name, arr), stream in zip(fast.items(), deflate_maps(list(fast.values()))):
                out[name] = stream if stream is not None else self.general_deflate(name, arr)
        for name, arr in maps.items():
            if name not in out:
                out[name] = self.encode(name, arr)
        return out

    def map_fast(self, name: str) -> bool:
        """Whether dataset ``name`` is a label-like map that ``map_deflate`` encodes (level 1)."""
        return name in MAP_DATASETS and self.levels[name] == 1 and sys.byteorder == "little"

    def dataset_kwargs(self, name: str) -> dict:
        level = self.levels[name]
        return {} if level is None else {"compression": "gzip", "compression_opts": level}


def deflate(data: bytes | np.ndarray, level: int) -> bytes:
    """A zlib stream (what HDF5's deflate filter stores) of ``data``; ISA-L for levels 1-3 when installed."""
    if _fast_zlib is not None and level <= 3:
        return _fast_zlib.compress(data, level)
    return zlib.compress(data, level)


def inflate(data: bytes) -> bytes:
    return _fast_zlib.decompress(data) if _fast_zlib is not None else zlib.decompress(data)
