"""engine.quality: superpixel metrics on tiny hand-made label maps with hand-computed answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engine import quality as Q


def vsplit(h: int, w: int, col: int, left: int = 0, right: int = 1) -> np.ndarray:
    """h x w map: columns < col carry ``left``, the others ``right``."""
    out = np.full((h, w), right, dtype=np.int32)
    out[:, :col] = left
    return out


# --------------------------------------------------------------------------------------------- boundaries
def test_tolerance_is_a_quarter_percent_of_the_diagonal():
    assert Q.tolerance((256, 256)) == 1           # 0.0025 * 362.0 = 0.905 -> 1
    assert Q.tolerance((1000, 1000)) == 4         # 3.54 -> 4
    assert Q.tolerance((100, 100)) == 0           # 0.35 -> 0


def test_boundary_pixels_mark_both_sides_of_a_label_change():
    b = Q.boundary_pixels(vsplit(3, 5, 2))
    expected = np.zeros((3, 5), dtype=bool)
    expected[:, 1:3] = True                       # columns 1 and 2 touch each other
    np.testing.assert_array_equal(b, expected)
    assert not Q.boundary_pixels(np.ones((4, 4), dtype=np.int32)).any()   # the image border is no boundary


def test_boundary_pixels_use_4_neighbours_only():
    lab = np.zeros((3, 3), dtype=np.int32)
    lab[0, 0] = 1
    b = Q.boundary_pixels(lab)
    # (0,0) and its 4-neighbours (0,1), (1,0); the diagonal (1,1) is not a boundary pixel
    assert set(zip(*np.nonzero(b))) == {(0, 0), (0, 1), (1, 0)}


def test_boundary_recall_hand_counts():
    gt = vsplit(6, 6, 3)                          # gt boundary: columns 2 and 3, 12 pixels
    sp = vsplit(6, 6, 4, 1, 2)                    # superpixel boundary: columns 3 and 4
    assert Q.boundary_recall(sp, gt, r=0) == 6 / 12          # only column 3 coincides
    assert Q.boundary_recall(sp, gt, r=1) == 1.0             # column 2 is 1 px from column 3
    far = vsplit(6, 6, 5, 1, 2)                   # boundary at columns 4 and 5
    assert Q.boundary_recall(far, gt, r=0) == 0.0
    assert Q.boundary_recall(far, gt, r=1) == 6 / 12         # column 3 reaches column 4; column 2 does not
    assert Q.boundary_recall(far, gt, r=2) == 1.0
    assert Q.boundary_recall(sp, gt) == Q.boundary_recall(sp, gt, r=0)   # default r at 6 x 6 is 0


def test_boundary_recall_window_is_a_square():
    gt = np.zeros((5, 5), dtype=np.int32)
    gt[0, 0] = 1                                  # gt boundary pixels: (0,0), (0,1), (1,0)
    sp = np.zeros((5, 5), dtype=np.int32)
    sp[2:, 2:] = 1                                # sp boundary pixels include (2,2), (1,2), (2,1)...
    # (0,1) has (1,2) at Chebyshev distance 1 and (1,0) has (2,1): both recalled; (0,0) is 2 away from all
    assert Q.boundary_recall(sp, gt, r=1) == 2 / 3


def test_boundary_recall_region_and_no_boundary():
    gt = vsplit(6, 6, 3)
    sp = vsplit(6, 6, 5, 1, 2)
    region = np.zeros((6, 6), dtype=bool)
    region[:, 3:] = True                          # only gt boundary column 3 must be recalled
    assert Q.boundary_recall(sp, gt, region, r=1) == 1.0
    assert math.isnan(Q.boundary_recall(sp, np.zeros((6, 6), dtype=np.int32), r=1))


# --------------------------------------------------------------------------------------------- UE / ASA
def _ue_asa_case():
    gt = vsplit(4, 4, 2)                           # G0: columns 0-1 (8 px), G1: columns 2-3 (8 px)
    sp = np.full((4, 4), 1, dtype=np.int32)        # S1: columns 0-2 (12 px), S2: column 3 (4 px)
    sp[:, 3] = 2
    return sp, gt


def test_undersegmentation_error_hand_count():
    sp, gt = _ue_asa_case()
    # S1: min(|S1&G0| = 8, 12 - 8) + min(|S1&G1| = 4, 12 - 4) = 4 + 4; S2: min(4, 0) = 0
    assert Q.undersegmentation_error(sp, gt) == (4 + 4 + 0) / 16
    assert Q.undersegmentation_error(gt, gt) == 0.0


def test_asa_hand_count():
    sp, gt = _ue_asa_case()
    assert Q.achievable_segmentation_accuracy(sp, gt) == (8 + 4) / 16
    assert Q.achievable_segmentation_accuracy(gt, gt) == 1.0
    assert Q.achievable_segmentation_accuracy(np.zeros((4, 4), dtype=np.int32), gt) == 8 / 16


def test_ue_asa_in_a_region():
    sp, gt = _ue_asa_case()
    region = np.zeros((4, 4), dtype=bool)
    region[:, 1:] = True                           # 12 px: S1&G0 = 4, S1&G1 = 4, S2&G1 = 4
    assert Q.undersegmentation_error(sp, gt, region) == (4 + 4 + 0) / 12
    assert Q.achievable_segmentation_accuracy(sp, gt, region) == (4 + 4) / 12
    empty = np.zeros((4, 4), dtype=bool)
    assert math.isnan(Q.undersegmentation_error(sp, gt, empty))
    assert math.isnan(Q.achievable_segmentation_accuracy(sp, gt, empty))


def test_contingency_table():
    sp, gt = _ue_asa_case()
    np.testing.assert_array_equal(Q.contingency(sp, gt), [[0, 0], [8, 4], [0, 4]])


def test_metrics_ignore_label_values():
    """Renaming labels (including huge ids that take the sorting path) changes no metric."""
    rng = np.random.default_rng(0)
    sp = rng.integers(0, 6, size=(12, 12)).astype(np.int64)
    gt = (np.arange(144).reshape(12, 12) % 5 == 0).astype(np.int64) + (np.arange(12)[:, None] > 6)
    big = sp * 10**12                             # 0 stays 0 (n_superpixels ignores it)
    for f in (Q.undersegmentation_error, Q.achievable_segmentation_accuracy):
        assert f(big, gt) == f(sp, gt)
    assert Q.boundary_recall(big, gt, r=1) == Q.boundary_recall(sp, gt, r=1)
    assert Q.compactness(big) == pytest.approx(Q.compactness(sp), rel=1e-12)
    assert Q.n_superpixels(big) == Q.n_superpixels(sp)


# --------------------------------------------------------------------------------------------- compactness
def test_compactness_of_squares_and_rectangles():
    # one 4x4 segment: A = 16, P = 16 image-border edges -> 4 pi 16 / 256 = pi / 4
    assert Q.compactness(np.ones((4, 4), dtype=np.int32)) == pytest.approx(math.pi / 4)
    # two 4x2 halves: A = 8, P = 2 * (4 + 2) = 12 each -> 4 pi 8 / 144 = 2 pi / 9, area-weighted mean the same
    assert Q.compactness(vsplit(4, 4, 2)) == pytest.approx(2 * math.pi / 9)
    # a 1x4 strip and a 3x4 block: 4 pi 4 / 100 and 4 pi 12 / 196, weighted by 4 and 12 over 16
    strip = np.ones((4, 4), dtype=np.int32)
    strip[0] = 2
    expected = (4 * (4 * math.pi * 4 / 10**2) + 12 * (4 * math.pi * 12 / 14**2)) / 16
    assert Q.compactness(strip) == pytest.approx(expected)


def test_compactness_region_edges_count_as_perimeter():
    lab = np.ones((4, 4), dtype=np.int32)
    region = np.zeros((4, 4), dtype=bool)
    region[:, :2] = True                           # the 4x2 part: P = 12 (8 border edges + 4 region edges)
    assert Q.compactness(lab, region) == pytest.approx(2 * math.pi / 9)
    assert math.isnan(Q.compactness(lab, np.zeros((4, 4), dtype=bool)))


def test_n_superpixels_and_evaluate():
    sp, gt = _ue_asa_case()
    sp[0, 0] = 0
    assert Q.n_superpixels(sp) == 2
    assert Q.n_superpixels(sp, ignore_zero=False) == 3
    region = np.zeros((4, 4), dtype=bool)
    region[0, 0] = True
    assert Q.n_superpixels(sp, region) == 0
    ev = Q.evaluate(*_ue_asa_case(), r=0)
    assert ev == {"br": Q.boundary_recall(*_ue_asa_case(), r=0), "ue": 0.5, "asa": 0.75,
                  "co": Q.compactness(_ue_asa_case()[0]), "n": 2.0}


# --------------------------------------------------------------------------------------------- ALPNet view
def test_downsampled_masks_hand_values():
    # 16 -> 2: output cell i samples rows 8i+3 and 8i+4 with weight 1/2 each (align_corners=False)
    sp = np.zeros((16, 16), dtype=np.int32)
    sp[:8, :8] = 1                                  # covers both taps of cell (0, 0)
    sp[0, 15] = 2                                   # touches no tap: vanishes
    sp[3, 8:] = 3                                   # row 3 only: half of the taps of cell (0, 1)
    ids, soft = Q.downsampled_masks(sp, size=2)
    np.testing.assert_array_equal(ids, [1, 2, 3])
    np.testing.assert_allclose(soft[0], [[1, 0], [0, 0]])
    np.testing.assert_allclose(soft[1], 0)
    np.testing.assert_allclose(soft[2], [[0, 0.5], [0, 0]])


def test_downsampled_masks_match_torch_bilinear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    sp = rng.integers(0, 5, size=(8, 8)).repeat(5, axis=0).repeat(5, axis=1)[:37, :40].astype(np.int32)
    ids, soft = Q.downsampled_masks(sp, size=8)
    onehot = torch.from_numpy(np.stack([(sp == i) for i in ids]).astype(np.float64))[None]
    ref = torch.nn.functional.interpolate(onehot, size=(8, 8), mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(soft, ref, atol=1e-12)


def test_feature_stats_local_prototypes():
    sp = np.zeros((64, 64), dtype=np.int32)
    sp[:32, :32] = 1                                # a whole 4x4 window of 8x8 cells: one local prototype
    sp[40:48, 40:64] = 2                            # 8 rows: at most one cell row, never a full window
    sp[63, 63] = 3                                  # vanishes
    st = Q.feature_stats(sp, size=8, pool=4)
    np.testing.assert_array_equal(st["ids"], [1, 2, 3])
    np.testing.assert_array_equal(st["vanished"], [False, False, True])
    np.testing.assert_array_equal(st["fg_local"], [True, False, False])
    np.testing.assert_array_equal(st["n_local"], [1, 0, 0])
    with pytest.raises(ValueError, match="multiple of the pooling window"):
        Q.feature_stats(sp, size=8, pool=3)
    empty = Q.feature_stats(np.zeros((16, 16), dtype=np.int32), size=4, pool=2)
    assert empty["ids"].size == 0 and empty["vanished"].size == 0


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("sp, gt, region, message", [
    (np.zeros((2, 2, 2), dtype=np.int32), None, None, "2D label map"),
    (np.zeros((2, 2), dtype=np.float32), None, None, "integer labels"),
    (-np.ones((2, 2), dtype=np.int32), None, None, "non-negative"),
    (np.zeros((2, 2), dtype=np.int32), np.zeros((3, 2), dtype=np.int32), None, "gt shape"),
    (np.zeros((2, 2), dtype=np.int32), np.zeros((2, 2), dtype=np.float64), None, "gt must hold integer"),
    (np.zeros((2, 2), dtype=np.int32), -np.ones((2, 2), dtype=np.int32), None, "gt must hold non-negative"),
    (np.zeros((2, 2), dtype=np.int32), np.zeros((2, 2), dtype=np.int32), np.ones((2, 3), bool), "region shape"),
])
def test_invalid_inputs(sp, gt, region, message):
    with pytest.raises(ValueError, match=message):
        if gt is None:
            Q.compactness(sp, region)
        else:
            Q.evaluate(sp, gt, region)


def test_negative_tolerance_rejected():
    with pytest.raises(ValueError, match="tolerance"):
        Q.boundary_recall(vsplit(4, 4, 2), vsplit(4, 4, 2), r=-1)
