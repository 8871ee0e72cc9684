"""Raw CHAOS MR reader (engine.dicom): round trip through real DICOM + PNG files, geometry, bad inputs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.config import PrepareConfig
from engine.dicom import (array_to_dicom, dicom_to_array, normalize_chaos, read_chaos_subject,
                          read_dicom_series, resample_labels, resample_linear, resampled_shape)
from engine.sources import describe, iter_volumes, open_source
from engine.volume import VolumeError

GREY = {1: 63, 2: 126, 3: 189, 4: 252}     # CHAOS PNG grey value of each label id


# --------------------------------------------------------------------------------------------- writer
def write_chaos_subject(root: Path, vid: str, image: np.ndarray, label: np.ndarray | None,
                        spacing=(1.5, 1.5, 9.0), series_uid: str = "1.2.826.0.1.3680043.8.498.1",
                        origin=(-180.0, -150.0, -60.0), shuffle: bool = True) -> Path:
    """Write ``image`` (X, Y, Z in our LAS layout) as an axial DICOM series + CHAOS PNG masks.

    Files are named IMG-0001-<n>.dcm with instance numbers in a shuffled order, so the reader must sort
    by ImagePositionPatient and pair masks by name, not by listing order.
    """
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    t2 = root / vid / "T2SPIR"
    dcm_dir, png_dir = t2 / "DICOM_anon", t2 / "Ground"
    dcm_dir.mkdir(parents=True)
    if label is not None:
        png_dir.mkdir()
    nx, ny, nz = image.shape
    d_col, d_row, d_z = spacing           # our axis 0 = DICOM columns, axis 1 = (reversed) rows
    rng = np.random.default_rng(7)
    names = rng.permutation(nz) + 1 if shuffle else np.arange(nz) + 1
    r, c = np.indices((ny, nx))
    for k in range(nz):
        # written from the DICOM side, independently of engine.dicom: pixel (r, c) of slice k is our
        # voxel (i = c, j = ny - 1 - r, k)
        pixels = image[c, ny - 1 - r, k]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.2.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "MR"
        ds.InstanceNumber = int(names[k])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        # array k is k slices above origin (LPS +z = superior)
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * d_z]
        ds.PixelSpacing = [d_row, d_col]
        ds.SliceThickness = d_z
        ds.SpacingBetweenSlices = d_z
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
        stem = f"IMG-0001-{int(names[k]):05d}"
        ds.save_as(dcm_dir / f"{stem}.dcm", enforce_file_format=True)
        if label is not None:
            grey = np.zeros(pixels.shape, np.uint8)
            lab = label[c, ny - 1 - r, k]
            for lid, g in GREY.items():
                grey[lab == lid] = g
            Image.fromarray(grey).save(png_dir / f"{stem}.png")
    return t2


def synthetic_volume(shape=(44, 36, 7), seed=0):
    """Integer image with a bright tail and four labelled blobs; non-square so a transpose shows."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    image = (200 + 3 * x + 5 * y + 20 * z + rng.integers(0, 40, shape)).astype(np.int64)
    image[rng.random(shape) < 0.01] = 4000                     # spikes for the 99.5 % clip
    label = np.zeros(shape, np.uint8)
    centres = {1: (10, 10, 2), 2: (30, 12, 3), 3: (12, 26, 4), 4: (32, 27, 5)}
    for lid, (cx, cy, cz) in centres.items():
        label[(x - cx) ** 2 + (y - cy) ** 2 + 4 * (z - cz) ** 2 < 40] = lid
    return image, label


def small_cfg(**kw) -> PrepareConfig:
    return dataclasses.replace(PrepareConfig(), **kw)


# --------------------------------------------------------------------------------------------- layout
def test_dicom_layout_transform_is_transpose_plus_row_flip():
    pixels = np.arange(6).reshape(2, 3)           # 2 rows, 3 columns
    arr = dicom_to_array(pixels)
    assert arr.shape == (3, 2)
    # our [i, j] = DICOM [rows - 1 - j, i]
    for i in range(3):
        for j in range(2):
            assert arr[i, j] == pixels[1 - j, i]
    assert np.array_equal(array_to_dicom(arr), pixels)


