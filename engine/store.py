"""The HDF5 store: immutable per-batch shards, an atomically replaced index, a writer lock, a lazy reader.

Layout on disk, for a store ``STORE`` (e.g. ``data/store.h5``)::

    STORE                 the file users open: a small HDF5 index, rebuilt (tmp + rename) after commits: during
                          a run at most every 0.5 s (engine.pipeline.PUBLISH_INTERVAL_S), and at its end.
                          Virtual datasets image / superpixels / fg / label of shape (N, H, W) mapped onto the
                          shards (so h5ls/h5dump/HDFView read it like a plain file), the tables ``slices`` and
                          ``volumes`` (one dataset per column) and the provenance attributes.
    STORE.parts/NNNNNN.h5 one immutable shard per committed batch: written under a temporary name, flushed,
                          fsync'd, then renamed (rename is atomic). Shards are the source of truth; the index is
                          derived from them and can always be rebuilt.
    STORE.parts/runs.jsonl one line per run (start, end, status, host, pid, code version): history, not content.
    STORE.lock            exists while a writer runs: JSON with pid / host / start time / command, and an
                          exclusive ``flock`` on it. The kernel drops the flock when the holder dies, so a lock
                          left by a killed run is taken over at once.

Why the requirements of design.md "Store" hold:

1. Readers see whole committed batches: a shard becomes visible only by its rename, and the index that points
   to it only by its own atomic replace; ``StoreReader`` reads the index once and then only reads immutable
   shards, so it keeps one consistent snapshot however long it stays open, also while a run writes.
2. ``kill -9`` then the same command: the slices of a run form one deterministic sequence (volumes in source
   order, z ascending; a volume that fails takes no slots), cut into batches of ``engine.batch`` slices
   starting at the number of slices already committed. A rerun skips what the shards hold and recomputes only
   the batch that was in flight: the engine opens batch k+1 only once batch k's shard is renamed, so at most one
   batch of computed slices is ever uncommitted (``max_uncommitted_slices`` in the run's profile). Stray
   temporary files are removed under the lock.
3. A second writer is refused at once, naming the holder (``StoreLocked``).
4. ``settings`` (schema, method, parameters, preparation, source) are hashed into every shard; a run with
   other settings is refused (``SettingsMismatch``) unless ``overwrite``.
5. Provenance: every shard and the index record schema version, method and parameters, preparation and
   source settings, code version, creation time; the ``volumes`` table records path, checksum, spacing,
   orientation and affine of every source volume; the ``log`` attribute lists every volume that failed.

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
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import sys
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import h5py
import numpy as np

try:  # ISA-L writes and reads the same zlib streams as zlib, 4-10x faster at levels 0-3 (measured below)
    from isal import isal_zlib as _fast_zlib
except ImportError:  # optional: zlib gives the same store, only slower
    _fast_zlib = None

SCHEMA_VERSION = 1
FORMAT_NAME = "slic-alpnet pseudo-label store"
DATASETS = ("image", "superpixels", "fg", "label")
MAP_DATASETS = ("superpixels", "fg", "label")     # piecewise constant: ``map_deflate`` at level 1
DTYPES = {"image": np.dtype(np.float32), "superpixels": np.dtype(np.uint16),
          "fg": np.dtype(np.uint8), "label": np.dtype(np.uint8)}
MAX_SUPERPIXEL_ID = int(np.iinfo(np.uint16).max)
_SHARD_RE = re.compile(r"^(\d{6})\.h5$")
_STR = h5py.string_dtype("utf-8")


class StoreError(Exception):
    """A store cannot be opened or written; ``str(err)`` is one line naming the store and the problem."""


class StoreLocked(StoreError):
    """Another run holds the store's writer lock."""


class SettingsMismatch(StoreError):
    """The store was made with other settings (method, parameters, preparation or source)."""


class RunRecordError(StoreError):
    """The run's line of ``runs.jsonl`` could not be written; the store itself is (history only)."""


def error_text(exc: BaseException) -> str:
    """One line for an error met while reading or writing a store.

    HDF5 reports a failed system call in several lines (time, descriptor, buffer address, ...); the system's
    own words for the errno say what a user needs (e.g. "No space left on device"). Other messages keep their
    text, on one line.
    """
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{os.strerror(code)} (errno {code}){where}"
    text = " ".join(str(exc).split())
    m = re.search(r"\berrno = (\d+)", text)            # h5py raises some HDF5 I/O failures as RuntimeError
    if m and int(m.group(1)):
        return f"{os.strerror(int(m.group(1)))} (errno {m.group(1)})"
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------- paths
def parts_dir(store: str | Path) -> Path:
    """Folder of the shard files of ``store``."""
    store = Path(store)
    return store.with_name(store.name + ".parts")


def shard_name(index: int) -> str:
    return f"{index:06d}.h5"


def lock_path(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".lock")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_cached(fd: int) -> None:
    """Let the kernel free the file's cached pages once they are on disk (``POSIX_FADV_DONTNEED``).

    The engine writes a store once and does not read it back. Without this, every stored byte stays in the page
    cache and the writer keeps filling freshly allocated pages; dropped pages are reused by the next writes
    instead. On a VM that returns free memory to its host a fresh page costs a host fault: there, writing
    1 GB in 4 MB synced steps took 1.1-1.2 s of CPU keeping the pages and 0.22 s dropping them. Each shard's
    pages are dropped once it is committed, so the cache holds about one batch of the store. Readers lose
    nothing but warm cache.
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_path(path)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic there
        pass


# --------------------------------------------------------------------------------------------- settings
def settings_hash(settings: dict) -> str:
    """Stable 16-hex-digit hash of a JSON-able settings dict (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two settings trees differ, with both values (for the mismatch message)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key, "<absent>"), new.get(key, "<absent>"),
                                f"{prefix}.{key}" if prefix else str(key))
        return out
    if old != new:
        def short(v):
            text = json.dumps(v, default=str)
            return text if len(text) <= 60 else text[:57] + "..."
        return [f"{prefix or 'settings'}: store has {short(old)}, this run {short(new)}"]
    return []


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


