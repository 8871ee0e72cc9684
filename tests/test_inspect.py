"""``cli.py inspect STORE``: summary, JSON keys, integrity findings, overlay PNG, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cli
from engine import pipeline
from engine.figures import save_figure
from engine.inspect import inspect_store
from engine.store_format import parts_dir, shard_name
from test_pipeline import make_cfg, write_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("insp")
    src = write_folder(base / "in", n=2, n_slices=5)
    (src / "image_9.nii.gz").write_bytes(b"\x1f\x8b truncated")
    out = base / "store.h5"
    assert pipeline.preprocess(make_cfg(src, out), progress=False) == 1      # one bad volume
    return out


def test_summary_fits_one_screen_and_names_everything(store, capsys):
    assert cli.main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) <= 24
    assert "(complete)" in lines[0]
    assert "volumes      2 (2 with labels)   slices 11" in out
    assert "method       slic  n_segments=12" in out
    assert "superpixels  per slice: min" in out and "median" in out and "max" in out
    assert "on disk" in out and "MB" in out
    assert "integrity    OK: 11 slices read and consistent" in out
    assert "image_9.nii.gz" in out                                          # the failure log


def test_json_has_the_agreed_keys(store, capsys):
    assert inspect_store(str(store), as_json=True) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("volumes", "slices", "method", "params", "superpixels_per_slice", "complete", "problems"):
        assert key in s
    assert s["slices"] == 11 and s["complete"] is True and s["problems"] == [] and s["pixels_checked"] is True
    assert [v["id"] for v in s["volumes"]] == ["1", "2"] and s["volumes"][1]["slices_in_store"] == 6
    assert s["method"] == "slic" and s["params"]["n_segments"] == 12
    sp = s["superpixels_per_slice"]
    assert 0 < sp["min"] <= sp["median"] <= sp["max"]
    assert len(s["log"]) == 1 and "image_9" in s["log"][0]["path"]
    assert s["size_bytes"] > 0 and s["being_written_by"] is None


def test_summary_tells_how_the_store_was_built(store, tmp_path, capsys):
    import shutil
    assert inspect_store(str(store), as_json=True) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["runs"]["count"] == 1 and s["runs"]["statuses"] == ["complete"]
    assert s["runs"]["last"]["slices_committed"] == 11
    prof = s["profile"]
    assert prof["slices"] == 11 and prof["status"] == "complete" and prof["slices_per_s"] > 0
    assert prof["path"] == f"{store}.profile.json"
    inspect_store(str(store))
    out = capsys.readouterr().out
    assert "runs         1 (1 complete); last " in out and "11 slices committed, complete" in out
    assert "profile      11 slices in " in out and f"({store}.profile.json)" in out
    # a copy with an interrupted run before, a line torn by a kill, and no profile
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    runs = parts_dir(copy) / "runs.jsonl"
    last = runs.read_text()
    runs.write_text(json.dumps({**json.loads(last), "status": "interrupted"}) + "\n" + last + '{"started": "20')
    inspect_store(str(copy))
    out = capsys.readouterr().out
    assert "runs         2 (1 interrupted, 1 complete); last " in out
    assert "profile" not in out
    runs.unlink()
    inspect_store(str(copy))
    assert "runs         none recorded (runs.jsonl missing or empty)" in capsys.readouterr().out


def test_quick_checks_tables_and_mapping_without_reading_pixels(store, tmp_path, capsys, monkeypatch):
    from engine.store_reader import StoreReader
    read = []
    monkeypatch.setattr(StoreReader, "read", lambda self, i: read.append(i))
    assert cli.main(["inspect", str(store), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "integrity    OK: 11 slices consistent in the tables, no gaps, every batch mapped (pixels not read: " \
           "--quick)" in out
    assert read == []                                                   # no slice's chunks were read
    assert cli.main(["inspect", str(store), "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pixels_checked"] is False
    # a missing shard is still found: the tables and the mapping are checked
    import shutil
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    (parts_dir(copy) / shard_name(1)).unlink()
    assert cli.main(["inspect", str(copy), "--quick"]) == 1
    assert "missing or unreadable" in capsys.readouterr().out


def test_overlay_png_is_written(store, tmp_path, capsys):
    png = tmp_path / "o" / "overlay.png"
    assert cli.main(["inspect", str(store), "--volume", "2", "--slice", "3", "--png", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert cli.main(["inspect", str(store), "--volume", "2", "--slice", "40", "--png", str(png)]) == 2
    assert "slice 40 is not in the store" in capsys.readouterr().err
    assert cli.main(["inspect", str(store), "--volume", "7", "--slice", "0", "--png", str(png)]) == 2
    capsys.readouterr()
    assert cli.main(["inspect", str(store), "--png", str(png)]) == 2
    assert cli.main(["inspect", str(store), "--volume", "2", "--slice", "3"]) == 2      # no --png: not ignored
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        "inspect: --png needs --volume ID and --slice Z",
        "inspect: --volume and --slice choose the slice of an overlay: add --png FILE"]


def test_damage_is_reported(store, tmp_path, capsys):
    import shutil
    copy = tmp_path / "store.h5"
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    (parts_dir(copy) / shard_name(1)).unlink()
    assert inspect_store(str(copy), as_json=True) == 1
    s = json.loads(capsys.readouterr().out)
    assert s["complete"] is False and any("missing or unreadable" in p for p in s["problems"])
    assert inspect_store(str(copy)) == 1
    assert "DAMAGED" in capsys.readouterr().out


def test_a_damaged_shard_is_one_finding_not_one_per_slice(store, tmp_path, capsys):
    import os
    import shutil
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    shard = parts_dir(copy) / shard_name(1)
    os.truncate(shard, shard.stat().st_size // 2)
    assert inspect_store(str(copy), as_json=True) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert len(problems) == 2, problems                 # the shard itself, and its slices in one line
    assert problems[0].startswith(f"{shard}: missing or unreadable (Unable to synchronously open file")
    assert "slices (" in problems[1] and "unreadable (" in problems[1] and "the shard is damaged" in problems[1]


def test_a_lost_index_is_told_how_to_come_back(store, tmp_path, capsys):
    import shutil
    shutil.copytree(parts_dir(store), parts_dir(tmp_path / store.name))
    assert inspect_store(str(tmp_path / store.name)) == 2
    assert capsys.readouterr().err.strip() == (f"inspect: {tmp_path / store.name}: no such store (its shard folder "
                                               f"{store.name}.parts is there: the preprocess command that made it "
                                               f"rebuilds the index)")


def test_not_a_store(tmp_path, capsys):
    assert inspect_store(str(tmp_path / "nope.h5")) == 2
    assert "no such store" in capsys.readouterr().err
    bad = tmp_path / "x.h5"
    bad.write_text("hello")
    assert inspect_store(str(bad)) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_scans_or_a_batch_folder_given_as_the_store_say_what_to_give(store, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    nifti = scans / "image_1.nii.gz"
    nifti.write_bytes(b"")
    upper = scans / "image_2.NII.GZ"
    upper.write_bytes(b"")
    for path, what in [(scans, "a folder"), (nifti, "a NIfTI file"), (upper, "a NIfTI file")]:
        assert inspect_store(str(path)) == 2
        assert capsys.readouterr().err == (f"inspect: {path}: {what}, not a store; make a store of it with `cli.py "
                                           f"preprocess --input {path} --out STORE.h5` (`cli.py inspect --data "
                                           f"{path}` lists its scans)\n")
    assert inspect_store(str(parts_dir(store))) == 2
    assert capsys.readouterr().err == f"inspect: {parts_dir(store)}: the batch folder of the store {store}: give that file\n"


def _run_cli_as_main(args: list[str]):
    """``python cli.py ARGS`` with an exit handler that prints TEARDOWN if the interpreter's teardown runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(cli.__file__).resolve().parent
    code = ("import atexit, runpy, sys; atexit.register(print, 'TEARDOWN'); "
            f"sys.argv = ['cli.py'] + {args!r}; runpy.run_path('cli.py', run_name='__main__')")
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(root / ".numba_cache"))
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_engine_commands_end_without_the_interpreter_teardown(store):
    # preprocess and inspect end with os._exit once their output is flushed: what they print arrives whole,
    # with their exit status, and no exit handler runs. Other outcomes keep their status too.
    done = _run_cli_as_main(["inspect", str(store)])
    assert done.returncode == 0, done.stderr
    assert "integrity    OK: 11 slices" in done.stdout and "failures" in done.stdout
    assert "TEARDOWN" not in done.stdout
    missing = _run_cli_as_main(["inspect", str(store) + ".nope"])
    assert missing.returncode == 2 and "no such store" in missing.stderr and "TEARDOWN" not in missing.stdout


