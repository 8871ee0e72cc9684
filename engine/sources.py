"""Data sources: every reader yields the same ``Volume`` record.

Accepted specs (``open_source``):

- a folder of ``image_<id>.nii[.gz]`` files, each with an optional ``label_<id>.nii[.gz]``
  (e.g. ``../shared/data/chaos_t2``);
- a single NIfTI file (its ``label_<id>`` sibling is used when the file is ``image_<id>``);
- the raw CHAOS MR layout: a folder of ``<id>/T2SPIR/DICOM_anon/*.dcm`` (+ ``Ground/*.png``), the
  ``MR`` folder of the download, its parent, or one ``<id>`` folder (``engine.dicom``);
- ``phantom`` or ``phantom:N``: the built-in synthetic volumes (``engine.phantom``).

``Source.refs()`` is a cheap listing; ``Source.load(ref)`` reads one volume and raises ``VolumeError``
(one line naming the file and the problem) for a bad input. ``load`` keeps no shared state, so several
engine workers may call it at once (inflating and file reads release the GIL).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engine._prepare_kernels import labels_to_u8
from engine.volume import Volume, VolumeError, one_line

# the suffix in any case: scans copied from Windows or written by some converters end in .NII / .NII.GZ
_NIFTI_RE = re.compile(r"^(image|label)_(.+?)\.(?i:nii(\.gz)?)$")
_NIFTI_SUFFIX = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_MAX_VOXELS = 1 << 30               # 4 GiB as float32: far beyond any abdominal scan, rejects absurd headers


def _id_key(vid: str) -> tuple:
    """Numeric ids in numeric order, then the others alphabetically."""
    return (0, int(vid), vid) if vid.isdecimal() else (1, 0, vid)


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _configs(cfg):
    from engine.config import DataConfig, PrepareConfig
    data = getattr(cfg, "data", None) or DataConfig()
    prep = getattr(cfg, "prepare", None) or PrepareConfig()
    return data, prep


# --------------------------------------------------------------------------------------------- NIfTI
def _gunzip(data: bytes) -> bytes:
    """Inflate gzip bytes with ISA-L when installed (about 3x faster than zlib; both release the GIL)."""
    try:
        from isal import igzip
        return igzip.decompress(data)
    except ImportError:
        return gzip.decompress(data)


def _libdeflate_gunzip(data: bytes) -> bytearray | None:
    """Inflate with libdeflate (package ``deflate``) when installed: about twice as fast as ISA-L on CHAOS
    (0.21 against 0.39-0.47 ms per slice here), straight into a buffer of the final size; releases the GIL.

    libdeflate reads only the first gzip member and the size is taken from the file's last four bytes, so
    a multi-member file can come back short: the caller keeps the result only when it holds the whole
    NIfTI image. None when the package is missing or the bytes do not inflate to that size.
    """
    try:
        import deflate
    except ImportError:
        return None
    size = int.from_bytes(data[-4:], "little") if len(data) >= 18 else 0   # ISIZE, mod 2**32
    if size == 0:
        return None
    try:
        out = deflate.gzip_decompress(data, size)
    except (ValueError, MemoryError, deflate.DeflateError):
        return None
    return out if len(out) == size else None


_GZIP_MAGIC = b"\x1f\x8b"


def _from_bytes(path: Path):
    """Read a NIfTI-1 file in one pass: its bytes serve both the checksum and the (fast) decompression.

    Returns (image object, sha256) or None when the fast path does not apply (NIfTI-2, a corrupt or
    truncated file, ...): the caller then goes through ``nib.load``, which words the error.
    """
    import nibabel as nib

    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256(data).hexdigest()
    try:
        raw = data
        if data[:2] == _GZIP_MAGIC:             # by content: a misnamed .nii / .nii.gz reads all the same
            fast = _libdeflate_gunzip(data)
            if fast is not None:
                # A view exists only when every voxel is in ``fast`` (a short buffer gives none), so the common
                # case parses the header once; the general path needs the explicit check.
                view = _nifti_view(fast)
                if view is not None:
                    return view, digest
                if _holds_whole_image(fast):
                    return nib.Nifti1Image.from_bytes(fast), digest
            raw = _gunzip(data)
        view = _nifti_view(raw)
        if view is not None:
            return view, digest
        # nibabel would print its findings on a stray header (see _header_problem); the caller words the error
        return (nib.Nifti1Image.from_bytes(raw), digest) if _header_size(raw) == 348 else None
    except Exception:
        return None


def _header_size(first: bytes) -> int | None:
    """``sizeof_hdr`` of a NIfTI file from its first bytes: 348 (NIfTI-1) or 540 (NIfTI-2), either byte order."""
    if len(first) < 4:
        return None
    for order in ("little", "big"):
        size = int.from_bytes(first[:4], order)
        if size in (348, 540):
            return size
    return None


def _header_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a NIfTI-1/2 file, judged from its first bytes (inflated when it is gzip), or None.

    Checked before handing a file to nibabel, which prints its own findings about a stray header to stderr
    (next to the one line the engine gives) and goes by the file name to decide on gzip.
    """
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == _GZIP_MAGIC
            fh.seek(0)
            first = gzip.GzipFile(fileobj=fh).read(4) if gz else fh.read(4)
    except FileNotFoundError:
        return None                                   # nibabel's own "file not found" follows
    except (OSError, EOFError) as exc:                # gzip.BadGzipFile and zlib errors included
        return f"unreadable start: {one_line(exc)}"
    if _header_size(first) is None:
        return "no NIfTI-1 or NIfTI-2 header at its start"
    if gz != path.name.lower().endswith(".gz"):
        return ("gzip-compressed but named .nii: rename it .nii.gz" if gz else
                "named .gz but not gzip-compressed: rename it .nii")
    return None


