"""Smoke tests of the benchmark scripts (table2.py, scaling.py, engine.py, cpu_budget.py, common.py).

They run each script's core function and its command line on three phantom slices with one repeat, so the
scripts cannot rot unnoticed. They check structure and arithmetic (ratios, efficiency, the Amdahl fit), never
speed: timings on three slices mean nothing.
"""
from __future__ import annotations

import json
import re
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, scaling, table2  # noqa: E402


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory) -> Path:
    """A NIfTI folder with one 3-slice volume (+ labels) cut from the built-in phantom."""
    import nibabel as nib

    from engine.phantom import make_volume

    vol = make_volume(0, seed=0)
    z0 = vol.image.shape[2] // 2 - 1
    folder = tmp_path_factory.mktemp("phantom3")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.image[:, :, z0:z0 + 3]), vol.affine), folder / "image_1.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.label[:, :, z0:z0 + 3]), vol.affine), folder / "label_1.nii.gz")
    return folder


@pytest.fixture(scope="module")
def cfg():
    return common.load_config()


# --------------------------------------------------------------------------------------------- helpers
def test_summarise_median_and_spread():
    s = common.summarise([1.0, 3.0, 2.0], items=6)
    assert s["fps"] == pytest.approx(3.0)
    assert s["fps_min"] == pytest.approx(2.0) and s["fps_max"] == pytest.approx(6.0)
    assert s["spread_pct"] == pytest.approx(100.0)
    assert s["repeats"] == 3
    with pytest.raises(ValueError):
        common.summarise([], items=1)


def test_figures_near_a_bound_get_the_digits_that_keep_them_on_their_side():
    assert common.fmt_vs_bound(89.966, 90) == "89.97"          # "90.0" would sit next to "not met"
    assert common.fmt_vs_bound(90.04, 90) == "90.0"
    assert common.fmt_vs_bound(0.49992, 0.5, 3) == "0.4999"
    assert common.fmt_vs_bound(0.50016, 0.5, 3) == "0.500"
    assert common.fmt_vs_bound(49.5, 50) == "49.5"
    assert common.fmt_vs_bound(0.8999999999, 0.9, 1) == "0.90000"    # at most 4 more digits


def test_engine_summary_takes_the_median_rate_of_an_even_number_of_runs():
    from benchmarks import engine as engine_bench

    def run(rate, wall):
        return {"seconds": wall + 1, "store_bytes": 1e6,
                "profile": {"slices": 10, "slices_per_s": rate, "wall_s": wall, "per_slice_ms": {},
                            "worker_time": {"busy_s": 1.0, "waiting_s": 0.0, "barrier_s": 0.0},
                            "cpu": {"utilisation_pct": 100.0, "cpu_s": rate / 100},
                            "memory": {"peak_rss_mb": 100.0}}}

    e = engine_bench.summarise_engine([run(200.0, 0.05), run(180.0, 0.0556)])
    assert e["engine_slices_per_s"] == 190.0 and e["engine_slices_per_s_all"] == [200.0, 180.0]
    e = engine_bench.summarise_engine([run(200.0, 0.05), run(100.0, 0.1), run(150.0, 0.0667)])
    assert e["engine_slices_per_s"] == 150.0
    assert "first_result_ms" not in e                    # profiles from before stop 33: no ends
    runs = [run(200.0, 0.05), run(100.0, 0.1), run(150.0, 0.0667)]
    for r, (first, after, between) in zip(runs, ((10.0, 2.0, 250.0), (30.0, 6.0, 120.0), (20.0, 4.0, 180.0))):
        r["profile"]["ends"] = {"first_result_ms": first, "after_last_result_ms": after,
                                "between_slices_per_s": between}
    e = engine_bench.summarise_engine(runs)
    # each part's own median over the runs
    assert (e["first_result_ms"], e["after_last_result_ms"], e["between_slices_per_s"]) == (20.0, 4.0, 180.0)


def test_round_robin_warms_up_then_interleaves():
    calls = []
    out = common.round_robin(["a", "b"], warmup=lambda c: calls.append(("warm", c)),
                             measure=lambda c: calls.append(("run", c)) or {"seconds": 1.0}, repeats=2)
    assert calls == [("warm", "a"), ("warm", "b"), ("run", "a"), ("run", "b"), ("run", "a"), ("run", "b")]
    assert [len(r) for r in out] == [2, 2]


def _affinity_in_fork(conn) -> None:
    import os
    conn.send(sorted(os.sched_getaffinity(0)))
    conn.close()


def test_confined_to_pins_every_thread_and_what_they_start():
    import multiprocessing as mp
    import os
    import threading

    allowed = os.sched_getaffinity(0)
    one = common.first_cpus(1)
    assert len(one) == 1 and set(one) <= allowed
    assert common.first_cpus(10 ** 6) == sorted(allowed)
    release, seen = threading.Event(), {}
    old = threading.Thread(target=release.wait)                       # exists before the pinning
    old.start()
    try:
        with common.confined_to(one):
            assert os.sched_getaffinity(0) == set(one)
            assert os.sched_getaffinity(old.native_id) == set(one)
            t = threading.Thread(target=lambda: seen.update(new=os.sched_getaffinity(0)))
            t.start()
            t.join()
            parent, child = mp.get_context("fork").Pipe()
            p = mp.get_context("fork").Process(target=_affinity_in_fork, args=(child,))
            p.start()
            seen["fork"] = set(parent.recv())
            p.join()
        assert seen == {"new": set(one), "fork": set(one)}
        assert os.sched_getaffinity(0) == allowed and os.sched_getaffinity(old.native_id) == allowed
    finally:
        release.set()
        old.join()
    with common.confined_to(None):                                     # None: nothing changes
        assert os.sched_getaffinity(0) == allowed


