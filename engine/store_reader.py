"""``StoreReader``: a read-only view of one committed snapshot of a store (the index read once, pixel data read
lazily from the immutable shards), and the decoding of the index's attributes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from engine.store_codec import inflate
from engine.store_format import (_SHARD_RE, DATASETS, FORMAT_NAME, SCHEMA_VERSION, StoreError, _read_json_rows,
                                 _read_volume_table, _s, error_text, parts_dir, shard_name)


# --------------------------------------------------------------------------------------------- reader
def _scans_not_store(path: Path) -> str | None:
    """What to say when ``path`` holds scans rather than a store (a folder or a NIfTI file), else None."""
    if path.is_dir() and path.name.endswith(".parts") and len(path.name) > len(".parts"):
        return f"the batch folder of the store {path.with_name(path.name[:-len('.parts')])}: give that file"
    if path.is_dir():
        what = "a folder"
    elif path.name.lower().endswith((".nii", ".nii.gz")):      # as the sources read them, in any case
        what = "a NIfTI file"
    else:
        return None
    return (f"{what}, not a store; make a store of it with `cli.py preprocess --input {path} --out STORE.h5` "
            f"(`cli.py inspect --data {path}` lists its scans)")


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
        scans = _scans_not_store(self.path)
        if scans:
            raise StoreError(f"{self.path}: {scans}")
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
        if not self.parts.is_dir() and parts_dir(self.path).is_dir():
            # renamed together with its folder: the shards are the same files (the index's own mapping is
            # stale until a preprocess rerun rebuilds it, which inspect reports)
            self.parts = parts_dir(self.path)
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