class _NiftiView:
    """The parts of a nibabel image the readers use, with ``dataobj`` a view of the file's bytes."""

    def __init__(self, header, dataobj: np.ndarray):
        self.header = header
        self.dataobj = dataobj
        self.shape = dataobj.shape
        self.affine = header.get_best_affine()    # what nibabel gives a loaded image


def _nifti1_header(raw: bytes):
    """(header, data offset) of a single-file NIfTI-1 image held in ``raw``; None for anything else.

    nibabel's own checks (``from_fileobj``) cost ~0.35 ms of GIL time per file, so the fields the readers rely
    on are checked here instead.
    """
    import nibabel as nib

    if len(raw) < 352:
        return None
    hdr = nib.Nifti1Header(raw[:348], check=False)
    if hdr["magic"].item() != b"n+1" or hdr["sizeof_hdr"].item() != 348 or not 1 <= hdr["dim"][0] <= 7:
        return None
    offset = int(hdr.get_data_offset())
    return (hdr, offset) if offset >= 352 else None


def _holds_whole_image(raw: bytes) -> bool:
    """Whether ``raw`` is a NIfTI-1 file long enough for all the voxels its header announces."""
    parsed = _nifti1_header(raw)
    if parsed is None:
        return False
    hdr, offset = parsed
    n_voxels = int(np.prod(hdr.get_data_shape(), dtype=np.int64))
    return len(raw) >= offset + n_voxels * hdr.get_data_dtype().itemsize


