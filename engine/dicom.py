"""Reader of the raw CHAOS MR layout: ``<id>/T2SPIR/DICOM_anon/*.dcm`` + ``<id>/T2SPIR/Ground/*.png``.

It produces the same volumes as the SSL-ALPNet preparation (method.md 1.2-1.3: ``dcm2nii``, the PNG
notebook and ``image_normalize``) with our own code and no external converter.

Array orientation (derived, see ``dicom_to_array``)
----------------------------------------------------
A DICOM slice ``pixel_array[r, c]`` has ``c`` running along the first ImageOrientationPatient vector
(for CHAOS axial slices +x LPS = towards the patient's left) and ``r`` along the second (+y LPS = towards
posterior). ``dcm2nii`` writes NIfTI column-major with the rows flipped, i.e. NIfTI voxel
``[i, j, k] = pixel_array_k[rows - 1 - j, i]``, which with the usual ``[1,0,0,0,1,0]`` orientation is
L-A-S: exactly the orientation of the public preprocessed copy (``nib.aff2axcodes`` = LAS). The label
notebook stacks the PNGs as (Z, H, W), flips axis 1 ("flip correction") and hands the array to
SimpleITK, whose (z, y, x) array convention gives label voxel ``[i, j, k] = png_k[H - 1 - j, i]``: the
same transform, which is why images and labels of the public copy agree. We apply that transform to
both (``a.T[:, ::-1]`` per slice) and stack the slices in increasing position along the slice normal
``n = row_dir x col_dir`` (+z LPS = superior for axial slices, so ``k`` runs towards the head). The
affine is built from the DICOM geometry itself (RAS+), so ``nib.aff2axcodes`` of it is computed, not
assumed.

Intensities (mimicking the integer pipeline of the original)
-------------------------------------------------------------
``dcm2nii`` keeps the 16-bit integers; ``image_normalize`` clips with ``array[array > p] = p`` on that
integer array (so the clip value is truncated to an integer) and SimpleITK's linear resampling writes
into the same integer type (values truncated toward zero; points beyond the last voxel centre by more
than half a voxel get 0). This is why every voxel of the public copy is an integer and why most of its
volumes end with an all-zero slice. We reproduce each of these steps for integer-valued DICOM data.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.prepare import center_crop_pad, crop_offset
from engine.volume import Volume, VolumeError, one_line

if TYPE_CHECKING:
    from engine.config import PrepareConfig

# CHAOS PNG grey values -> label ids (accepted ranges, method.md 1.1-1.2)
GREY_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
_GREY_TEXT = "0, 55-70, 110-135, 175-200, 240-255"

_LUT = np.full(65536, 255, dtype=np.uint8)     # 255 marks a grey value outside every range
_LUT[0] = 0
for _lo, _hi, _lab in GREY_RANGES:
    _LUT[_lo:_hi + 1] = _lab


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------- DICOM series
def _float_list(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise VolumeError(path, f"DICOM tag {keyword} is missing")
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise VolumeError(path, f"DICOM tag {keyword} is not numeric ({value!r})") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(path, f"DICOM tag {keyword} must hold {n} finite numbers, got {value!r}")
    return arr


def _read_slice(path: Path):
    """Header geometry and pixels of one DICOM file (raises VolumeError naming the file)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        ds = _read_bare_dataset(path)
        if ds is None:
            raise VolumeError(path, "not a DICOM file") from None
    except Exception as exc:                               # truncated or malformed: one line, not a traceback
        raise VolumeError(path, f"cannot read DICOM ({one_line(exc)})") from None
    _assume_transfer_syntax(ds)
    iop = _float_list(ds, "ImageOrientationPatient", 6, path)
    ipp = _float_list(ds, "ImagePositionPatient", 3, path)
    ps = _float_list(ds, "PixelSpacing", 2, path)
    if np.any(ps <= 0):
        raise VolumeError(path, f"PixelSpacing must be positive, got {list(ps)}")
    try:
        pix = ds.pixel_array
    except Exception as exc:
        raise VolumeError(path, f"cannot decode the pixel data ({_decode_error(exc)})") from None
    if pix.ndim != 2:
        raise VolumeError(path, f"expected one grey-level frame, got pixel data of shape {pix.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        pix = pix * slope + intercept
    uid = str(ds.get("SeriesInstanceUID", ""))
    return dict(path=path, iop=iop, ipp=ipp, ps=ps, pix=pix, uid=uid, rows=int(pix.shape[0]),
                cols=int(pix.shape[1]))


def _read_bare_dataset(path: Path):
    """A file that is a DICOM dataset without the 128-byte preamble and file meta (older writers, some
    exports), or None. pydicom reads anything when forced, so only a result with pixel data counts."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=True)
        return ds if "PixelData" in ds else None
    except Exception:
        return None


def _assume_transfer_syntax(ds) -> None:
    """Give a file without a Transfer Syntax UID (no file meta: older or hand-made files) the encoding pydicom
    read its dataset in, so that its pixel data can be decoded; such a file cannot hold compressed pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", None) or (getattr(ds, "read_implicit_vr", None),
                                                                    getattr(ds, "read_little_endian", None))
    if implicit is None or little is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _decode_error(exc: BaseException) -> str:
    """``one_line`` of a pixel decoding error; pydicom lists the plugins a compressed transfer syntax needs on
    the lines after its first, which is the part a user acts on, so they are kept (joined with '; ')."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{type(exc).__name__}: {lines[0]} {'; '.join(lines[1:])}"
    return one_line(exc)


def dicom_to_array(pixels: np.ndarray) -> np.ndarray:
    """One DICOM frame or PNG mask (rows, cols) -> our in-plane layout (cols, rows reversed).

    ``out[i, j] = pixels[rows - 1 - j, i]``: the transform ``dcm2nii`` applies to the image and the
    SSL-ALPNet notebook applies to the PNG masks (see the module docstring).
    """
    return pixels.T[:, ::-1]


def array_to_dicom(arr: np.ndarray) -> np.ndarray:
    """Inverse of ``dicom_to_array``: our (i, j) slice -> DICOM (rows, cols)."""
    return arr[:, ::-1].T


def read_dicom_series(folder: str | Path) -> dict:
    """Read one DICOM series into a volume in our array layout, without resampling.

    Parameters
    ----------
    folder : path
        Folder of ``*.dcm`` files of one series.

    Returns
    -------
    dict
        ``image`` (cols, rows, Z) ndarray (integer when the pixel data are integers), ``spacing``
        (3 floats, mm), ``affine`` (4, 4) voxel -> RAS+ mm, ``files`` (list of Path, in slice order),
        ``rows``, ``cols``, ``checksum`` (sha256 over the files in slice order).

    Raises
    ------
    VolumeError
        Unreadable files, mixed series, inconsistent geometry, duplicate or missing slices.
    """
    folder = Path(folder)
    slices = [_read_slice(p) for p in _series_files(folder)]
    _check_one_series(folder, slices)
    _check_same_geometry(slices)
    first = slices[0]
    row_dir, col_dir = first["iop"][:3], first["iop"][3:]
    normal = np.cross(row_dir, col_dir)
    if not 0.99 < np.linalg.norm(normal) < 1.01:
        raise VolumeError(first["path"], f"ImageOrientationPatient {list(first['iop'])} is not two "
                                         "orthogonal unit vectors")
    slices, step = _in_position_order(folder, slices, normal)
    d_row, d_col = first["ps"]                 # PixelSpacing = (between rows, between columns)
    digest = hashlib.sha256()
    for s in slices:
        _hash_file(s["path"], digest)
    return dict(image=_stack(slices), spacing=(float(d_col), float(d_row), step),
                affine=_ras_affine(slices, first), files=[s["path"] for s in slices],
                rows=first["rows"], cols=first["cols"], checksum=digest.hexdigest())


def _series_files(folder: Path) -> list[Path]:
    """The ``*.dcm`` files of ``folder`` in natural name order; refused when there is none."""
    # hidden files are skipped: macOS leaves a "._<name>" companion (not DICOM) beside each file it copies
    files = sorted((p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() == ".dcm" and not p.name.startswith(".")),
                   key=lambda p: _natural_key(p.name)) if folder.is_dir() else []
    if not files:
        raise VolumeError(folder, "no .dcm files")
    return files


def _check_one_series(folder: Path, slices: list[dict]) -> None:
    """Refuse slices of several series, or a single slice."""
    uids = sorted({s["uid"] for s in slices})
    if len(uids) > 1:
        raise VolumeError(folder, f"mixed DICOM series ({len(uids)} SeriesInstanceUIDs: "
                                  f"{', '.join(u or '<none>' for u in uids[:3])}{' ...' if len(uids) > 3 else ''})"
                                  "; put each series in its own folder")
    if len(slices) < 2:
        raise VolumeError(folder, "a single DICOM slice is not a volume (need at least 2)")


def _check_same_geometry(slices: list[dict]) -> None:
    """Refuse a slice whose size, orientation or pixel spacing differs from the first slice's."""
    first = slices[0]
    for s in slices[1:]:
        if (s["rows"], s["cols"]) != (first["rows"], first["cols"]):
            raise VolumeError(s["path"], f"slice size {s['cols']}x{s['rows']} differs from "
                                         f"{first['path'].name} ({first['cols']}x{first['rows']})")
        if not np.allclose(s["iop"], first["iop"], atol=1e-4):
            raise VolumeError(s["path"], f"ImageOrientationPatient differs from {first['path'].name}")
        if not np.allclose(s["ps"], first["ps"], rtol=1e-5, atol=1e-6):
            raise VolumeError(s["path"], f"PixelSpacing differs from {first['path'].name}")


