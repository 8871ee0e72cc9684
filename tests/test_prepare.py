"""engine.prepare: body mask (numba) == scipy/skimage reference; z-scoring, crop/pad, NaN/Inf, errors."""
from __future__ import annotations

import dataclasses
import threading

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from engine._mask_kernels import body_mask_kernel
from engine.config import PrepareConfig
from engine.prepare import (body_mask, body_mask_reference, center_crop_pad, crop_offset,
                            prepare_volume, zscore_slice)
from engine.volume import Volume, VolumeError

THR = 50.0 + 1e-4


def _same(img, thr):
    got, ref = body_mask(img, thr), body_mask_reference(img, thr)
    assert got.dtype == bool and got.shape == img.shape
    assert np.array_equal(got, ref), f"mismatch at threshold {thr} on a {img.shape} slice"
    return got


# --------------------------------------------------------------------------------------------- body mask
def test_body_mask_equals_reference_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        field = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 4.0)).astype(np.float32)
        _same(field, float(np.quantile(field, rng.uniform(0.05, 0.95))))


def test_body_mask_equals_reference_on_small_binary_images_with_ties():
    # tiny random images have many equal-size components and diagonal contacts
    rng = np.random.default_rng(1)
    for _ in range(3000):
        h, w = (int(v) for v in rng.integers(1, 10, 2))
        _same((rng.random((h, w)) < rng.uniform(0.1, 0.9)).astype(np.float32), 0.5)


def test_body_mask_runs_that_reach_the_right_border_at_every_width_modulo_8():
    # the kernel scans rows 8 pixels at a time: rows whose width is, or is not, a multiple of 8, with runs
    # ending on the last pixel and on either side of a word boundary
    rng = np.random.default_rng(4)
    for w in (1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 72):
        img = (rng.random((12, w)) < 0.7).astype(np.float32)
        img[:, -1] = 1.0
        img[3, :] = 1.0
        _same(img, 0.5)


def test_body_mask_on_a_realistic_256_slice_with_holes_and_noise():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:256, :256]
    body = ((yy - 128) / 100.0) ** 2 + ((xx - 128) / 80.0) ** 2 < 1
    img = np.where(body, 300.0, 5.0) + rng.normal(0, 30, (256, 256))
    img[(yy - 120) ** 2 + (xx - 110) ** 2 < 200] = 10.0        # a dark organ: a hole to fill
    img[(yy - 20) ** 2 + (xx - 20) ** 2 < 30] = 400.0           # a bright blob outside the body
    mask = _same(img.astype(np.float32), THR)
    assert mask[120, 110] and not mask[20, 20] and not mask[0, 0]


def test_body_mask_empty_full_and_nan():
    assert not _same(np.zeros((8, 9), np.float32), THR).any()
    assert _same(np.full((8, 9), 100, np.float32), THR).all()
    img = np.full((10, 10), 100, np.float32)
    img[2:5, 2:5] = np.nan                                      # NaN is background (NaN > t is False)
    mask = _same(img, THR)
    assert mask[3, 3]                                           # ... and an enclosed NaN hole is filled
    assert not body_mask(np.full((4, 4), np.nan, np.float32), THR).any()


def test_body_mask_tie_keeps_the_component_first_in_raster_order():
    img = np.zeros((6, 8), np.float32)
    img[1:3, 0:2] = 100      # component A: 4 px, first pixel (1, 0)
    img[0:2, 5:7] = 100      # component B: 4 px, first pixel (0, 5) -> first in raster order
    mask = _same(img, THR)
    assert mask[0, 5] and not mask[1, 0]


def test_body_mask_connectivity_rules():
    # foreground: 8-connected (a diagonal chain is one component)
    img = np.zeros((5, 5), np.float32)
    img[[0, 1, 2, 3], [0, 1, 2, 3]] = 100
    img[4, 0] = 100
    assert _same(img, THR).sum() == 4
    # holes: background reaching the border only diagonally is enclosed under 4-connectivity -> filled
    ring = np.full((5, 5), 100, np.float32)
    ring[1:3, 1:3] = 0          # the hole
    ring[0, 3] = 0              # a border notch that touches the hole only at the corner (1, 2)-(0, 3)
    mask = _same(ring, THR)
    assert mask[1:3, 1:3].all() and not mask[0, 3]