def _nifti_view(raw: bytes) -> _NiftiView | None:
    """A single-file NIfTI-1 without extensions or intensity scaling, its voxels viewed in place (no copy).

    ``Nifti1Image.dataobj`` copies the voxels out of the file object while holding the GIL: 0.36 ms per CHAOS
    slice, which the engine's worker threads would wait for. None when the file needs nibabel's general path.
    """
    parsed = _nifti1_header(raw)
    if parsed is None or raw[348:352] != b"\0\0\0\0":        # header extensions follow when not zero
        return None
    hdr, offset = parsed
    slope, inter = hdr.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        return None
    try:
        arr = np.ndarray(hdr.get_data_shape(), dtype=hdr.get_data_dtype(), buffer=raw, offset=offset, order="F")
    except (TypeError, ValueError):                           # truncated: the general path words the error
        return None
    return _NiftiView(hdr, arr)


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a file (a broken link, a folder, nothing there), or None."""
    if path.is_file():
        return None
    if path.is_symlink() and not path.exists():
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    if path.is_dir():
        return "a folder, not a NIfTI file"
    return "file not found" if not path.exists() else "not a regular file"


def _nifti_array(path: Path, kind: str):
    """Open a NIfTI file; return (image object, shape checked to be 3D, sha256 of the file)."""
    import nibabel as nib

    problem = _not_a_file(path)
    if problem:
        raise VolumeError(path, problem)
    fast = _from_bytes(path)
    if fast is not None:
        img, digest = fast
    else:
        problem = _header_problem(path)
        if problem:
            raise VolumeError(path, f"not a readable NIfTI {kind} ({problem})")
        try:
            img = nib.load(str(path))
        except FileNotFoundError:
            raise VolumeError(path, "file not found") from None
        except Exception as exc:               # nibabel raises many types for non-NIfTI / corrupt files
            raise VolumeError(path, f"not a readable NIfTI {kind} ({one_line(exc)})") from None
        digest = None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        shape = shape[:3]                  # (H, W, Z, 1) is a 3D volume written with a time axis of 1
    if len(shape) != 3:
        what = f"{len(shape)}D" if len(shape) != 1 else "1D"
        raise VolumeError(path, f"{what} {kind} of shape {tuple(img.shape)}; expected a 3D volume (H, W, Z)")
    if min(shape) < 1:
        raise VolumeError(path, f"empty {kind} (shape {shape})")
    if int(np.prod(shape, dtype=np.int64)) > _MAX_VOXELS:
        raise VolumeError(path, f"{kind} of shape {shape} is too large (> {_MAX_VOXELS} voxels)")
    return img, shape, digest or sha256_file(path)


def _read_data(img, path: Path, shape) -> np.ndarray:
    try:
        arr = np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, MemoryError) as exc:
        raise VolumeError(path, f"truncated or corrupt file ({one_line(exc)})") from None
    except Exception as exc:
        raise VolumeError(path, f"cannot read the voxel data ({one_line(exc)})") from None
    if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
        raise VolumeError(path, f"voxel type {arr.dtype} is not a real number type")
    return arr.reshape(shape)


def _to_uint8_labels(arr: np.ndarray, path: Path) -> np.ndarray:
    """Label ids as uint8; non-finite, non-integer, negative or > 255 values are an error."""
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise VolumeError(path, f"label values must be 0..255, found {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8, copy=False)
    # Fast path (labels are read for every volume): one nogil pass that stops at the first value that is not an
    # integer in 0..255; the numpy checks below then word the error.
    if arr.dtype in (np.float32, np.float64):
        h, w, d = arr.shape
        fast = np.empty((d, h, w), dtype=np.uint8).transpose(1, 2, 0)    # slice-major, as ``prepare`` stores it
        if labels_to_u8(arr, fast):
            return fast
    if not np.all(np.isfinite(arr)):
        raise VolumeError(path, "label contains NaN/Inf values")
    rounded = np.rint(arr)
    frac = rounded != arr
    if frac.any():
        raise VolumeError(path, f"label values must be integers, found {arr[frac].flat[0]:g}")
    if arr.size and (rounded.min() < 0 or rounded.max() > 255):
        raise VolumeError(path, f"label values must be 0..255, found {rounded.min():g}..{rounded.max():g}")
    return rounded.astype(np.uint8)


def _axcodes(affine) -> str:
    import nibabel as nib

    try:
        return "".join(c or "?" for c in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))
    except Exception:                      # a degenerate affine: record that rather than fail
        return "???"


def _states_orientation(header) -> bool:
    """Whether the file sets a qform or sform (code > 0)."""
    try:
        return int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    except Exception:
        return False


def load_nifti(image_path: str | Path, label_path: str | Path | None, vid: str) -> Volume:
    """Read an image (and optional label) NIfTI into a Volume.

    Parameters
    ----------
    image_path, label_path : path
    vid : str
        Scan id.

    Returns
    -------
    Volume
        ``image`` (H, W, Z) as stored (NaN/Inf kept: ``prepare`` handles them): float64 when the file holds
        float64, float32 otherwise; ``label`` uint8.

    Raises
    ------
    VolumeError
        Unreadable/truncated file, not 3D, label shape, orientation or values invalid.
    """
    image_path = Path(image_path)
    img, shape, checksum = _nifti_array(image_path, "image")
    data = _read_data(img, image_path, shape)
    if data.dtype != np.float64:              # float64 stays as stored: ``prepare`` converts it voxel by voxel
        data = data.astype(np.float32, copy=False)
    affine = np.asarray(img.affine if img.affine is not None else np.eye(4), dtype=np.float64)
    orientation = _axcodes(affine)
    zooms = img.header.get_zooms()[:3]
    # header zooms are float32: round to 6 decimals so 7.7 reads 7.7, not 7.699999809. Without a qform nibabel
    # passes pixdim on as written, sign included; a voxel size has none.
    spacing = tuple(round(abs(float(z)), 6) for z in zooms) + (1.0,) * (3 - len(zooms))
    label = None
    if label_path is not None:
        label_path = Path(label_path)
        limg, lshape, label_sum = _nifti_array(label_path, "label")
        if lshape != shape:
            raise VolumeError(label_path, f"label shape {lshape} differs from image shape {shape}")
        # Same shape but flipped or permuted axes (e.g. a label saved LPS beside a RAS image) would put every
        # organ in the mirror position without a word. A file without a q/sform states no orientation (nibabel
        # then assumes one): nothing to compare, the voxel grid is taken as the image's.
        if _states_orientation(img.header) and _states_orientation(limg.header):
            lorientation = _axcodes(limg.affine)
            if "?" not in orientation + lorientation and lorientation != orientation:
                raise VolumeError(label_path, f"label orientation {lorientation} differs from image orientation "
                                              f"{orientation}: its voxels would not line up with the image's")
        label = _to_uint8_labels(_read_data(limg, label_path, lshape), label_path)
        checksum += "+" + label_sum
    return Volume(id=str(vid), image=data, spacing=spacing, affine=affine, orientation=orientation,
                  label=label, path=str(image_path), checksum=checksum)


# --------------------------------------------------------------------------------------------- sources
class Source:
    """A listing of volumes and a way to load each. Subclasses set ``kind`` and ``path``."""

    kind = "source"

    def __init__(self, path: str):
        self.path = str(path)
        self.warnings: list[str] = []     # listing-time remarks (e.g. a label without image), one line each

    def refs(self) -> list[str]:
        """Volume references (ids), sorted numerically."""
        raise NotImplementedError

    def load(self, ref: str) -> Volume:
        """Read one volume; raises VolumeError naming the file and the problem."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.refs())

    def warm_up(self) -> None:
        """Import what ``load`` needs, so that the engine's first load does not pay for it inside the run."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {len(self)} volumes)"


class NiftiFolderSource(Source):
    """``image_<id>.nii[.gz]`` (+ optional ``label_<id>.nii[.gz]``) files of one folder."""

    kind = "nifti-folder"

    def warm_up(self) -> None:
        _import_nifti_reader()

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        self._images: dict[str, list[Path]] = {}
        self._labels: dict[str, list[Path]] = {}
        stray = []
        for p in Path(folder).iterdir():
            m = _NIFTI_RE.match(p.name)
            if m:
                # kept even when not a regular file (a broken link, a folder): its load then says what it is,
                # where skipping it here would drop a scan from the store without a word
                (self._images if m.group(1) == "image" else self._labels).setdefault(m.group(2), []).append(p)
            elif _NIFTI_SUFFIX.search(p.name) and not p.name.startswith(".") and p.is_file():
                stray.append(p)
        for vid in sorted(set(self._labels) - set(self._images), key=_id_key):
            self.warnings.append(f"{self._labels[vid][0]}: label without an image_{vid} file (ignored)")
        # a scan named otherwise would silently go missing from the store or the evaluation
        for p in sorted(stray):
            self.warnings.append(f"{p}: a NIfTI file not named image_<id> or label_<id> (ignored)")

    def refs(self) -> list[str]:
        return sorted(self._images, key=_id_key)

    def load(self, ref: str) -> Volume:
        images = self._images.get(ref)
        if not images:
            raise VolumeError(Path(self.path) / f"image_{ref}.nii.gz", "no such volume in this folder")
        if len(images) > 1:
            raise VolumeError(images[0], f"several image files for id {ref}: "
                                         f"{', '.join(sorted(p.name for p in images))}")
        labels = self._labels.get(ref, [])
        if len(labels) > 1:
            raise VolumeError(labels[0], f"several label files for id {ref}: "
                                         f"{', '.join(sorted(p.name for p in labels))}")
        return load_nifti(images[0], labels[0] if labels else None, ref)


def _import_nifti_reader() -> None:
    import nibabel  # noqa: F401  (0.16 s here; inside a run, the first worker would hold the GIL for it)
    for name in ("deflate", "isal.igzip"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for dtype in (np.float32, np.float64):       # label files as NIfTI stores them (column-major)
        labels_to_u8(np.zeros((2, 2, 2), dtype, order="F"), np.empty((2, 2, 2), np.uint8).transpose(1, 2, 0))


_SIBLING_SUFFIXES = (".nii.gz", ".nii", ".NII.GZ", ".NII")


class NiftiFileSource(Source):
    """One NIfTI file; ``image_<id>`` files pick up their ``label_<id>`` sibling."""

    kind = "nifti-file"

    def warm_up(self) -> None:
        _import_nifti_reader()

    def __init__(self, path: str | Path):
        super().__init__(path)
        p = Path(path)
        m = _NIFTI_RE.match(p.name)
        self._label = None
        if m and m.group(1) == "image":
            self._id = m.group(2)
            for ext in _SIBLING_SUFFIXES:
                cand = p.with_name(f"label_{self._id}{ext}")
                if cand.is_file():
                    self._label = cand
                    break
        else:
            self._id = _NIFTI_SUFFIX.sub("", p.name)
            if m:                                     # label_<id>: most likely given in place of its image
                image = [c for c in (p.with_name(f"image_{m.group(2)}{e}") for e in _SIBLING_SUFFIXES)
                         if c.is_file()]
                self.warnings.append(f"{p}: named as a label volume, read here as an image"
                                     + (f" (its image is {image[0]})" if image else ""))

    def refs(self) -> list[str]:
        return [self._id]

    def load(self, ref: str) -> Volume:
        if ref != self._id:
            raise VolumeError(self.path, f"this source holds only volume {self._id!r}, not {ref!r}")
        return load_nifti(self.path, self._label, self._id)


def find_chaos_subjects(folder: Path) -> dict[str, Path]:
    """``{id: <id>/T2SPIR folder}`` of a raw CHAOS tree rooted at ``folder`` (empty when none)."""
    if (folder / "T2SPIR" / "DICOM_anon").is_dir():
        return {folder.name: folder / "T2SPIR"}
    for base in (folder, folder / "MR", folder / "Train_Sets" / "MR"):
        if base.is_dir():
            found = {d.name: d / "T2SPIR" for d in base.iterdir() if (d / "T2SPIR" / "DICOM_anon").is_dir()}
            if found:
                return found
    return {}


class ChaosRawSource(Source):
    """Raw CHAOS MR download: ``<id>/T2SPIR/DICOM_anon/*.dcm`` + ``Ground/*.png`` (engine.dicom)."""

    kind = "chaos-raw"

    def warm_up(self) -> None:
        try:
            import pydicom  # noqa: F401
            from PIL import Image  # noqa: F401
        except ImportError:
            pass                    # ``load`` words the error for each volume

    def __init__(self, folder: str | Path, subjects: dict[str, Path], prepare_cfg):
        super().__init__(folder)
        self._subjects = subjects
        self._cfg = prepare_cfg

    def refs(self) -> list[str]:
        return sorted(self._subjects, key=_id_key)

    def load(self, ref: str) -> Volume:
        from engine.dicom import read_chaos_subject

        if ref not in self._subjects:
            raise VolumeError(Path(self.path) / ref, "no such CHAOS subject")
        return read_chaos_subject(self._subjects[ref], ref, self._cfg)


class PhantomSource(Source):
    """The built-in synthetic volumes ``phantom_000`` ... (generated on demand by ``engine.phantom``)."""

    kind = "phantom"

    def __init__(self, n: int, seed: int):
        super().__init__(f"phantom:{n}")
        self.n = int(n)
        self.seed = int(seed)

    def refs(self) -> list[str]:
        return [f"phantom_{i:03d}" for i in range(self.n)]

    def load(self, ref: str) -> Volume:
        m = re.fullmatch(r"phantom_(\d+)", ref)
        if not m or int(m.group(1)) >= self.n:
            raise VolumeError(self.path, f"no phantom volume {ref!r} (ids phantom_000..phantom_{self.n - 1:03d})")
        try:
            from engine.phantom import make_volume
        except ImportError as exc:
            raise VolumeError(self.path, f"the built-in phantom is not available ({one_line(exc)})") from None
        return make_volume(int(m.group(1)), seed=self.seed)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _not_nifti(path: Path) -> str:
    """Why a file cannot be a source; an engine store given in place of its scans says which scans made it."""
    try:
        with open(path, "rb") as fh:
            hdf5 = fh.read(8) == _HDF5_SIGNATURE
    except OSError:
        hdf5 = False
    if hdf5:
        made_from = ""
        try:
            import h5py
            with h5py.File(path, "r") as f:
                made_from = json.loads(f.attrs["source"]).get("input", "")
        except Exception:                      # any HDF5 file, or a store without its source record
            pass
        return ("an HDF5 file (a store?), not scans: give the NIfTI file or folder, raw CHAOS folder or "
                "'phantom' it was made from" + (f" ({made_from})" if made_from else ""))
    return "not a NIfTI file (.nii or .nii.gz); give a NIfTI file, a folder or 'phantom'"


def open_source(spec: str, cfg: Any = None) -> Source:  # cfg: alpnet.config.Config or None
    """Open a data source.

    Parameters
    ----------
    spec : str
        A NIfTI folder or file, a raw CHAOS folder, ``phantom`` or ``phantom:N``.
    cfg : Config, optional
        Uses ``cfg.data`` (phantom count and seed) and ``cfg.prepare`` (raw CHAOS normalisation);
        defaults when None.

    Returns
    -------
    Source

    Raises
    ------
    VolumeError
        Missing path, a file that is not NIfTI, or a folder with nothing usable.
    """
    data_cfg, prep_cfg = _configs(cfg)
    spec = str(spec)
    if spec == "phantom" or spec.startswith("phantom:"):
        n_text = spec.partition(":")[2]
        if not n_text:
            return PhantomSource(data_cfg.phantom_volumes, data_cfg.phantom_seed)
        if not n_text.isdigit() or int(n_text) < 1:
            raise VolumeError(spec, "phantom:N needs a positive integer N, e.g. phantom:5")
        return PhantomSource(int(n_text), data_cfg.phantom_seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise VolumeError(spec, "no such file or folder")
    if path.is_file():
        if _NIFTI_SUFFIX.search(path.name):
            return NiftiFileSource(path)
        raise VolumeError(spec, _not_nifti(path))
    if not path.is_dir():
        raise VolumeError(spec, "neither a file nor a folder")
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise VolumeError(spec, f"cannot list the folder ({one_line(exc)})") from None
    if not entries:
        raise VolumeError(spec, "empty folder")
    folder = NiftiFolderSource(path)
    if folder.refs():
        return folder
    subjects = find_chaos_subjects(path)
    if subjects:
        return ChaosRawSource(path, subjects, prep_cfg)
    hint = " (only label files: every label_<id> needs its image_<id>)" if folder.warnings else ""
    raise VolumeError(spec, "no image_<id>.nii[.gz] files and no raw CHAOS <id>/T2SPIR/DICOM_anon "
                            f"folders{hint}")


def iter_volumes(source: Source) -> Iterator[Volume | VolumeError]:
    """Load every volume of ``source`` in ``refs()`` order; a bad one yields its VolumeError and the
    iteration goes on."""
    for ref in source.refs():
        try:
            yield source.load(ref)
        except VolumeError as exc:
            yield exc
        except Exception as exc:           # never let one input stop the others
            yield VolumeError(f"{source.path}[{ref}]", f"unexpected error ({one_line(exc)})")


# --------------------------------------------------------------------------------------------- describe
def _volume_row(vol: Volume) -> tuple[dict, list[str], str | None]:
    """Summary row of a volume, warnings, and an error when ``prepare`` would reject it."""
    img = vol.image
    with np.errstate(over="ignore"):          # what ``prepare`` repairs: not finite once in float32
        finite = np.isfinite(img.astype(np.float32, copy=False))
    n_bad = int(img.size - np.count_nonzero(finite))
    warnings, error = [], None
    if n_bad == img.size:
        error = "no finite voxel (all NaN/Inf)"
    else:
        if n_bad:
            warnings.append(f"{vol.path}: {n_bad} NaN/Inf voxel(s) (replaced by the finite minimum when prepared)")
        lo, hi = float(img[finite].min()), float(img[finite].max())
        if lo == hi:
            error = f"constant volume (every voxel = {lo:g})"
    labels = [int(v) for v in np.unique(vol.label)] if vol.label is not None else None
    row = dict(id=vol.id, shape=list(img.shape), spacing=[float(s) for s in vol.spacing],
               slices=vol.n_slices, orientation=vol.orientation, labels=labels, path=vol.path,
               checksum=vol.checksum)
    return row, warnings, error


def describe(spec: str, cfg: Any = None, as_json: bool = False) -> int:  # cfg: alpnet.config.Config or None
    """Print the volumes a source yields: one row each (id, shape, spacing, slices, orientation, label
    ids), totals, and one line per bad input.

    Returns
    -------
    int
        0 when every input loaded, 1 when some did not, 2 for a missing or unusable source (as ``preprocess``
        and ``evaluate`` give for the same ``--input`` / ``--data``).
    """
    try:
        source = open_source(spec, cfg)
    except VolumeError as exc:
        if as_json:
            print(json.dumps(dict(source=str(spec), volumes=[], errors=[str(exc)], warnings=[],
                                  totals=dict(volumes=0, slices=0, failed=1)), indent=2))
        else:
            print(f"inspect: {exc}", file=sys.stderr)
        return 2
    rows, errors, warnings = [], [], list(source.warnings)
    if not as_json:
        print(f"{source.kind} source {source.path}")
        print(f"{'id':>12}  {'shape':>16}  {'spacing (mm)':>20}  {'slices':>6}  {'orient':>6}  labels")
    for item in iter_volumes(source):
        if isinstance(item, VolumeError):
            errors.append(str(item))
            if not as_json:
                print(f"error: {item}", file=sys.stderr, flush=True)
            continue
        row, warns, error = _volume_row(item)
        warnings += warns
        if error:
            errors.append(f"{item.path}: {error}")
            if not as_json:
                print(f"error: {item.path}: {error}", file=sys.stderr, flush=True)
            continue
        rows.append(row)
        if not as_json:
            shape = "x".join(str(s) for s in row["shape"])
            spacing = " x ".join(f"{s:.4g}" for s in row["spacing"])
            labels = "-" if row["labels"] is None else " ".join(str(v) for v in row["labels"])
            print(f"{row['id']:>12}  {shape:>16}  {spacing:>20}  {row['slices']:>6}  "
                  f"{row['orientation']:>6}  {labels}", flush=True)
    totals = dict(volumes=len(rows), slices=int(sum(r["slices"] for r in rows)), failed=len(errors))
    label_ids = sorted({v for r in rows for v in (r["labels"] or [])})
    totals["label_ids"] = label_ids
    if as_json:
        print(json.dumps(dict(source=source.path, kind=source.kind, volumes=rows, errors=errors,
                              warnings=warnings, totals=totals), indent=2))
    else:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        ids = " ".join(str(v) for v in label_ids) if label_ids else "none"
        print(f"total: {totals['volumes']} volumes, {totals['slices']} slices, label ids {ids}"
              + (f"; {len(errors)} input(s) failed" if errors else ""))
    return 1 if errors else 0
