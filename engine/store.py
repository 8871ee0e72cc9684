"""The HDF5 store: immutable per-batch shards, an atomically replaced index, a writer lock, a lazy reader.

This module holds the writer, ``StoreWriter``, and is the store's public entry point: it re-exports (``__all__``)
the names that users of the store import from ``engine.store``. The other parts live in modules of their own::

    engine.store_format   format constants, errors, paths, the settings hash, the records a run commits
                          (SliceResult, Batch, volume rows) and the HDF5 table helpers
    engine.store_codec    how chunks are encoded (Codec, deflate, inflate) and the measurements behind it
    engine.store_shards   one shard written and committed (ShardBuilder: fsync, early syncs, page drops),
                          read back (read_shard_info), and the index rebuilt over the shards (write_index)
    engine.store_lock     the writer lock (StoreLock)
    engine.store_reader   the lazy reader (StoreReader)

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
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py

from engine.store_codec import Codec, deflate, inflate
from engine.store_format import (_SHARD_RE, DATASETS, DTYPES, FORMAT_NAME, MAP_DATASETS, MAX_SUPERPIXEL_ID,
                                 SCHEMA_VERSION, Batch, RunRecordError, SettingsMismatch, SliceResult, StoreError,
                                 StoreLocked, _differences, _s, error_text, lock_path, parts_dir, settings_hash,
                                 shard_name, slice_organ_bits, volume_row)
from engine.runinfo import not_a_folder
from engine.store_lock import StoreLock, describe_holder
from engine.store_reader import StoreReader
from engine.store_shards import (ShardBuilder, ShardInfo, merge_volumes, read_shard_info, read_shard_settings,
                                 write_index)

__all__ = [
    # engine.store_format
    "SCHEMA_VERSION", "FORMAT_NAME", "DATASETS", "MAP_DATASETS", "DTYPES", "MAX_SUPERPIXEL_ID",
    "StoreError", "StoreLocked", "SettingsMismatch", "RunRecordError", "error_text",
    "parts_dir", "shard_name", "lock_path", "settings_hash", "SliceResult", "Batch", "slice_organ_bits", "volume_row",
    # engine.store_codec
    "Codec", "deflate", "inflate",
    # engine.store_shards
    "ShardInfo", "ShardBuilder", "read_shard_info", "read_shard_settings", "write_index", "merge_volumes",
    # engine.store_lock
    "StoreLock", "describe_holder",
    # engine.store_reader
    "StoreReader",
    # this module
    "StoreWriter",
]


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
            blocker = not_a_folder(store.parent, itself=True)
            why = f"{blocker} is a file, not a folder" if blocker else exc.strerror or exc
            raise StoreError(f"{store}: cannot create its folder: {why}") from None
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
        index = _index_attrs(store)             # read once; under the lock nothing else rewrites it
        if store.exists() and index is None and not parts.is_dir():
            raise StoreError(f"{store}: exists and is not a store written by this engine; "
                             f"choose another --out (it is never overwritten)")
        named = _s(index.get("parts", "")) if index is not None else ""
        moved = store.with_name(named) if named and named != parts.name else None
        if moved is not None and moved.is_dir() and not parts.is_dir() and not overwrite:
            raise StoreError(f"{store}: its committed batches are in {moved}, not {parts} (was the store file "
                             f"renamed?); rename that folder to {parts.name} to resume, or use --overwrite to "
                             f"start over")
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
        if index is not None and store.exists():     # _discard removes the index
            # an index that names another batch folder (renamed with it) is rebuilt, even when complete
            self.was_complete = bool(index.get("complete", False)) and \
                _s(index.get("settings_hash", "")) == self.hash and \
                int(index.get("n_slices", -1)) == self.n_committed and named == parts.name
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
        if _index_attrs(self.store) is not None:
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
                error = StoreError(f"{self.store}: cannot write the final index: {error_text(exc)}; the committed "
                                   f"batches are kept, rerun the same command to finish")
                if run_record is not None:       # the history names the run that could not finish (best effort)
                    try:
                        self._record_run({**run_record, "status": "failed", "error": str(error)})
                    except OSError:
                        pass
                raise error from None
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


def _index_attrs(path: Path) -> dict | None:
    """The attributes of this engine's index at ``path``; None when there is none (no file, not HDF5, or an
    HDF5 file of something else)."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs) if _s(f.attrs.get("format", "")) == FORMAT_NAME else None
    except (OSError, ValueError):
        return None