def test_body_mask_dtypes_and_threshold_precision():
    t = 0.1
    assert float(np.float32(t)) > t            # the float32 nearest to 0.1 lies above it
    img = np.full((2, 2), np.float32(t), np.float32)
    # compared in float32, as numpy does for `float32_slice > 0.1`: float32(0.1) > float32(0.1) is False
    assert not _same(img, t).any()
    # the same values in float64 are compared in float64: 0.10000000149 > 0.1
    assert _same(img.astype(np.float64), t).all()
    ints = (np.arange(36).reshape(6, 6) % 7 * 20).astype(np.int16)
    _same(ints, THR)
    _same(np.asfortranarray(np.random.default_rng(3).random((20, 30)) * 100), THR)
    with pytest.raises(ValueError, match="2D"):
        body_mask(np.zeros((2, 2, 2), np.float32), THR)


def test_body_mask_kernel_releases_the_gil_and_is_thread_safe():
    assert body_mask_kernel.targetoptions.get("nogil") is True
    rng = np.random.default_rng(4)
    slices = [ndimage.gaussian_filter(rng.random((64, 64)), 2).astype(np.float32) for _ in range(40)]
    expected = [body_mask(s, 0.5) for s in slices]
    results = [None] * len(slices)

    def work(start):
        for i in range(start, len(slices), 4):
            results[i] = body_mask(slices[i], 0.5)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(results, expected))


def test_body_mask_equals_reference_on_every_real_chaos_slice(chaos_dir):
    n = 0
    fractions = []
    for path in sorted(chaos_dir.glob("image_*.nii.gz")):
        vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        for z in range(vol.shape[2]):
            mask = _same(vol[:, :, z], THR)
            fractions.append(mask.mean())
            n += 1
    assert n == 718
    # method.md 1.6 [measured]: body fraction mean ~0.6, range ~0.1-0.9
    assert 0.5 < np.mean(fractions) < 0.7 and max(fractions) < 0.95


# --------------------------------------------------------------------------------------------- crop / pad
def test_crop_offset_matches_the_notebook_convention():
    # resampled 317 -> rows 30..285 kept; 240 -> 8 rows of padding before
    assert crop_offset(317, 256) == 30
    assert crop_offset(240, 256) == -8
    assert crop_offset(256, 256) == 0
    a = np.arange(317 * 240, dtype=np.float32).reshape(317, 240)
    out = center_crop_pad(a, 256, -1.0)
    assert out.shape == (256, 256)
    assert np.array_equal(out[:, 8:248], a[30:286, :])
    assert np.all(out[:, :8] == -1) and np.all(out[:, 248:] == -1)


# --------------------------------------------------------------------------------------------- prepare
def _vol(image, label=None, path="mem://v"):
    return Volume(id="v", image=image, spacing=(1.25, 1.25, 7.7), affine=np.eye(4), orientation="RAS",
                  label=label, path=path, checksum="x")


CFG = PrepareConfig()


def test_prepare_z_scores_per_volume():
    rng = np.random.default_rng(5)
    img = rng.normal(300, 80, (256, 256, 6)).astype(np.float64)
    lab = (rng.random((256, 256, 6)) < 0.1).astype(np.uint8)
    p = prepare_volume(_vol(img, lab), CFG)
    assert p.image.dtype == np.float32 and p.raw.dtype == np.float32 and p.label.dtype == np.uint8
    assert p.image.shape == p.raw.shape == p.label.shape == (256, 256, 6)
    assert abs(p.image.astype(np.float64).mean()) < 1e-5
    assert abs(p.image.astype(np.float64).std() - 1) < 1e-5
    expected = (img.astype(np.float32) - img.astype(np.float32).astype(np.float64).mean()) \
        / img.astype(np.float32).astype(np.float64).std()
    assert np.allclose(p.image, expected, atol=1e-5)
    assert np.array_equal(p.raw, img.astype(np.float32))
    assert p.notes == [] and p.id == "v" and p.n_slices == 6
    # slice-major storage: each slice is one C-contiguous block (no copy for the kernels and the store)
    for arr in (p.image, p.raw, p.label):
        assert arr[:, :, 4].flags.c_contiguous


