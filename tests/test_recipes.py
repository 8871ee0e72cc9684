"""engine.recipes: the SSL-ALPNet Felzenszwalb recipe (faithful and clean relabelling) and the MeanShift recipe."""
from __future__ import annotations

import numpy as np
import pytest

from engine import recipes
from engine.recipes import consecutive_ids, felzenszwalb_pseudolabels, meanshift_pseudolabels

# A hand-made Felzenszwalb output (ids 0..5) and body mask:
#  - segment 0 has two pixels in the body           -> faithful: dropped (0); clean: id 1
#  - segment 3 lies entirely outside the body       -> faithful: id 3 reserved and empty; clean: no id
#  - segment 5 has the largest id M = 5             -> faithful: id 6, id 5 empty; clean: id 5
SEG = np.array([[0, 0, 1, 1, 2, 2],
                [0, 0, 1, 1, 2, 2],
                [3, 3, 4, 4, 2, 2],
                [3, 3, 4, 4, 5, 5]], dtype=np.int64)
FG = np.array([[0, 1, 1, 1, 1, 0],
               [0, 1, 1, 0, 0, 0],
               [0, 0, 1, 1, 0, 0],
               [0, 0, 1, 1, 1, 0]], dtype=bool)
FAITHFUL = np.array([[0, 0, 1, 1, 2, 0],
                     [0, 0, 1, 0, 0, 0],
                     [0, 0, 4, 4, 0, 0],
                     [0, 0, 4, 4, 6, 0]], dtype=np.int32)
CLEAN = np.array([[0, 1, 2, 2, 3, 0],
                  [0, 1, 2, 0, 0, 0],
                  [0, 0, 4, 4, 0, 0],
                  [0, 0, 4, 4, 5, 0]], dtype=np.int32)


def notebook_masking(raw_seg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The official ``superpix_masking`` loop, written out step by step as an independent reference."""
    seg = raw_seg.astype(np.int32).copy()
    values = np.unique(seg)
    top = values.max()
    seg[seg == 0] = top + 1
    order = list(values) + [top]
    seg = seg * mask
    out = np.zeros(seg.shape, dtype=np.int32)
    new = 1
    for v in order:
        if v == 0:
            continue
        out[seg == v] = new
        new += 1
    return out


@pytest.fixture
def fake_felzenszwalb(monkeypatch):
    """Make the recipe's Felzenszwalb call return ``SEG`` so the relabelling is tested on a known map."""
    calls = []

    def fake(image, scale, sigma, min_size, channel_axis):
        calls.append((image.shape, scale, sigma, min_size, channel_axis))
        return SEG.copy()

    monkeypatch.setattr(recipes, "felzenszwalb", fake)
    return calls


# --------------------------------------------------------------------------------------------- relabelling
def test_faithful_relabelling_reproduces_every_quirk(fake_felzenszwalb):
    out = felzenszwalb_pseudolabels(np.zeros(SEG.shape, np.float32), FG, faithful=True)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, FAITHFUL)
    np.testing.assert_array_equal(out, notebook_masking(SEG, FG))
    present = set(np.unique(out)) - {0}
    assert present == {1, 2, 4, 6}                # 3 (outside) and 5 (moved to 6) are empty ids
    assert fake_felzenszwalb == [(SEG.shape, 1, 1, 400, None)]   # the SSL-ALPNet parameters


def test_clean_relabelling_gives_consecutive_ids(fake_felzenszwalb):
    out = felzenszwalb_pseudolabels(np.zeros(SEG.shape, np.float32), FG)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, CLEAN)
    np.testing.assert_array_equal(out, consecutive_ids(SEG, FG))


def test_faithful_single_segment_slice_is_dropped_whole(monkeypatch):
    monkeypatch.setattr(recipes, "felzenszwalb", lambda image, **kw: np.zeros(image.shape, np.int64))
    fg = np.ones((5, 5), dtype=bool)
    assert not felzenszwalb_pseudolabels(np.zeros((5, 5)), fg, faithful=True).any()
    np.testing.assert_array_equal(felzenszwalb_pseudolabels(np.zeros((5, 5)), fg), np.ones((5, 5)))