def test_series_geometry_affine_matches_dicom_positions(tmp_path):
    image, label = synthetic_volume()
    origin = (-180.0, -150.0, -60.0)
    t2 = write_chaos_subject(tmp_path, "7", image, label, spacing=(2.0, 1.5, 9.0), origin=origin)
    series = read_dicom_series(t2 / "DICOM_anon")
    assert np.array_equal(series["image"], image)              # exact pixels, our layout, sorted by position
    assert series["spacing"] == (2.0, 1.5, 9.0)
    assert "".join(nib.aff2axcodes(series["affine"])) == "LAS"
    nx, ny, _ = image.shape
    for i, j, k in [(0, 0, 0), (5, 7, 3), (nx - 1, ny - 1, 6)]:
        r, c = ny - 1 - j, i                                  # DICOM row / column of voxel (i, j)
        lps = np.array([origin[0] + c * 2.0, origin[1] + r * 1.5, origin[2] + k * 9.0])
        ras = lps * [-1, -1, 1]
        assert np.allclose(series["affine"] @ [i, j, k, 1], [*ras, 1])


def test_voxel_position_of_a_marker_agrees_with_dicom_geometry(tmp_path):
    """Data and affine agree: a marker written at DICOM pixel (r, c) of the slice at height z ends up in
    the voxel that the affine maps to that pixel's patient position, whatever the layout convention."""
    image = np.full((20, 16, 5), 100, np.int64)
    origin, spacing = (-30.0, -20.0, 10.0), (2.0, 1.5, 9.0)
    t2 = write_chaos_subject(tmp_path, "9", image, None, spacing=spacing, origin=origin)
    import pydicom
    f = sorted((t2 / "DICOM_anon").glob("*.dcm"))[1]
    ds = pydicom.dcmread(f)
    px = ds.pixel_array.copy()
    r0, c0 = 3, 11
    px[r0, c0] = 999
    ds.PixelData = px.astype(np.uint16).tobytes()
    ds.save_as(f)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    lps = ipp + c0 * 2.0 * np.array([1, 0, 0]) + r0 * 1.5 * np.array([0, 1, 0])   # DICOM PS 3.3 C.7.6.2
    series = read_dicom_series(t2 / "DICOM_anon")
    (i, j, k), = np.argwhere(series["image"] == 999)
    assert np.allclose(series["affine"] @ [i, j, k, 1], [*(lps * [-1, -1, 1]), 1])
    # a patient-left, anterior, superior voxel has larger i, j, k (LAS)
    assert "".join(nib.aff2axcodes(series["affine"])) == "LAS"


# --------------------------------------------------------------------------------------------- resampling
def test_resampled_shape_follows_the_notebook_rounding():
    # the notebook's int(n * (old / new) + 1): 36 slices of 7.700004577 mm -> 37, of 7.69999695 mm -> 36
    assert resampled_shape((256, 256, 36), (1.54296875, 1.54296875, 7.700004577636719),
                           (1.25, 1.25, 7.7)) == (317, 317, 37)
    assert resampled_shape((256, 256, 36), (1.69921875, 1.69921875, 7.6999969482421875),
                           (1.25, 1.25, 7.7)) == (349, 349, 36)


def test_resample_linear_itk_boundary_rules():
    vol = np.arange(4, dtype=float).reshape(4, 1, 1) + 10     # 10, 11, 12, 13
    out = resample_linear(vol, (1.0, 1.0, 1.0), (0.75, 1.0, 1.0))
    # index o samples 0.75 * o: 0, .75, 1.5, 2.25, 3.0 (edge), 3.75 (> n - 0.5: outside -> 0)
    assert out.shape == (6, 2, 2)
    assert np.allclose(out[:, 0, 0], [10, 10.75, 11.5, 12.25, 13, 0])
    assert np.all(out[:, 1, :] == 0) and np.all(out[:, :, 1] == 0)   # 1 voxel axes grow to 2: outside