@pytest.mark.parametrize("zscore", ["volume", "robust"])
def test_buffers_without_an_image_leave_the_z_score_to_each_slice_bit_for_bit(zscore):
    """The processes backend shares raw and label only; its workers z-score each slice with the volume's stats."""
    rng = np.random.default_rng(7)
    img = rng.normal(300, 80, (64, 64, 5))
    img[10:50, 10:50] += 200
    lab = (rng.random((64, 64, 5)) < 0.1).astype(np.uint8)
    cfg = dataclasses.replace(CFG, size=64, zscore=zscore)
    whole = prepare_volume(_vol(img, lab), cfg)
    flat, label = np.empty((5, 64, 64), np.float32), np.empty((5, 64, 64), np.uint8)
    per_slice = prepare_volume(_vol(img, lab), cfg, buffers=lambda n, has_label: (flat, None, label))
    assert per_slice.image is None and per_slice.zstats == whole.zstats
    assert all(isinstance(v, np.float32) for v in per_slice.zstats)
    assert np.array_equal(per_slice.raw, whole.raw) and np.array_equal(per_slice.label, whole.label)
    out = np.empty((64, 64), np.float32)
    for z in range(5):
        assert zscore_slice(flat[z], per_slice.zstats, out) is out
        assert np.array_equal(out, whole.image[:, :, z])             # the same bits as the whole-volume pass


def test_prepare_robust_z_score_uses_body_median_and_iqr():
    # background 0, body 100..199 (one value per row), and a bright lesion of 5000 inside the body: the robust
    # statistics come from the body only, and the lesion barely moves them
    img = np.zeros((64, 64, 2), np.float64)
    img[8:48, 8:58, :] = (100 + np.arange(40) * 2.5)[:, None, None]
    img[20:30, 20:30, 0] = 5000.0
    p = prepare_volume(_vol(img, None), dataclasses.replace(CFG, size=64, zscore="robust"))
    body = img.astype(np.float32)[img > CFG.fg_threshold]
    q1, med, q3 = np.percentile(body, [25, 50, 75])
    assert np.allclose(p.image, (img.astype(np.float32) - med) / ((q3 - q1) / 1.349), atol=1e-5)
    assert p.notes == []
    # the default is the reference's whole-volume z-score
    assert np.allclose(prepare_volume(_vol(img, None), dataclasses.replace(CFG, size=64)).image,
                       (img - img.mean()) / img.std(), atol=1e-4)


def test_prepare_robust_z_score_falls_back_with_a_note_when_the_body_is_too_small():
    img = np.zeros((64, 64, 2), np.float64)
    img[0:3, 0:3, 0] = 500.0                                   # 9 body voxels
    p = prepare_volume(_vol(img, None), dataclasses.replace(CFG, size=64, zscore="robust"))
    assert len(p.notes) == 1 and "whole volume" in p.notes[0]
    assert np.allclose(p.image, (img - img.mean()) / img.std(), atol=1e-4)


def test_unknown_zscore_mode_is_a_config_error():
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="prepare.zscore"):
        PrepareConfig(zscore="global")


def test_prepare_replaces_nan_inf_by_the_finite_minimum_with_a_note():
    img = np.arange(2 * 256 * 256 * 3, dtype=np.float32).reshape(256, 256, 6)[:, :, :3] + 7
    img[0, 0, 0], img[5, 5, 1], img[9, 9, 2] = np.nan, np.inf, -np.inf
    original = img.copy()
    p = prepare_volume(_vol(img), CFG)
    assert np.isfinite(p.image).all() and np.isfinite(p.raw).all()
    assert p.raw[0, 0, 0] == p.raw[5, 5, 1] == p.raw[9, 9, 2] == np.nanmin(img[np.isfinite(img)])
    assert len(p.notes) == 1 and "3 NaN/Inf" in p.notes[0]
    assert np.array_equal(img, original, equal_nan=True)        # the source array is untouched


@pytest.mark.parametrize("size", [256, 200])        # one-pass placement, then the crop path
def test_float64_volumes_prepare_like_their_float32_copy(size):
    # Readers hand float64 files over as they are; preparation converts voxel by voxel, and a value beyond
    # float32's range is repaired like Inf, as it was when the reader made a float32 copy first.
    img = np.random.default_rng(8).normal(300, 80, (256, 256, 3))
    img[7, 9, 1] = 1e300
    cfg = dataclasses.replace(CFG, size=size)
    with np.errstate(over="ignore"):
        as32 = img.astype(np.float32)
    a, b = prepare_volume(_vol(img), cfg), prepare_volume(_vol(as32), cfg)
    assert np.array_equal(a.raw, b.raw) and np.array_equal(a.image, b.image)
    assert [n for n in a.notes if "NaN/Inf" in n] == [n for n in b.notes if "NaN/Inf" in n]
    assert any("1 NaN/Inf" in n for n in a.notes)             # counted over the whole volume, as before


