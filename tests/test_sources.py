"""engine.sources: NIfTI folder/file, phantom, describe, and every bad-input path (real files in tmp_path)."""
from __future__ import annotations

import gzip
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from engine.sources import describe, iter_volumes, load_nifti, open_source
from engine.volume import Volume, VolumeError, first_sentence

LAS = np.diag([-1.25, 1.25, 7.7, 1.0])


def _write(path, arr, affine=LAS, dtype=None):
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype) if dtype else np.asarray(arr), affine)
    nib.save(img, str(path))
    return path


def _image(shape=(16, 12, 5), seed=0):
    return np.random.default_rng(seed).normal(200, 50, shape)


def _sha(*paths):
    return "+".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)


# --------------------------------------------------------------------------------------------- good inputs
def test_nifti_folder_lists_numerically_and_loads_pairs(tmp_path):
    for vid in ("10", "2", "1"):
        _write(tmp_path / f"image_{vid}.nii.gz", _image(seed=int(vid)))
    lab = np.zeros((16, 12, 5))
    lab[2:5, 3:6, 1:3] = 4
    _write(tmp_path / "label_2.nii.gz", lab)                     # float64 labels, like CHAOS
    (tmp_path / "classmap_1.json").write_text("{}")              # unrelated files are ignored
    src = open_source(str(tmp_path), None)
    assert src.kind == "nifti-folder" and src.refs() == ["1", "2", "10"]
    v = src.load("2")
    assert isinstance(v, Volume) and v.id == "2"
    assert v.image.dtype == np.float64 and v.image.shape == (16, 12, 5)      # float64 files stay float64
    assert np.array_equal(v.image, _image(seed=2))
    assert v.label.dtype == np.uint8 and set(np.unique(v.label)) == {0, 4}
    assert v.spacing == (1.25, 1.25, 7.7) and v.orientation == "LAS"
    assert np.allclose(v.affine, LAS) and v.n_slices == 5
    assert v.path == str(tmp_path / "image_2.nii.gz")
    assert v.checksum == _sha(tmp_path / "image_2.nii.gz", tmp_path / "label_2.nii.gz")
    v1 = src.load("1")
    assert v1.label is None and v1.checksum == _sha(tmp_path / "image_1.nii.gz")


def test_single_file_uncompressed_with_label_sibling_and_trailing_unit_axis(tmp_path):
    _write(tmp_path / "image_a.nii", _image()[..., None])         # (H, W, Z, 1) is still 3D
    _write(tmp_path / "label_a.nii", np.ones((16, 12, 5, 1), np.uint8))
    src = open_source(str(tmp_path / "image_a.nii"), None)
    assert src.kind == "nifti-file" and src.refs() == ["a"]
    v = src.load("a")
    assert v.image.shape == (16, 12, 5) and v.label.shape == (16, 12, 5)
    other = open_source(str(_write(tmp_path / "scan.nii.gz", _image())), None)
    assert other.refs() == ["scan"] and other.load("scan").label is None
    assert src.warnings == [] and other.warnings == []
    # a label file given in place of its image is read as asked, with a warning naming the image
    label = open_source(str(tmp_path / "label_a.nii"), None)
    assert label.refs() == ["label_a"]
    assert label.warnings == [f"{tmp_path / 'label_a.nii'}: named as a label volume, read here as an image (its "
                              f"image is {tmp_path / 'image_a.nii'})"]


def test_orientation_is_recorded_not_changed(tmp_path):
    ras = np.diag([1.5, 1.5, 3.0, 1.0])
    img = _image()
    _write(tmp_path / "image_1.nii.gz", img, affine=ras)
    v = open_source(str(tmp_path), None).load("1")
    assert v.orientation == "RAS" and v.spacing == (1.5, 1.5, 3.0)
    assert np.allclose(v.image, img.astype(np.float32))        # array axes as stored


def test_chaos_folder_matches_method_section_8(chaos_dir):
    src = open_source(str(chaos_dir), None)
    assert src.refs() == ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32",
                          "33", "34", "36", "37", "38", "39"]
    v = src.load("32")
    assert v.image.shape == (256, 256, 46) and v.image.dtype == np.float64      # as CHAOS stores it
    assert v.spacing == (1.25, 1.25, 7.7) and v.orientation == "LAS"
    assert set(np.unique(v.label)) == {0, 1, 2, 3, 4}