def _in_position_order(folder: Path, slices: list[dict], normal: np.ndarray) -> tuple[list[dict], float]:
    """The slices ordered by ImagePositionPatient along ``normal``, and their spacing (the median step, mm).

    Refuses slices at one position, a duplicate, a gap (missing slices) and irregular spacing.
    """
    pos = np.array([float(np.dot(s["ipp"], normal)) for s in slices])
    order = np.argsort(pos, kind="stable")
    slices = [slices[i] for i in order]
    steps = np.diff(pos[order])
    step = float(np.median(steps))
    if step <= 1e-3:
        raise VolumeError(folder, f"slices share the same position ({slices[0]['path'].name}, "
                                  f"{slices[1]['path'].name}, ...)")
    for i, d in enumerate(steps):
        pair = f"{slices[i]['path'].name} and {slices[i + 1]['path'].name}"
        if d <= 1e-3 * step:
            raise VolumeError(folder, f"duplicate slice position: {pair}")
        if d > 1.5 * step:
            missing = int(round(d / step)) - 1
            raise VolumeError(folder, f"missing slice(s): {d:.3g} mm between {pair} where the spacing is "
                                      f"{step:.3g} mm (about {max(missing, 1)} slice(s) missing)")
        if abs(d - step) > 0.2 * step:
            raise VolumeError(folder, f"irregular slice spacing: {d:.3g} mm between {pair}, {step:.3g} mm "
                                      "elsewhere")
    return slices, step