def deflate(data, level: int) -> bytes:
    """A zlib stream (what HDF5's deflate filter stores) of ``data``; ISA-L for levels 1-3 when installed."""
    if _fast_zlib is not None and level <= 3:
        return _fast_zlib.compress(data, level)
    return zlib.compress(data, level)


def inflate(data) -> bytes:
    return _fast_zlib.decompress(data) if _fast_zlib is not None else zlib.decompress(data)


# --------------------------------------------------------------------------------------------- records
@dataclasses.dataclass
class SliceResult:
    """One computed slice, ready to commit. ``chunks[name]`` are encoded by ``Codec.encode``."""
    volume: str                  # volume id
    ref: str                     # source reference (Source.refs entry)
    z: int
    chunks: dict
    n_superpixels: int
    labels_present: bool
    organs: int                  # bit v set when label value v (1..63) occurs in the slice
    release: Callable[[], None] | None = None   # called once the chunks are written: their buffer may be reused


@dataclasses.dataclass
class Batch:
    """One commit: consecutive slices of the run's sequence, the volumes they come from, failures seen."""
    index: int                   # shard number
    first_slice: int             # global slice index of slices[0]
    slices: list                 # list[SliceResult], in sequence order
    volumes: dict                # ref -> volume row dict (see _volume_columns), for volumes in ``slices``
    failures: list               # [{"ref", "path", "reason"}] met since the previous batch


def slice_organ_bits(label: np.ndarray) -> int:
    """The ``organs`` value of one (H, W) label map: bit v set when label value v (1..63) occurs in it."""
    mask = 0
    for v in np.flatnonzero(np.bincount(np.asarray(label).ravel(), minlength=64)[1:64]):
        mask |= 1 << int(v + 1)
    return mask


_VOLUME_FIELDS = ("id", "ref", "n_slices", "spacing", "orientation", "affine", "path", "checksum", "has_label",
                  "notes")


def volume_row(vol_id: str, ref: str, n_slices: int, spacing, orientation: str, affine, path: str,
               checksum: str, has_label: bool, notes: Iterable[str] = ()) -> dict:
    """A row of the ``volumes`` table (plain Python values)."""
    return {"id": str(vol_id), "ref": str(ref), "n_slices": int(n_slices),
            "spacing": [float(s) for s in spacing], "orientation": str(orientation),
            "affine": np.asarray(affine, dtype=np.float64).reshape(4, 4).tolist(), "path": str(path),
            "checksum": str(checksum), "has_label": bool(has_label), "notes": list(notes)}


def _write_volume_table(group: h5py.Group, rows: list[dict]) -> None:
    n = len(rows)
    group.create_dataset("id", data=[r["id"] for r in rows], dtype=_STR)
    group.create_dataset("ref", data=[r["ref"] for r in rows], dtype=_STR)
    group.create_dataset("n_slices", data=np.array([r["n_slices"] for r in rows], dtype=np.int32))
    group.create_dataset("spacing", data=np.array([r["spacing"] for r in rows], dtype=np.float64).reshape(n, 3))
    group.create_dataset("orientation", data=[r["orientation"] for r in rows], dtype=_STR)
    group.create_dataset("affine", data=np.array([r["affine"] for r in rows], dtype=np.float64).reshape(n, 4, 4))
    group.create_dataset("path", data=[r["path"] for r in rows], dtype=_STR)
    group.create_dataset("checksum", data=[r["checksum"] for r in rows], dtype=_STR)
    group.create_dataset("has_label", data=np.array([r["has_label"] for r in rows], dtype=bool))
    group.create_dataset("notes", data=[json.dumps(r["notes"]) for r in rows], dtype=_STR)


def _read_volume_table(group: h5py.Group) -> list[dict]:
    cols = {k: group[k][()] for k in _VOLUME_FIELDS}
    rows = []
    for i in range(len(cols["id"])):
        rows.append(volume_row(
            _s(cols["id"][i]), _s(cols["ref"][i]), cols["n_slices"][i], cols["spacing"][i],
            _s(cols["orientation"][i]), cols["affine"][i], _s(cols["path"][i]), _s(cols["checksum"][i]),
            cols["has_label"][i], json.loads(_s(cols["notes"][i]))))
    return rows


def _write_json_rows(f: h5py.File, name: str, rows: list) -> None:
    f.create_dataset(name, shape=(len(rows),), dtype=_STR, data=[json.dumps(r) for r in rows] if rows else None)


def _read_json_rows(f: h5py.File, name: str) -> list:
    return [json.loads(_s(v)) for v in f[name][()]] if name in f else []


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _write_slice_table(group: h5py.Group, volume, z, nsp, present, organs, shard=None, row=None) -> None:
    group.create_dataset("volume", data=list(volume), dtype=_STR)
    group.create_dataset("z", data=np.asarray(z, dtype=np.int32))
    group.create_dataset("n_superpixels", data=np.asarray(nsp, dtype=np.int32))
    group.create_dataset("labels_present", data=np.asarray(present, dtype=bool))
    group.create_dataset("organs", data=np.asarray(organs, dtype=np.uint64))
    if shard is not None:
        group.create_dataset("shard", data=np.asarray(shard, dtype=np.int32))
        group.create_dataset("row", data=np.asarray(row, dtype=np.int32))