def test_describe_chaos_lists_20_scans_718_slices(chaos_dir, capsys):
    assert describe(str(chaos_dir), None, as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["volumes"] == 20 and report["totals"]["slices"] == 718
    assert report["totals"]["label_ids"] == [0, 1, 2, 3, 4] and report["errors"] == []
    per_scan = {r["id"]: r["slices"] for r in report["volumes"]}
    assert per_scan["1"] == 37 and per_scan["32"] == 46 and per_scan["39"] == 31


def test_phantom_specs(tmp_path):
    from engine.config import DataConfig

    class Cfg:
        data = DataConfig(phantom_volumes=4, phantom_seed=3)
    src = open_source("phantom", Cfg())
    assert src.kind == "phantom" and src.refs() == [f"phantom_{i:03d}" for i in range(4)]
    assert open_source("phantom:2", Cfg()).refs() == ["phantom_000", "phantom_001"]
    for bad in ("phantom:0", "phantom:x", "phantom:-1"):
        with pytest.raises(VolumeError, match="positive integer"):
            open_source(bad, Cfg())
    with pytest.raises(VolumeError, match="no phantom volume"):
        open_source("phantom:2", Cfg()).load("phantom_007")


def test_phantom_volume_loads_lazily():
    pytest.importorskip("engine.phantom")
    v = open_source("phantom:1", None).load("phantom_000")
    assert v.id == "phantom_000" and v.image.ndim == 3 and v.label is not None


# --------------------------------------------------------------------------------------------- bad sources
def test_missing_path_empty_folder_and_non_nifti_file(tmp_path):
    with pytest.raises(VolumeError, match="no such file or folder") as info:
        open_source(str(tmp_path / "nowhere"), None)
    assert str(tmp_path / "nowhere") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="empty folder"):
        open_source(str(tmp_path / "empty"), None)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no image_<id>"):
        open_source(str(tmp_path / "junk"), None)
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match="not a NIfTI file"):
        open_source(str(tmp_path / "scan.png"), None)


def test_a_scan_that_is_no_regular_file_is_reported_not_skipped(tmp_path):
    """A broken link or a folder named image_<id> was left out of the listing without a word."""
    _write(tmp_path / "image_1.nii.gz", _image())
    (tmp_path / "image_2.nii.gz").symlink_to("moved/image_2.nii.gz")
    (tmp_path / "image_3.nii.gz").mkdir()
    _write(tmp_path / "image_4.nii.gz", _image())
    (tmp_path / "label_4.nii.gz").symlink_to("gone.nii.gz")
    src = open_source(str(tmp_path), None)
    assert src.refs() == ["1", "2", "3", "4"] and src.warnings == []
    assert src.load("1").n_slices == 5
    for vid, path, problem in [
            ("2", "image_2.nii.gz", "a symbolic link to moved/image_2.nii.gz, which does not exist"),
            ("3", "image_3.nii.gz", "a folder, not a NIfTI file"),
            ("4", "label_4.nii.gz", "a symbolic link to gone.nii.gz, which does not exist")]:
        with pytest.raises(VolumeError) as info:
            src.load(vid)
        assert str(info.value) == f"{tmp_path / path}: {problem}"


def test_describe_missing_path_is_one_line_and_exit_2(tmp_path, capsys):
    # exit 2 and the command's name, as preprocess --input and evaluate --data say it (it was 1 and "error:")
    assert describe(str(tmp_path / "nowhere"), None) == 2
    out, err = capsys.readouterr()
    assert err == f"inspect: {tmp_path / 'nowhere'}: no such file or folder\n"


