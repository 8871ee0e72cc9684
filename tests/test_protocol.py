"""The evaluation protocol (method.md 5.1-5.3) on hand-made inputs: folds, support slices, chunks, Dice."""
from __future__ import annotations

import math

import numpy as np
import pytest

from alpnet.protocol import (Counts, ProtocolError, chunk_of, dice, held_out_labels, make_fold, numeric_key,
                             organ_slices, parse_folds, query_plan, select_classes, summarise,
                             support_fractions, support_slice_indices)

CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36",
             "37", "38", "39"]


# --------------------------------------------------------------------------------------------- folds
@pytest.mark.parametrize("fold, queries, support", [
    (0, ["1", "2", "3", "5"], "8"),
    (1, ["8", "10", "13", "15"], "19"),
    (2, ["19", "20", "21", "22"], "31"),
    (3, ["31", "32", "33", "34"], "36"),
    (4, ["36", "37", "38", "39"], "1"),     # wraps around
])
def test_folds_match_method_table(fold, queries, support):
    shuffled = CHAOS_IDS[::-1]                # input order must not matter: ids are sorted numerically
    f = make_fold(shuffled, 5, fold)
    assert list(f.queries) == queries
    assert f.support == support
    assert f.scans == tuple(queries) + (support,)


def test_every_scan_is_a_query_exactly_once_and_never_its_own_support():
    for n, k in [(20, 5), (7, 3), (3, 3), (2, 2), (11, 4)]:
        ids = [f"s{i}" for i in range(n)]
        folds = [make_fold(ids, k, j) for j in range(k)]
        queries = [q for f in folds for q in f.queries]
        assert sorted(queries, key=numeric_key) == ids
        assert all(f.support not in f.queries for f in folds)
        sizes = [len(f.queries) for f in folds]
        assert max(sizes) - min(sizes) <= 1


def test_uneven_fold_sizes_larger_groups_first():
    ids = [str(i) for i in range(1, 8)]       # 7 scans, 3 folds -> groups of 3, 2, 2
    assert make_fold(ids, 3, 0).queries == ("1", "2", "3") and make_fold(ids, 3, 0).support == "4"
    assert make_fold(ids, 3, 1).queries == ("4", "5") and make_fold(ids, 3, 1).support == "6"
    assert make_fold(ids, 3, 2).queries == ("6", "7") and make_fold(ids, 3, 2).support == "1"


def test_numeric_sort_of_ids():
    assert sorted(["10", "2", "1", "phantom_10", "phantom_2"], key=numeric_key) == \
        ["1", "2", "10", "phantom_2", "phantom_10"]


@pytest.mark.parametrize("ids, n_folds, fold, message", [
    (CHAOS_IDS, 1, 0, "at least 2 folds"),
    (["1", "2"], 3, 0, "cannot form 3 folds .* e.g. --set evaluate.n_folds=2$"),
    (["1"], 2, 0, "cannot form 2 folds .* the protocol needs 2 labelled scans at least$"),
    (CHAOS_IDS, 5, 5, "out of range"),
    (["1", "1", "2"], 2, 0, "duplicate"),
])
def test_fold_errors(ids, n_folds, fold, message):
    with pytest.raises(ProtocolError, match=message):
        make_fold(ids, n_folds, fold)


def test_parse_folds():
    assert parse_folds("all", 5) == [0, 1, 2, 3, 4]
    assert parse_folds("3", 5) == [3]
    assert parse_folds(2, 4) == [2]
    with pytest.raises(ProtocolError, match="out of range 0..4"):
        parse_folds("5", 5)
    with pytest.raises(ProtocolError, match="integer 0..4 or 'all'"):
        parse_folds("first", 5)


# --------------------------------------------------------------------------------------------- support
def test_support_fractions():
    assert support_fractions(1) == [0.5]
    assert support_fractions(3) == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert support_fractions(5) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    with pytest.raises(ProtocolError):
        support_fractions(0)


def test_support_slices_c3_c1():
    z = list(range(4, 18))                    # 14 slices: indices int(14/6)=2, int(7)=7, int(11.67)=11
    assert support_slice_indices(z, 3) == [6, 11, 15]
    assert support_slice_indices(z, 1) == [11]
    # the list is indexed, not the z range: gaps in the organ are skipped over
    assert support_slice_indices([3, 4, 9, 10, 11, 20], 3) == [4, 10, 20]


def test_support_one_slice_organ_and_absent_organ():
    assert support_slice_indices([7], 3) == [7, 7, 7]
    assert support_slice_indices([7], 1) == [7]
    with pytest.raises(ProtocolError, match="absent from the support scan"):
        support_slice_indices([], 3)


# --------------------------------------------------------------------------------------------- chunks
def test_chunk_assignment_c3_even():
    # z_max - z_min = 12 -> chunks of width 4; z_max itself is clamped into the last chunk
    got = [chunk_of(z, 10, 22, 3) for z in range(10, 23)]
    assert got == [0] * 4 + [1] * 4 + [2] * 5


