"""Shards and the index over them.

``ShardBuilder`` writes one batch's shard under a temporary name and commits it (flush, fsync, atomic rename),
sending its chunks to the disk early and dropping its cached pages in the store's sync thread;
``read_shard_info`` and ``read_shard_settings`` read a committed shard back (on resume); ``write_index`` rebuilds
the index file from the committed shards (atomic replace), ``merge_volumes`` joins their volume rows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from engine.store_codec import Codec
from engine.store_format import (_STR, DATASETS, DTYPES, FORMAT_NAME, SCHEMA_VERSION, SliceResult, StoreError, _now,
                                 _read_json_rows, _read_volume_table, _s, _write_json_rows, _write_slice_table,
                                 _write_volume_table, parts_dir, settings_hash, shard_name)


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