def test_prepare_crops_and_pads_to_size():
    img = np.zeros((300, 200, 2), np.float32) + 20
    img[150, 100, :] = 999                                       # the centre pixel lands at (128, 128)
    lab = np.ones((300, 200, 2), np.uint8)
    p = prepare_volume(_vol(img, lab), dataclasses.replace(CFG, size=256))
    assert p.raw.shape == (256, 256, 2)
    assert p.raw[128, 128, 0] == 999
    assert p.raw[0, 0, 0] == 20 and p.label[128, 0, 0] == 0 and p.label[128, 100, 0] == 1
    assert any("centre-cropped/padded" in n for n in p.notes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", ["C", "F"])
def test_one_pass_placement_equals_range_then_place(dtype, order):
    # The one-pass kernel must give what the two passes give, bit for bit (same float64 sum order), and hand
    # back every volume that needs a repair.
    from engine._prepare_kernels import finite_range, place, place_scan, shifted_sum_sq_dev, sum_sq_dev
    src = np.asarray(np.random.default_rng(5).normal(300, 80, (16, 16, 4)), dtype=dtype, order=order)
    a, b = np.empty((4, 16, 16), np.float32), np.empty((4, 16, 16), np.float32)
    ok, lo, hi, total, s1, s2 = place_scan(src, a)
    n, lo2, hi2 = finite_range(src)
    assert ok and (lo, hi) == (lo2, hi2) and n == src.size
    assert total == place(src, b, 0, 0, lo2) and np.array_equal(a, b)
    # its shifted sums give the sum of squared deviations of the second pass
    exact = sum_sq_dev(a, total / a.size)
    assert shifted_sum_sq_dev(a.size, s1, s2) == pytest.approx(exact, rel=1e-12)
    for bad in (np.nan, np.inf, -np.inf) + ((1e300,) if dtype == np.float64 else ()):
        broken = src.copy(order=order)
        broken[3, 7, 2] = bad
        assert not place_scan(broken, a)[0], bad


def test_sum_sq_dev_equals_numpy_for_every_row_length():
    from engine._prepare_kernels import sum_sq_dev
    rng = np.random.default_rng(3)
    for w in (1, 3, 4, 5, 8, 11):                      # four sums per row, and the rest of the row
        flat = rng.normal(300, 80, (3, 5, w)).astype(np.float32)
        mean = float(flat.astype(np.float64).mean())
        assert sum_sq_dev(flat, mean) == pytest.approx(((flat.astype(np.float64) - mean) ** 2).sum(), rel=1e-12)


def test_z_score_is_exact_when_the_first_voxel_is_far_from_the_mean():
    # The one-pass statistics are shifted by the first voxel. A first voxel 10^7 standard deviations away
    # from the mean would cost them their accuracy: they are refused, and the second pass gives the std.
    from engine._prepare_kernels import place_scan, shifted_sum_sq_dev
    img = np.random.default_rng(4).normal(300, 1, (256, 256, 2))
    img[0, 0, 0] = 1e7
    out = np.empty((2, 256, 256), np.float32)
    ok, _, _, total, s1, s2 = place_scan(img, out)
    assert ok and shifted_sum_sq_dev(out.size, s1, s2) is None
    p = prepare_volume(_vol(img), CFG)
    x = img.astype(np.float32).astype(np.float64)
    expected = ((img.astype(np.float32) - np.float32(x.mean())) / np.float32(x.std())).astype(np.float32)
    np.testing.assert_allclose(p.image, expected, rtol=1e-6, atol=1e-6)
    # an ordinary first voxel: the one-pass figure is taken, and agrees with numpy as closely
    img[0, 0, 0] = 300.0
    ok, _, _, total, s1, s2 = place_scan(img, out)
    x = img.astype(np.float32).astype(np.float64)
    assert shifted_sum_sq_dev(out.size, s1, s2) == pytest.approx(((x - x.mean()) ** 2).sum(), rel=1e-12)


@pytest.mark.parametrize("order", ["C", "F"])
def test_label_placement_equals_center_crop_pad_for_every_crop_and_pad(order):
    from engine._prepare_kernels import place_labels
    rng = np.random.default_rng(3)
    for h, w in [(8, 8), (5, 11), (12, 3), (1, 9)]:
        lab = np.asarray(rng.integers(0, 5, (h, w, 3)), dtype=np.uint8, order=order)
        out = np.full((3, 8, 8), 77, np.uint8)
        place_labels(lab, out, crop_offset(h, 8), crop_offset(w, 8))
        assert np.array_equal(out.transpose(1, 2, 0), center_crop_pad(lab, 8, 0)), (h, w)


def test_label_id_kernel_accepts_integers_0_255_and_stops_at_anything_else():
    from engine._prepare_kernels import labels_to_u8
    good = np.array([0.0, 1.0, 4.0, 255.0, -0.0]).reshape(1, 5, 1)
    for dtype in (np.float32, np.float64):
        for order in ("C", "F"):
            src = np.asarray(good, dtype=dtype, order=order)
            out = np.empty(src.shape, np.uint8, order=order)
            assert labels_to_u8(src, out) and out.ravel().tolist() == [0, 1, 4, 255, 0]
            for bad in (np.nan, np.inf, -np.inf, 0.5, -1.0, 256.0, 1e10):
                src_bad = src.copy(order=order)
                src_bad[0, 2, 0] = bad
                assert not labels_to_u8(src_bad, np.empty(src.shape, np.uint8, order=order)), (dtype, bad)


def test_label_id_kernel_copies_every_slice_of_a_non_square_volume_in_any_layout():
    from engine._prepare_kernels import labels_to_u8
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256, (7, 5, 3)).astype(np.float64)
    for order in ("C", "F"):
        src = np.asarray(ids, order=order)
        out = np.empty((3, 7, 5), np.uint8).transpose(1, 2, 0)       # slice-major, as the reader passes it
        assert labels_to_u8(src, out) and np.array_equal(out, ids.astype(np.uint8)), order
        src_bad = src.copy(order=order)
        src_bad[6, 4, 2] = 2.5                                       # last voxel of the last slice
        assert not labels_to_u8(src_bad, out), order