# --------------------------------------------------------------------------------------------- shards
@dataclasses.dataclass
class ShardInfo:
    """What the index needs from one committed shard (read back from disk on resume)."""
    index: int
    first_slice: int
    n: int
    volume: list                 # str ids
    ref: list
    z: np.ndarray
    n_superpixels: np.ndarray
    labels_present: np.ndarray
    organs: np.ndarray
    volumes: list                # volume rows
    failures: list
    settings_hash: str
    code_version: str
    created: str
    shape: tuple
    compression: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


EARLY_SYNC_BYTES = 4 << 20

_syncer: ThreadPoolExecutor | None = None
_syncer_lock = threading.Lock()


def _in_sync_thread(fn: Callable, fd: int) -> Future:
    """Run ``fn(fd)`` in the store's sync thread (one per process, started on first use), in order with the
    other jobs there: the writer thread goes on writing chunks meanwhile instead of waiting for the disk."""
    global _syncer
    with _syncer_lock:
        if _syncer is None:
            _syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-syncer")
    return _syncer.submit(fn, fd)


def _background_sync(fd: int) -> Future:
    """``fdatasync`` of ``fd`` in the sync thread."""
    return _in_sync_thread(getattr(os, "fdatasync", os.fsync), fd)      # macOS has no fdatasync


def _drop_and_close(fd: int) -> None:
    """Drop a committed shard's cached pages, then close ``fd`` (the sync thread owns it from then on)."""
    try:
        _drop_cached(fd)
    finally:
        os.close(fd)