def test_memory_touch_check_times_both_page_sizes():
    m = common.memory_touch_check(mb=8)
    assert m["mb"] == 8
    for key in ("first_touch_4k_gb_s", "again_4k_gb_s", "first_touch_huge_gb_s", "again_huge_gb_s"):
        assert m[key] > 0


def test_parse_int_list():
    assert common.parse_int_list("1,2,4") == [1, 2, 4]
    assert common.parse_int_list("1-3,8") == [1, 2, 3, 8]
    for bad in ("0", "", "a", "2,x", "1-b"):
        with pytest.raises(ValueError) as err:
            common.parse_int_list(bad)
        assert str(err.value) == f"{bad!r}: expected positive integers such as 1,2,4 or 1-6"


@pytest.mark.parametrize("script, argv, message", [
    ("engine", ["--repeats", "0"], "argument --repeats: '0': must be at least 1"),
    ("scaling", ["--max-volumes", "0"], "argument --max-volumes: '0': must be at least 1"),
    ("scaling", ["--max-workers", "-2"], "argument --max-workers: '-2': must be at least 1"),
    ("table2", ["--max-volumes", "-1"], "argument --max-volumes: '-1': must be at least 1"),
    ("table2", ["--repeats", "0"], "argument --repeats: '0': must be at least 1"),
    ("kernels", ["--every", "0"], "argument --every: '0': must be at least 1"),
    ("cpu_budget", ["--copies", "0"], "argument --copies: '0': must be at least 1"),
    ("cpu_budget", ["--freq", "x"], "argument --freq: 'x' is not a whole number"),
    ("superpixel_quality", ["--step", "0"], "argument --step: '0': must be at least 1"),
    ("loader", ["--paper-steps", "-1", "store.h5"], "argument --paper-steps: '-1': must be at least 0"),
    ("device_data", ["unpack", "a", "b", "--jobs", "0"], "argument --jobs: '0': must be at least 1"),
])
def test_counts_below_their_range_are_refused_before_any_work(script, argv, message, tmp_path, capsys,
                                                              monkeypatch):
    """``args.x or default`` used to take 0 for "not given" and a negative --max-volumes sliced from the end:
    a full run started (and overwrote a committed result file) where the user had mistyped a count."""
    import importlib

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert not any(tmp_path.iterdir())


def test_engine_benchmark_refuses_an_unknown_section_to_skip():
    """A misspelt --skip ran every section, minutes of them, instead of leaving one out."""
    from benchmarks import engine as engine_bench

    with pytest.raises(engine_bench.common.BenchmarkError) as err:     # its own copy of common (see its top)
        engine_bench.main(["--skip", "compresion,memory"])
    assert str(err.value) == ("--skip 'compresion,memory': choose among compression, kernel, serial, engine, "
                              "memory")


