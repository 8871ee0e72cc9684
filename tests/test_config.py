"""Config loading: YAML + overrides onto typed dataclasses, errors name the dotted key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alpnet.config import Config, load
from engine.config import ConfigError, parse_override, to_dict


def test_defaults_are_paper_values():
    cfg = load()
    assert cfg.train.lr == 1e-3 and cfg.train.momentum == 0.9 and cfg.train.weight_decay == 5e-4
    assert cfg.train.lr_gamma == 0.95 and cfg.train.lr_step == 1000
    assert cfg.model.alpha == 20.0 and cfg.model.threshold == 0.95
    assert (cfg.model.local_size_train, cfg.model.local_size_test) == (4, 2)
    assert (cfg.model.bg_weight, cfg.model.fg_weight) == (0.05, 1.0)
    assert cfg.superpixels.felzenszwalb.min_size == 400
    assert cfg.evaluate.classes == {"LIVER": 1, "RK": 2, "LK": 3, "SPLEEN": 4}


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"iterations": 50}, "superpixels": {"slic": {"n_segments": 30}}}))
    cfg = load(str(path), ["train.iterations=7", "model.encoder=tiny", "augment.zoom=[0.8, 1.3]",
                            "train.lr=1e-2"])
    assert cfg.train.iterations == 7
    assert cfg.superpixels.slic.n_segments == 30
    assert cfg.model.encoder == "tiny"
    assert cfg.augment.zoom == [0.8, 1.3]
    assert cfg.train.lr == pytest.approx(0.01)


def test_int_promotes_to_float_but_not_reverse():
    assert load(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"^train\.iterations: expected an integer"):
        load(None, ["train.iterations=1.5"])


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", r"^train\.nope: unknown key \(allowed: .*iterations"),
    ("nosection.x=1", r"^nosection: unknown key"),
    ("model.alpha=abc", r"^model\.alpha: expected a number"),
    ("train.amp=3", r"^train\.amp: expected true/false"),
    ("augment.zoom=1.0", r"^augment\.zoom: expected a list"),
    ("evaluate.classes.LIVER=x", r"^evaluate\.classes\.LIVER: expected an integer"),
    ("superpixels.method=watershed", r"superpixels\.method: 'watershed' is not one of"),
    ("engine.backend=gpu", r"engine\.backend: 'gpu' is not one of"),
    ("engine.batch=-1", r"^engine\.batch: must be >= 0 \(0: automatic\), got -1$"),
    ("engine.threads=-2", r"^engine\.threads: must be >= 0 \(0: automatic\), got -2$"),
    ("engine.queue_slices=0", r"^engine\.queue_slices: must be >= 1, got 0$"),
    ("engine.run_slices=0", r"^engine\.run_slices: must be >= 1 and <= 64, got 0$"),
    ("engine.run_slices=65", r"^engine\.run_slices: must be >= 1 and <= 64, got 65$"),
    ("train.iterations", r"expected KEY=VALUE"),
    ("train.iterations.x=1", r"^train\.iterations: expected an integer, got dict"),
    # the ranges of the methods' parameters: refused before any work (and before --overwrite discards a store)
    ("superpixels.slic.n_segments=0", r"^superpixels\.slic\.n_segments: must be >= 1, got 0$"),
    ("superpixels.slic.compactness=0", r"^superpixels\.slic\.compactness: must be > 0, got 0\.0$"),
    ("superpixels.slic.max_num_iter=0", r"^superpixels\.slic\.max_num_iter: must be >= 1"),
    ("superpixels.slic.sigma=-1", r"^superpixels\.slic\.sigma: must be >= 0"),
    ("superpixels.slic.search_radius=0", r"^superpixels\.slic\.search_radius: must be > 0"),
    ("superpixels.felzenszwalb.scale=0", r"^superpixels\.felzenszwalb\.scale: must be > 0"),
    ("superpixels.felzenszwalb.min_size=-3", r"^superpixels\.felzenszwalb\.min_size: must be >= 0"),
    ("superpixels.meanshift.ratio=1.5", r"^superpixels\.meanshift\.ratio: must be > 0 and <= 1, got 1\.5$"),
    ("superpixels.meanshift.kernel_size=0.5", r"^superpixels\.meanshift\.kernel_size: must be >= 1"),
    ("prepare.size=0", r"^prepare\.size: must be >= 1, got 0$"),
    # each trainer key by its own name and value (they were refused in groups: "train.iterations, batch_size,
    # log_every and ckpt_every must be >= 1"); values that ran without an error but ruined the run
    ("train.ckpt_every=0", r"^train\.ckpt_every: must be >= 1, got 0$"),
    ("train.num_workers=-1", r"^train\.num_workers: must be >= 0, got -1$"),
    ("episodes.max_slice_tries=0", r"^episodes\.max_slice_tries: must be >= 1, got 0$"),
    ("augment.elastic_kernel=4", r"^augment\.elastic_kernel: must be odd and >= 1, got 4$"),
    ("augment.elastic_sigma=.nan", r"^augment\.elastic_sigma: must be > 0, got nan$"),
    ("augment.gamma=[0.5, .inf]", r"^augment\.gamma: expected \[low, high\] with 0 < low <= high, both finite"),
    ("evaluate.chunks=0", r"^evaluate\.chunks: must be >= 1, got 0$"),
    ("evaluate.n_folds=1", r"^evaluate\.n_folds: must be >= 2, got 1$"),
    ("prepare.clip_percentile=0", r"^prepare\.clip_percentile: must be > 0 and <= 100"),
    ("prepare.clip_percentile=.nan", r"^prepare\.clip_percentile: must be > 0 and <= 100, got nan$"),
    ("prepare.target_spacing=[1.25, 0, 7.7]", r"^prepare\.target_spacing: must be 3 numbers > 0"),
    # guards the NaN hole of the spacing check: ``min(...) <= 0`` let NaN through (NaN <= 0 is False), and the
    # raw CHAOS reader then failed on every volume (int(nan) in the resampled size) after the run had started
    ("prepare.target_spacing=[.nan, 1.25, 7.7]", r"^prepare\.target_spacing: must be 3 numbers > 0"),
    ("prepare.target_spacing=[1.25, .nan, 7.7]", r"^prepare\.target_spacing: must be 3 numbers > 0"),
    ("prepare.target_spacing=[1.25, 1.25, .inf]", r"^prepare\.target_spacing: must be 3 numbers > 0"),
    # the trainer's: each of these ended in a traceback from torch or numpy, or trained without learning
    ("model.local_size_train=0", r"^model\.local_size_train: must be >= 1, got 0$"),
    ("model.fg_rule_window=0", r"^model\.fg_rule_window: must be >= 1, got 0$"),
    ("model.feature_dim=0", r"^model\.feature_dim: must be >= 1, got 0$"),
    ("model.threshold=2", r"^model\.threshold: must be >= 0 and <= 1, got 2\.0$"),
    ("model.alpha=0", r"^model\.alpha: must be > 0, got 0\.0$"),
    ("model.bg_weight=-1", r"^model\.bg_weight: must be >= 0, got -1\.0$"),
    ("train.lr=-1", r"^train\.lr: must be > 0, got -1\.0$"),
    ("train.weight_decay=-1e-4", r"^train\.weight_decay: must be >= 0, got -0\.0001$"),
    ("train.lr_gamma=0", r"^train\.lr_gamma: must be > 0 and <= 1, got 0\.0$"),
    ("train.momentum=1", r"^train\.momentum: must be >= 0 and < 1, got 1\.0$"),
    ("train.seed=-1", r"^train\.seed: must be >= 0 and <= 4294967295, got -1$"),
    ("augment.rotate_deg=-5", r"^augment\.rotate_deg: must be >= 0, got -5\.0$"),
    ("episodes.exclude_labels=[2, 0]",
     r"^episodes\.exclude_labels: organ labels that can be excluded are 1\.\.63 \(0 is background\), got 0$"),
    ("episodes.exclude_labels=[2, 64]",
     r"^episodes\.exclude_labels: organ labels that can be excluded are 1\.\.63 \(0 is background\), got 64$"),
    ("evaluate.batch=0", r"^evaluate\.batch: must be >= 1, got 0$"),
    ("evaluate.overlays=-1", r"^evaluate\.overlays: must be >= 0, got -1$"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(str(top))
    section = tmp_path / "section.yaml"
    section.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=rf"^{section}: train: expected a mapping"):
        load(str(section))


def test_a_fault_of_the_config_file_names_the_file_and_one_of_a_set_does_not(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train\.lr: must be > 0, got -1\.0$"):
        load(str(path))
    assert load(str(path), ["train.lr=0.1"]).train.lr == 0.1          # a --set may mend the file's value
    path.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^train\.lr: must be > 0, got -2\.0$"):
        load(str(path), ["train.lr=-2"])


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  iterations: 100\nmodel:\n  encoder: tiny\ntrain:\n  lr: 0.01\n", "train", (1, 5)),   # a section
    ("train:\n  lr: 0.1\n  iterations: 5\n  lr: 0.01\n", "lr", (2, 4)),                               # a value
])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, key, lines):
    # YAML itself keeps the last one: a second "train:" section would drop the first without a word
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == (f"{path}: key {key!r} is given twice (lines {lines[0]} and {lines[1]}): YAML would "
                               f"keep only the last")


def test_yaml_merge_keys_still_load(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("train:\n  <<: &b {lr: 0.01, iterations: 7}\n  iterations: 9\n")
    cfg = load(str(path))
    assert (cfg.train.lr, cfg.train.iterations) == (0.01, 9)


def test_round_trip_through_dict():
    cfg = load(None, ["train.iterations=3"])
    again = load(None, [])
    from engine.config import from_dict
    rebuilt = from_dict(Config, to_dict(cfg))
    assert rebuilt == cfg and rebuilt != again


def test_parse_override_yaml_values():
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=some/path.h5") == (["a"], "some/path.h5")


def test_shipped_configs_load():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("*.yaml"))
    assert {"default.yaml", "demo.yaml", "paper.yaml"} <= {p.name for p in files}     # a glob of nothing passes
    for path in files:
        load(str(path))                      # raises ConfigError on a bad key, type or range


def test_text_files_are_replaced_whole_and_a_failure_names_the_file(tmp_path, monkeypatch):
    # run configs, info files and evaluation reports: either the old content or all of the new one
    import os

    from engine import runinfo
    path = tmp_path / "results.md"
    runinfo.write_text_atomic(path, "old")
    real = os.replace

    def full(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(runinfo.os, "replace", full)
    with pytest.raises(OSError) as err:
        runinfo.write_text_atomic(path, "new")
    assert err.value.errno == 28 and err.value.filename == str(path)
    monkeypatch.setattr(runinfo.os, "replace", real)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def _checkout(root):
    """A minimal copy of this project's source layout: what the digest reads, and things it must not read."""
    for rel, text in {"cli.py": "main()\n", "engine/a.py": "A = 1\n", "engine/sub/b.py": "B = 2\n",
                      "alpnet/m.py": "M = 3\n", "benchmarks/t.py": "T = 4\n", "README.md": "words\n",
                      "benchmarks/results/r.json": "{}\n", "engine/__pycache__/a.cpython-311.pyc": "x"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_source_digest_follows_the_code_and_nothing_else(tmp_path):
    from engine.runinfo import source_digest

    root = _checkout(tmp_path / "c")
    d0 = source_digest(root)
    assert len(d0) == 12 and source_digest(root) == d0
    assert source_digest(_checkout(tmp_path / "copy")) == d0          # a copy elsewhere: the same code
    for rel in ("README.md", "benchmarks/results/r.json", "engine/__pycache__/a.cpython-311.pyc"):
        (root / rel).write_text("changed")
    assert source_digest(root) == d0                                    # docs, results, caches: not code
    (root / "engine/sub/b.py").write_text("B = 3\n")
    assert source_digest(root) != d0
    (root / "engine/sub/b.py").write_text("B = 2\n")
    (root / "engine/sub/b.py").rename(root / "engine/sub/c.py")
    assert source_digest(root) != d0                                    # a renamed module is another code


def test_source_digest_command_prints_it_and_refuses_a_folder_without_engine(tmp_path):
    import subprocess
    import sys

    from engine.runinfo import source_digest

    root = _checkout(tmp_path / "c")
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "engine.runinfo", str(root)], cwd=repo, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip() == source_digest(root)
    r = subprocess.run([sys.executable, "-m", "engine.runinfo", str(tmp_path)], cwd=repo, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "not a checkout of this project" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_a_string_key_set_to_a_number_a_bool_or_a_date_takes_the_text_typed():
    # YAML reads 123, no and 2024-01-01 as an int, a bool and a date: such a --set of a string key was refused
    # ("expected a string, got int 123"); every other key still gets the value read, and a union its YAML value
    cfg = load(None, ["train.out=123", "evaluate.label=no", "train.store=2024-01-01", "model.pretrained= 1e3 ",
                      "train.iterations=5", "train.amp=true", "evaluate.fold=1"])
    assert (cfg.train.out, cfg.evaluate.label, cfg.train.store, cfg.model.pretrained) == ("123", "no",
                                                                                         "2024-01-01", "1e3")
    assert cfg.train.iterations == 5 and cfg.train.amp is True and cfg.evaluate.fold == 1
    with pytest.raises(ConfigError, match=r"^train\.iterations: expected an integer, got dict \{'x': 1\}$"):
        load(None, ["train.iterations.x=1"])
    with pytest.raises(ConfigError, match=r"^model\.alpha: expected a number, got bool True$"):
        load(None, ["model.alpha=true"])