class ShardBuilder:
    """One shard being written: chunks go to a temporary file as slices arrive; :meth:`commit` renames it.

    The engine adds each slice as soon as it is computed, in any order, so that closing a batch
    costs only its tables, an fsync and the rename: workers wait at the batch barrier for that, not for the
    whole batch's writes. Nothing is visible under the shard's final name before :meth:`commit`.
    """

    def __init__(self, parts: Path, index: int, first_slice: int, capacity: int, codec: Codec,
                 shape: tuple[int, int], settings: dict, code_version: str):
        self.parts, self.index, self.first_slice = Path(parts), index, first_slice
        self.codec, self.shape, self.settings, self.code_version = codec, tuple(shape), settings, code_version
        self.final = self.parts / shard_name(index)
        self.tmp = self.parts / f".{shard_name(index)}.tmp-{os.getpid()}"
        self.created = _now()
        self.rows: dict[int, SliceResult] = {}       # position -> the slice's table row (chunks dropped once written)
        self.nbytes = 0                              # bytes of the chunks written
        self.capacity = max(capacity, 0)
        self.prepared: int | None = None             # slice count written by ``prepare``
        self.file = h5py.File(self.tmp, "w")
        self.sync_fd, self.unsynced = -1, 0
        self.sync_job: Future | None = None          # the early sync in flight (it uses ``sync_fd``)
        try:
            self.sync_fd = os.open(self.tmp, os.O_RDONLY)
            # Datasets start at ``capacity`` slices and are cut to the real count on commit; the first axis
            # stays extensible, since a batch may end up with no slice (only failures of its volumes).
            self.dsets = {name: self.file.create_dataset(
                name, shape=(self.capacity,) + self.shape, dtype=DTYPES[name], chunks=(1,) + self.shape,
                maxshape=(None,) + self.shape, **codec.dataset_kwargs(name)) for name in DATASETS}
        except BaseException:
            self.discard()
            raise

    def add(self, s: SliceResult, pos: int | None = None) -> None:
        """Write the chunks of the slice at position ``pos`` of the shard (default: the next one). Slices may
        come in any order: each chunk goes to its slice's index, and the slice table is written in position
        order at :meth:`commit`."""
        i = len(self.rows) if pos is None else int(pos)
        if i in self.rows or i < 0:
            raise StoreError(f"{self.tmp}: internal error: slice position {i} written twice or negative")
        if i >= self.capacity:                       # h5py's ``shape`` costs GIL time: track it here
            self._size_to(i + 1)
        for name in DATASETS:
            self.dsets[name].id.write_direct_chunk((i, 0, 0), s.chunks[name])
            n = len(memoryview(s.chunks[name]).cast("B"))
            self.unsynced += n
            self.nbytes += n
        self.rows[i] = dataclasses.replace(s, chunks=None, release=None)
        if self.unsynced >= EARLY_SYNC_BYTES and (self.sync_job is None or self.sync_job.done()):
            # Send the chunks to the disk while the batch is still being computed: the fsync of the commit,
            # which the workers wait for at the batch barrier, then has little left to write (8 ms -> ~1 ms
            # for a 64-slice CHAOS shard here). In another thread: these syncs and the page drops took 1.7 s
            # of the writer's 3.7 s on 10x CHAOS here, and one writer is the ceiling on many cores. The pages
            # are dropped after the commit (``commit``).
            self._wait_sync()
            self.sync_job = _background_sync(self.sync_fd)
            self.unsynced = 0

    def prepare(self, volumes: dict, failures: list, n: int) -> None:
        """Write what the batch's last slices do not change (its size, volumes, failures, attributes) ahead of
        :meth:`commit`. The engine calls it once the batch is closed, while its last slices are still being
        computed, so the workers waiting at the barrier wait only for the slice table and the rename."""
        try:
            self._size_to(n)
            self._write_batch_metadata(volumes, failures, n)
            self.prepared = n
        except BaseException:
            self.discard()
            raise

    def commit(self, volumes: dict, failures: list) -> ShardInfo:
        """Tables and metadata, flush, fsync, atomic rename, fsync of the folder: the commit point."""
        n = len(self.rows)
        try:
            missing = [i for i in range(n) if i not in self.rows]
            if missing:
                raise StoreError(f"{self.final}: internal error: {len(missing)} slice position(s) not written, "
                                 f"the first {missing[0]}, while {n} slices were added")
            sl = [self.rows[i] for i in range(n)]
            f = self.file
            if self.prepared is not None and self.prepared != n:
                raise StoreError(f"{self.final}: internal error: batch prepared for {self.prepared} slices, "
                                 f"committed with {n}")
            self._size_to(n)
            _write_slice_table(f.create_group("slices"), [s.volume for s in sl], [s.z for s in sl],
                               [s.n_superpixels for s in sl], [s.labels_present for s in sl],
                               [s.organs for s in sl])
            f["slices"].create_dataset("ref", data=[s.ref for s in sl], dtype=_STR)
            if self.prepared is None:
                self._write_batch_metadata(volumes, failures, n)
            f.close()
            self._wait_sync()
            os.fsync(self.sync_fd)
            # The pages leave the page cache only now, in the sync thread, not after each early sync: HDF5
            # rewrites its metadata (chunk index, object headers) in place at close, and each partial page of
            # it that had been dropped was read back from the disk first, ~100 kB of synchronous reads per
            # 128-slice CHAOS batch here, inside the commit that the workers wait for.
            fd, self.sync_fd = self.sync_fd, -1
            _in_sync_thread(_drop_and_close, fd)
            os.replace(self.tmp, self.final)
        except BaseException:
            self.discard()
            raise
        _fsync_dir(self.parts)
        return ShardInfo(self.index, self.first_slice, n, [s.volume for s in sl], [s.ref for s in sl],
                         np.array([s.z for s in sl], dtype=np.int32),
                         np.array([s.n_superpixels for s in sl], dtype=np.int32),
                         np.array([s.labels_present for s in sl], dtype=bool),
                         np.array([s.organs for s in sl], dtype=np.uint64),
                         list(volumes.values()), list(failures), settings_hash(self.settings), self.code_version,
                         self.created, self.shape, self.codec.spec)

    def _size_to(self, n: int) -> None:
        if self.capacity != n:
            for dset in self.dsets.values():
                dset.resize(n, axis=0)
            self.capacity = n

    def _write_batch_metadata(self, volumes: dict, failures: list, n: int) -> None:
        f = self.file
        _write_volume_table(f.create_group("volumes"), list(volumes.values()))
        _write_json_rows(f, "failures", failures)
        settings = self.settings
        f.attrs.update({
            "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "shard": self.index,
            "first_slice": self.first_slice, "n_slices": n, "settings": json.dumps(settings, sort_keys=True),
            "settings_hash": settings_hash(settings), "compression": self.codec.spec,
            "code_version": self.code_version, "created": self.created})

    def discard(self) -> None:
        """Close and remove the temporary file (a failed or abandoned batch)."""
        try:
            self.file.close()
        except Exception:
            pass
        self._close_sync_fd()
        self.tmp.unlink(missing_ok=True)

    def _wait_sync(self) -> None:
        """Wait for the early sync in flight; its error (e.g. EIO) is raised here, in the writer."""
        job, self.sync_job = self.sync_job, None
        if job is not None:
            job.result()

    def _close_sync_fd(self) -> None:
        if self.sync_job is not None:                # never close an fd the sync thread may still use
            try:
                self._wait_sync()
            except OSError:
                pass
        if self.sync_fd >= 0:
            os.close(self.sync_fd)
            self.sync_fd = -1


def read_shard_info(path: Path) -> ShardInfo:
    """Metadata and tables of one shard file (no pixel data). Raises OSError/KeyError when unreadable."""
    with h5py.File(path, "r") as f:
        a = f.attrs
        s = f["slices"]
        return ShardInfo(
            int(a["shard"]), int(a["first_slice"]), int(a["n_slices"]),
            [_s(v) for v in s["volume"][()]], [_s(v) for v in s["ref"][()]], s["z"][()].astype(np.int32),
            s["n_superpixels"][()].astype(np.int32), s["labels_present"][()].astype(bool),
            s["organs"][()].astype(np.uint64), _read_volume_table(f["volumes"]),
            _read_json_rows(f, "failures"), _s(a["settings_hash"]), _s(a["code_version"]), _s(a["created"]),
            tuple(f["image"].shape[1:]), _s(a["compression"]))