def _stack(slices: list[dict]) -> np.ndarray:
    """(cols, rows, Z) volume of the slices' pixels: int32 when all are integers, else float64."""
    pix = [s["pix"] for s in slices]
    integer = all(np.issubdtype(p.dtype, np.integer) for p in pix)
    image = np.empty((slices[0]["cols"], slices[0]["rows"], len(pix)), dtype=np.int32 if integer else np.float64)
    for k, p in enumerate(pix):
        image[:, :, k] = dicom_to_array(p)
    return image


def _ras_affine(slices: list[dict], first: dict) -> np.ndarray:
    """(4, 4) voxel -> RAS+ mm affine of the volume of ``slices`` (in position order), whose orientation,
    pixel spacing and size are those of ``first``."""
    row_dir, col_dir = first["iop"][:3], first["iop"][3:]
    d_row, d_col = first["ps"]
    # voxel (i, j, k) sits at IPP_0 + i*d_col*row_dir + (rows-1-j)*d_row*col_dir + k*slice_step (LPS)
    slice_vec = (slices[-1]["ipp"] - slices[0]["ipp"]) / (len(slices) - 1)
    lps = np.eye(4)
    lps[:3, 0] = d_col * row_dir
    lps[:3, 1] = -d_row * col_dir
    lps[:3, 2] = slice_vec
    lps[:3, 3] = slices[0]["ipp"] + (first["rows"] - 1) * d_row * col_dir
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps          # LPS (DICOM) -> RAS (NIfTI, nibabel)


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)


