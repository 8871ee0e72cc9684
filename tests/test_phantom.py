"""The built-in phantom: determinism, geometry, anatomy, contrasts and the body-mask threshold.

Reference figures are the measured CHAOS-T2 statistics of method.md section 8 (per-volume z-scored
intensity: median over the voxels of a region, then over scans). The 20 default volumes are generated once
per test session (a few seconds).
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label as cc_label

from engine import phantom
from engine.config import DataConfig
from engine.volume import Volume

ORGANS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
# method.md 8: organ extent along z in slices, (min, max) over the 20 real scans; the kidney ranges are
# the union of right (11-18) and left (12-20) as the brief allows either kidney 11-20.
EXTENT_RANGE = {"liver": (19, 32), "right_kidney": (11, 20), "left_kidney": (11, 20), "spleen": (9, 21)}
# method.md 8: per-scan median z-score, median over scans (target) and (min, max) over scans (real range).
TARGET = {"body": 0.25, "liver": 1.10, "right_kidney": 3.29, "left_kidney": 3.54, "spleen": 3.10}
REAL_RANGE = {"body": (-0.14, 0.51), "liver": (-0.03, 1.90), "right_kidney": (1.00, 4.19),
              "left_kidney": (1.41, 4.09), "spleen": (0.03, 3.80)}
# Inter-quartile range over the 20 real scans of the same per-scan medians (measured on
# ../shared/data/chaos_t2 with the statistic above). The phantom's median over its 20 default volumes must
# fall inside it: a typical phantom volume then looks like a typical real scan, while the generator keeps
# the freedom of sampling noise (the median of 20 draws moves by ~0.1-0.15 between seeds).
REAL_IQR = {"body": (0.15, 0.32), "liver": (0.88, 1.45), "right_kidney": (2.97, 3.71),
            "left_kidney": (3.24, 3.76), "spleen": (2.97, 3.39)}
FG_THRESHOLD = 50.0 + 1e-4   # method.md 1.6 (engine.config.PrepareConfig.fg_threshold)


@pytest.fixture(scope="module")
def default_set() -> list[phantom.PhantomArrays]:
    cfg = DataConfig()
    return [phantom.generate(i, seed=cfg.phantom_seed) for i in range(cfg.phantom_volumes)]


def _zmedians(arr: phantom.PhantomArrays) -> dict[str, float]:
    img, lab = arr.image.astype(np.float64), arr.label
    z = (img - img.mean()) / img.std()
    out = {"body": float(np.median(z[(img > 50) & (lab == 0)]))}
    out.update({name: float(np.median(z[lab == c])) for name, c in ORGANS.items()})
    return out


def _body_mask(slice_: np.ndarray) -> np.ndarray:
    """Reference body mask (method.md 1.6): threshold, largest 8-connected component, holes filled."""
    comp = cc_label(slice_ > FG_THRESHOLD, connectivity=2)
    if comp.max() == 0:
        return np.zeros(slice_.shape, bool)
    largest = np.argmax(np.bincount(comp.ravel())[1:]) + 1
    return ndimage.binary_fill_holes(comp == largest)


# ------------------------------------------------------------------------------------------ determinism
def test_same_arguments_give_identical_volumes():
    a, b = phantom.make_volume(3, seed=7), phantom.make_volume(3, seed=7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.checksum == b.checksum


def test_other_index_or_seed_gives_other_volume():
    base = phantom.make_volume(3, seed=7)
    for other in (phantom.make_volume(4, seed=7), phantom.make_volume(3, seed=8)):
        same_shape = other.image.shape == base.image.shape
        assert not same_shape or not np.array_equal(other.image, base.image)
        assert not same_shape or not np.array_equal(other.label, base.label)
        assert other.checksum != base.checksum


def test_checksum_depends_on_settings_only():
    assert phantom.checksum(2, 0) == phantom.checksum(2, 0)
    assert len({phantom.checksum(2, 0), phantom.checksum(2, 1), phantom.checksum(3, 0),
                phantom.checksum(2, 0, n_slices=10)}) == 4
    assert phantom.make_volume(2, n_slices=6).checksum == phantom.checksum(2, 0, n_slices=6)


# ------------------------------------------------------------------------------------------ the record
def test_volume_record_fields():
    vol = phantom.make_volume(5)
    assert isinstance(vol, Volume)
    assert vol.id == "phantom_005" and vol.path == "phantom:5"
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    h, w, nz = vol.image.shape
    assert (h, w) == (256, 256) and 30 <= nz <= 45 and vol.label.shape == vol.image.shape
    assert vol.n_slices == nz
    assert tuple(vol.spacing) == (1.25, 1.25, 7.7)
    assert vol.orientation == "LAS" and nib.aff2axcodes(vol.affine) == ("L", "A", "S")
    assert np.allclose(np.abs(np.diag(vol.affine)[:3]), vol.spacing)
    assert len(vol.checksum) == 64 and int(vol.checksum, 16) >= 0


def test_shapes_dtypes_and_ranges(default_set):
    assert len(default_set) == DataConfig().phantom_volumes == 20
    n_slices = [a.image.shape[2] for a in default_set]
    assert all(30 <= n <= 45 for n in n_slices) and len(set(n_slices)) > 5
    for a in default_set:
        assert a.image.dtype == np.float32 and a.image.flags.c_contiguous
        assert np.isfinite(a.image).all()
        assert a.image.min() >= 0.0 and 600.0 < a.image.max() < 1400.0   # CHAOS-T2: 0 .. ~750-1300
        assert set(np.unique(a.label)) <= {0, 1, 2, 3, 4}
        assert a.body.dtype == bool and a.body.shape == a.image.shape


def test_forced_slice_count_compresses_the_anatomy():
    for n in (1, 5):
        a = phantom.generate(2, n_slices=n)
        assert a.image.shape == (256, 256, n) and a.label.shape == (256, 256, n)
        assert set(np.unique(a.label)) == {0, 1, 2, 3, 4}, n
    natural = phantom.generate(11)                      # the shortest default stack (30 slices)
    stretched = phantom.generate(11, n_slices=2 * natural.image.shape[2])
    for name, c in ORGANS.items():
        n_nat = int((natural.label == c).any(axis=(0, 1)).sum())
        n_long = int((stretched.label == c).any(axis=(0, 1)).sum())
        assert 2 * n_nat - 2 <= n_long <= 2 * n_nat + 2, (name, n_nat, n_long)


@pytest.mark.parametrize("kwargs", [dict(index=-1), dict(index=0, seed=-3), dict(index=0, n_slices=0),
                                    dict(index=1.5), dict(index=True), dict(index=0, n_slices=2.0)])
def test_bad_arguments_raise_one_line_value_error(kwargs):
    with pytest.raises(ValueError) as err:
        phantom.make_volume(**kwargs)
    assert "\n" not in str(err.value) and str(err.value).startswith("phantom:")


# ------------------------------------------------------------------------------------------ anatomy
def test_every_organ_present_with_realistic_extent(default_set):
    for i, a in enumerate(default_set):
        starts, ends = {}, {}
        for name, c in ORGANS.items():
            zs = np.nonzero((a.label == c).any(axis=(0, 1)))[0]
            assert zs.size > 0, f"phantom {i}: {name} missing"
            assert np.array_equal(zs, np.arange(zs[0], zs[-1] + 1)), f"phantom {i}: {name} not contiguous"
            lo, hi = EXTENT_RANGE[name]
            assert lo <= zs.size <= hi, f"phantom {i}: {name} spans {zs.size} slices"
            assert (zs[0], zs[-1]) == a.extents[name]            # painting never erases a planned slice
            starts[name], ends[name] = zs[0], zs[-1]
        # organs start and end at different slices, in the real order along z (z grows towards the head)
        assert len(set(starts.values())) >= 2 and len(set(ends.values())) >= 2
        assert starts["spleen"] > starts["right_kidney"] and starts["spleen"] > starts["liver"] - 1
        assert ends["liver"] > max(ends["right_kidney"], ends["left_kidney"])
        assert ends["liver"] < a.image.shape[2] - 1             # slices above the dome exist
    # and the extents vary from patient to patient
    for name, c in ORGANS.items():
        sizes = {int((a.label == c).any(axis=(0, 1)).sum()) for a in default_set}
        assert len(sizes) >= 4, name


def test_organs_on_the_chaos_sides(default_set):
    """LAS arrays: axis 0 grows towards the patient's left, axis 1 towards anterior (as in CHAOS)."""
    for i, a in enumerate(default_set):
        c = {name: np.argwhere(a.label == v).mean(axis=0) for name, v in ORGANS.items()}
        assert c["liver"][0] < 128 and c["right_kidney"][0] < 128, i
        assert c["left_kidney"][0] > 128 and c["spleen"][0] > 128, i
        assert c["right_kidney"][1] < c["liver"][1] and c["left_kidney"][1] < c["liver"][1], i
        kidneys_z = (c["right_kidney"][2] + c["left_kidney"][2]) / 2
        assert kidneys_z < c["spleen"][2], i


