"""Bad input on the command line: every case ends in ONE line on stderr naming the file or option and the
problem, exit status 2, no traceback, and nothing written.

Each test calls ``cli.main`` in this process (as ``cli.py`` does), so an exception that escapes it is the
traceback a user would have seen.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import cli
from alpnet.config import load
from engine.config import ConfigError


def one_error_line(capsys) -> str:
    """The single line the command wrote to stderr (asserts there was exactly one and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny real store (one volume of 3 slices): the overlay cases need one that opens."""
    from engine import pipeline
    from test_pipeline import make_cfg, write_folder
    base = tmp_path_factory.mktemp("errs")
    src = write_folder(base / "in", n=1, n_slices=3)
    out = base / "store.h5"
    assert pipeline.preprocess(make_cfg(src, out), progress=False) == 0
    return out


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a file where a folder is needed\n")
    return path


# ------------------------------------------------------------------------------------------ --config FILE
def test_a_binary_config_file_is_a_config_error(tmp_path, capsys):
    # was: UnicodeDecodeError traceback from Path.read_text, exit 1
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02PK\x00\x01\xff\xfe binary")
    assert cli.main(["train", "--config", str(path), "--store", str(tmp_path / "s.h5")]) == 2
    assert one_error_line(capsys) == f"config error: {path}: not a YAML text file (not UTF-8: byte 0)"


def test_a_config_folder_is_called_a_folder(tmp_path, capsys):
    # was: "config file not found" for a folder that is there
    folder = tmp_path / "configs"
    folder.mkdir()
    assert cli.main(["train", "--config", str(folder)]) == 2
    assert one_error_line(capsys) == f"config error: {folder}: a folder, not a config file"


def test_an_unreadable_config_file_is_a_config_error(tmp_path, capsys, monkeypatch):
    # was: "train: Permission denied (errno 13): PATH", exit 1 (the status of a run that failed on the way).
    # Simulated: the tests may run as root, who reads any file whatever its mode.
    path = tmp_path / "locked.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    real = Path.read_text

    def denied(self, *a, **k):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "read_text", denied)
    assert cli.main(["train", "--config", str(path)]) == 2
    assert one_error_line(capsys) == f"config error: {path}: cannot read the config file (Permission denied)"


@pytest.mark.parametrize("text, message", [
    # YAML errors name the line and the problem: only the first line of PyYAML's message was given, e.g.
    # "not valid YAML (while parsing a flow sequence)"
    ("train: [1, 2\n", "not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>')"),
    ("train:\n\tlr: 1\n", "not valid YAML (line 2, column 1: found character '\\t' that cannot start any token)"),
    ("train:\n  <<: 5\n",
     "not valid YAML (line 2, column 7: expected a mapping or list of mappings for merging, but found scalar)"),
    # was: TypeError "unhashable type: 'list'" from the duplicate-key check, a traceback
    ("? [a, b]\n: 1\n", "not valid YAML (line 1, column 3: found unhashable key)"),
    ("- 1\n- 2\n", "the top level must be a mapping of sections"),
    ("just a string\n", "the top level must be a mapping of sections"),
    ("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n",
     "key 'train' is given twice (lines 1 and 3): YAML would keep only the last"),
])
def test_a_config_file_that_is_no_valid_config_exits_2_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path)]) == 2
    assert one_error_line(capsys) == f"config error: {path}: {message}"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_config_file_is_the_defaults(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert load(str(path)) == load()


def test_a_missing_config_file_exits_2_in_one_line(tmp_path, capsys):
    assert cli.main(["preprocess", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert one_error_line(capsys) == f"config error: {tmp_path / 'nope.yaml'}: config file not found"


# ---------------------------------------------------------------------------------- unknown keys: a hint
@pytest.mark.parametrize("text, override, start, hint", [
    ("trian:\n  lr: 0.1\n", None, "trian: unknown key (allowed: augment, data,", "; did you mean 'train'?"),
    ("train:\n  iteratons: 5\n", None, "train.iteratons: unknown key (allowed: amp,", "; did you mean 'iterations'?"),
    (None, "superpixels.slic.n_segment=40", "superpixels.slic.n_segment: unknown key",
     "; did you mean 'n_segments'?"),
    (None, "modle.encoder=tiny", "modle: unknown key", "; did you mean 'model'?"),
])
def test_a_misspelt_key_suggests_the_close_one(tmp_path, capsys, text, override, start, hint):
    argv = ["train"]
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        argv += ["--config", str(path)]
    if override is not None:
        argv += ["--set", override]
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    where = f"{tmp_path / 'c.yaml'}: " if text is not None else ""      # a fault of the file names the file
    assert line.startswith(f"config error: {where}{start}") and line.endswith(hint), line


def test_a_key_like_no_other_gets_no_suggestion():
    with pytest.raises(ConfigError) as info:
        load(None, ["train.zzzzzz=1"])
    assert str(info.value).startswith("train.zzzzzz: unknown key (allowed: ")
    assert str(info.value).endswith("weight_decay)")


# ------------------------------------------------------------------------------------ --set KEY=VALUE
@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr: expected a number, got str 'abc'"),
    ("train.iterations=1.5", "train.iterations: expected an integer, got float 1.5"),
    ("train.iterations=true", "train.iterations: expected an integer, got bool True"),
    ("train.iterations", "--set 'train.iterations': expected KEY=VALUE, e.g. train.iterations=200"),
    ("=5", "--set '=5': empty key component"),
    ("train..lr=1", "--set 'train..lr=1': empty key component"),
    ("train=5", "train: expected a mapping, got int 5"),
    ("train.lr=.inf", "train.lr: must be > 0, got inf"),
    ("engine.threads=-1", "engine.threads: must be >= 0 (0: automatic), got -1"),
])
def test_bad_overrides_exit_2_in_one_line(capsys, override, message):
    assert cli.main(["train", "--set", override]) == 2
    assert one_error_line(capsys) == f"config error: {message}"


@pytest.mark.parametrize("value, got", [("1.5", "float 1.5"), ("[1]", "list [1]"), ("true", "bool True")])
def test_a_key_of_two_types_names_both(capsys, value, got):
    # was: "evaluate.fold: expected a string, got float 1.5" (the first member's error only)
    assert cli.main(["evaluate", "--baseline", "support-copy", "--set", f"evaluate.fold={value}"]) == 2
    assert one_error_line(capsys) == f"config error: evaluate.fold: expected a string or an integer, got {got}"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_the_body_threshold_must_be_finite(tmp_path, capsys, value):
    # was: accepted, then preprocess's warm-up raised VolumeError "no finite voxel" as a traceback
    out = tmp_path / "s.h5"
    assert cli.main(["preprocess", "--set", f"prepare.fg_threshold={value}", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("config error: prepare.fg_threshold: must be a finite number, got "), line
    assert not out.exists()


def test_a_negative_body_threshold_is_still_allowed():
    assert load(None, ["prepare.fg_threshold=-500"]).prepare.fg_threshold == -500.0     # README, Dice section


# ------------------------------------------------------------------------------------ preprocess options
@pytest.mark.parametrize("option", ["--threads", "--batch"])
def test_a_negative_count_names_the_option_typed(tmp_path, capsys, option):
    # was: "config error: engine.threads: ..." for --threads -1, a key the user never typed
    assert cli.main(["preprocess", option, "-1", "--out", str(tmp_path / "s.h5")]) == 2
    assert one_error_line(capsys) == f"preprocess: {option}: must be >= 0 (0: automatic), got -1"


@pytest.mark.parametrize("argv", [["preprocess", "--threads", "x"], ["preprocess", "--threads", "1.5"],
                                  ["preprocess", "--batch", "many"], ["preprocess", "--method", "unknown"],
                                  ["preprocess", "--backend", "gpu"], ["inspect", "s.h5", "--slice", "z"],
                                  ["evaluate", "--setting", "3"], ["nope"], []])
def test_argparse_refuses_bad_option_values_with_status_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("cli.py")


# ------------------------------------------------------------------ --out: a file where a folder is needed
@pytest.mark.parametrize("command, extra", [
    ("train", ["--store", "s.h5"]),
    ("evaluate", ["--baseline", "support-copy", "--data", "phantom:6"]),
    ("demo", []),
])
def test_a_run_folder_that_is_a_file_exits_2_in_one_line(a_file, capsys, command, extra):
    # was: "train: File exists (errno 17): PATH", exit 1 as if the machine had failed, after loading the model
    # and the data; demo: "preprocess: PATH/store.h5: cannot create its folder: File exists"
    assert cli.main([command, "--out", str(a_file), *extra]) == 2
    assert one_error_line(capsys) == f"{command}: --out {a_file}: is a file, not a folder"
    assert a_file.read_text() == "a file where a folder is needed\n"


def test_a_run_folder_from_the_config_is_named_by_its_key(a_file, capsys):
    assert cli.main(["train", "--set", f"train.out={a_file}"]) == 2
    assert one_error_line(capsys) == f"train: train.out {a_file}: is a file, not a folder"


def test_a_store_under_a_file_exits_2_naming_the_file(a_file, capsys):
    # was: "cannot create its folder: File exists"
    out = a_file / "s.h5"
    assert cli.main(["preprocess", "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"preprocess: --out {out}: {a_file} is a file, not a folder"


# -------------------------------------------------------------------------------------- inspect --png
def test_an_overlay_into_a_folder_is_refused(store, tmp_path, capsys):
    # was: exit 0 and "overlay written: FOLDER", while matplotlib wrote FOLDER.png beside the folder
    folder = tmp_path / "pngs"
    folder.mkdir()
    assert cli.main(["inspect", str(store), "--volume", "1", "--slice", "1", "--png", str(folder)]) == 2
    assert one_error_line(capsys) == f"inspect: --png {folder}: a folder; give a file name ending in .png"
    assert not (tmp_path / "pngs.png").exists() and not any(folder.iterdir())


@pytest.mark.parametrize("name", ["overlay", "overlay.xyz", "overlay.jpg"])
def test_an_overlay_name_must_end_in_png(store, tmp_path, capsys, name):
    # was: "overlay" -> exit 0, reported as written to "overlay" while the file was "overlay.png";
    # "overlay.xyz" -> a traceback from matplotlib (format not supported); "overlay.jpg" -> a JPEG
    png = tmp_path / name
    assert cli.main(["inspect", str(store), "--volume", "1", "--slice", "1", "--png", str(png)]) == 2
    assert one_error_line(capsys) == f"inspect: --png {png}: give a file name ending in .png"
    assert list(tmp_path.iterdir()) == []


def test_an_overlay_name_in_capitals_is_written(store, tmp_path, capsys):
    png = tmp_path / "new" / "O.PNG"
    assert cli.main(["inspect", str(store), "--quick", "--volume", "1", "--slice", "1", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"overlay written: {png}" in capsys.readouterr().err


@pytest.mark.parametrize("volume, z, message", [
    ("1", "99", "volume '1' slice 99 is not in the store (z 0..2)"),
    ("1", "-1", "volume '1' slice -1 is not in the store (z 0..2)"),
    ("nosuch", "0", "volume 'nosuch' slice 0 is not in the store (no such volume)"),
])
def test_an_overlay_slice_out_of_range_exits_2_in_one_line(store, tmp_path, capsys, volume, z, message):
    png = tmp_path / "o.png"
    assert cli.main(["inspect", str(store), "--volume", volume, "--slice", z, "--png", str(png)]) == 2
    assert one_error_line(capsys) == f"inspect: {store}: {message}"
    assert not png.exists()


# ------------------------------------------------------------------------------------- inspect STORE
def test_inspect_on_what_is_not_a_store_exits_2_in_one_line(tmp_path, capsys):
    import h5py
    text = tmp_path / "text.h5"
    text.write_text("hello\n")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    cases = [(tmp_path / "missing.h5", "no such store"),
             (text, "cannot read the store index"),
             (other, "not a store written by this engine"),
             (tmp_path, "a folder, not a store")]
    for path, message in cases:
        assert cli.main(["inspect", str(path)]) == 2, path
        line = one_error_line(capsys)
        assert line.startswith(f"inspect: {path}: {message}"), line


# ------------------------------------------------------------------------------- evaluate / train --resume
def test_evaluate_without_a_model_or_baseline_exits_2(capsys):
    assert cli.main(["evaluate", "--data", "phantom:6"]) == 2
    assert one_error_line(capsys) == "evaluate: give --checkpoint CKPT or --baseline support-copy"


def test_evaluate_with_what_is_not_a_checkpoint_exits_2(tmp_path, capsys):
    fake = tmp_path / "fake.pt"
    fake.write_text("not a checkpoint\n")
    argv = ["evaluate", "--data", "phantom:6", "--out", str(tmp_path / "ev"), "--device", "cpu"]
    assert cli.main([*argv, "--checkpoint", str(fake)]) == 2
    assert one_error_line(capsys).startswith(f"evaluate: {fake}: not a readable checkpoint (")
    assert cli.main([*argv, "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert one_error_line(capsys) == f"evaluate: {tmp_path / 'missing.pt'}: checkpoint file not found"
    assert cli.main([*argv, "--checkpoint", str(tmp_path)]) == 2          # the run folder, not its file
    assert one_error_line(capsys) == (f"evaluate: {tmp_path}: a folder, not a checkpoint file (a run folder "
                                      f"holds {tmp_path / 'checkpoint.pt'})")
    assert not (tmp_path / "ev").exists()


def test_train_resume_without_a_checkpoint_exits_2(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--store", str(store), "--out", str(out), "--resume", "--device", "cpu",
                     "--set", "model.encoder=tiny"]) == 2
    assert one_error_line(capsys) == (f"train: {out / 'checkpoint.pt'}: no checkpoint to resume from (--resume "
                                      f"needs a previous run in {out})")
    assert not out.exists()