def test_kernels_benchmark_reports_a_missing_folder_in_one_line(tmp_path, capsys):
    from benchmarks import kernels

    assert kernels.main(["--data", str(tmp_path / "nope"), "--quick"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (    # after its "loading ..." progress line
        f"kernels: {tmp_path / 'nope'}: no image_<id>.nii.gz files (set CHAOS_T2_DIR)")


def test_parse_choices_names_the_option_and_the_choices():
    assert common.parse_choices(" processes, threads", common.BACKENDS, "--backends") == ["processes", "threads"]
    for bad in ("gpu", "", "threads,gpu"):
        with pytest.raises(common.BenchmarkError) as err:
            common.parse_choices(bad, common.BACKENDS, "--backends")
        assert str(err.value) == f"--backends {bad!r}: choose among threads, processes"


def test_round_ratios_pair_the_rounds_and_count_those_that_meet_the_bound():
    assert common.round_ratios([9.0, 8.0, 10.0], [5.0, 5.0, 4.0], scale=2) == [0.9, 0.8, 1.25]
    assert common.round_ratios([1.0, 2.0, 3.0], [2.0, 0.0]) == [0.5]             # unpaired or empty rounds: none
    verdict = common.rounds_verdict([0.9, 0.8, 1.25], 0.9)
    assert verdict == {"min": 0.8, "max": 1.25, "met": 2, "rounds": 3}
    assert common.rounds_text(verdict) == "0.8-1.25, met in 2 of 3"
    assert common.rounds_text({"min": 44.842, "max": 47.297, "met": 3, "rounds": 3}) == "44.8-47.3, met in 3 of 3"
    assert common.rounds_verdict([0.95], 0.9) is None and common.rounds_text(None) == "-"


def test_round_by_round_spread_keeps_each_end_on_its_side_of_the_bound():
    """Guards the round-by-round spread next to a verdict: ``rounds_verdict`` rounded its ends to 3 decimals and
    ``rounds_text`` to 3 significant digits, so a round just under the line (1.7997 against 1.8) read
    "1.8-1.92, met in 4 of 5" (committed ``engine-vm-s33b.md``): every round shown at or above the line, one of
    them not counted as met. An end near the line keeps the digits that leave it on its own side."""
    rounds = [1.8226, 1.9167, 1.7997, 1.8110, 1.8561]
    v = common.rounds_verdict(rounds, 1.8)
    assert v["met"] == 4 and v["min"] < 1.8 and v["max"] == 1.917
    assert common.rounds_text(v, bound=1.8) == "1.7997-1.92, met in 4 of 5"
    # an end just over the line is not shown on the line's other side either, and far ends keep 3 decimals
    assert common.rounds_verdict([1.80004, 1.9], 1.8)["min"] >= 1.8
    assert common.rounds_verdict([0.9, 0.8, 1.25], 0.9) == {"min": 0.8, "max": 1.25, "met": 2, "rounds": 3}
    # a percentage: 89.97% is not "90.0%" next to "met in 1 of 2"
    v = common.rounds_verdict([0.8997, 0.95], 0.9)
    assert common.rounds_text(v, 100, "%", bound=0.9) == "89.97-95.0%, met in 1 of 2"
    # the three scripts' verdict tables pass their bound on
    from benchmarks import engine as engine_bench
    table = engine_bench._targets_table({"k": {"value": 1.856, "target": ">= 1.8", "bound": 1.8, "met": True,
                                               "rounds": common.rounds_verdict(rounds, 1.8)}})
    assert "1.7997-1.92, met in 4 of 5" in table
    t2 = table2._targets_lines([{"target": "k", "measured": 1.856, "goal": 1.8, "unit": "x", "met": True,
                                 "rounds": common.rounds_verdict(rounds, 1.8)}])
    assert any("1.7997-1.92, met in 4 of 5" in line for line in t2)
    pts = [{"backend": "threads", "workers": 1, "pinned": True, "cpus": 1, "per_core_series": True, "fps": 100.0,
            "fps_rounds": [100.0, 100.0]},
           {"backend": "threads", "workers": 2, "pinned": False, "cpus": 2, "per_core_series": True, "fps": 185.0,
            "fps_rounds": [179.94, 190.0]}]
    scaling.add_speedups(pts, ncores=2)
    assert "round by round 89.97-95.0%, met in 1 of 2" in scaling.target_lines(pts)[0]


def test_kernels_report_prints_a_target_near_its_line_on_its_side():
    """Guards ``kernels.report``: a target's value was printed with 2 decimals whatever its line, so 1.2996
    against ">= 1.3" read "1.30 (target >= 1.3) -> NOT met" (and a BR difference of -0.01004 read "-0.01 ...
    NOT met")."""
    from benchmarks import kernels

    res = {"speed": {"ours": {"label": "ours", "per_core_fps": 1000.0, "wall_fps": 990.0}}, "quality": {},
           "targets": [{"name": "ours / fast-slic AVX2, per core", "target": ">= 1.3", "value": 1.2996, "met": False},
                       {"name": "BR ours - skimage maskSLIC", "target": ">= -0.01", "value": -0.01004, "met": False},
                       {"name": "ours / skimage maskSLIC, per core", "target": ">= 15", "value": 41.234, "met": True}],
           "verdicts": [], "missing": {}}
    text = kernels.report(res)
    assert "- ours / fast-slic AVX2, per core: 1.2996 (target >= 1.3) -> NOT met" in text
    assert "- BR ours - skimage maskSLIC: -0.01004 (target >= -0.01) -> NOT met" in text
    assert "- ours / skimage maskSLIC, per core: 41.23 (target >= 15) -> met" in text


def test_scaling_efficiency_round_by_round_against_the_targets():
    def point(workers, pinned, cpus, fps_rounds):
        return {"backend": "threads", "workers": workers, "pinned": pinned, "cpus": cpus,
                "per_core_series": pinned or workers >= 2, "fps": sorted(fps_rounds)[1], "fps_rounds": fps_rounds}

    pts = [point(1, False, 2, [500.0, 520.0, 540.0]), point(1, True, 1, [450.0, 500.0, 480.0]),
           point(2, False, 2, [900.0, 900.0, 880.0])]
    scaling.add_speedups(pts, ncores=2)
    free1, pinned1, two = pts
    assert two["efficiency_per_core"] == pytest.approx(900 / (2 * 480))
    assert two["efficiency_per_core_rounds"] == pytest.approx([1.0, 0.9, 880 / 960])
    assert two["efficiency_rounds"] == pytest.approx([0.9, 900 / 1040, 880 / 1080])
    assert pinned1["efficiency_per_core_rounds"] == pytest.approx([1.0, 1.0, 1.0])
    x, y, err = scaling._efficiency_err([two], "efficiency_per_core")         # the plot's error bars
    assert x == [2] and y == pytest.approx([93.75]) and err[:, 0] == pytest.approx([3.75, 6.25])
    assert scaling._efficiency_err([{"workers": 1, "efficiency": 1.0}], "efficiency")[2].sum() == 0
    assert scaling.target_lines(pts) == [
        "- threads, 2 workers, per core: efficiency 93.8% (target 90%: met; round by round 90.0-100.0%, met in 3 "
        "of 3)",
        "- threads, 2 workers, per worker: efficiency 86.5% (target 90%: not met; round by round 81.5-90.0%, met "
        "in 1 of 3)", ""]


def test_table2_targets_round_by_round():
    def row(key, workers, fps_rounds):
        fps = sorted(fps_rounds)[len(fps_rounds) // 2]
        return {"key": key, "label": key, "workers": workers, "kind": "in-memory", "fps": fps,
                "fps_rounds": fps_rounds, "x_felzenszwalb": fps / 40.0}

    rows = [row("felzenszwalb_serial", 1, [40.0, 36.0]), row("our_slic_pythreads_1", 1, [950.0, 800.0]),
            row("our_slic_pythreads_2", 2, [1800.0, 1400.0])]
    got = {t["target"]: t for t in table2.targets(rows, nproc=2)}
    x40 = got["our_slic_pythreads_2 vs serial Felzenszwalb recipe"]
    assert x40["measured"] == pytest.approx(45.0) and x40["met"]
    assert x40["rounds"] == {"min": round(1400 / 36, 3), "max": 45.0, "met": 1, "rounds": 2}
    eff = got["efficiency at 2 workers: our SLIC, one image per Python thread"]
    assert eff["measured"] == pytest.approx(100 * 1800 / 1900)
    assert eff["rounds"] == {"min": 87.5, "max": round(100 * 1800 / 1900, 3), "met": 1, "rounds": 2}


def test_worker_lists():
    assert scaling.default_workers(2) == [1, 2, 3, 4]
    assert scaling.default_workers(16) == list(range(1, 17)) + [24, 32]
    assert scaling.default_workers(16, 16) == list(range(1, 17))
    assert table2.default_workers(2) == [1, 2]
    assert table2.default_workers(16) == [1, 2, 4, 8, 16]


def test_amdahl_fit_recovers_known_law():
    ns = [1, 2, 3, 4, 6, 8]
    xs = scaling.amdahl(ns, 120.0, 0.08)
    fit = scaling.fit_amdahl(ns, xs)
    assert fit["x1"] == pytest.approx(120.0, rel=1e-4)
    assert fit["serial_fraction"] == pytest.approx(0.08, abs=1e-4)
    assert scaling.fit_amdahl([2, 2], [10.0, 11.0]) is None        # one distinct count: nothing to fit
    s = scaling.implied_serial_fraction(6, 91 / 28)
    assert float(scaling.amdahl(6, 28.0, s)) == pytest.approx(91.0)
    # two worker counts: the curve goes through both points, so no error is claimed for it
    assert scaling.fit_quality_text(scaling.fit_amdahl([1, 2], [500.0, 900.0])) == \
        "exact through its 2 points, so no fit error to show"
    assert scaling.fit_quality_text(fit) == "rms error 0.0% over 6 worker counts"


def test_scaling_plot_splits_busy_time_when_the_profile_does():
    split = {"busy_pct": 80.0, "busy_on_cpu_pct": 80.0, "busy_core_wait_pct": 15.0, "waiting_pct": 6.0,
             "barrier_pct": 4.0, "other_pct": 10.0}
    assert scaling._time_parts(split) == pytest.approx((64.0, 12.0, 4.0, 0.0, 6.0, 4.0, 10.0))
    # profiles from before the busy split and before ``other``: their shares are of busy + waiting + barrier
    older = {"busy_pct": 90.0, "busy_on_cpu_pct": 80.0, "waiting_pct": 6.0, "barrier_pct": 4.0}
    assert scaling._time_parts(older) == pytest.approx((72.0, 0.0, 0.0, 18.0, 6.0, 4.0, 0.0))
    for parts in (scaling._time_parts(split), scaling._time_parts(older)):
        assert sum(parts) == pytest.approx(100.0)


def test_worker_time_shares_are_of_the_workers_wall_time():
    wt = {"busy_s": 1.5, "waiting_s": 0.1, "barrier_s": 0.1, "other_s": 0.3, "waiting_volume_s": 0.06,
          "waiting_room_s": 0.02}
    assert common.worker_time_pcts(wt) == {"busy_pct": 75.0, "waiting_pct": 5.0, "barrier_pct": 5.0,
                                           "other_pct": 15.0, "waiting_volume_pct": 3.0, "waiting_room_pct": 1.0}
    # a profile written before ``other_s`` and the waiting split: the shares of the three it has
    assert common.worker_time_pcts({"busy_s": 1.8, "waiting_s": 0.1, "barrier_s": 0.1}) == \
        {"busy_pct": 90.0, "waiting_pct": 5.0, "barrier_pct": 5.0, "other_pct": 0.0, "waiting_volume_pct": None,
         "waiting_room_pct": None}
    assert scaling._waiting_parts({"waiting_volume_pct": 3.0, "waiting_room_pct": 1.0}) == "3.0 / 1.0"
    assert scaling._waiting_parts({"waiting_volume_pct": None}) == "-"


def test_busy_warning_looks_at_the_load_when_the_run_starts():
    # the load at the end of a run is mostly the run's own work: a 2-worker run on 2 cores ends near 2.0
    quiet_start = {"usable_cpus": 2, "load_average_start": [0.3, 0.2, 0.2], "load_average_end": [2.0, 1.0, 0.5]}
    assert common.busy_warning(quiet_start) is None
    busy_start = {"usable_cpus": 2, "load_average_start": [1.6, 1.0, 0.5], "load_average_end": [0.1, 0.1, 0.1]}
    assert "load average 1.6 on 2 cores" in common.busy_warning(busy_start)
    assert common.busy_warning({"usable_cpus": 2}) is None
    # a run that records the CPUs' busy time is judged by it: the load average lags behind a previous run
    after_a_run = {"usable_cpus": 2, "load_average_start": [2.6, 1.4, 0.7], "cores_busy_start": 0.1}
    assert common.busy_warning(after_a_run) is None
    busy_now = {"usable_cpus": 2, "load_average_start": [0.4, 0.2, 0.1], "cores_busy_start": 1.8}
    assert common.busy_warning(busy_now).startswith("the machine was busy when this run started (1.8 of 2 cores "
                                                    "busy in the 0.5 s before it, 1-minute load average 0.4)")


def test_host_info_samples_the_cpus_before_the_run():
    import psutil
    info = common.host_info()
    assert 0.0 <= info["cores_busy_start"] <= psutil.cpu_count()


def test_engine_input_links_and_cuts(phantom_folder, tmp_path):
    assert common.engine_input(str(phantom_folder), tmp_path) == str(phantom_folder)
    linked = Path(common.engine_input(str(phantom_folder), tmp_path, copies=3))
    names = sorted(p.name for p in linked.iterdir())
    assert names == sorted([f"image_{c}0001.nii.gz" for c in (1, 2, 3)] + [f"label_{c}0001.nii.gz" for c in (1, 2, 3)])
    assert all((linked / n).is_symlink() for n in names)
    assert common.engine_input("phantom:5", tmp_path, max_volumes=2, copies=2) == "phantom:4"


def test_missing_input_is_one_line_error(tmp_path, capsys):
    assert table2.main(["--input", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]) == 2
    assert scaling.main(["--input", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("nope: no such file or folder" in line for line in err)
    assert scaling.main(["--backends", "gpu", "--out-dir", str(tmp_path)]) == 2
    assert "--backends" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- table2
def test_table2_core_on_three_slices(phantom_folder, cfg, tmp_path):
    slices = common.load_slices(str(phantom_folder), cfg)
    assert slices.raw.shape == (3, 256, 256) and slices.raw.dtype == np.float32
    nii = common.uncompressed_copy(str(phantom_folder), tmp_path, None)
    again = common.load_slices(nii, cfg)
    np.testing.assert_array_equal(again.raw, slices.raw)           # the .nii copy holds the same data
    res = table2.run_table2(cfg, slices, {"nii.gz": str(phantom_folder)}, workers=[1, 2],
                            backends=["threads", "processes"], repeats=1, tmp_root=tmp_path, warmup_slices=2)
    rows = {d["key"]: d for d in res["rows"]}
    nproc = common.n_cores()
    expected = {"felzenszwalb_serial", "skimage_slic_serial", "skimage_slic_full_serial", "our_slic_serial",
                f"skimage_slic_pythreads_{nproc}", "our_slic_pythreads_1", "our_slic_pythreads_2",
                "engine_threads_niigz_1", "engine_threads_niigz_2", "engine_processes_niigz_1",
                "engine_processes_niigz_2"}
    assert set(rows) == expected
    assert rows["felzenszwalb_serial"]["x_felzenszwalb"] == pytest.approx(1.0)
    for d in rows.values():
        assert d["frames"] == 3 and math.isfinite(d["fps"]) and d["fps"] > 0
        assert d["x_felzenszwalb"] == pytest.approx(d["fps"] / rows["felzenszwalb_serial"]["fps"])
    for key in ("felzenszwalb_serial", "our_slic_serial"):
        assert rows[key]["kernel_fps"] >= rows[key]["fps"]           # the kernel alone is part of the step
        assert rows[key]["mask_ms"] > 0
    eng = rows["engine_processes_niigz_2"]["engine"]
    assert eng["busy_pct"] + eng["waiting_pct"] + eng["barrier_pct"] + eng["other_pct"] == \
        pytest.approx(100.0, abs=0.5)
    assert len(eng["per_worker"]) == 2 and sum(w["slices"] for w in eng["per_worker"]) == 3
    assert rows["felzenszwalb_serial"]["paper_fps"] == common.PAPER["felzenszwalb"]
    names = {t["target"] for t in res["targets"]}
    assert any("efficiency at 2 workers" in n for n in names) and any("skimage" in n for n in names)
    md = table2.render_markdown(res)
    for d in rows.values():
        assert d["label"] in md
    path = common.write_json(tmp_path / "t.json", res)
    assert json.loads(path.read_text())["rows"][0]["key"] == "felzenszwalb_serial"
    assert not list(tmp_path.glob("engine-*"))                       # temporary stores are removed


def test_table2_command_line(phantom_folder, tmp_path, capsys):
    rc = table2.main(["--input", str(phantom_folder), "--quick", "--workers", "1", "--backends", "threads",
                      "--engine-inputs", "nii", "--no-skimage-threads", "--tag", "smoke", "--out-dir",
                      str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "table2-smoke-quick.json").read_text())
    assert {d["key"] for d in data["rows"]} >= {"felzenszwalb_serial", "engine_threads_nii_1"}
    assert data["host"]["usable_cpus"] == common.n_cores() and data["quick"] is True
    md = (tmp_path / "table2-smoke-quick.md").read_text()
    assert "Quick run" in md and md.strip() in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- scaling
def test_scaling_core_on_three_slices(phantom_folder, cfg, tmp_path):
    res = scaling.run_scaling(cfg, str(phantom_folder), workers=[1, 2], backends=["threads", "processes"],
                              repeats=1, tmp_root=tmp_path, warmup=False, ncores=2)
    assert [(p["backend"], p["workers"], p["cpus"], p["pinned"]) for p in res["points"]] == [
        ("threads", 1, 2, False), ("threads", 1, 1, True), ("threads", 2, 2, False),
        ("processes", 1, 2, False), ("processes", 1, 1, True), ("processes", 2, 2, False)]
    for b in ("threads", "processes"):
        free1, pinned1, free2 = [p for p in res["points"] if p["backend"] == b]
        assert free1["efficiency"] == pytest.approx(1.0) and free1["efficiency_per_core"] is None
        assert pinned1["efficiency"] is None and pinned1["efficiency_per_core"] == pytest.approx(1.0)
        assert free2["efficiency"] == pytest.approx(free2["fps"] / (2 * free1["fps"]))
        assert free2["efficiency_per_core"] == pytest.approx(free2["fps"] / (2 * pinned1["fps"]))
        assert res["fits"][b]["amdahl"]["x1"] > 0
    for p in res["points"]:
        assert p["slices"] == 3 and p["fps"] > 0 and p["end_to_end_fps"] > 0
        assert len(p["profile"]["per_worker"]) == p["workers"]
    for b in ("threads", "processes"):
        fit = res["fits"][b]["amdahl"]
        assert 0.0 <= fit["serial_fraction"] <= 1.0
        assert fit["projected_fps_6"] == pytest.approx(float(scaling.amdahl(6, fit["x1"], fit["serial_fraction"])))
    res.update(slices_label="3 phantom slices", host=common.host_info())
    png = scaling.plot_scaling(res, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = scaling.render_markdown(res)
    assert "Amdahl fit" in md
    # each point's two ends, from its median run's profile; a point from an older file has none: '-'
    ends = res["points"][0]["profile"]["ends"]
    assert ends["first_result_ms"] > 0
    assert f"| {ends['first_result_ms']:.0f} / {ends['after_last_result_ms']:.0f} |" in md
    res["points"][0]["profile"].pop("ends")
    assert scaling.render_markdown(res).count("| - |") > md.count("| - |")


def test_scaling_pinned_counts_can_be_chosen(phantom_folder, cfg, tmp_path):
    res = scaling.run_scaling(cfg, str(phantom_folder), workers=[1, 2, 3], backends=["threads"], repeats=1,
                              tmp_root=tmp_path, warmup=False, ncores=3, pinned=[1])
    assert [(p["workers"], p["pinned"]) for p in res["points"]] == [(1, False), (1, True), (2, False), (3, False)]
    one, three = res["points"][1], res["points"][3]
    assert one["cpus"] == 1 and one["efficiency_per_core"] == pytest.approx(1.0)
    assert res["points"][2]["efficiency_per_core"] is None          # 2 workers with 3 CPUs free: not per core
    assert three["efficiency_per_core"] == pytest.approx(three["fps"] / (3 * one["fps"]))
    none = scaling.run_scaling(cfg, str(phantom_folder), workers=[1, 2], backends=["threads"], repeats=1,
                               tmp_root=tmp_path, warmup=False, ncores=2, pinned=[])
    assert [p["pinned"] for p in none["points"]] == [False, False]
    assert all(p["efficiency_per_core"] is None for p in none["points"])   # no run on one CPU
    assert none["fits"]["threads"]["amdahl"] is None                 # one per-core point: nothing to fit
    none.update(slices_label="3 slices", host=common.host_info())
    assert "no Amdahl fit" in scaling.render_markdown(none)
    assert scaling.plot_scaling(none, tmp_path / "none.png").stat().st_size > 0


def test_scaling_command_line(phantom_folder, tmp_path):
    rc = scaling.main(["--input", str(phantom_folder), "--quick", "--workers", "1,2", "--backends", "threads",
                       "--no-warmup", "--copies", "2", "--tag", "smoke", "--out-dir", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "scaling-smoke-quick.json").read_text())
    assert [p["slices"] for p in data["points"]] == [6] * len(data["points"])   # two linked copies of 3 slices
    below = [n for n in (1, 2) if n < common.n_cores()]             # counts that also run pinned
    assert [(p["workers"], p["pinned"]) for p in data["points"]] == [
        (n, pin) for n in (1, 2) for pin in ((False, True) if n in below else (False,))]
    assert (tmp_path / "scaling-smoke-quick.png").stat().st_size > 0
    assert (tmp_path / "scaling-smoke-quick.md").read_text() == data["markdown"] + "\n"


# --------------------------------------------------------------------------------------------- engine.py
def test_engine_command_line_times_the_kernel_beside_the_engine(phantom_folder, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--input", str(phantom_folder),
                           "--quick", "--repeats", "2", "--workers", "1,2", "--skip", "compression,serial",
                           "--tag", "smoke",
                           "--out-dir", str(tmp_path), "--tmp", str(tmp_path), "--set", "engine.queue_slices=64"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "engine-smoke-quick.json").read_text())
    assert data["slices"] == 3 and data["kernel_rounds"] == 2          # a kernel round per engine round
    assert data["engine_config"]["queue_slices"] == 64                 # the shared --set reaches the config
    assert "round 1 bare kernel: 1 thread(s)" in proc.stderr + proc.stdout
    assert set(data["engine"]) >= {"threads-1", "threads-2", "processes-1", "processes-2"}
    kernel2 = data["kernel_slices_per_s"]["2"]
    ratio = data["ratios"]["threads: engine / bare kernel at 2 worker(s)"]
    assert ratio == pytest.approx(data["engine"]["threads-2"]["engine_slices_per_s"] / kernel2, rel=1e-2, abs=1e-3)
    # round by round: each engine round against the kernel round timed just before it
    key = "threads: engine / bare kernel at 2 worker(s)"
    engine_rounds = data["engine"]["threads-2"]["engine_slices_per_s_all"]
    # the file keeps 3 decimals: a quick run's first round (a cold engine on 3 slices) can be near 0.01, where the
    # rounding alone is 5% of the value
    assert data["ratio_rounds"][key] == pytest.approx(
        [e / k for e, k in zip(engine_rounds, data["kernel_slices_per_s_rounds"]["2"])], rel=1e-2, abs=1e-3)
    verdict = data["targets"][key]["rounds"]
    assert verdict["rounds"] == 2 and verdict["met"] == sum(v >= 0.5 for v in data["ratio_rounds"][key])
    assert data["targets"]["peak RSS CHAOS (MB)"].get("rounds") is None
    # CPU per slice: each engine run against the kernel at its own worker count (a pinned 1-worker run: 1)
    kcpu = data["kernel_cpu_ms_per_slice"]
    assert set(kcpu) == {"1", "2"}
    for key, w in (("threads-2", "2"), ("threads-1-pinned", "1")):
        if key in data["engine"]:
            t = data["targets"][f"threads x{key[8:]}: kernel CPU / engine CPU per slice"]
            assert t["value"] == pytest.approx(kcpu[w] / data["engine"][key]["cpu_ms_per_slice"], rel=1e-3)
    md = (tmp_path / "engine-smoke-quick.md").read_text()
    assert md.startswith("## Engine benchmark: 3 slices")
    # the run's two ends: in the table, and the rate between them against the kernel, which is no target
    ends = data["engine"]["threads-2"]
    assert ends["first_result_ms"] > 0 and ends["between_slices_per_s"] > 0
    key = "threads: engine between its first and last result / kernel at 2 worker(s)"
    assert data["ratios"][key] == pytest.approx(ends["between_slices_per_s"] / kernel2, rel=1e-2, abs=1e-3)
    assert key not in data["targets"]
    assert f"| {ends['first_result_ms']:.0f} / {ends['after_last_result_ms']:.0f} / " in md
    assert f"threads 2 worker(s) {100 * data['ratios'][key]:.1f}%" in md


# --------------------------------------------------------------------------------------------- cpu_budget.py
PERF_SCRIPT = """\
  101/101  10.000:
\t    7f00 0x7f00 ([unknown])
\t    7f01 [unknown] (/tmp/perf-101.map)
  101/102  10.100:
\t    5a0 0x5a0 (/venv/site-packages/deflate/_deflate.abi3.so)
  101/103  10.200:
\t    ffff1 copy_folio_from_iter_atomic ([kernel.kallsyms])
\t    ffff2 __x64_sys_pwrite64 ([kernel.kallsyms])
\t    1234 __libc_pwrite (/usr/lib/x86_64-linux-gnu/libc.so.6)
  202/202  10.300:
\t    ffff3 clear_page_erms ([kernel.kallsyms])
\t    7f02 [unknown] (/tmp/perf-101.map)
  202/202  11.000:
\t    1 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
"""


def test_cpu_budget_parses_perf_script_and_groups_samples():
    from benchmarks import cpu_budget

    samples = cpu_budget.parse_perf_script(PERF_SCRIPT.splitlines())
    assert [(pid, t) for pid, t, _ in samples] == [(101, 10.0), (101, 10.1), (101, 10.2), (202, 10.3), (202, 11.0)]
    assert samples[2][2][0] == ("copy_folio_from_iter_atomic", "[kernel.kallsyms]")
    assert [cpu_budget.classify(st) for _, _, st in samples] == [
        "other libraries", "inflate .nii.gz (libdeflate)", "kernel: pwrite (store chunks)",
        "kernel: page faults, interrupts, other", "Python interpreter"]
    # the first sample's innermost frame has no library: grouped as "other"; a JIT frame alone is numba
    assert cpu_budget.classify([("[unknown]", "perf-101.map")]) == "numba kernels (SLIC, body mask, preparation)"
    out = cpu_budget.budget(samples, 10.05, 10.5)          # the three samples inside the window
    assert out["samples"] == 3
    assert out["share_pct"] == pytest.approx({"inflate .nii.gz (libdeflate)": 100 / 3,
                                              "kernel: pwrite (store chunks)": 100 / 3,
                                              "kernel: page faults, interrupts, other": 100 / 3})
    assert out["process_share_pct"] == pytest.approx([200 / 3, 100 / 3])
    with pytest.raises(common.BenchmarkError, match="no perf samples"):
        cpu_budget.budget(samples, 20.0, 21.0)


def test_cpu_budget_command_line_errors(monkeypatch, capsys):
    from benchmarks import cpu_budget

    assert cpu_budget.main(["--runs", "threads:0"]) == 2
    assert "is not backend:workers" in capsys.readouterr().err
    monkeypatch.setattr(cpu_budget.shutil, "which", lambda name: None)
    assert cpu_budget.main(["--runs", "threads:1"]) == 2
    assert "'perf' tool is not installed" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- shell scripts
def _script(name: str, *args, **env_extra):
    """Run ``benchmarks/<name>`` with bash from the repository root, this interpreter as its PYTHON."""
    import os
    import subprocess

    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _ab_commits(*args, **env_extra):
    return _script("ab_commits.sh", *args, **env_extra)


def test_ab_commits_refuses_bad_arguments_in_one_line(phantom_folder, tmp_path):
    twins = [tmp_path / side / "same" for side in ("a", "b")]          # two checkouts with one folder name
    for t in twins:
        (t / "benchmarks").mkdir(parents=True)
        (t / "benchmarks" / "scaling.py").write_text("")
    for args, words in [((phantom_folder, tmp_path / "o"), "name at least one commit"),
                        ((tmp_path / "nowhere", tmp_path / "o", "HEAD"), "no such folder"),
                        ((phantom_folder, tmp_path / "o", "no-such-ref"), "no-such-ref: not a commit"),
                        ((phantom_folder, tmp_path / "o", phantom_folder), "not a checkout of this project"),
                        ((phantom_folder, tmp_path / "o", *twins), "same named twice")]:
        r = _ab_commits(*args)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


@pytest.mark.slow
def test_ab_commits_measures_each_commit_in_its_worktree(phantom_folder, tmp_path):
    import subprocess
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD~1"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("needs a checkout with at least two commits")
    # HEAD~1 comes as a folder made by git archive, as for a machine that gets no .git
    tree = tmp_path / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD~1", "--", ".", ":!benchmarks/results"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    r = _ab_commits(phantom_folder, tmp_path / "o", "HEAD", tree,
                    WORKERS="1", ROUNDS="2", REPEATS="1", BACKENDS="threads", EXTRA="--no-warmup")
    assert r.returncode == 0, r.stdout + r.stderr
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    for c in (head.strip(), "before"):
        assert all((tmp_path / "o" / f"scaling-ab-{c}-r{r}.json").is_file() for r in (1, 2))
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {c} | threads | 1 |"))
        assert len(row.split("|")[5].split(",")) == 2            # both rounds' figures
        waiting, barrier, tail = row.split("|")[6:9]             # the medians of the profile's shares
        assert re.fullmatch(r" [\d.]+ \([\d.]+ / [\d.]+\) ", waiting) and float(barrier) >= 0, row
        if c != "before":                                        # a batch's last slice to its commit (ms)
            assert float(tail) > 0, row
        assert (tmp_path / "o" / f"log-{c}-warm.txt").is_file()  # its kernels compiled before round 1
    assert "== kernels compiled at" in r.stdout
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "ab-commits" not in worktrees                          # removed at the end


def _device_run(data, out, **env_extra):
    return _script("device_run.sh", data, out, "60", QUICK="1", TRAIN_DEVICE="cpu", STEPS="none", **env_extra)


def test_device_run_rebuilds_packed_data_after_its_preflight(phantom_folder, tmp_path):
    from benchmarks import device_data

    device_data.pack(phantom_folder, tmp_path / "packed", jobs=1)
    r = _device_run(tmp_path / "data", tmp_path / "out", PACKED=str(tmp_path / "packed"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every module the project imports is there" in r.stdout
    from engine.runinfo import source_digest
    assert f"sources {source_digest()}" in r.stdout                     # which code ran, without git
    for p in phantom_folder.iterdir():
        assert (tmp_path / "data" / p.name).read_bytes() == p.read_bytes()
    assert (tmp_path / "out" / "device_results.tar.gz").is_file()


def test_device_run_stops_at_damaged_packed_data(phantom_folder, tmp_path):
    from benchmarks import device_data

    device_data.pack(phantom_folder, tmp_path / "packed", jobs=1)
    (tmp_path / "packed" / device_data.MANIFEST).write_text("0" * 64 + "  label_1.nii.gz\n")
    r = _device_run(tmp_path / "data", tmp_path / "out", PACKED=str(tmp_path / "packed"))
    assert r.returncode == 3
    assert "label_1.nii.gz" in r.stderr and not (tmp_path / "out" / "device_results.tar.gz").exists()


def test_peak_memory_target_is_the_issues_1_5_gb():
    # the profile counts memory in MiB; 1.5 GB is 1430.5 of them (the line was 1536 MiB = 1.61 GB until stop 37)
    from benchmarks import engine as engine_bench

    def targets(peak):
        return engine_bench._memory_targets({"threads 2": {"peak_rss_mb": peak}},
                                            {"memory_10x": {"threads": {"peak_rss_mb": peak}}})

    for peak, met in ((1400.0, True), (1430.0, True), (1431.0, False), (1500.0, False)):
        t = targets(peak)
        assert t["peak RSS CHAOS (MB)"]["met"] is met and t["peak RSS 10x CHAOS (MB)"]["met"] is met, peak
    assert targets(1.0)["peak RSS CHAOS (MB)"]["target"] == "< 1430.5 (1.5 GB)"