def test_consecutive_ids_keeps_order_and_zeroes_outside():
    labels = np.array([[7, 7, 2], [9, 2, 2]])
    fg = np.array([[1, 1, 0], [1, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(consecutive_ids(labels, fg), [[2, 2, 0], [3, 0, 1]])
    assert not consecutive_ids(labels, np.zeros_like(fg)).any()


# --------------------------------------------------------------------------------------------- real runs
def blocks_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 64 'body' of four flat organs on a dark background, with mild noise, and its mask."""
    rng = np.random.default_rng(seed)
    img = np.full((64, 64), 10.0)
    img[8:56, 8:56] = 300.0
    img[12:30, 12:30] = 700.0
    img[34:52, 12:40] = 500.0
    img[14:28, 36:52] = 900.0
    img += rng.normal(0.0, 3.0, img.shape)
    fg = np.zeros((64, 64), dtype=bool)
    fg[8:56, 8:56] = True
    return img.astype(np.float32), fg


@pytest.mark.parametrize("func, kwargs", [
    (felzenszwalb_pseudolabels, dict(min_size=50)),
    (meanshift_pseudolabels, dict(kernel_size=3, max_dist=20)),
])
def test_clean_maps_are_consecutive_inside_the_mask(func, kwargs):
    img, fg = blocks_image()
    out = func(img, fg, **kwargs)
    assert out.dtype == np.int32 and out.shape == img.shape
    assert not out[~fg].any()
    assert out[fg].min() == 1
    np.testing.assert_array_equal(np.unique(out[fg]), np.arange(1, out.max() + 1))
    assert out.max() >= 4                         # the four flat regions are told apart


@pytest.mark.parametrize("func", [felzenszwalb_pseudolabels, meanshift_pseudolabels])
def test_empty_mask_gives_zeros(func):
    img, _ = blocks_image()
    out = func(img, np.zeros(img.shape, dtype=bool))
    assert out.dtype == np.int32 and not out.any()


@pytest.mark.parametrize("func, kwargs", [
    (felzenszwalb_pseudolabels, dict(faithful=True)),
    (felzenszwalb_pseudolabels, dict()),
    (meanshift_pseudolabels, dict(kernel_size=3)),
])
def test_deterministic(func, kwargs):
    img, fg = blocks_image(3)
    np.testing.assert_array_equal(func(img, fg, **kwargs), func(img.copy(), fg.copy(), **kwargs))


def test_faithful_matches_the_notebook_on_a_real_run():
    from skimage.segmentation import felzenszwalb

    img, fg = blocks_image(1)
    raw = felzenszwalb(img.astype(np.float64), scale=1, sigma=1, min_size=50)
    out = felzenszwalb_pseudolabels(img, fg, min_size=50, faithful=True)
    np.testing.assert_array_equal(out, notebook_masking(raw, fg))


def test_faithful_matches_the_notebook_on_chaos(chaos_dir):
    import nibabel as nib
    from skimage.segmentation import felzenszwalb

    from engine.prepare import body_mask

    vol = np.asarray(nib.load(chaos_dir / "image_2.nii.gz").dataobj)
    for z in (5, 15, 25):
        raw = np.ascontiguousarray(vol[:, :, z], dtype=np.float32)
        fg = body_mask(raw, 50 + 1e-4)
        seg = felzenszwalb(raw.astype(np.float64), scale=1, sigma=1, min_size=400)
        faithful = felzenszwalb_pseudolabels(raw, fg, faithful=True)
        np.testing.assert_array_equal(faithful, notebook_masking(seg, fg))
        clean = felzenszwalb_pseudolabels(raw, fg)
        # same partition of the body, except that clean keeps Felzenszwalb's segment 0
        keep = faithful > 0
        pairs = np.unique(np.stack([faithful[keep], clean[keep]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_meanshift_intensity_scale_invariant():
    """Intensities are mapped by the body's percentiles, so an affine change of the scan changes nothing."""
    img, fg = blocks_image(2)
    a = meanshift_pseudolabels(img, fg, kernel_size=3)
    b = meanshift_pseudolabels(img * 2.5 + 40.0, fg, kernel_size=3)
    assert (a == b).mean() > 0.99                  # equal up to float rounding of the features


def test_meanshift_constant_body():
    out = meanshift_pseudolabels(np.full((20, 20), 100.0), np.ones((20, 20), dtype=bool), kernel_size=3)
    assert out.min() >= 1 and out.dtype == np.int32


# --------------------------------------------------------------------------------------------- errors
GOOD_IMG = np.ones((8, 8), np.float32)
GOOD_FG = np.ones((8, 8), bool)


@pytest.mark.parametrize("func", [felzenszwalb_pseudolabels, meanshift_pseudolabels])
@pytest.mark.parametrize("img, fg, message", [
    (np.ones((4, 4, 2), np.float32), np.ones((4, 4, 2), bool), "2D array"),
    (np.ones((1, 8), np.float32), np.ones((1, 8), bool), "at least 2 x 2"),
    (np.array([["a", "b"], ["c", "d"]]), np.ones((2, 2), bool), "numeric"),
    (np.where(np.eye(8, dtype=bool), np.nan, 1.0), GOOD_FG, "NaN or Inf"),
    (np.where(np.eye(8, dtype=bool), np.inf, 1.0), GOOD_FG, "NaN or Inf"),
    (GOOD_IMG, np.ones((8, 7), bool), "fg mask shape"),
    (GOOD_IMG, np.full((8, 8), 2), "boolean"),
])
def test_invalid_inputs(func, img, fg, message):
    with pytest.raises(ValueError, match=message):
        func(img, fg)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=0), "scale must be > 0"),
    (dict(sigma=-1), "sigma must be >= 0"),
    (dict(min_size=-1), "min_size must be an integer >= 0"),
    (dict(min_size=2.5), "min_size must be an integer >= 0"),
    (dict(scale=float("nan")), "scale must be > 0"),
])
def test_felzenszwalb_invalid_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        felzenszwalb_pseudolabels(GOOD_IMG, GOOD_FG, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=0.5), "kernel_size must be >= 1"),
    (dict(max_dist=0), "max_dist must be > 0"),
    (dict(ratio=-1), "ratio must be > 0"),
    (dict(sigma=-0.1), "sigma must be >= 0"),
    (dict(ratio=float("nan")), "ratio must be > 0"),
])
def test_meanshift_invalid_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        meanshift_pseudolabels(GOOD_IMG, GOOD_FG, **kwargs)


def test_zero_one_float_mask_accepted():
    img, fg = blocks_image()
    np.testing.assert_array_equal(felzenszwalb_pseudolabels(img, fg.astype(np.float32)),
                                  felzenszwalb_pseudolabels(img, fg))
