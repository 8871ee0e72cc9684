"""``alpnet.evaluate`` and ``alpnet.report``: the protocol driven end to end on tiny hand-made data.

The synthetic dataset (3 scans of 32 x 32 x Z, classes A = 7 and B = 200, 3 folds) is built so that every
Dice of the support-copy reference can be worked out by hand; the numbers are derived in the comments of
``_make_dataset``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from alpnet import report
from alpnet.config import load
from alpnet.evaluate import Scan, SupportCopy, evaluate_fold, main
from alpnet.protocol import make_fold

CLASSES = {"A": 7, "B": 200}
SIZE = 32


def _labels() -> dict[str, np.ndarray]:
    """Label volumes of scans 1, 2, 3 (see the module docstring)."""
    l1 = np.zeros((SIZE, SIZE, 8), np.uint8)
    l1[0:4, 0:4, 2] = 7              # 16 px
    l1[0:4, 0:4, 3] = 7              # 16 px
    # z = 4: no A although inside A's extent 2..5 -> still scored (false positives only)
    l1[4:8, 0:8, 5] = 7              # 32 px
    l1[10:14, 10:14, 6] = 200        # 16 px
    l1[10:14, 10:14, 7] = 200        # 16 px
    l2 = np.zeros((SIZE, SIZE, 6), np.uint8)
    l2[0:4, 0:4, 1] = 7              # 16 px
    l2[0:4, 0:8, 2] = 7              # 32 px
    l2[0:8, 0:8, 3] = 7              # 64 px
    l2[10:14, 10:16, 4] = 200        # 24 px
    l3 = np.zeros((SIZE, SIZE, 5), np.uint8)
    l3[0:4, 0:8, 0] = 7              # 32 px, a one-slice organ; no B at all
    return {"1": l1, "2": l2, "3": l3}


# Hand-computed support-copy Dice (3 folds over scans 1, 2, 3: fold k queries scan k+1, support the next):
# fold 0 (query 1, support 2), A: support z_S = [1, 2, 3] -> chunk supports z = 1, 2, 3 (16, 32, 64 px).
#   Query extent 2..5, width 1: z2 -> chunk 0 (16 px == truth: TP 16), z3 -> chunk 1 (32 px vs 16: TP 16, FP 16),
#   z4 -> chunk 2 (64 px, no truth: FP 64), z5 -> chunk 2 (64 px vs 32 inside it: TP 32, FP 32).
#   TP 64, FP 112, FN 0 -> Dice 128 / 240.
# fold 0, B: support z_S = [4] (24 px at rows 10-13, cols 10-15); query z6, z7 each 16 px inside it:
#   TP 32, FP 16 -> Dice 64 / 80.
# fold 1 (query 2, support 3), A: every chunk gets scan 3's only slice (rows 0-3, cols 0-7, 32 px);
#   query z1 16 px (TP 16, FP 16), z2 32 px (TP 32), z3 64 px (TP 32, FN 32) -> Dice 160 / 208.
# fold 1, B: absent from the support scan 3 -> organ skipped.
# fold 2 (query 3, support 1), A: support z_S = [2, 3, 5] -> chunk 0 uses z = 2 (16 px); query z0 (32 px):
#   TP 16, FN 16 -> Dice 32 / 48.   B: absent from the query scan 3 -> scan skipped.
EXPECTED = {0: {"A": 128 / 240, "B": 64 / 80}, 1: {"A": 160 / 208}, 2: {"A": 32 / 48}}


def _make_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affine = np.diag([1.25, 1.25, 7.7, 1.0])
    for sid, lab in _labels().items():
        img = rng.uniform(0, 1000, size=lab.shape)
        nib.save(nib.Nifti1Image(img, affine), folder / f"image_{sid}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), folder / f"label_{sid}.nii.gz")
    return folder


def _cfg(tmp_path: Path, data: Path, fold: str = "0", extra: list[str] | None = None):
    cfg = load(None, [f"prepare.size={SIZE}", "evaluate.n_folds=3", "evaluate.overlays=1",
                      f"evaluate.out={tmp_path / 'eval'}", f"evaluate.data={data}"] + (extra or []))
    cfg.evaluate.classes = dict(CLASSES)
    cfg.evaluate.fold = fold
    return cfg


def _scans() -> dict[str, Scan]:
    rng = np.random.default_rng(1)
    return {sid: Scan(sid, rng.standard_normal(lab.shape).astype(np.float32), lab, f"mem:{sid}", "x")
            for sid, lab in _labels().items()}


# --------------------------------------------------------------------------------------------- protocol driver
@pytest.mark.parametrize("k", [0, 1, 2])
def test_support_copy_fold_dice_by_hand(k):
    scans = _scans()
    res, overlays = evaluate_fold(make_fold(list(scans), 3, k), CLASSES, 3, SupportCopy(), scans.__getitem__,
                                  overlay_scans=1)
    for organ, expected in EXPECTED[k].items():
        query = res["queries"][0]
        assert res["organs"][organ]["scans"][query]["dice"] == pytest.approx(expected)
    if k == 0:
        a = res["organs"]["A"]
        assert a["support_slices"] == [1, 2, 3] and a["support_extent"] == [1, 3]
        assert (a["scans"]["1"]["tp"], a["scans"]["1"]["fp"], a["scans"]["1"]["fn"]) == (64, 112, 0)
        assert [c["slices"] for c in a["scans"]["1"]["chunks"]] == [[2], [3], [4, 5]]
        # overlay = middle scored slice of each chunk
        assert [overlays[("A", "1", p)]["z"] for p in range(3)] == [2, 3, 5]
    if k == 1:
        assert res["organs"]["B"]["skipped"] == "absent from the support scan 3"
        assert res["organs"]["B"]["scans"]["2"] == {"skipped": "absent from the support scan 3"}
    if k == 2:
        assert res["organs"]["B"]["scans"]["3"] == {"skipped": "absent from the query scan 3"}
        assert math.isnan(res["summary"]["organs"]["B"])


def test_each_organ_reports_its_progress_when_done():
    scans = _scans()
    seen = []
    res, _ = evaluate_fold(make_fold(list(scans), 3, 1), CLASSES, 3, SupportCopy(), scans.__getitem__,
                           on_organ=lambda name, progress: seen.append((name, progress)))
    assert [name for name, _ in seen] == list(CLASSES)
    progress = dict(seen)
    assert progress["B"] == {"mean": progress["B"]["mean"], "scans": 0, "slices": 0, "seconds": 0.0,
                             "skipped": "absent from the support scan 3"} and math.isnan(progress["B"]["mean"])
    a = res["organs"]["A"]
    assert progress["A"]["skipped"] is None and progress["A"]["mean"] == pytest.approx(a["mean"])
    assert progress["A"]["scans"] == res["summary"]["n_scans"]["A"] > 0
    assert progress["A"]["slices"] == sum(len(c["slices"]) for sc in a["scans"].values() for c in sc["chunks"])


def test_chunk_count_one_uses_the_middle_support_slice():
    scans = _scans()
    res, _ = evaluate_fold(make_fold(list(scans), 3, 0), {"A": 7}, 1, SupportCopy(), scans.__getitem__)
    a = res["organs"]["A"]
    assert a["support_slices"] == [2]         # z_S = [1, 2, 3], int(0.5 * 3) = 1 -> z = 2 (32 px)
    # query z2 16 px (TP 16 FP 16), z3 16 (TP 16 FP 16), z4 0 (FP 32), z5 rows 4-7 (FP 32, FN 32)
    assert a["scans"]["1"]["dice"] == pytest.approx(64 / (64 + 96 + 32))


# --------------------------------------------------------------------------------------------- network predictor
def test_network_predictor_with_cached_support_equals_plain_forward():
    torch = pytest.importorskip("torch")
    from alpnet.config import ModelConfig
    from alpnet.evaluate import NetworkPredictor
    from alpnet.model import ALPNet

    torch.manual_seed(0)
    model = ALPNet(ModelConfig(encoder="tiny"), quiet=True).eval()
    rng = np.random.default_rng(2)
    sup = rng.standard_normal((3, SIZE, SIZE)).astype(np.float32)
    masks = np.zeros((3, SIZE, SIZE), bool)
    masks[0, 4:20, 4:20] = True
    masks[1, 8:28, 2:30] = True
    masks[2, 0:16, 16:32] = True
    qry = rng.standard_normal((5, SIZE, SIZE)).astype(np.float32)
    pred = NetworkPredictor(model, "cpu", batch=2)
    pred.set_support(sup, masks)
    for chunk in range(3):
        got = pred.logits(chunk, qry)
        tile = (lambda a: torch.from_numpy(a)[:, None].expand(-1, 3, -1, -1))
        ref = model(tile(np.repeat(sup[chunk:chunk + 1], 5, 0)), torch.from_numpy(
            np.repeat(masks[chunk:chunk + 1], 5, 0)).float(), tile(qry), train=False)["logits"]
        np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-4)
        assert np.array_equal(pred.predict(chunk, qry), got.argmax(1) == 1)
    assert pred.describe()["prototype_counters"]["episodes"] > 0


# --------------------------------------------------------------------------------------------- main
def test_main_support_copy_writes_report(tmp_path, capsys):
    data = _make_dataset(tmp_path / "data")
    (data / "notes.nii.gz").write_bytes(b"")                # a stray NIfTI name: said on stderr, ignored
    cfg = _cfg(tmp_path, data, fold="0")
    assert main(cfg, checkpoint=None, baseline="support-copy", setting=None, device="cpu") == 0
    out = tmp_path / "eval"
    res = json.loads((out / "results.json").read_text())
    assert res["folds"][0]["organs"]["A"]["scans"]["1"]["dice"] == pytest.approx(128 / 240)
    assert res["summary"]["organs"]["A"] == pytest.approx(128 / 240)
    assert res["summary"]["organs"]["B"] == pytest.approx(0.8)
    assert res["summary"]["mean"] == pytest.approx((128 / 240 + 0.8) / 2)
    assert res["classes"] == CLASSES and res["chunks"] == 3
    md = (out / "results.md").read_text()
    assert "| **support copy (no model)** | this run, data: data |" in md and "53.33" in md and "80.00" in md
    assert "paper, Table I" not in md       # classes are not CHAOS's: no paper rows
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["fold0_A_scan1.png", "fold0_B_scan1.png"]
    assert (out / "evaluate.info.json").is_file() and (out / "evaluate.config.yaml").is_file()
    captured = capsys.readouterr()
    printed = captured.out
    assert "53.33" in printed and "| A | B | Mean |" in printed.replace("---:", "")
    assert (f"evaluate: warning: {data / 'notes.nii.gz'}: a NIfTI file not named image_<id> or label_<id> "
            "(ignored)") in captured.err.splitlines()


def test_a_report_that_cannot_be_written_names_its_folder_and_keeps_the_scores(tmp_path, monkeypatch, capsys):
    # a full disk once the scans are scored: it used to be "evaluate: No space left on device (errno 28)", with
    # neither the folder nor the scores
    from alpnet import report

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report, "write_text_atomic", full)
    data = _make_dataset(tmp_path / "data")
    assert main(_cfg(tmp_path, data, fold="0"), checkpoint=None, baseline="support-copy", setting=None,
                device="cpu") == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == (
        f"evaluate: {tmp_path / 'eval'}: cannot write the report (No space left on device (errno 28)); the "
        "scores are the table above")
    assert "53.33" in captured.out and "80.00" in captured.out


def test_main_all_folds_pools_scans(tmp_path):
    data = _make_dataset(tmp_path / "data")
    cfg = _cfg(tmp_path, data, fold="all")
    assert main(cfg, checkpoint=None, baseline="support-copy", setting=None, device="cpu") == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [f["support"] for f in res["folds"]] == ["2", "3", "1"]
    a = [EXPECTED[k]["A"] for k in range(3)]
    assert res["summary"]["organs"]["A"] == pytest.approx(sum(a) / 3)
    assert res["summary"]["n_scans"] == {"A": 3, "B": 1}
    notes = "\n".join(res["notes"])
    assert "fold 1, B, scan 2: skipped (absent from the support scan 3)" in notes
    assert "fold 2, B, scan 3: skipped (absent from the query scan 3)" in notes


@pytest.mark.parametrize("kwargs, message", [
    (dict(checkpoint=None, baseline=None), "exactly one of"),
    (dict(checkpoint="x.pt", baseline="support-copy"), "exactly one of"),
    (dict(checkpoint=None, baseline="mean-shape"), "not one of support-copy"),
    (dict(checkpoint="missing.pt", baseline=None), "missing.pt: checkpoint file not found"),
])
def test_main_bad_arguments_one_line(tmp_path, capsys, kwargs, message):
    cfg = _cfg(tmp_path, tmp_path / "nothing")
    assert main(cfg, setting=None, device="cpu", **kwargs) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_main_bad_fold_and_missing_data(tmp_path, capsys):
    data = _make_dataset(tmp_path / "data")
    assert main(_cfg(tmp_path, data, fold="7"), None, "support-copy", None, "cpu") == 2
    assert "out of range 0..2" in capsys.readouterr().err
    assert main(_cfg(tmp_path, tmp_path / "absent"), None, "support-copy", None, "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert "absent" in err and len(err.splitlines()) == 1


def test_main_too_few_scans_for_the_folds(tmp_path, capsys):
    data = _make_dataset(tmp_path / "data")
    cfg = _cfg(tmp_path, data, extra=["evaluate.n_folds=5"])
    assert main(cfg, None, "support-copy", None, "cpu") == 2
    assert capsys.readouterr().err.strip() == ("evaluate: 3 labelled scan(s) cannot form 5 folds (evaluate.n_folds); "
                                               "need at least one scan per fold: set fewer, e.g. --set "
                                               "evaluate.n_folds=3")


# --------------------------------------------------------------------------------------------- report
def _fake_results(label, folds, organs, all_classes=("LIVER", "RK", "LK", "SPLEEN"), setting=2, sha=None):
    """A minimal results.json: ``organs`` = {organ: {fold: {scan: dice}}}; ``sha``: a checkpoint's digest."""
    fres = []
    for k in folds:
        f = {"fold": k, "queries": [], "support": "s", "organs": {}}
        for organ, per_fold in organs.items():
            f["organs"][organ] = {"scans": {sid: {"dice": d} for sid, d in per_fold.get(k, {}).items()}}
        fres.append(f)
    return {"label": label, "folds": fres, "all_classes": {c: i + 1 for i, c in enumerate(all_classes)},
            "n_folds": 5, "folds_evaluated": list(folds), "setting": setting, "data": "d", "chunks": 3,
            "checkpoint": sha and {"path": f"{label}.pt", "sha256": sha, "encoder": "e", "train_fold": folds[0]}}