def read_shard_settings(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(_s(f.attrs["settings"]))


# --------------------------------------------------------------------------------------------- index
def write_index(store: Path, shards: list[ShardInfo], settings: dict, complete: bool,
                extra_attrs: dict | None = None) -> None:
    """(Re)build the index file ``store`` from committed shards: temporary name, then atomic replace."""
    store = Path(store)
    parts_rel = parts_dir(store).name        # relative to the index's folder: the store can be moved as a whole
    shape = shards[0].shape if shards else (int(settings.get("prepare", {}).get("size", 256)),) * 2
    n_total = sum(s.n for s in shards)
    tmp = store.with_name(f".{store.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for name in DATASETS:
                full = (n_total,) + tuple(shape)
                if n_total == 0:
                    f.create_dataset(name, shape=full, dtype=DTYPES[name])
                    continue
                layout = h5py.VirtualLayout(shape=full, dtype=DTYPES[name])
                for s in shards:
                    if s.n:
                        src = h5py.VirtualSource(f"{parts_rel}/{shard_name(s.index)}", name,
                                                 shape=(s.n,) + tuple(shape))
                        layout[s.first_slice:s.first_slice + s.n] = src
                f.create_virtual_dataset(name, layout, fillvalue=0)
            cat = (lambda attr, dt: np.concatenate([getattr(s, attr) for s in shards]).astype(dt)
                   if shards else np.zeros(0, dt))
            _write_slice_table(
                f.create_group("slices"), [v for s in shards for v in s.volume], cat("z", np.int32),
                cat("n_superpixels", np.int32), cat("labels_present", bool), cat("organs", np.uint64),
                shard=np.concatenate([np.full(s.n, s.index, np.int32) for s in shards]) if shards
                else np.zeros(0, np.int32),
                row=np.concatenate([np.arange(s.n, dtype=np.int32) for s in shards]) if shards
                else np.zeros(0, np.int32))
            _write_volume_table(f.create_group("volumes"), merge_volumes(shards))
            log = [fail for s in shards for fail in s.failures]
            _write_json_rows(f, "log", log)
            log_attr = json.dumps(log)
            if len(log_attr) > 32000:   # HDF5 attributes stay small; the full list is the ``log`` dataset
                log_attr = json.dumps(log[:50] + [{"note": f"{len(log) - 50} more in the 'log' dataset"}])
            versions = sorted({s.code_version for s in shards})
            attrs = {
                "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION,
                "method": settings.get("method", ""), "params": json.dumps(settings.get("params", {})),
                "prepare": json.dumps(settings.get("prepare", {})), "source": json.dumps(settings.get("source", {})),
                "settings": json.dumps(settings, sort_keys=True), "settings_hash": settings_hash(settings),
                "code_version": shards[0].code_version if shards else "", "code_versions": json.dumps(versions),
                "created": shards[0].created if shards else _now(), "updated": _now(),
                "n_slices": n_total, "n_shards": len(shards), "complete": bool(complete),
                "log": log_attr, "parts": parts_rel,
                "compression": ",".join(sorted({s.compression for s in shards}))}
            attrs.update(extra_attrs or {})
            f.attrs.update(attrs)
        # No fsync here, unlike the shards: the index is derived data that the next writer rebuilds from the
        # shards, and the atomic rename alone already protects readers against a killed process.
        os.replace(tmp, store)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def merge_volumes(shards: list[ShardInfo]) -> list[dict]:
    """Volume rows of all shards, once each, in order of first appearance (a volume may span shards)."""
    seen: dict[str, dict] = {}
    for s in shards:
        for row in s.volumes:
            seen.setdefault(row["ref"], row)
    return list(seen.values())


# --------------------------------------------------------------------------------------------- lock
class StoreLock:
    """Exclusive writer lock: ``flock`` on ``STORE.lock`` plus who holds it (JSON), for the refusal message.

    ``flock`` is released by the kernel when the holding process dies, however it dies, so a lock file left by
    a killed run never blocks the next one (its stale content is reported and replaced).
    """

    def __init__(self, store: str | Path):
        self.store = Path(store)
        self.path = lock_path(store)
        self.fd: int | None = None
        self.stale: dict | None = None     # what a dead previous holder had written, if anything

    def acquire(self, command: str = "") -> "StoreLock":
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_fd(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreError(f"{self.store}: cannot lock {self.path}: {exc}") from None
                raise StoreLocked(f"{self.store}: another run is writing this store ({describe_holder(holder)}); "
                                  f"wait for it to finish or stop it") from None
            # The holder may have unlinked the file between our open and flock: lock the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.stale = _read_fd(fd) or None
            info = {"pid": os.getpid(), "host": platform.node(), "started": _now(),
                    "command": command or " ".join(sys.argv)}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise StoreError(f"{self.store}: could not take the lock {self.path} (it keeps being replaced)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)   # unlink while still holding it: nobody can lock a stale inode
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_fd(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}, "
            f"command: {holder.get('command', '?')}")


# --------------------------------------------------------------------------------------------- writer
class StoreWriter:
    """The single writer of a store. Open with ``StoreWriter.open``; ``commit`` batches in order; ``finish``.

    Attributes
    ----------
    shards : list of ShardInfo
        Committed shards, in order (read back from disk when resuming).
    n_committed : int
        Slices committed so far (the run continues at this position of the slice sequence).
    resumed : bool
        True when committed shards of an earlier run were found and kept.
    """

    def __init__(self, store: Path, settings: dict, codec: Codec, shape: tuple[int, int], code_version: str,
                 lock: StoreLock):
        self.store = store
        self.parts = parts_dir(store)
        self.settings = settings
        self.hash = settings_hash(settings)
        self.codec = codec
        self.shape = tuple(shape)
        self.code_version = code_version
        self.lock = lock
        self.shards: list[ShardInfo] = []
        self.resumed = False
        self.dropped: list[str] = []       # unreadable shards removed on open (recomputed)
        self.was_complete = False

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, store: str | Path, settings: dict, codec: Codec, shape: tuple[int, int], code_version: str,
             overwrite: bool = False, command: str = "") -> "StoreWriter":
        """Lock the store, then resume it, start it, or refuse.

        Raises
        ------
        StoreLocked
            Another run holds the lock (message names pid, host, start time, command).
        SettingsMismatch
            Committed data were made with other settings and ``overwrite`` is False.
        StoreError
            ``store`` exists but is not a store of this engine (never overwritten), or cannot be written.
        """
        store = Path(store)
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{store}: cannot create its folder: {exc.strerror or exc}") from None
        if store.is_dir():
            raise StoreError(f"{store}: is a folder, not a store file")
        try:
            lock = StoreLock(store).acquire(command)
        except OSError as exc:                   # e.g. a read-only folder
            raise StoreError(f"{store}: cannot take its lock: {error_text(exc)}") from None
        try:
            writer = cls(store, settings, codec, shape, code_version, lock)
            writer._prepare(overwrite)
            return writer
        except (OSError, RuntimeError) as exc:  # e.g. a full disk (h5py raises some HDF5 failures as RuntimeError)
            try:
                parts_dir(store).rmdir()         # only when this open created it and nothing is in it
            except OSError:
                pass
            lock.release()
            raise StoreError(f"{store}: cannot be written: {error_text(exc)}") from None
        except BaseException:
            lock.release()
            raise

    def _prepare(self, overwrite: bool) -> None:
        store, parts = self.store, self.parts
        if store.exists() and not _is_our_index(store) and not parts.is_dir():
            raise StoreError(f"{store}: exists and is not a store written by this engine; "
                             f"choose another --out (it is never overwritten)")
        self._clean_temporaries()
        shards = self._scan_shards()
        if shards:
            old = read_shard_settings(parts / shard_name(shards[0].index))
            if shards[0].settings_hash != self.hash:
                if not overwrite:
                    diff = "; ".join(_differences(old, self.settings)[:4]) or "settings hash differs"
                    raise SettingsMismatch(f"{store}: made with other settings ({diff}); use --overwrite to "
                                           f"discard it, or --out for a new store")
                self._discard()
                shards = []
        else:
            # No shard: nothing was ever committed (even a run whose volumes all failed commits a shard holding
            # its failure log), so there is nothing to protect; start from a clean folder.
            self._discard()
        self.shards = shards
        self.resumed = bool(shards)
        if store.exists() and _is_our_index(store):
            with h5py.File(store, "r") as f:
                self.was_complete = bool(f.attrs.get("complete", False)) and \
                    _s(f.attrs.get("settings_hash", "")) == self.hash and \
                    int(f.attrs.get("n_slices", -1)) == self.n_committed
        self.parts.mkdir(exist_ok=True)
        if not self.was_complete:
            write_index(store, self.shards, self.settings, complete=False)
        self.n_published = len(self.shards)       # shards the index on disk shows

    def _clean_temporaries(self) -> None:
        # Safe only under the lock: no other writer can be producing these files.
        for p in self.store.parent.glob(f".{self.store.name}.tmp-*"):
            p.unlink(missing_ok=True)
        if self.parts.is_dir():
            for p in self.parts.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)

    def _scan_shards(self) -> list[ShardInfo]:
        if not self.parts.is_dir():
            return []
        found = sorted(int(m.group(1)) for p in self.parts.iterdir() if (m := _SHARD_RE.match(p.name)))
        shards: list[ShardInfo] = []
        for k, idx in enumerate(found):
            path = self.parts / shard_name(idx)
            info = None
            if idx == k:
                try:
                    info = read_shard_info(path)
                except (OSError, KeyError, ValueError) as exc:
                    self.dropped.append(f"{path}: unreadable ({error_text(exc)}); it will be recomputed")
            else:
                self.dropped.append(f"{path}: follows a gap in the shard sequence; it will be recomputed")
            if info is None or (shards and info.settings_hash != shards[0].settings_hash) or \
                    info.first_slice != sum(s.n for s in shards):
                # Everything from the first bad shard on is recomputed: the sequence must stay contiguous.
                for later in found[k:]:
                    (self.parts / shard_name(later)).unlink(missing_ok=True)
                break
            shards.append(info)
        return shards

    def _discard(self) -> None:
        if self.parts.is_dir():
            for p in self.parts.iterdir():
                if _SHARD_RE.match(p.name) or p.name == "runs.jsonl" or p.name.startswith("."):
                    p.unlink(missing_ok=True)
        if self.store.exists() and _is_our_index(self.store):
            self.store.unlink()

    # ------------------------------------------------------------------ state
    @property
    def n_committed(self) -> int:
        return sum(s.n for s in self.shards)

    def committed_progress(self) -> tuple[dict, set, dict]:
        """What committed shards hold, for skipping on resume.

        Returns
        -------
        slices_by_ref : dict ref -> set of committed z
        failed_refs : set of refs whose failure is recorded in a committed shard
        rows_by_ref : dict ref -> volume row
        """
        by_ref: dict[str, set] = {}
        for s in self.shards:
            for ref, z in zip(s.ref, s.z.tolist()):
                by_ref.setdefault(ref, set()).add(z)
        failed = {f["ref"] for s in self.shards for f in s.failures}
        rows = {row["ref"]: row for row in merge_volumes(self.shards)}
        return by_ref, failed, rows

    # ------------------------------------------------------------------ commit
    def commit(self, batch: Batch) -> ShardInfo:
        """Write one batch as the next shard and publish it in the index (:meth:`commit_shard` + :meth:`publish`)."""
        info = self.commit_shard(batch)
        self.publish()
        return info

    def begin_shard(self, index: int, first_slice: int, capacity: int) -> ShardBuilder:
        """Start writing the next shard; slices are added as they come (see :meth:`end_shard`)."""
        self._check_next(index, first_slice)
        return ShardBuilder(self.parts, index, first_slice, capacity, self.codec, self.shape, self.settings,
                            self.code_version)

    def end_shard(self, builder: ShardBuilder, volumes: dict, failures: list) -> ShardInfo:
        """Commit a shard started with :meth:`begin_shard` (its rename is the commit point)."""
        self._check_next(builder.index, builder.first_slice)
        self._check_ids(builder.rows.values())
        info = builder.commit(volumes, failures)
        self.shards.append(info)
        return info

    def _check_next(self, index: int, first_slice: int) -> None:
        expected = len(self.shards)
        if index != expected or first_slice != self.n_committed:
            raise StoreError(f"{self.store}: internal error: batch {index} at slice {first_slice} "
                             f"does not follow shard {expected - 1} (next slice {self.n_committed})")

    def _check_ids(self, slices) -> None:
        for s in slices:
            if s.n_superpixels > MAX_SUPERPIXEL_ID:
                raise StoreError(f"{self.store}: volume {s.volume} slice {s.z} has {s.n_superpixels} superpixels, "
                                 f"more than the store's uint16 ids allow ({MAX_SUPERPIXEL_ID})")

    def commit_shard(self, batch: Batch) -> ShardInfo:
        """Write one batch as the next shard in one go (:meth:`begin_shard`, every slice, :meth:`end_shard`). Its
        rename is the commit point: from then on a rerun keeps it, also before :meth:`publish` has shown it to
        readers (the index is rebuilt from the shards on open)."""
        builder = self.begin_shard(batch.index, batch.first_slice, len(batch.slices))
        try:
            for s in batch.slices:
                builder.add(s)
            return self.end_shard(builder, batch.volumes, batch.failures)
        except BaseException:
            builder.discard()
            raise

    def publish(self) -> None:
        """Rebuild the index over every committed shard, so that new readers see them (atomic replace)."""
        write_index(self.store, self.shards, self.settings, complete=False)
        self.n_published = len(self.shards)

    def finish(self, complete: bool, run_record: dict | None = None) -> None:
        """Final index (``complete`` flag), append the run to ``runs.jsonl``, release the lock.

        Raises ``StoreError`` when the index cannot be written (e.g. a full disk; the committed shards are kept and
        the next run rebuilds the index from them), ``RunRecordError`` when only the run's record cannot.
        """
        try:
            try:
                if not (self.was_complete and complete):
                    write_index(self.store, self.shards, self.settings, complete=complete)
            except (OSError, RuntimeError) as exc:
                raise StoreError(f"{self.store}: cannot write the final index: {error_text(exc)}; the committed "
                                 f"batches are kept, rerun the same command to finish") from None
            if run_record is not None:
                try:
                    self._record_run(run_record)
                except OSError as exc:
                    raise RunRecordError(f"{self.parts / 'runs.jsonl'}: cannot record this run: {error_text(exc)} "
                                         f"(the store itself is written)") from None
        finally:
            self.lock.release()

    def _record_run(self, run_record: dict) -> None:
        with open(self.parts / "runs.jsonl", "a") as fh:
            fh.write(json.dumps(run_record) + "\n")

    def discard_if_empty(self) -> None:
        """Remove the index and shard folder this writer created when nothing was ever committed to them."""
        if not self.shards and not self.resumed:
            self._discard()
            try:
                self.parts.rmdir()
            except OSError:
                pass

    def abort(self, run_record: dict | None = None) -> None:
        """Publish committed shards the index does not show yet (best effort); record the run; release the lock."""
        try:
            if self.n_published != len(self.shards):
                try:
                    self.publish()
                except (OSError, RuntimeError, StoreError):
                    pass                      # e.g. the disk is full: the next run rebuilds the index from the shards
            if run_record is not None and self.parts.is_dir():
                try:
                    self._record_run(run_record)
                except OSError:
                    pass                      # history only; the run already stops with its own error
        finally:
            self.lock.release()


def _is_our_index(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return _s(f.attrs.get("format", "")) == FORMAT_NAME
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------- reader
class StoreReader:
    """Read-only view of one committed snapshot of a store.

    The index is read once when the reader is created (tables and metadata into memory, file closed); pixel
    data are read on demand from the immutable shard files, which are opened lazily in the process that reads
    them. A reader created before ``fork`` (e.g. a DataLoader's dataset) therefore works in each worker
    process: inherited handles are dropped and each process opens its own. Pickling drops open handles too.

    Parameters
    ----------
    path : str or Path
        The store file (index).

    Attributes
    ----------
    n_slices : int
    slices : dict of ndarray
        ``volume`` (str ids, object array), ``z`` (int32), ``n_superpixels`` (int32), ``labels_present``
        (bool: the slice's volume has a label map), ``organs`` (uint64 bitmask: bit v set when label value v
        occurs in the slice); all of length ``n_slices``.
    volumes : list of dict
        id, ref, n_slices, spacing, orientation, affine, path, checksum, has_label, notes.
    meta : dict
        schema_version, method, params, prepare, source, settings_hash, code_version, code_versions, created,
        updated, n_slices, n_shards, complete, log (list of failures), compression.
    """

    MAX_OPEN = 32

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            parts = parts_dir(self.path)
            hint = (f" (its shard folder {parts.name} is there: the preprocess command that made it rebuilds the "
                    f"index)" if parts.is_dir() and any(_SHARD_RE.match(p.name) for p in parts.iterdir()) else "")
            raise StoreError(f"{self.path}: no such store{hint}")
        try:
            with h5py.File(self.path, "r") as f:
                if _s(f.attrs.get("format", "")) != FORMAT_NAME:
                    raise StoreError(f"{self.path}: not a store written by this engine")
                version = int(f.attrs.get("schema_version", -1))
                if version != SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: schema version {version}, this code reads version "
                                     f"{SCHEMA_VERSION}; rebuild the store with `cli.py preprocess --overwrite`")
                self.meta = {k: _decode_attr(k, v) for k, v in f.attrs.items()}
                self.meta["log"] = _read_json_rows(f, "log")
                s = f["slices"]
                self.slices = {
                    "volume": np.array([_s(v) for v in s["volume"][()]], dtype=object),
                    "z": s["z"][()].astype(np.int32), "n_superpixels": s["n_superpixels"][()].astype(np.int32),
                    "labels_present": s["labels_present"][()].astype(bool),
                    "organs": s["organs"][()].astype(np.uint64)}
                self._shard = s["shard"][()].astype(np.int64)
                self._row = s["row"][()].astype(np.int64)
                self.volumes = _read_volume_table(f["volumes"])
                self.shape = tuple(f["image"].shape[1:])
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read the store index: {error_text(exc)}") from None
        except KeyError as exc:
            raise StoreError(f"{self.path}: store index is missing {exc}") from None
        self.n_slices = int(len(self.slices["z"]))
        self.parts = self.path.parent / str(self.meta.get("parts", parts_dir(self.path).name))
        self._by_volume: dict[str, np.ndarray] = {}
        vols = self.slices["volume"]
        order = np.lexsort((self.slices["z"], vols.astype(str))) if self.n_slices else np.zeros(0, np.int64)
        for i in order:
            self._by_volume.setdefault(vols[i], []).append(int(i))
        self._by_volume = {k: np.asarray(v, dtype=np.int64) for k, v in self._by_volume.items()}
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    # -------------------------------------------------------------- lazily opened shards
    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():          # forked: never use handles of the parent process
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= self.MAX_OPEN:
                old = next(iter(self._files))
                self._files.pop(old).close()
            path = self.parts / shard_name(shard)
            try:
                f = h5py.File(path, "r")
            except OSError as exc:
                hint = ("was the store overwritten or moved without its .parts folder?" if not path.exists() else
                        "the shard is damaged: `cli.py preprocess` with the store's command recomputes it")
                raise StoreError(f"{self.path}: shard {path} cannot be opened ({error_text(exc)}); {hint}") from None
            self._files[shard] = f
        return f

    def _chunk(self, f: h5py.File, name: str, row: int) -> np.ndarray:
        dset = f[name]
        shape = dset.shape[1:]
        # The direct chunk path skips h5py's selection machinery (several times faster for one slice).
        comp = dset.compression
        if dset.chunks == (1,) + shape and comp in (None, "gzip") and not dset.shuffle and not dset.fletcher32:
            mask, raw = dset.id.read_direct_chunk((row, 0, 0))
            if mask == 0:
                buf = inflate(raw) if comp == "gzip" else raw
                return np.frombuffer(buf, dtype=dset.dtype).reshape(shape)
        return dset[row]

    def read(self, i: int, fields: tuple[str, ...] = DATASETS) -> dict:
        """Slice ``i`` of the store.

        Parameters
        ----------
        i : int
            Slice index, 0 <= i < n_slices.
        fields : tuple of str
            The maps to read, among ``image``, ``superpixels``, ``fg``, ``label`` (default: all); reading fewer
            saves their chunk reads (an episode needs only the image and the superpixels).

        Returns
        -------
        dict
            With the keys of ``fields``: ``image`` (H, W) float32 z-scored; ``superpixels`` (H, W) int32 (0
            outside the body, 1..K); ``fg`` (H, W) bool; ``label`` (H, W) uint8, or None when the volume has
            no label map.
        """
        if not 0 <= i < self.n_slices:
            raise IndexError(f"slice index {i} out of range 0..{self.n_slices - 1}")
        unknown = set(fields) - set(DATASETS)
        if unknown:
            raise ValueError(f"fields {sorted(unknown)}: not among {', '.join(DATASETS)}")
        f = self._file(int(self._shard[i]))
        row = int(self._row[i])
        out = {}
        if "image" in fields:
            out["image"] = np.array(self._chunk(f, "image", row), dtype=np.float32)
        if "superpixels" in fields:
            out["superpixels"] = self._chunk(f, "superpixels", row).astype(np.int32)
        if "fg" in fields:
            out["fg"] = self._chunk(f, "fg", row).astype(bool)
        if "label" in fields:
            out["label"] = self._chunk(f, "label", row).copy() if self.slices["labels_present"][i] else None
        return out

    def slices_of(self, volume_id: str) -> np.ndarray:
        """Indices of the slices of ``volume_id``, ordered by z (empty when the store has no such volume)."""
        return self._by_volume.get(str(volume_id), np.zeros(0, dtype=np.int64)).copy()

    def shard_of(self, i: int) -> tuple[int, int]:
        """(shard number, row in the shard) of slice ``i``."""
        return int(self._shard[i]), int(self._row[i])

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:      # a handle inherited across fork may already be invalid
                pass
        self._files = {}

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_slices

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __del__(self, _getpid=os.getpid):
        # ``os.getpid`` bound at definition: at interpreter exit this module's globals may already be None
        if getattr(self, "_pid", None) == _getpid():
            self.close()


_JSON_ATTRS = {"params", "prepare", "source", "settings", "log", "code_versions"}


def _decode_attr(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if key in _JSON_ATTRS and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