def test_resample_labels_one_value_at_a_time():
    lab = np.zeros((4, 1, 1), np.uint8)
    lab[1, 0, 0], lab[2, 0, 0] = 1, 2
    out = resample_labels(lab, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0))
    # 9 samples at 0, .5, ..., 4; index 3 samples 1.5 where each binary mask is 0.5 -> rint 0 (half to
    # even), so neither label claims it; 3.5 and 4 lie outside (0)
    assert out.shape == (9, 2, 2)
    assert out[:, 0, 0].tolist() == [0, 0, 1, 0, 2, 0, 0, 0, 0]


# --------------------------------------------------------------------------------------------- round trips
def _check_round_trip(tmp_path, image, label, spacing, cfg):
    t2 = write_chaos_subject(tmp_path, "5", image, label, spacing=spacing)
    vol = read_chaos_subject(t2, "5", cfg)
    exp_img, exp_lab, _ = normalize_chaos(image, label, spacing, cfg)
    z = resampled_shape(image.shape, spacing, cfg.target_spacing)[2]
    assert vol.image.shape == (cfg.size, cfg.size, z) and vol.image.dtype == np.float32
    assert vol.spacing == tuple(cfg.target_spacing)
    assert vol.orientation == "LAS"
    assert np.array_equal(vol.label, exp_lab)
    assert np.array_equal(vol.image, exp_img)
    assert set(np.unique(vol.label)) <= {0, 1, 2, 3, 4}
    assert np.allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), cfg.target_spacing)
    return vol


def test_round_trip_synthetic(tmp_path):
    image, label = synthetic_volume()
    cfg = small_cfg(size=48)
    vol = _check_round_trip(tmp_path, image, label, (2.0, 1.5, 9.0), cfg)
    # the clip: no voxel above the truncated 99.5th percentile of the source
    assert vol.image.max() <= np.trunc(np.percentile(image, 99.5))
    assert np.all(vol.image == np.round(vol.image))            # integer pipeline, like the public copy
    assert set(np.unique(vol.label)) == {0, 1, 2, 3, 4}
    # the affine follows the resampling and the crop: output voxel o is source index (o + offset) * ratio
    series = read_dicom_series(tmp_path / "5" / "T2SPIR" / "DICOM_anon")
    _, _, (off0, off1) = normalize_chaos(image, label, (2.0, 1.5, 9.0), cfg)
    ratio = np.array(cfg.target_spacing) / [2.0, 1.5, 9.0]
    for o in [(0, 0, 0), (10, 20, 3), (47, 5, 7)]:
        src = (np.array(o) + [off0, off1, 0]) * ratio
        assert np.allclose(vol.affine @ [*o, 1], series["affine"] @ [*src, 1])


def test_round_trip_real_chaos_volume(tmp_path, chaos_dir):
    img = nib.load(chaos_dir / "image_2.nii.gz")
    image = np.asarray(img.dataobj).astype(np.int64)           # integer-valued float64 in the file
    label = np.asarray(nib.load(chaos_dir / "label_2.nii.gz").dataobj).astype(np.uint8)
    vol = _check_round_trip(tmp_path, image, label, (1.5, 1.5, 9.0), PrepareConfig())
    assert vol.image.shape == (256, 256, 37)      # int(31 * 9 / 7.7 + 1)


def test_open_source_raw_chaos_tree(tmp_path):
    image, label = synthetic_volume()
    write_chaos_subject(tmp_path / "MR", "3", image, label)
    write_chaos_subject(tmp_path / "MR", "12", image[:, :, :5], None)
    src = open_source(str(tmp_path), None)
    assert src.kind == "chaos-raw" and src.refs() == ["3", "12"]
    vols = list(iter_volumes(src))
    assert [v.id for v in vols] == ["3", "12"]
    assert vols[0].label is not None and vols[1].label is None
    single = open_source(str(tmp_path / "MR" / "3"), None)      # one subject folder
    assert single.refs() == ["3"]


def test_masks_named_with_an_upper_case_suffix_are_read_and_hashed(tmp_path):
    """Guards the checksum of the masks: ``read_masks`` accepts ``.PNG`` as well as ``.png``, but the checksum
    opened ``Ground/<stem>.png`` and failed with FileNotFoundError on masks it had just read."""
    image, label = synthetic_volume()
    t2 = write_chaos_subject(tmp_path, "5", image, label)
    lower = read_chaos_subject(t2, "5", small_cfg(size=48))
    for png in (t2 / "Ground").glob("*.png"):
        png.rename(png.with_suffix(".PNG"))
    upper = read_chaos_subject(t2, "5", small_cfg(size=48))
    assert np.array_equal(upper.label, lower.label)
    assert upper.checksum == lower.checksum             # same bytes, same order: the same digest