# --------------------------------------------------------------------------------------------- bad volumes
def _bad_folder(tmp_path):
    """A folder with two good volumes and one of each kind of bad input."""
    good = [_write(tmp_path / f"image_{i}.nii.gz", _image(seed=i)) for i in (1, 2)]
    raw = (tmp_path / "image_1.nii.gz").read_bytes()
    (tmp_path / "image_3.nii.gz").write_bytes(raw[: len(raw) // 2])                     # truncated
    (tmp_path / "image_4.nii.gz").write_bytes(b"this is not an image at all\n" * 20)   # non-image
    (tmp_path / "image_5.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 40))
    _write(tmp_path / "image_6.nii.gz", np.zeros((16, 12), np.float32))                 # 2D
    _write(tmp_path / "image_7.nii.gz", np.zeros((6, 5, 4, 3), np.float32))             # 4D
    _write(tmp_path / "image_8.nii.gz", _image())
    _write(tmp_path / "label_8.nii.gz", np.zeros((16, 12, 4), np.uint8))                # label shape
    _write(tmp_path / "image_9.nii.gz", _image())
    _write(tmp_path / "label_9.nii.gz", np.full((16, 12, 5), 0.5))                      # fractional label
    _write(tmp_path / "image_11.nii.gz", _image())
    _write(tmp_path / "label_11.nii.gz", np.full((16, 12, 5), 300, np.int16))           # label > 255
    _write(tmp_path / "image_12.nii.gz", _image())
    _write(tmp_path / "label_12.nii.gz", np.full((16, 12, 5), -1, np.int16))            # negative label
    return good


EXPECTED = {"3": "truncated or corrupt", "4": "not a readable NIfTI image",
            "5": "not a readable NIfTI image", "6": "2D image", "7": "4D image", "8": "label shape",
            "9": "must be integers", "11": "must be 0..255", "12": "must be 0..255"}


def test_each_bad_volume_gets_one_line_and_the_others_still_load(tmp_path):
    _bad_folder(tmp_path)
    src = open_source(str(tmp_path), None)
    items = list(iter_volumes(src))
    assert len(items) == 11
    loaded = [v.id for v in items if isinstance(v, Volume)]
    assert loaded == ["1", "2"]
    errors = {}
    for e in items:
        if isinstance(e, VolumeError):
            text = str(e)
            assert "\n" not in text and text.startswith(e.path + ": ")
            vid = e.path.rsplit("_", 1)[1].split(".")[0]
            errors[vid] = text
    assert set(errors) == set(EXPECTED)
    for vid, fragment in EXPECTED.items():
        assert fragment in errors[vid], errors[vid]
    assert errors["8"].startswith(str(tmp_path / "label_8.nii.gz"))   # the label file is named


def test_misnamed_compression_is_read_by_content(tmp_path):
    # a plain NIfTI named .nii.gz and a gzipped one named .nii (both seen in the wild) load like the original
    arr = _image()
    plain = _write(tmp_path / "ref.nii", arr)
    (tmp_path / "image_1.nii.gz").write_bytes(plain.read_bytes())
    (tmp_path / "image_2.nii").write_bytes(gzip.compress(plain.read_bytes()))
    for name in ("image_1.nii.gz", "image_2.nii"):
        vol = load_nifti(tmp_path / name, None, name)
        assert np.array_equal(np.asarray(vol.image), arr) and vol.checksum == _sha(tmp_path / name)


def test_files_that_are_no_nifti_get_one_line_and_nothing_else_on_stderr(tmp_path, capfd):
    # nibabel prints its own findings on a stray header ("sizeof_hdr should be 348; ..."): the engine judges
    # such files before handing them over, so its one line is all a user sees
    (tmp_path / "image_1.nii").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "image_2.nii.gz").write_bytes(gzip.compress(np.random.default_rng(1).bytes(5000)))
    (tmp_path / "image_3.nii.gz").write_bytes(b"\x1f\x8b garbage")
    two = nib.Nifti2Image(_image().astype(np.float32), LAS)
    nib.save(two, str(tmp_path / "two.nii"))
    (tmp_path / "image_4.nii").write_bytes(gzip.compress((tmp_path / "two.nii").read_bytes()))   # NIfTI-2
    expected = {"image_1.nii": "no NIfTI-1 or NIfTI-2 header at its start",
                "image_2.nii.gz": "no NIfTI-1 or NIfTI-2 header at its start",
                "image_3.nii.gz": "unreadable start: BadGzipFile",
                "image_4.nii": "gzip-compressed but named .nii: rename it .nii.gz"}
    for name, reason in expected.items():
        with pytest.raises(VolumeError) as err:
            load_nifti(tmp_path / name, None, name)
        assert str(err.value).startswith(f"{tmp_path / name}: not a readable NIfTI image ({reason}")
    out, errout = capfd.readouterr()
    assert out == "" and errout == ""


def test_describe_reports_bad_inputs_one_line_each_and_exits_1(tmp_path, capsys):
    _bad_folder(tmp_path)
    _write(tmp_path / "image_13.nii.gz", np.full((16, 12, 5), 7.0))                    # constant
    nan = _image()
    nan[0, 0, 0], nan[1, 1, 1] = np.nan, np.inf
    _write(tmp_path / "image_14.nii.gz", nan)                                          # NaN/Inf: warning
    _write(tmp_path / "label_99.nii.gz", np.zeros((4, 4, 4), np.uint8))                # orphan label
    _write(tmp_path / "scan_7.nii.gz", _image())                                       # named otherwise
    _write(tmp_path / ".hidden.nii.gz", _image())
    assert describe(str(tmp_path), None) == 1
    out, err = capsys.readouterr()
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == len(EXPECTED) + 1
    assert any("image_13.nii.gz: constant volume" in line for line in error_lines)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("image_14.nii.gz: 2 NaN/Inf voxel(s)" in w for w in warnings)
    assert any("label_99.nii.gz: label without an image_99" in w for w in warnings)
    assert any("scan_7.nii.gz: a NIfTI file not named image_<id> or label_<id> (ignored)" in w for w in warnings)
    assert not any("hidden" in w for w in warnings)                                    # dot files: not ours
    assert "total: 3 volumes, 15 slices" in out
    assert describe(str(tmp_path), None, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["failed"] == len(EXPECTED) + 1 and len(report["volumes"]) == 3


def test_nan_inf_voxels_load_and_are_repaired_by_prepare(tmp_path):
    from engine.config import PrepareConfig
    from engine.prepare import prepare_volume
    img = _image((20, 20, 3))
    img[3, 3, 1] = np.nan
    v = load_nifti(_write(tmp_path / "image_1.nii.gz", img), None, "1")
    assert np.isnan(v.image[3, 3, 1])
    p = prepare_volume(v, PrepareConfig(size=20))
    assert np.isfinite(p.image).all() and "1 NaN/Inf" in p.notes[0]


def test_duplicate_image_files_for_one_id(tmp_path):
    _write(tmp_path / "image_1.nii.gz", _image())
    _write(tmp_path / "image_1.nii", _image())
    (err,) = list(iter_volumes(open_source(str(tmp_path), None)))
    assert isinstance(err, VolumeError) and "several image files for id 1" in str(err)


def test_iter_volumes_turns_an_unexpected_exception_into_one_error_and_goes_on():
    from engine.sources import Source

    class Flaky(Source):
        def refs(self):
            return ["a", "b"]

        def load(self, ref):
            if ref == "a":
                raise RuntimeError("disk on fire\nsecond line")
            return Volume(id="b", image=np.zeros((2, 2, 2), np.float32), spacing=(1, 1, 1),
                          affine=np.eye(4), orientation="RAS", label=None, path="b", checksum="")
    first, second = list(iter_volumes(Flaky("mem")))
    assert isinstance(first, VolumeError) and str(first) == "mem[a]: unexpected error (RuntimeError: disk on fire)"
    assert isinstance(second, Volume)


def test_gzip_variants_read_like_nibabel(tmp_path):
    # The fast inflater (libdeflate) reads one gzip member and sizes its output from the last four bytes; files
    # with several members (concatenated gzip streams, whatever their sizes) or padding after the stream
    # must still read whole, through the streaming inflater.
    from engine.sources import _libdeflate_gunzip
    arr = _image(shape=(16, 12, 6), seed=7)
    single = _write(tmp_path / "single.nii.gz", arr, dtype=np.float64)
    raw = gzip.decompress(single.read_bytes())
    half = len(raw) // 2
    variants = {
        "members": gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
        # first and last members of the same length: the last four bytes then match the first member's length
        "equal_members": gzip.compress(raw[:100]) + gzip.compress(raw[100:-100]) + gzip.compress(raw[-100:]),
        "padded": single.read_bytes() + b"\0" * 512,
    }
    want = nib.load(str(single)).get_fdata()
    for name, data in variants.items():
        path = tmp_path / f"image_{name}.nii.gz"
        path.write_bytes(data)
        assert gzip.decompress(data).startswith(raw), name
        vol = load_nifti(path, None, name)
        assert np.array_equal(vol.image, want), name
        assert vol.checksum == _sha(path), name
    fast = _libdeflate_gunzip(single.read_bytes())
    if fast is not None:                      # the package is optional
        assert bytes(fast) == raw
        assert _libdeflate_gunzip(variants["padded"]) is None
        assert bytes(_libdeflate_gunzip(variants["equal_members"])) == raw[:100]   # short: the reader's guard
    assert _libdeflate_gunzip(b"not gzip data at all") is None


def test_whole_single_member_files_are_inflated_once(tmp_path, monkeypatch):
    # A complete libdeflate result serves nibabel's general path too (scaled data here): the streaming
    # inflater is only for files libdeflate cannot read whole.
    pytest.importorskip("deflate")
    import engine.sources as sources
    arr = np.round(_image(seed=9)).astype(np.int16)
    scaled = nib.Nifti1Image(arr, LAS)
    scaled.header.set_slope_inter(0.5, 10.0)
    nib.save(scaled, str(tmp_path / "image_1.nii.gz"))

    def no_streaming(data):
        raise AssertionError("inflated a second time")
    monkeypatch.setattr(sources, "_gunzip", no_streaming)
    vol = load_nifti(tmp_path / "image_1.nii.gz", None, "1")
    assert np.allclose(vol.image, arr * 0.5 + 10.0)


def test_in_place_nifti_view_matches_nibabel_and_falls_back_when_it_must(tmp_path):
    # The engine views the voxels of a plain NIfTI-1 file in place; scaled data, header extensions and truncated
    # files go through nibabel's general path, with the same values or the same one-line errors.
    from engine.sources import _nifti_view
    arr = _image(seed=4)
    plain = _write(tmp_path / "image_1.nii.gz", arr, dtype=np.float64)
    raw = gzip.decompress(plain.read_bytes())
    view = _nifti_view(raw)
    assert view is not None and np.array_equal(view.dataobj, nib.load(str(plain)).get_fdata())
    assert np.allclose(view.affine, LAS)

    scaled = nib.Nifti1Image(np.round(arr).astype(np.int16), LAS)
    scaled.header.set_slope_inter(0.5, 10.0)
    nib.save(scaled, str(tmp_path / "image_2.nii.gz"))
    assert _nifti_view(gzip.decompress((tmp_path / "image_2.nii.gz").read_bytes())) is None
    vol = load_nifti(tmp_path / "image_2.nii.gz", None, "2")
    assert np.allclose(vol.image, np.round(arr).astype(np.int16) * 0.5 + 10.0)

    ext = nib.Nifti1Image(arr.astype(np.float32), LAS)
    ext.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"made by a test"))
    nib.save(ext, str(tmp_path / "image_3.nii.gz"))
    assert _nifti_view(gzip.decompress((tmp_path / "image_3.nii.gz").read_bytes())) is None
    assert np.array_equal(load_nifti(tmp_path / "image_3.nii.gz", None, "3").image, arr.astype(np.float32))

    assert _nifti_view(raw[: len(raw) - 100]) is None
    (tmp_path / "image_4.nii").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(VolumeError, match="image_4.nii"):
        load_nifti(tmp_path / "image_4.nii", None, "4")


@pytest.mark.parametrize("text, limit, expected", [
    ("reading failed: no central directory. This is an internal error. Retry.", 200,
     "reading failed: no central directory"),
    ("one sentence.\nsecond line", 200, "one sentence"),
    ("version 2.6 changed the default", 200, "version 2.6 changed the default"),
    ("x" * 50, 20, "x" * 17 + "..."),
    ("", 200, ""),
])
def test_first_sentence_of_an_error_message(text, limit, expected):
    assert first_sentence(text, limit) == expected


def test_a_store_given_as_the_source_names_the_scans_it_was_made_from(tmp_path):
    import h5py
    store = tmp_path / "store.h5"
    with h5py.File(store, "w") as f:                 # what an engine index records of its source
        f.attrs["source"] = json.dumps({"input": "/data/chaos_t2", "n_refs": 20})
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    expected = ("an HDF5 file (a store?), not scans: give the NIfTI file or folder, raw CHAOS folder or 'phantom' "
                "it was made from")
    with pytest.raises(VolumeError) as info:
        open_source(str(store), None)
    assert str(info.value) == f"{store}: {expected} (/data/chaos_t2)"
    with pytest.raises(VolumeError) as info:
        open_source(str(tmp_path / "other.h5"), None)
    assert str(info.value) == f"{tmp_path / 'other.h5'}: {expected}"


def test_id_order_does_not_depend_on_the_folder_listing_and_odd_digits_do_not_crash(tmp_path):
    # Guards _id_key: ids equal as numbers ("1", "01") tied, so their order followed the folder's listing order
    # (the slice sequence of a store must not depend on it); an id of digits int() refuses ("²": str.isdigit
    # but not a decimal number) raised ValueError from refs() instead of being listed.
    from engine.sources import _id_key
    assert sorted(["1", "01"], key=_id_key) == sorted(["01", "1"], key=_id_key)
    for vid in ("²", "10", "2"):
        _write(tmp_path / f"image_{vid}.nii.gz", _image())
    src = open_source(str(tmp_path), None)
    assert src.refs() == ["2", "10", "²"]
    assert src.load("²").id == "²"


def test_upper_case_suffixes_are_scans_too(tmp_path):
    # image_7.NII.GZ was left out of a folder without a word, and refused as "not a NIfTI file" when given alone
    _write(tmp_path / "image_7.NII.GZ", _image(seed=7))
    _write(tmp_path / "label_7.NII.GZ", np.ones((16, 12, 5), np.uint8))
    _write(tmp_path / "image_8.nii", _image(seed=8))
    src = open_source(str(tmp_path), None)
    assert src.refs() == ["7", "8"] and src.warnings == []
    v = src.load("7")
    assert np.array_equal(v.image, _image(seed=7)) and v.label is not None and v.label.max() == 1
    alone = open_source(str(tmp_path / "image_7.NII.GZ"), None)
    assert alone.refs() == ["7"] and alone.load("7").label is not None
    # the general reader's name check (a NIfTI-2 file takes that path) treats .GZ as .gz
    nib.save(nib.Nifti2Image(_image(seed=2), LAS), str(tmp_path / "n2.nii.gz"))
    (tmp_path / "n2.nii.gz").rename(tmp_path / "SCAN.NII.GZ")
    assert np.array_equal(load_nifti(tmp_path / "SCAN.NII.GZ", None, "s").image, _image(seed=2))


def test_label_in_another_orientation_is_refused(tmp_path):
    ras, lps = np.diag([1.5, 1.5, 3.0, 1.0]), np.diag([-1.5, -1.5, 3.0, 1.0])
    image = _write(tmp_path / "image_1.nii.gz", _image(), affine=ras)
    lab = np.zeros((16, 12, 5), np.uint8)
    lab[:4] = 1                                   # an organ on the low-x side, which LPS puts on the other side
    flipped = _write(tmp_path / "label_1.nii.gz", lab, affine=lps)
    with pytest.raises(VolumeError) as err:
        load_nifti(image, flipped, "1")
    assert str(err.value) == (f"{flipped}: label orientation LPS differs from image orientation RAS: its voxels "
                              "would not line up with the image's")
    # a label that states no orientation (no qform, no sform) is taken on the image's voxel grid
    bare = nib.Nifti1Image(lab, None)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    nib.save(bare, str(tmp_path / "label_2.nii.gz"))
    assert np.array_equal(load_nifti(image, tmp_path / "label_2.nii.gz", "1").label, lab)
    # same axes, another origin: not an orientation problem
    shifted = ras.copy()
    shifted[:3, 3] = [5.0, -3.0, 2.0]
    _write(tmp_path / "label_3.nii.gz", lab, affine=shifted)
    assert np.array_equal(load_nifti(image, tmp_path / "label_3.nii.gz", "1").label, lab)


def test_negative_pixdim_gives_a_positive_spacing(tmp_path):
    img = nib.Nifti1Image(_image().astype(np.float32), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    path = tmp_path / "image_1.nii"
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.array([-1.5, 2.0, 3.0], "<f4").tobytes()      # pixdim[1:4], as some writers leave it
    path.write_bytes(bytes(raw))
    assert load_nifti(path, None, "1").spacing == (1.5, 2.0, 3.0)
