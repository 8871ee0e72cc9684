"""benchmarks/device_data.py: packing data for the device machine and rebuilding it bit for bit."""
import gzip
import hashlib

import numpy as np
import pytest

from benchmarks import device_data as dd


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = np.arange(50_000, dtype=np.float64).tobytes()
    (src / "image_1.nii.gz").write_bytes(dd.rebuild_gzip(data))            # as the CHAOS files are written
    (src / "image_2.nii.gz").write_bytes(gzip.compress(data, compresslevel=9, mtime=0))   # not rebuildable
    (src / "README.md").write_text("not gzip\n")
    return src


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_round_trip_is_bit_identical(folder, tmp_path):
    counts = dd.pack(folder, tmp_path / "packed", jobs=1)
    assert counts == {"xz": 1, "copy": 2}
    packed = tmp_path / "packed"
    assert (packed / ("image_1.nii.gz" + dd.XZ_SUFFIX)).is_file() and not (packed / "image_1.nii.gz").exists()
    assert dd.unpack(packed, tmp_path / "out", jobs=1) == []
    assert _digests(tmp_path / "out") == _digests(folder)


def test_damaged_or_missing_packed_file_is_named(folder, tmp_path, capsys):
    packed = tmp_path / "packed"
    dd.pack(folder, packed, jobs=1)
    xz = packed / ("image_1.nii.gz" + dd.XZ_SUFFIX)
    xz.write_bytes(xz.read_bytes()[:-20])
    (packed / "README.md").unlink()
    assert sorted(dd.unpack(packed, tmp_path / "out", jobs=1)) == ["README.md", "image_1.nii.gz"]
    assert dd.main(["unpack", str(packed), str(tmp_path / "out2"), "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "README.md" in err and "image_1.nii.gz" in err


def test_altered_content_fails_the_checksum(folder, tmp_path):
    packed = tmp_path / "packed"
    dd.pack(folder, packed, jobs=1)
    (packed / "README.md").write_text("changed\n")
    assert dd.unpack(packed, tmp_path / "out", jobs=1) == ["README.md"]


def test_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert dd.main(["pack", str(tmp_path / "empty"), str(tmp_path / "p")]) == 1
    assert dd.main(["unpack", str(tmp_path / "empty"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no files to pack" in err[0] and "SHA256SUMS: not found" in err[1]
    assert str(tmp_path / "empty") in err[0]


@pytest.mark.chaos
def test_chaos_files_are_rebuildable(chaos_dir):
    raw = (chaos_dir / "label_1.nii.gz").read_bytes()
    assert dd._inflate_if_rebuildable(raw) is not None