# --------------------------------------------------------------------------------------------- bad inputs
def _one_error(src, match: str) -> VolumeError:
    items = list(iter_volumes(src))
    errors = [e for e in items if isinstance(e, VolumeError)]
    assert len(errors) == 1, items
    assert match in str(errors[0]) and "\n" not in str(errors[0])
    return errors[0]


def test_mixed_series_is_reported_with_the_folder(tmp_path):
    image, label = synthetic_volume()
    t2 = write_chaos_subject(tmp_path, "1", image, label)
    write_chaos_subject(tmp_path, "2", image, label)
    import pydicom
    f = sorted((t2 / "DICOM_anon").glob("*.dcm"))[2]
    ds = pydicom.dcmread(f)
    ds.SeriesInstanceUID = "1.2.3.999"
    ds.save_as(f)
    src = open_source(str(tmp_path), None)
    err = _one_error(src, "mixed DICOM series")
    assert err.path == str(t2 / "DICOM_anon")
    assert [v.id for v in iter_volumes(src) if not isinstance(v, VolumeError)] == ["2"]


def test_missing_slice_is_reported(tmp_path):
    image, label = synthetic_volume()
    t2 = write_chaos_subject(tmp_path, "1", image, label, shuffle=False)
    (t2 / "DICOM_anon" / "IMG-0001-00004.dcm").unlink()
    (t2 / "Ground" / "IMG-0001-00004.png").unlink()
    err = _one_error(open_source(str(tmp_path), None), "missing slice")
    assert "IMG-0001-00003.dcm" in str(err) and "IMG-0001-00005.dcm" in str(err)


def test_png_size_differing_from_its_dicom(tmp_path):
    from PIL import Image
    image, label = synthetic_volume()
    t2 = write_chaos_subject(tmp_path, "1", image, label)
    png = sorted((t2 / "Ground").glob("*.png"))[1]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(png)
    err = _one_error(open_source(str(tmp_path), None), "differs from its DICOM slice")
    assert err.path == str(png)


def test_png_grey_value_outside_the_chaos_ranges(tmp_path):
    from PIL import Image
    image, label = synthetic_volume()
    t2 = write_chaos_subject(tmp_path, "1", image, label)
    png = sorted((t2 / "Ground").glob("*.png"))[0]
    grey = np.asarray(Image.open(png)).copy()
    grey[0, 0] = 100
    Image.fromarray(grey).save(png)
    err = _one_error(open_source(str(tmp_path), None), "grey value(s) 100 outside")
    assert err.path == str(png)


def test_missing_png_and_non_dicom_file(tmp_path):
    image, label = synthetic_volume()
    t2 = write_chaos_subject(tmp_path, "1", image, label)
    png = sorted((t2 / "Ground").glob("*.png"))[0]
    png.unlink()
    _one_error(open_source(str(tmp_path), None), "PNG mask missing")
    t2b = write_chaos_subject(tmp_path / "b", "2", image, None)
    bad = t2b / "DICOM_anon" / "IMG-0001-00099.dcm"
    bad.write_bytes(b"this is not a DICOM file")
    err = _one_error(open_source(str(tmp_path / "b"), None), "not a DICOM file")
    assert err.path == str(bad)


def test_describe_lists_raw_chaos_and_reports_bad_subject(tmp_path, capsys):
    image, label = synthetic_volume()
    write_chaos_subject(tmp_path, "1", image, label)
    t2 = write_chaos_subject(tmp_path, "2", image, label)
    (t2 / "DICOM_anon" / sorted(p.name for p in (t2 / "DICOM_anon").iterdir())[3]).unlink()
    assert describe(str(tmp_path), None) == 1
    out, err = capsys.readouterr()
    assert "total: 1 volumes" in out
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