def test_chunk_assignment_c3_fractional_width():
    # width 10/3: 0..3 -> 0, 4..6 -> 1, 7..10 -> 2 (10 -> 3 clamped)
    assert [chunk_of(z, 0, 10, 3) for z in range(11)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_chunk_assignment_one_slice_and_c1():
    assert chunk_of(5, 5, 5, 3) == 0
    assert [chunk_of(z, 3, 9, 1) for z in range(3, 10)] == [0] * 7
    # a 2-slice organ with C = 3: first slice chunk 0, last clamped to chunk 2
    assert [chunk_of(z, 4, 5, 3) for z in (4, 5)] == [0, 2]


def _label_with(zs, value, shape=(6, 6, 12)):
    lab = np.zeros(shape, np.uint8)
    for z in zs:
        lab[1:3, 2:4, z] = value
    return lab


def test_query_plan_scores_the_whole_extent_including_gaps():
    lab = _label_with([2, 3, 5], 7)           # slice 4 lacks the organ but lies inside the extent
    plan = query_plan(lab, 7, 3)
    assert (plan.z_min, plan.z_max) == (2, 5)
    assert plan.slices == (2, 3, 4, 5)
    assert plan.chunks == (0, 1, 2, 2)        # width 1: 2->0, 3->1, 4->2, 5->3 clamped
    assert plan.slices_of_chunk(2) == [4, 5]
    assert organ_slices(lab, 7).tolist() == [2, 3, 5]


def test_query_plan_absent_and_one_slice():
    lab = _label_with([6], 9)
    assert query_plan(lab, 7, 3) is None      # absent organ: the caller skips the scan
    plan = query_plan(lab, 9, 3)
    assert plan.slices == (6,) and plan.chunks == (0,)


def test_organ_slices_rejects_2d():
    with pytest.raises(ProtocolError, match=r"\(H, W, Z\)"):
        organ_slices(np.zeros((4, 4), np.uint8), 1)


# --------------------------------------------------------------------------------------------- Dice
def test_dice_hand_made_volume():
    truth = np.zeros((4, 4, 3), bool)
    pred = np.zeros((4, 4, 3), bool)
    truth[0:2, 0:2, 0] = True                 # 4 voxels
    truth[0:2, 0:3, 1] = True                 # 6 voxels
    pred[0:2, 0:2, 0] = True                  # 4 TP
    pred[0:1, 0:3, 1] = True                  # 3 TP (3 FN)
    pred[3, 3, 2] = True                      # 1 FP (slice without organ)
    c = Counts().add(pred, truth)
    assert (c.tp, c.fp, c.fn) == (7, 1, 3)
    assert c.dice == pytest.approx(14 / 18)
    assert dice(pred, truth) == pytest.approx(14 / 18)


def test_dice_is_3d_not_mean_of_slices():
    c = Counts()
    c.add(np.ones((2, 2), bool), np.ones((2, 2), bool))            # slice Dice 1.0, 4 TP
    c.add(np.zeros((2, 2), bool), np.eye(2, dtype=bool))           # slice Dice 0.0, 2 FN
    assert c.dice == pytest.approx(8 / 10)                          # not (1 + 0) / 2


def test_dice_edge_cases():
    assert math.isnan(Counts().dice)                                # nothing predicted, nothing true
    assert dice(np.zeros(5, bool), np.ones(5, bool)) == 0.0
    with pytest.raises(ProtocolError, match="shape"):
        Counts().add(np.zeros((2, 2)), np.zeros((2, 3)))


def test_summarise_means_over_scans_then_organs_and_ignores_skips():
    per_scan = {"A": {"1": 0.5, "2": 1.0}, "B": {"1": 0.2, "2": float("nan")}, "C": {}}
    s = summarise(per_scan, ["A", "B", "C"])
    assert s["organs"]["A"] == pytest.approx(0.75)
    assert s["organs"]["B"] == pytest.approx(0.2)
    assert math.isnan(s["organs"]["C"])
    assert s["n_scans"] == {"A": 2, "B": 1, "C": 0}
    assert s["mean"] == pytest.approx((0.75 + 0.2) / 2)


# --------------------------------------------------------------------------------------------- classes
def test_classes_with_non_consecutive_values():
    classes = {"A": 7, "B": 200}
    assert select_classes(classes, None) == classes
    assert select_classes(classes, [200, 3]) == {"B": 200}
    with pytest.raises(ProtocolError, match="none of the configured classes"):
        select_classes(classes, [1, 2])


@pytest.mark.parametrize("classes, message", [
    ({}, "empty"), ({"A": 1, "B": 1}, "share one label value"), ({"A": 0}, "1..255"), ({"A": 300}, "1..255")])
def test_bad_classes(classes, message):
    with pytest.raises(ProtocolError, match=message):
        select_classes(classes, None)


def test_held_out_labels_of_a_checkpoint():
    assert held_out_labels({"setting": 1, "label_group": 0}) is None
    assert held_out_labels({"setting": 2, "label_group": 0, "exclude_labels": []}) == (2, 3)
    assert held_out_labels({"setting": 2, "label_group": 1}) == (1, 4)
    assert held_out_labels({"setting": 2, "label_group": 0, "exclude_labels": [7, 200]}) == (7, 200)
    with pytest.raises(ProtocolError, match="label_group"):
        held_out_labels({"setting": 2, "label_group": 5})