def test_merge_pools_label_groups_and_shows_paper_rows(tmp_path):
    kid = _fake_results("k", [0], {"RK": {0: {"1": 0.5, "2": 0.7}}, "LK": {0: {"1": 0.4, "2": 0.6}}})
    liv = _fake_results("l", [0], {"LIVER": {0: {"1": 0.9, "2": 0.7}}, "SPLEEN": {0: {"1": 0.2, "2": 0.4}}})
    copy = _fake_results("copy", [0], {"LIVER": {0: {"1": 0.1}}, "RK": {0: {"1": 0.3}}}, setting=None)
    paths = []
    for name, r in [("k", kid), ("l", liv), ("c", copy)]:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    text = report.merge_results(paths, ["SLIC-ALPNet", "SLIC-ALPNet", "support copy"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    assert rows["method"][-5:] == ["LK", "RK", "Spleen", "Liver", "Mean"]
    # LK 50, RK 60, Spleen 30, Liver 80 -> mean 55, all four organs: no asterisk
    assert rows["**SLIC-ALPNet**"][-5:] == ["50.00", "60.00", "30.00", "80.00", "55.00"]
    assert rows["**support copy**"][-5:] == ["–", "30.00", "–", "10.00", "20.00*"]
    assert rows["SLIC-ALPNet (the paper)"][0].startswith("paper, Table I")
    assert rows["SLIC-ALPNet (the paper)"][-1] == "81.38"
    assert "mean over the organs this row evaluates" in text


def test_merge_rejects_duplicates_and_bad_files(tmp_path):
    r = _fake_results("x", [0], {"RK": {0: {"1": 0.5}}})
    p = tmp_path / "r.json"
    p.write_text(json.dumps(r))
    with pytest.raises(report.ReportError, match=f"^a: {p} is given twice$"):
        report.merge_results([p, p], ["a", "a"])
    twin = tmp_path / "copy.json"
    twin.write_text(p.read_text())
    with pytest.raises(report.ReportError, match="appears in two results"):
        report.merge_results([p, twin], ["a", "a"])
    with pytest.raises(report.ReportError, match="^2 results files but 1 labels: --labels names one row per file$"):
        report.merge_results([p, p], ["a"])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(report.ReportError, match="not an evaluate results.json"):
        report.merge_results([bad])
    with pytest.raises(report.ReportError, match="file not found"):
        report.merge_results([tmp_path / "none.json"])


def test_merge_averages_repeated_trainings_per_scan(tmp_path):
    # two seeds of one method and one seed of another, on fold 0 scans 1 and 2 (LIVER only)
    runs = {"a1": {"1": 0.2, "2": 0.6}, "a2": {"1": 0.4, "2": 0.8}, "b": {"1": 0.1, "2": 0.5}}
    paths = []
    for name, scans in runs.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(_fake_results(name, [0], {"LIVER": {0: scans}}, sha=name * 8)))
        paths.append(p)
    with pytest.raises(report.ReportError, match="--average-repeats"):
        report.merge_results(paths, ["A", "A", "B"])
    text = report.merge_results(paths, ["A", "A", "B"], average_repeats=True)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    # A: scan 1 (0.2 + 0.4) / 2 = 0.3, scan 2 0.7 -> liver 50.00; B: 30.00
    assert rows["**A**"][-2:] == ["50.00", "50.00*"]
    assert rows["**A**"][0].endswith("mean of 2 trainings per scan")
    assert rows["**B**"][-2] == "30.00" and "trainings" not in rows["**B**"][0]
    # B minus A on the averaged scans: 0.1 - 0.3 and 0.5 - 0.7 -> -20 points, lower on both
    assert "B minus A: -20.00 Dice points" in text
    assert "higher on 0 and lower on 2 of 2 (organ, scan) pairs" in text


def test_merge_refuses_uneven_repeats(tmp_path, capsys):
    a = _fake_results("a", [0], {"LIVER": {0: {"1": 0.2, "2": 0.6}}}, sha="a" * 8)
    b = _fake_results("b", [0], {"LIVER": {0: {"1": 0.4}}}, sha="b" * 8)
    paths = []
    for name, r in [("a", a), ("b", b)]:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    with pytest.raises(report.ReportError, match=r"uneven repeats: organ LIVER of \(fold:scan\) 0:2 is scored 1 "
                                                 r"times, others 2"):
        report.merge_results(paths, ["A", "A"], average_repeats=True)
    assert report.main([str(p) for p in paths] + ["--labels", "A", "A", "--average-repeats"]) == 2
    assert "uneven repeats" in capsys.readouterr().err


def test_paired_difference_counts_pairs_and_uses_scans_as_the_unit():
    a = {"LIVER": {"0:1": 0.8, "0:2": 0.6, "1:8": 0.5}, "RK": {"0:1": 0.4, "0:2": 0.4}}
    b = {"LIVER": {"0:1": 0.6, "0:2": 0.6, "1:8": 0.7}, "RK": {"0:1": 0.2, "0:2": 0.5, "1:8": 0.9},
         "SPLEEN": {"0:1": 0.1}}
    c = report.paired_difference(a, b)
    # pairs: LIVER 0:1 +20, 0:2 0, 1:8 -20; RK 0:1 +20, 0:2 -10 (RK 1:8 and SPLEEN only in b)
    assert (c["pairs"], c["higher"], c["lower"]) == (5, 2, 2)
    # per scan: 0:1 (+20 +20)/2 = +20, 0:2 (0 - 10)/2 = -5, 1:8 -20 -> mean -5/3
    assert c["scans"] == 3 and c["mean"] == pytest.approx(-5 / 3)
    assert (c["scans_higher"], c["scans_lower"]) == (1, 2)
    # per fold: fold 0 (+20 - 5) / 2 = +7.5, fold 1 -20
    assert (c["folds"], c["folds_higher"], c["folds_lower"]) == (2, 1, 1)
    lo, hi = c["ci95"]
    assert -20 - 1e-9 <= lo < c["mean"] < hi <= 20 + 1e-9
    assert report.paired_difference(a, b) == c                      # fixed seed: the same text every time
    # identical rows: no difference, an empty interval at 0
    same = report.paired_difference(a, a)
    assert same["mean"] == 0 and same["ci95"] == (0.0, 0.0) and same["higher"] == same["lower"] == 0
    # a missing Dice (NaN) is not a pair; nothing in common: None
    assert report.paired_difference({"RK": {"0:1": float("nan")}}, {"RK": {"0:1": 0.5}}) is None
    assert report.paired_difference({"RK": {"0:1": 0.5}}, {"LK": {"0:1": 0.5}}) is None


def test_merge_compares_each_row_with_the_first(tmp_path):
    ours = _fake_results("ours", [0], {"RK": {0: {"1": 0.6, "2": 0.8}}, "LK": {0: {"1": 0.5, "2": 0.5}}})
    copy = _fake_results("copy", [0], {"RK": {0: {"1": 0.4, "2": 0.8}}, "LK": {0: {"1": 0.3}}}, setting=None)
    other = _fake_results("other", [1], {"RK": {1: {"8": 0.4}}})
    paths = []
    for name, r in [("a", ours), ("b", copy), ("c", other)]:
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    text = report.merge_results(paths)
    assert "Paired against the first row (ours), on the (organ, scan) pairs both scored:" in text
    # copy - ours per scan: scan 1 (-20 - 20) / 2 = -20, scan 2: 0 -> -10
    assert ("- copy minus ours: -10.00 Dice points (95% bootstrap interval over 2 scans: -20.00 to +0.00); "
            "higher on 0 and lower on 2 of 3 (organ, scan) pairs, on 0 and 1 of the 2 scans, on 0 and 1 of the 1 "
            "folds") in text
    assert "- other and ours: no (organ, scan) scored by both" in text
    # one row: no comparison
    assert "Paired against" not in report.merge_results(paths[:1])


def test_report_cli(tmp_path, capsys):
    r = _fake_results("x", [0, 1], {"RK": {0: {"1": 0.5}, 1: {"8": 0.25}}})
    p = tmp_path / "r.json"
    p.write_text(json.dumps(r))
    out = tmp_path / "t" / "table.md"
    assert report.main([str(p), "--labels", "mine", "--out", str(out)]) == 0
    assert "| **mine** | this project, data: d | 2 | 0, 1 | – | 37.50 |" in out.read_text()
    assert report.main([str(tmp_path / "nope.json")]) == 2
    assert "nope.json: file not found" in capsys.readouterr().err


def test_report_takes_evaluate_folders_and_words_an_unwritable_table(tmp_path, capsys):
    run = tmp_path / "eval_f0"                       # what `evaluate --out` makes
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_fake_results("x", [0], {"RK": {0: {"1": 0.5}}})))
    assert report.main([str(run), "--labels", "mine"]) == 0
    assert "| **mine** |" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == (f"report: {tmp_path / 'empty'}: a folder without a results.json "
                                               "(name an evaluate output folder or its results.json)")
    # --out naming a folder was a traceback (IsADirectoryError)
    assert report.main([str(run), "--out", str(run)]) == 2
    assert capsys.readouterr().err.strip() == f"report: {run}: cannot write the table (Is a directory)"