@pytest.mark.parametrize("image, match", [
    (np.zeros((8, 8), np.float32), "3D"),
    (np.zeros((8, 8, 3, 2), np.float32), "3D"),
    (np.full((8, 8, 3), 5.0, np.float32), "constant volume"),
    (np.full((8, 8, 3), np.nan, np.float32), "no finite voxel"),
    (np.zeros((8, 8, 0), np.float32), "empty"),
])
def test_prepare_rejects_unusable_volumes(image, match):
    with pytest.raises(VolumeError, match=match) as info:
        prepare_volume(_vol(image, path="/data/image_9.nii.gz"), CFG)
    assert str(info.value).startswith("/data/image_9.nii.gz: ") and "\n" not in str(info.value)


def test_prepare_rejects_constant_after_crop_and_label_shape_mismatch():
    img = np.full((400, 400, 2), 3.0, np.float32)
    img[0, 0, 0] = 9.0                                            # variation only outside the crop
    with pytest.raises(VolumeError, match="constant after the centre crop"):
        prepare_volume(_vol(img), CFG)
    with pytest.raises(VolumeError, match="label shape"):
        prepare_volume(_vol(np.random.rand(8, 8, 2), np.zeros((8, 8, 3), np.uint8)), CFG)


def test_prepared_labels_reuse_a_slice_major_uint8_label_and_copy_any_other():
    """No copy for the NIfTI reader's labels at the output size (uint8, slice by slice in memory); a copy
    for any other layout, dtype or size, and always into caller-given buffers."""
    rng = np.random.default_rng(5)
    size = CFG.size
    img = rng.random((size, size, 3)).astype(np.float32)
    slice_major = np.asarray(rng.integers(0, 5, (3, size, size)), dtype=np.uint8).transpose(1, 2, 0)
    prep = prepare_volume(_vol(img, label=slice_major), CFG)
    assert np.shares_memory(prep.label, slice_major) and np.array_equal(prep.label, slice_major)
    for other in (np.ascontiguousarray(slice_major), slice_major.astype(np.int32)):
        prep = prepare_volume(_vol(img, label=other), CFG)
        assert not np.shares_memory(prep.label, other) and np.array_equal(prep.label, slice_major)
        assert prep.label.dtype == np.uint8 and prep.label.transpose(2, 0, 1).flags.c_contiguous
    bufs = (np.empty((3, size, size), np.float32), np.empty((3, size, size), np.float32),
            np.empty((3, size, size), np.uint8))
    prep = prepare_volume(_vol(img, label=slice_major), CFG, buffers=lambda n, has_label: bufs)
    assert np.shares_memory(prep.label, bufs[2]) and np.array_equal(prep.label, slice_major)