def test_sides_match_the_real_chaos_volume(chaos_dir, default_set):
    lab = np.asarray(nib.load(str(chaos_dir / "label_1.nii.gz")).dataobj).astype(np.uint8)
    real = {v: np.argwhere(lab == v).mean(axis=0) for v in ORGANS.values()}
    fake = {v: np.argwhere(default_set[0].label == v).mean(axis=0) for v in ORGANS.values()}
    for v in ORGANS.values():
        assert (real[v][0] < 128) == (fake[v][0] < 128)
    assert (real[2][2] < real[4][2]) == (fake[2][2] < fake[4][2])


def test_organ_sizes_in_slice(default_set):
    """Largest in-slice area (px), medians over the 20 volumes, against method.md 8 (liver ~11400,
    spleen ~2700, kidneys ~1600); a factor 1.5 either way still makes a realistic abdomen."""
    for name, c, ref in (("liver", 1, 11400), ("right_kidney", 2, 1600), ("left_kidney", 3, 1600),
                         ("spleen", 4, 2700)):
        largest = [int((a.label == c).sum(axis=(0, 1)).max()) for a in default_set]
        assert ref / 1.5 < np.median(largest) < ref * 1.5, (name, np.median(largest))


# ------------------------------------------------------------------------------------------ intensities
def test_zscored_contrasts_match_chaos(default_set):
    per_volume = [_zmedians(a) for a in default_set]
    for name in TARGET:
        values = np.array([v[name] for v in per_volume])
        lo, hi = REAL_IQR[name]
        assert lo <= np.median(values) <= hi, (name, np.median(values))
        # every single volume stays within the real range widened by 0.75 z: the phantom's spread comes
        # from the bias field, tissue-level jitter and how much bright fluid a patient has, and is about
        # as wide as the real one, but not centred the same way for every organ
        rlo, rhi = REAL_RANGE[name]
        assert (values > rlo - 0.75).all() and (values < rhi + 0.75).all(), (name, values)
        assert values.std() > 0.05, name                     # intensities vary per patient
    # contrast ordering of the real scans: air < body < liver < kidneys/spleen
    for v in per_volume:
        assert v["body"] < v["liver"] < min(v["right_kidney"], v["left_kidney"], v["spleen"])