# --------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(tmp_path: Path, *overrides: str, store_prepare: dict | None = None) -> Path:
    torch = pytest.importorskip("torch")
    from alpnet.checkpoint import save_checkpoint
    from alpnet.model import ALPNet
    from engine.config import to_dict

    cfg = load(None, ["model.encoder=tiny", "evaluate.n_folds=3", *overrides])
    torch.manual_seed(0)
    model = ALPNet(cfg.model, quiet=True)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "iteration": 3,
                           "store": {"path": str(tmp_path / "no-store.h5"), "method": "slic",
                                     "prepare": store_prepare}})
    return path


def test_test_scans_are_normalised_like_the_training_store(tmp_path, monkeypatch):
    from alpnet import evaluate as ev_mod
    seen = []
    real = ev_mod.ScanLoader.__init__

    def spy(self, data, cfg):
        seen.append(cfg.prepare.zscore)
        real(self, data, cfg)

    monkeypatch.setattr(ev_mod.ScanLoader, "__init__", spy)
    data = _make_dataset(tmp_path / "data")
    ckpt = _checkpoint(tmp_path, "episodes.setting=1", "episodes.fold=0", store_prepare={"zscore": "robust"})
    assert main(_cfg(tmp_path, data, fold="0"), str(ckpt), None, None, "cpu") == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert seen == ["robust"]
    assert any("prepare.zscore=robust taken from the checkpoint" in n for n in res["notes"])
    # a checkpoint of a store written before the option (no zscore recorded) keeps the reference z-score
    ckpt = _checkpoint(tmp_path, "episodes.setting=1", "episodes.fold=0", store_prepare={"size": 256})
    assert main(_cfg(tmp_path, data, fold="0"), str(ckpt), None, None, "cpu") == 0
    assert seen[-1] == "volume"