# (slices, slice spacing in mm) of each raw scan, as printed by the original image_normalize notebook
NOTEBOOK_LOG = {"1": (36, 7.700004577636719), "2": (26, 9.000003814697266), "3": (30, 9.0), "5": (30, 9.0),
                "8": (32, 8.0), "10": (36, 7.6999969482421875), "13": (30, 9.0), "15": (26, 9.0),
                "19": (30, 9.0), "20": (26, 9.0), "21": (31, 7.999995231628418), "22": (33, 8.700000762939453),
                "31": (29, 8.999991416931152), "32": (39, 9.0), "33": (29, 9.0), "34": (30, 8.79998779296875),
                "36": (38, 9.0), "37": (32, 9.0), "38": (34, 9.0), "39": (26, 9.000004768371582)}


def test_resampling_rules_reproduce_the_public_copy_slice_counts(chaos_dir):
    """Our output-size formula and ITK's 'beyond half a voxel -> 0' rule predict, for every scan, the slice
    count of the public copy and whether its last slice is all zero (16 of the 20 are)."""
    n_zero = 0
    for vid, (n, dz) in NOTEBOOK_LOG.items():
        public = np.asarray(nib.load(chaos_dir / f"image_{vid}.nii.gz").dataobj)
        column = np.arange(n, dtype=float).reshape(1, 1, n) + 1         # no zero inside the scan
        res = resample_linear(column, (1.0, 1.0, dz), (1.0, 1.0, 7.7))
        assert res.shape[2] == public.shape[2], vid
        last_zero = bool(res[0, 0, -1] == 0)
        assert last_zero == bool(public[:, :, -1].max() == 0), vid
        n_zero += last_zero
    assert n_zero == 16


def test_hidden_files_beside_the_slices_and_masks_are_skipped(tmp_path):
    # macOS leaves a "._<name>" file (AppleDouble, not DICOM / PNG) beside each file it copies to some disks;
    # each failed the whole subject ("not a DICOM file", "PNG mask has no DICOM slice of the same name")
    image, label = synthetic_volume()
    t2 = write_chaos_subject(tmp_path, "1", image, label)
    clean = read_chaos_subject(t2, "1", small_cfg(size=48))
    for folder in (t2 / "DICOM_anon", t2 / "Ground"):
        first = sorted(folder.iterdir())[0]
        (folder / f"._{first.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    vol = read_chaos_subject(t2, "1", small_cfg(size=48))
    assert np.array_equal(vol.image, clean.image) and np.array_equal(vol.label, clean.label)
    assert vol.checksum == clean.checksum


def test_slices_without_a_transfer_syntax_are_decoded(tmp_path):
    # a file with no preamble and no file meta (older writers): refused as "not a DICOM file"; read when forced,
    # pydicom still cannot decode its pixels without a Transfer Syntax UID
    import pydicom
    image, _ = synthetic_volume(shape=(20, 16, 4))
    t2 = write_chaos_subject(tmp_path, "1", image, None)
    for path in (t2 / "DICOM_anon").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.preamble = None                            # no preamble, no meta: the bare dataset, implicit VR
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(next((t2 / "DICOM_anon").glob("*.dcm")))
    series = read_dicom_series(t2 / "DICOM_anon")
    assert np.array_equal(series["image"], image)


def test_missing_decoder_plugin_is_named_in_one_line(tmp_path):
    # pydicom lists the plugins a compressed transfer syntax needs after a colon, on the next lines; the
    # one-line error kept only "... because all plugins are missing dependencies:"
    import importlib.util

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless
    if any(importlib.util.find_spec(m) for m in ("gdcm", "pylibjpeg", "jpeg_ls")):
        pytest.skip("a JPEG-LS decoder is installed here")
    image, _ = synthetic_volume(shape=(20, 16, 3))
    t2 = write_chaos_subject(tmp_path, "1", image, None)
    first = sorted((t2 / "DICOM_anon").glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(first, enforce_file_format=True)
    with pytest.raises(VolumeError) as err:
        read_dicom_series(t2 / "DICOM_anon")
    text = str(err.value)
    assert text.startswith(f"{first}: cannot decode the pixel data (RuntimeError: Unable to decompress 'JPEG-LS")
    assert "pylibjpeg" in text and "\n" not in text and "\t" not in text