def test_teardown_is_kept_while_an_hdf5_file_is_open_for_writing(tmp_path):
    import h5py
    assert cli.can_skip_teardown()
    f = h5py.File(tmp_path / "w.h5", "w")
    try:
        assert not cli.can_skip_teardown()                # its metadata would be lost
    finally:
        f.close()
    with h5py.File(tmp_path / "w.h5", "r"):
        assert cli.can_skip_teardown()                    # reading loses nothing


def test_a_store_before_its_first_commit_says_it_has_no_batch(tmp_path, capsys):
    # the index a run writes when it opens a new store (and leaves behind when it is killed before a commit)
    from engine.store_shards import write_index
    store = tmp_path / "s.h5"
    parts_dir(store).mkdir()
    write_index(store, [], {"method": "slic", "params": {"n_segments": 30}, "prepare": {"size": 64}}, complete=False)
    cli.main(["inspect", str(store)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("(INCOMPLETE)")
    assert lines[1].startswith("written      schema 1, code - (no batch committed yet), created ")


def _renamed_copy(store, folder, name: str, rename_folder: bool):
    """A copy of ``store`` whose index file is called ``name``; its batch folder renamed with it or not."""
    import shutil
    folder.mkdir()
    shutil.copy(store, folder / name)
    shutil.copytree(parts_dir(store), parts_dir(folder / name) if rename_folder else folder / parts_dir(store).name)
    return folder / name


def test_an_index_renamed_without_its_folder_is_refused_not_recomputed(store, tmp_path, capsys):
    renamed = _renamed_copy(store, tmp_path / "a", "renamed.h5", rename_folder=False)
    cfg = make_cfg(store.parent / "in", renamed)
    assert pipeline.preprocess(cfg, progress=False) == 2
    assert (f"renamed.h5: its committed batches are in {tmp_path / 'a' / 'store.h5.parts'}, not "
            f"{parts_dir(renamed)} (was the store file renamed?); rename that folder to renamed.h5.parts"
            in capsys.readouterr().err)
    assert not parts_dir(renamed).exists()                              # nothing computed again
    # as the message says: the rerun then resumes (nothing left to compute) and rebuilds the index
    (tmp_path / "a" / "store.h5.parts").rename(parts_dir(renamed))
    assert pipeline.preprocess(cfg, progress=False) == 1                # the fixture's bad volume, as before
    assert "resuming" in capsys.readouterr().err
    assert inspect_store(str(renamed), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is True and report["problems"] == [] and report["slices"] == 11


def test_overwrite_starts_a_renamed_index_over_and_leaves_the_other_folder(store, tmp_path, capsys):
    renamed = _renamed_copy(store, tmp_path / "c", "renamed.h5", rename_folder=False)
    cfg = make_cfg(store.parent / "in", renamed)
    pipeline.preprocess(cfg, progress=False, overwrite=True)
    capsys.readouterr()
    assert inspect_store(str(renamed), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] is True and report["problems"] == [] and report["slices"] == 11
    assert sorted(p.name for p in (tmp_path / "c" / "store.h5.parts").glob("0*.h5")) == \
        sorted(p.name for p in parts_dir(store).glob("0*.h5"))         # not ours under this name: kept


def test_a_store_renamed_with_its_folder_reads_and_says_its_index_is_stale(store, tmp_path, capsys):
    from engine.store_reader import StoreReader
    renamed = _renamed_copy(store, tmp_path / "b", "renamed.h5", rename_folder=True)
    with StoreReader(store) as a, StoreReader(renamed) as b:              # the engine's reader finds the shards
        assert np.array_equal(a.read(7)["image"], b.read(7)["image"])
    inspect_store(str(renamed), as_json=True)
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert problems == ["the index maps its datasets onto 3 file(s) that are not there (e.g. store.h5.parts/"
                        "000000.h5); the preprocess command that made the store rebuilds the index from "
                        "renamed.h5.parts"]
    assert pipeline.preprocess(make_cfg(store.parent / "in", renamed), progress=False) == 1
    capsys.readouterr()
    inspect_store(str(renamed), as_json=True)
    assert json.loads(capsys.readouterr().out)["problems"] == []


def test_a_slice_table_that_drops_a_label_is_found(store, tmp_path, capsys):
    # Guards the "label present exactly when recorded" check: it compared what the reader returned (which the
    # reader derives from the slice table) with the slice table itself, so it could never fail. A slice marked
    # unlabelled while its volume has a label map must be a finding.
    import shutil

    import h5py
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    with h5py.File(copy, "r+") as f:
        present = f["slices/labels_present"][()]
        assert present.all()                                       # both volumes of the fixture have labels
        present[3] = False
        f["slices/labels_present"][...] = present
    assert inspect_store(str(copy), as_json=True) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert len(problems) == 1 and problems[0].startswith("slice 3 (volume 1 z=3): label") and "differs" in problems[0]


def test_text_output_says_how_many_problems_it_leaves_out(store, tmp_path, capsys):
    # the text lists the first 10 problems; the rest are counted, not dropped without a word
    import shutil

    import h5py
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    with h5py.File(copy, "r+") as f:
        present = f["slices/labels_present"][()]
        n = present.size
        present[:] = False                                          # one problem per slice
        f["slices/labels_present"][...] = present
        nsp = f["slices/n_superpixels"][()]
        nsp[:3] += 1                                                # and 3 more
        f["slices/n_superpixels"][...] = nsp
    assert inspect_store(str(copy)) == 1
    out = capsys.readouterr().out
    assert f"integrity    {n + 3} problem(s):" in out
    assert len([line for line in out.splitlines() if line.startswith("  slice ")]) == 10
    assert f"  ... and {n + 3 - 10} more (--json lists all {n + 3})" in out


def test_a_capped_problem_list_says_so_and_counts_only_problems(store, tmp_path, monkeypatch, capsys):
    # the pixel check stops at a limit: the text used to count its "stopped" line as a problem, one beyond the
    # limit too, and to promise that --json lists all
    import shutil

    import h5py

    from engine import inspect as inspect_mod
    monkeypatch.setattr(inspect_mod, "MAX_PROBLEMS", 4)
    monkeypatch.setattr(inspect_mod, "STOPPED_NOTE", "... (stopped at 4)")
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    with h5py.File(copy, "r+") as f:
        f["slices/labels_present"][...] = False                    # 11 problems, one per slice
    assert inspect_store(str(copy), as_json=True) == 1
    s = json.loads(capsys.readouterr().out)
    assert len(s["problems"]) == 4 and s["problems_truncated"] is True
    assert all(p.startswith("slice ") for p in s["problems"])
    assert inspect_store(str(copy)) == 1
    assert "integrity    4 problem(s), maybe more (the check stops at 4):" in capsys.readouterr().out
    from engine.store_reader import StoreReader
    with StoreReader(copy) as r:                   # the library's list ends with the note, once
        found = inspect_mod.check_integrity(r)
    assert len(found) == 5 and found[-1] == "... (stopped at 4)" and found[:4] == s["problems"]
    monkeypatch.setattr(inspect_mod, "MAX_PROBLEMS", 50)
    assert inspect_store(str(copy), as_json=True) == 1
    s = json.loads(capsys.readouterr().out)
    assert len(s["problems"]) == 11 and s["problems_truncated"] is False


def test_an_organs_column_that_disagrees_with_the_label_map_is_found(store, tmp_path, capsys):
    # training chooses setting 2's slices by the organs column alone, so inspect checks it against the labels
    import shutil

    import h5py
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    assert inspect_store(str(copy), as_json=True) == 0
    capsys.readouterr()
    with h5py.File(copy, "r+") as f:
        organs = f["slices/organs"][()]
        organs[2] ^= np.uint64(1 << 5)
        f["slices/organs"][...] = organs
    assert inspect_store(str(copy), as_json=True) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert len(problems) == 1 and problems[0].startswith("slice 2 (volume ")
    assert problems[0].endswith("the organs column differs from the label map's values")


def test_save_figure_closes_the_figure_when_the_write_fails(tmp_path):
    # evaluate writes one overlay per scan and organ: a failed write must not leave its figure open in pyplot
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        save_figure(fig, blocker / "sub" / "a.png", 50)          # its parent is a file
    assert not plt.fignum_exists(fig.number)


@pytest.mark.parametrize("zs, expected", [
    ([0, 1, 1, 3, 4], "volume 1: duplicated slices"),
    ([0, 1, 3, 4, 5], "volume 1: slices are not z = 0..4 in order (gap)"),
])
def test_a_duplicated_or_missing_z_is_reported_once_as_what_it_is(store, tmp_path, zs, expected):
    # a duplicated z was also reported as a gap
    import shutil

    import h5py

    from engine.inspect import integrity_problems
    from engine.store_reader import StoreReader
    copy = tmp_path / store.name
    shutil.copy(store, copy)
    shutil.copytree(parts_dir(store), parts_dir(copy))
    with h5py.File(copy, "r+") as f:
        z = f["slices/z"][()]
        first = np.flatnonzero(f["slices/volume"][()].astype(str) == "1")
        z[first] = zs
        f["slices/z"][...] = z
    with StoreReader(copy) as r:
        problems, truncated = integrity_problems(r, read_pixels=False)
    assert [p for p in problems if p.startswith("volume 1")] == [expected] and not truncated