def test_main_with_checkpoint_writes_three_outputs(tmp_path, capsys):
    data = _make_dataset(tmp_path / "data")
    ckpt = _checkpoint(tmp_path, "episodes.setting=2", "episodes.exclude_labels=[7]", "episodes.fold=0")
    cfg = _cfg(tmp_path, data, fold="0")
    assert main(cfg, checkpoint=str(ckpt), baseline=None, setting=None, device="cpu") == 0
    out = tmp_path / "eval"
    res = json.loads((out / "results.json").read_text())
    assert res["setting"] == 2 and res["classes"] == {"A": 7}            # the checkpoint's held-out organ
    assert res["checkpoint"]["sha256"] == report_sha(ckpt)
    assert res["checkpoint"]["meta"]["iteration"] == 3
    d = res["folds"][0]["organs"]["A"]["scans"]["1"]["dice"]
    assert 0.0 <= d <= 1.0
    assert res["predictor_info"]["prototype_counters"]["episodes"] == 4    # 4 scored query slices
    assert res["label"] == "SLIC-ALPNet (this run)"
    md = (out / "results.md").read_text()
    assert res["checkpoint"]["sha256"] in md and "| **SLIC-ALPNet (this run)** |" in md
    assert [p.name for p in (out / "overlays").iterdir()] == ["fold0_A_scan1.png"]
    assert "SLIC-ALPNet" in capsys.readouterr().out