# --------------------------------------------------------------------------------------------- PNG masks
def read_mask_png(path: str | Path, rows: int, cols: int) -> np.ndarray:
    """One CHAOS ground-truth PNG -> label ids (rows, cols) uint8, in DICOM pixel layout.

    Raises VolumeError when the file is unreadable, its size differs from (rows, cols), or a grey value
    lies outside the CHAOS ranges (0, 55-70, 110-135, 175-200, 240-255).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise VolumeError(path, f"cannot read PNG mask ({one_line(exc)})") from None
    if arr.ndim == 3:
        # a grey mask saved as RGB(A): accept only when the colour channels agree
        if arr.shape[2] >= 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise VolumeError(path, f"colour PNG mask (shape {arr.shape}); expected a grey-level mask")
    if arr.ndim != 2:
        raise VolumeError(path, f"unexpected PNG mask shape {arr.shape}")
    if arr.shape != (rows, cols):
        raise VolumeError(path, f"mask size {arr.shape[1]}x{arr.shape[0]} differs from its DICOM slice "
                                f"({cols}x{rows})")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 65535:
        raise VolumeError(path, f"unsupported PNG mask values (dtype {arr.dtype})")
    labels = _LUT[arr.astype(np.int64)]
    if np.any(labels == 255):
        bad = np.unique(arr[labels == 255])
        shown = ", ".join(str(int(v)) for v in bad[:6]) + (" ..." if bad.size > 6 else "")
        raise VolumeError(path, f"grey value(s) {shown} outside the CHAOS label ranges ({_GREY_TEXT})")
    return labels


def _png_files(ground: Path) -> dict[str, Path]:
    """The PNG masks of ``ground`` by base name (``.png`` in any case)."""
    return {p.stem: p for p in ground.iterdir()
            if p.is_file() and p.suffix.lower() == ".png" and not p.name.startswith(".")}   # as _series_files


def read_masks(ground: Path, dicom_files: list[Path], rows: int, cols: int) -> np.ndarray | None:
    """Label volume (cols, rows, Z) uint8 from the PNGs paired by base name with ``dicom_files``.

    None when the Ground folder is absent or holds no PNG. Raises VolumeError for a missing or an
    unpaired PNG.
    """
    if not ground.is_dir():
        return None
    pngs = _png_files(ground)
    if not pngs:
        return None
    stems = {p.stem for p in dicom_files}
    extra = sorted(set(pngs) - stems, key=_natural_key)
    if extra:
        raise VolumeError(pngs[extra[0]], f"PNG mask has no DICOM slice of the same name "
                                          f"({len(extra)} such file(s))")
    label = np.empty((cols, rows, len(dicom_files)), dtype=np.uint8)
    for k, dcm in enumerate(dicom_files):
        png = pngs.get(dcm.stem)
        if png is None:
            raise VolumeError(ground / f"{dcm.stem}.png", f"PNG mask missing for DICOM slice {dcm.name}")
        label[:, :, k] = dicom_to_array(read_mask_png(png, rows, cols))
    return label


# --------------------------------------------------------------------------------------------- method.md 1.3
def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Output size per axis: ``int(n * (old / new) + 1)``, in the float order of the original notebook."""
    coe = np.asarray(spacing, dtype=np.float64) * 1.0 / np.asarray(new_spacing, dtype=np.float64)
    return tuple(int(sz + 1) for sz in np.asarray(shape, dtype=np.float64) * coe)


