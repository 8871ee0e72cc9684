"""What the store's writer and reader share: the format's constants and errors, the paths of a store's files,
the settings hash, the records a run commits (``SliceResult``, ``Batch``, rows of the ``volumes`` table) and the
helpers that write and read the HDF5 tables of shards and index.

The layout on disk and why it meets design.md "Store" are told in ``engine.store``; how the chunks are encoded, in
``engine.store_codec``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import h5py
import numpy as np

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


def volume_row(vol_id: str, ref: str, n_slices: int, spacing: Iterable[float], orientation: str, affine: np.ndarray,
               path: str, checksum: str, has_label: bool, notes: Iterable[str] = ()) -> dict:
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