def report_sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_setting_and_fold_rules(tmp_path, capsys):
    data = _make_dataset(tmp_path / "data")
    ck1 = _checkpoint(tmp_path, "episodes.setting=1", "episodes.fold=0")
    assert main(_cfg(tmp_path, data), str(ck1), None, 2, "cpu") == 2
    assert "trained in setting 1" in capsys.readouterr().err
    # a checkpoint of fold 0 evaluated on fold 1: its training scans are fold 1's test scans
    assert main(_cfg(tmp_path, data, fold="1"), str(ck1), None, None, "cpu") == 2
    err = capsys.readouterr().err
    assert "fold 1: scan(s) 3 may be training scans" in err and "allow_train_overlap" in err
    cfg = _cfg(tmp_path, data, fold="1", extra=["evaluate.allow_train_overlap=true"])
    assert main(cfg, str(ck1), None, None, "cpu") == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["folds"][0]["train_overlap"] == ["3"]
    assert "WARNING fold 1" in (tmp_path / "eval" / "results.md").read_text()



def test_a_setting_1_checkpoint_trained_without_some_organs_says_so(tmp_path):
    # was: scored as plain setting 1 without a word of the organs its training never saw
    data = _make_dataset(tmp_path / "data")
    ck = _checkpoint(tmp_path, "episodes.setting=1", "episodes.exclude_labels=[7]", "episodes.fold=0")
    assert main(_cfg(tmp_path, data, fold="0"), str(ck), None, None, "cpu") == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["setting"] == 1 and set(res["classes"]) == {"A", "B"}
    assert ("the checkpoint (setting 1) was trained without the slices holding labels [7] "
            "(episodes.exclude_labels): those organs are scored as setting 1 all the same, though their "
            "training was nearer setting 2's") in res["notes"]