def resample_linear(vol: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray:
    """Linear resampling on the same origin, as SimpleITK's ``ResampleImageFilter`` does it.

    Output voxel ``o`` samples input continuous index ``o * new / old`` per axis. Points within half a
    voxel beyond the last voxel centre take the edge value (ITK's linear interpolator); points farther
    out get 0 (ITK's default pixel value). Computed in float64.

    Parameters
    ----------
    vol : ndarray, shape (X, Y, Z)
    spacing, new_spacing : 3 floats (mm)

    Returns
    -------
    ndarray, shape ``resampled_shape(vol.shape, spacing, new_spacing)``, float64
    """
    from scipy import ndimage

    out_shape = resampled_shape(vol.shape, spacing, new_spacing)
    ratio = np.asarray(new_spacing, dtype=np.float64) / np.asarray(spacing, dtype=np.float64)
    out = ndimage.affine_transform(np.asarray(vol, dtype=np.float64), ratio, output_shape=out_shape,
                                   order=1, mode="nearest")
    for axis, (n, m, r) in enumerate(zip(vol.shape, out_shape, ratio)):
        outside = np.arange(m) * r >= n - 0.5
        if outside.any():
            index = [slice(None)] * 3
            index[axis] = outside
            out[tuple(index)] = 0.0
    return out


def resample_labels(label: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray:
    """Labels one value at a time: binary mask -> linear resampling -> round -> written in increasing
    value order (later values overwrite earlier ones), method.md 1.3."""
    out = np.zeros(resampled_shape(label.shape, spacing, new_spacing), dtype=np.uint8)
    for value in np.unique(label):
        if value == 0:
            continue
        res = np.rint(resample_linear(label == value, spacing, new_spacing))
        out[res == 1] = value
    return out


def normalize_chaos(image: np.ndarray, label: np.ndarray | None, spacing: Sequence[float], cfg: PrepareConfig
                    ) -> tuple:
    """method.md 1.3 on arrays in our layout: clip the bright tail, resample, centre-crop/pad.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Integer-valued data follow the original integer pipeline (clip value and resampled values
        truncated to integers).
    label : ndarray (X, Y, Z) of label ids, or None
    spacing : 3 floats (mm)
    cfg : PrepareConfig
        ``clip_percentile``, ``target_spacing``, ``size``.

    Returns
    -------
    (image, label, offsets)
        ``image`` (size, size, Z') float32, ``label`` (size, size, Z') uint8 or None, and the crop
        offsets (resampled index of output index 0 on the two in-plane axes).
    """
    integer = np.issubdtype(image.dtype, np.integer)
    clip = float(np.percentile(image, cfg.clip_percentile))
    if integer:
        clip = float(np.trunc(clip))          # the original assigns the percentile into an int16 array
    img = np.minimum(image, clip) if integer else np.where(image > clip, clip, image)
    res = resample_linear(img, spacing, cfg.target_spacing)
    if integer:
        res = np.trunc(res)                   # ITK casts the interpolated value to the integer pixel type
    size = int(cfg.size)
    offsets = (crop_offset(res.shape[0], size), crop_offset(res.shape[1], size))
    out_img = center_crop_pad(res, size, float(res.min())).astype(np.float32)
    out_lab = None
    if label is not None:
        out_lab = center_crop_pad(resample_labels(label, spacing, cfg.target_spacing), size, 0)
    return out_img, out_lab, offsets


def read_chaos_subject(folder: str | Path, vid: str, cfg: PrepareConfig) -> Volume:
    """One raw CHAOS subject (its ``T2SPIR`` folder) -> a Volume like the public preprocessed copy.

    Parameters
    ----------
    folder : path
        ``<id>/T2SPIR`` (holding ``DICOM_anon`` and optionally ``Ground``).
    vid : str
        Scan id.
    cfg : PrepareConfig

    Raises
    ------
    VolumeError
        Any problem of the series or of the masks, naming the file or folder.
    """
    folder = Path(folder)
    series = read_dicom_series(folder / "DICOM_anon")
    label = read_masks(folder / "Ground", series["files"], series["rows"], series["cols"])
    image, lab, offsets = normalize_chaos(series["image"], label, series["spacing"], cfg)
    ratio = np.asarray(cfg.target_spacing, dtype=np.float64) / np.asarray(series["spacing"])
    # output voxel o is resampled voxel o + offset, i.e. source continuous index (o + offset) * ratio
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:2, 3] = np.asarray(offsets, dtype=np.float64) * ratio[:2]
    affine = series["affine"] @ step
    import nibabel as nib

    orientation = "".join(c or "?" for c in nib.aff2axcodes(affine))
    checksum = series["checksum"]
    if label is not None:
        digest = hashlib.sha256()
        pngs = _png_files(folder / "Ground")          # the files read_masks read (``.PNG`` too)
        for dcm in series["files"]:
            _hash_file(pngs[dcm.stem], digest)
        checksum += "+" + digest.hexdigest()
    return Volume(id=str(vid), image=image, spacing=tuple(float(s) for s in cfg.target_spacing),
                  affine=affine, orientation=orientation, label=lab, path=str(folder), checksum=checksum)