def test_fat_is_dark_and_air_darkest(default_set):
    for a in default_set[:5]:
        img = a.image.astype(np.float64)
        z = (img - img.mean()) / img.std()
        st = np.ones((3, 3, 1), bool)
        # 3-4 px under the skin is subcutaneous fat in every patient (skin 2 px, fat >= 4 px)
        fat = ndimage.binary_erosion(a.body, st, iterations=3) & ~ndimage.binary_erosion(a.body, st, iterations=4)
        far_air = ~ndimage.binary_dilation(a.body, st, iterations=3)
        body_rest = (a.image > 50) & (a.label == 0)
        assert np.median(z[far_air]) < np.median(z[fat]) < np.median(z[body_rest]) - 0.2
        assert np.median(z[fat]) < 0


def test_air_below_threshold_and_body_mask_recovers_the_body(default_set):
    for i, a in enumerate(default_set[:6]):
        st = np.ones((3, 3, 1), bool)
        far_air = ~ndimage.binary_dilation(a.body, st, iterations=2)
        deep_body = ndimage.binary_erosion(a.body, st, iterations=2)
        assert a.image[far_air].max() < FG_THRESHOLD and np.mean(a.image[far_air]) < 15, i
        mask = np.stack([_body_mask(a.image[:, :, k]) for k in range(a.image.shape[2])], axis=2)
        assert not (mask & far_air).any(), i                  # no air more than 2 px off the body
        # the whole body, dark fat and lungs included; where the body leaves the field of view there is no
        # skin to close it, so a few dark fat voxels touching the image edge may fall outside the mask
        assert mask[deep_body].mean() > 0.999, i
        dice = 2 * (mask & a.body).sum() / (mask.sum() + a.body.sum())
        assert dice > 0.98, (i, dice)