def test_test_slices_too_small_for_the_model_are_refused_before_loading(tmp_path, capsys):
    # was: a traceback from torch's pooling once the scans were loaded and the support encoded
    data = _make_dataset(tmp_path / "data")
    ck = _checkpoint(tmp_path, "episodes.setting=1", "episodes.fold=0")
    assert main(_cfg(tmp_path, data, extra=["prepare.size=24"]), str(ck), None, None, "cpu") == 2
    assert capsys.readouterr().err.strip() == ("evaluate: prepare.size = 24: slices too small for the checkpoint's "
                                               "model: its 4-cell windows at feature stride 8 need at least "
                                               "32 x 32 px")


def test_unreadable_checkpoint_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(_cfg(tmp_path, tmp_path), str(bad), None, None, "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert "bad.pt: not a readable checkpoint" in err and len(err.splitlines()) == 1


def test_cli_evaluate_support_copy(tmp_path, capsys):
    import cli
    data = _make_dataset(tmp_path / "data")
    out = tmp_path / "cli-eval"
    rc = cli.main(["evaluate", "--baseline", "support-copy", "--data", str(data), "--fold", "0", "--out", str(out),
                   "--set", f"prepare.size={SIZE}", "--set", "evaluate.n_folds=3",
                   "--set", "evaluate.classes={A: 7, B: 200}"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["organs"]["A"] == pytest.approx(128 / 240)
    lines = capsys.readouterr().out.splitlines()
    assert any("53.33" in line for line in lines[1:] if line.startswith("| "))
    # a progress line as each organ is done, with its mean Dice and its query slices
    progress = [line for line in lines if line.startswith("  fold 0, ")]
    assert [line.split(":")[0] for line in progress] == ["  fold 0, A", "  fold 0, B"]
    for line, organ in zip(progress, ["A", "B"]):
        entry = res["folds"][0]["organs"][organ]
        n_slices = sum(len(c["slices"]) for scan in entry["scans"].values() for c in scan.get("chunks", []))
        assert line.startswith(f"  fold 0, {organ}: Dice {100 * entry['mean']:.2f} over "
                               f"{res['summary']['n_scans'][organ]} scan(s); {n_slices} query slices in ")


@pytest.mark.chaos
def test_support_copy_on_chaos_fold0_matches_the_datasets_classmap(chaos_dir, tmp_path):
    """Fold 0 on the real data against an independent computation from the dataset's own classmap_1.json."""
    cfg = load(None, [f"evaluate.data={chaos_dir}", f"evaluate.out={tmp_path / 'e'}", "evaluate.overlays=0"])
    assert main(cfg, None, "support-copy", None, "cpu") == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    cmap = json.loads((chaos_dir / "classmap_1.json").read_text())
    lab = {s: np.asarray(nib.load(chaos_dir / f"label_{s}.nii.gz").dataobj).astype(np.uint8)
           for s in ["1", "2", "3", "5", "8"]}
    for organ, value in cfg.evaluate.classes.items():
        zs = cmap[organ]["8"]
        sup = [zs[int(p * len(zs))] for p in (1 / 6, 1 / 2, 5 / 6)]
        assert res["folds"][0]["organs"][organ]["support_slices"] == sup
        for q in ["1", "2", "3", "5"]:
            z0, z1 = min(cmap[organ][q]), max(cmap[organ][q])
            tp = fp = fn = 0
            for z in range(z0, z1 + 1):
                p = min(int((z - z0) // ((z1 - z0) / 3)), 2) if z1 > z0 else 0
                pr, gt = lab["8"][:, :, sup[p]] == value, lab[q][:, :, z] == value
                tp += int((pr & gt).sum())
                fp += int((pr & ~gt).sum())
                fn += int((~pr & gt).sum())
            got = res["folds"][0]["organs"][organ]["scans"][q]
            assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn)
            assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_training_overlap_from_store_volumes(tmp_path, monkeypatch):
    import engine.store_reader
    from alpnet.evaluate import training_overlap, training_volumes

    store_vols = [{"id": i, "checksum": f"sum{i}"} for i in ["1", "2", "3", "4", "5", "6"]]

    class FakeReader:                   # stands in for engine.store_reader.StoreReader (volumes table only)
        def __init__(self, path):
            self.volumes = store_vols

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(engine.store_reader, "StoreReader", FakeReader)
    (tmp_path / "s.h5").write_bytes(b"")
    ckpt_cfg = {"episodes": {"fold": 0, "holdout": True}, "evaluate": {"n_folds": 3}}
    vols, basis = training_volumes(ckpt_cfg, {"store": {"path": str(tmp_path / "s.h5")}})
    assert [v["id"] for v in vols] == ["4", "5", "6"]          # fold 0 of 3 holds out 1, 2 (queries) + 3
    assert "training store" in basis
    fold1 = make_fold(["1", "2", "3", "4", "5", "6"], 3, 1)    # queries 3, 4; support 5
    sums = {s: f"sum{s}" for s in fold1.scans}
    assert training_overlap(ckpt_cfg, vols, fold1, sums, 3) == ["4", "5"]
    # other data (different files): no overlap whatever the ids
    assert training_overlap(ckpt_cfg, vols, fold1, {s: "other" for s in fold1.scans}, 3) == []
    # store gone: judged from the config (same data assumed)
    assert training_volumes(ckpt_cfg, {"store": {"path": str(tmp_path / "gone.h5")}})[0] is None
    assert training_overlap(ckpt_cfg, None, fold1, dict.fromkeys(map(str, range(1, 7)), ""), 3) == ["4", "5"]
    no_holdout = {"episodes": {"fold": 0, "holdout": False}, "evaluate": {"n_folds": 3}}
    assert training_overlap(no_holdout, None, fold1, dict.fromkeys(map(str, range(1, 7)), ""), 3) == \
        ["3", "4", "5"]


def test_training_overlap_uses_the_scans_training_held_out(tmp_path, monkeypatch):
    # Guards: training held out the fold of the store as it was (an incomplete store trains on its committed
    # volumes, so its folds are other groups); the overlap check recomputed the fold from the store as it is now
    # and missed a scan the model trained on. The checkpoint records what training held out: use it.
    import engine.store_reader
    from alpnet.evaluate import training_overlap, training_volumes
    from alpnet.episodes import held_out_volumes

    ids = ["1", "2", "3", "4", "5", "6"]
    store_vols = [{"id": i, "checksum": f"sum{i}"} for i in ids]

    class FakeReader:                   # the training store now (complete: 6 volumes)
        def __init__(self, path):
            self.volumes = store_vols

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(engine.store_reader, "StoreReader", FakeReader)
    (tmp_path / "s.h5").write_bytes(b"")
    ckpt_cfg = {"episodes": {"fold": 0, "holdout": True}, "evaluate": {"n_folds": 3}}
    held = held_out_volumes(ids[:3], 0, 3)              # trained while only scans 1-3 were committed
    assert held == ["1", "2"]                           # so it trained on scan 3
    vols, _ = training_volumes(ckpt_cfg, {"store": {"path": str(tmp_path / "s.h5"), "held_out": held}})
    fold0 = make_fold(ids, 3, 0)                        # queries 1, 2; support 3
    assert training_overlap(ckpt_cfg, vols, fold0, {s: f"sum{s}" for s in fold0.scans}, 3) == ["3"]


def _write(tmp_path, **results):
    paths = []
    for name, r in results.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    return paths


def test_unequal_folds_get_the_mean_of_fold_means_beside_the_table(tmp_path):
    # fold 0 scores two scans (0.2, 0.4), fold 1 one (0.9): over scans 50.00, over fold means (0.3 + 0.9) / 2
    uneven = _fake_results("u", [0, 1], {"LIVER": {0: {"1": 0.2, "2": 0.4}, 1: {"3": 0.9}}}, all_classes=["LIVER"])
    note = ("- u: the mean of the fold means (the paper's averaging) is 60.00 (Liver 60.00); the table weighs each "
            "scan once, and its folds score 1 to 2 scans per organ")
    table = report.results_table(uneven)
    assert "| 50.00 | 50.00 |" in table and table.endswith("\n\n" + note)
    assert note in report.merge_results(_write(tmp_path, u=uneven))
    even = _fake_results("e", [0, 1], {"LIVER": {0: {"1": 0.2}, 1: {"3": 0.9}}}, all_classes=["LIVER"])
    assert "fold means" not in report.results_table(even)
    assert "fold means" not in report.merge_results(_write(tmp_path, e=even))


@pytest.mark.parametrize("key, value, message", [
    ("chunks", 1, "has C (chunks) 1 but {a} has 3"),
    ("n_folds", 4, "has n_folds 4 but {a} has 5"),
    ("all_classes", {"LIVER": 1}, "has classes ['LIVER'] but {a} has ['LIVER', 'LK', 'RK', 'SPLEEN']"),
    ("data", "/x/other", "has data other but {a} has d"),
])
def test_a_row_pools_one_protocol_on_one_dataset(tmp_path, key, value, message):
    a = _fake_results("a", [0], {"LIVER": {0: {"1": 0.2}}})
    b = _fake_results("b", [1], {"LIVER": {1: {"3": 0.4}}})
    b[key] = value
    pa, pb = _write(tmp_path, a=a, b=b)
    with pytest.raises(report.ReportError) as err:
        report.merge_results([pa, pb], ["A", "A"])
    assert str(err.value) == (f"A: {pb} " + message.format(a=pa)
                              + ": one row pools results of one protocol on one dataset")
    assert report.merge_results([pa, pb], ["A", "B"]).count("| **") == 2     # two rows may differ


def test_average_repeats_needs_separate_trainings(tmp_path):
    scans = {"LIVER": {0: {"1": 0.2}}}
    one, same, copy = _write(tmp_path, one=_fake_results("one", [0], scans, sha="f" * 64),
                             same=_fake_results("same", [0], scans, sha="f" * 64),
                             copy=_fake_results("copy", [0], scans))
    with pytest.raises(report.ReportError, match=f"^A: {one} is given twice$"):
        report.merge_results([one, one], ["A", "A"], average_repeats=True)
    with pytest.raises(report.ReportError) as err:
        report.merge_results([one, same], ["A", "A"], average_repeats=True)
    assert str(err.value) == (f"A: {one} and {same} score the same checkpoint (sha256 ffffffffffff): "
                              "repeats must be separate trainings")
    with pytest.raises(report.ReportError) as err:
        report.merge_results([one, copy], ["A", "A"], average_repeats=True)
    assert str(err.value) == (f"A: {copy} has no model (support copy): there is no training to repeat, "
                              "so nothing to average")
