"""The HDF5 store on its own: codec, shards + index round trip, snapshots, lock, settings, resume scan, reader."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import zlib

import h5py
import numpy as np
import pytest

from engine.store import (Batch, Codec, SettingsMismatch, SliceResult, StoreError, StoreLock, StoreLocked,
                          StoreReader, StoreWriter, lock_path, parts_dir, shard_name, volume_row)

SHAPE = (16, 16)
SETTINGS = {"schema_version": 1, "method": "slic", "params": {"n_segments": 5}, "prepare": {"size": 16},
            "source": {"input": "test", "n_refs": 2}}


def make_slice(codec: Codec, vol: str, z: int, labelled: bool = True) -> tuple[SliceResult, dict]:
    rng = np.random.default_rng(100 * int(vol) + z)
    image = rng.normal(size=SHAPE).astype(np.float32)
    fg = np.zeros(SHAPE, bool)
    fg[3:13, 2:14] = True
    sp = np.zeros(SHAPE, np.int32)
    sp[fg] = 1 + (np.arange(fg.sum()) // 40)
    label = (rng.random(SHAPE) > 0.8).astype(np.uint8) * 2 if labelled else None
    chunks = {"image": codec.encode("image", image), "superpixels": codec.encode("superpixels", sp),
              "fg": codec.encode("fg", fg.view(np.uint8)),
              "label": codec.encode("label", label if labelled else np.zeros(SHAPE, np.uint8))}
    organs = 0b100 if labelled and label.any() else 0
    res = SliceResult(vol, f"ref{vol}", z, chunks, int(sp.max()), labelled, organs)
    return res, {"image": image, "superpixels": sp, "fg": fg, "label": label}


def row(vol: str, n: int, labelled: bool = True) -> dict:
    return volume_row(vol, f"ref{vol}", n, (1.0, 1.0, 5.0), "LAS", np.eye(4), f"/data/image_{vol}.nii.gz",
                      f"sha{vol}", labelled, ["a note"])


def write_store(path, codec_spec="maps-gzip-1", batches=((("1", 0), ("1", 1), ("1", 2)), (("2", 0), ("2", 1))),
                settings=SETTINGS, failures=()):
    """Commit ``batches`` (lists of (volume, z)) through a StoreWriter; returns the expected pixels per slice."""
    codec = Codec.parse(codec_spec)
    w = StoreWriter.open(path, settings, codec, SHAPE, "rev1")
    expected, first = [], w.n_committed
    for k, items in enumerate(batches):
        results, vols = [], {}
        for vol, z in items:
            res, px = make_slice(codec, vol, z, labelled=(vol != "2"))
            results.append(res)
            expected.append(px)
            vols[f"ref{vol}"] = row(vol, 3 if vol == "1" else 2, labelled=(vol != "2"))
        w.commit(Batch(len(w.shards), first, results, vols, list(failures) if k == 0 else []))
        first += len(results)
    w.finish(complete=True, run_record={"status": "complete"})
    return expected


@pytest.mark.parametrize("spec", ["none", "gzip-1", "maps-gzip-1", "gzip-4"])
def test_round_trip_every_codec(tmp_path, spec):
    path = tmp_path / "s.h5"
    expected = write_store(path, spec)
    with StoreReader(path) as r:
        assert r.n_slices == 5 and len(r) == 5
        assert r.slices["volume"].tolist() == ["1", "1", "1", "2", "2"]
        assert r.slices["z"].tolist() == [0, 1, 2, 0, 1]
        assert r.slices["labels_present"].tolist() == [True, True, True, False, False]
        for i, px in enumerate(expected):
            d = r.read(i)
            assert d["image"].dtype == np.float32 and np.array_equal(d["image"], px["image"])
            assert d["superpixels"].dtype == np.int32 and np.array_equal(d["superpixels"], px["superpixels"])
            assert d["fg"].dtype == bool and np.array_equal(d["fg"], px["fg"])
            if px["label"] is None:
                assert d["label"] is None
            else:
                assert d["label"].dtype == np.uint8 and np.array_equal(d["label"], px["label"])
        assert r.slices["n_superpixels"].tolist() == [int(p["superpixels"].max()) for p in expected]
        assert r.slices_of("1").tolist() == [0, 1, 2] and r.slices_of("2").tolist() == [3, 4]
        assert r.slices_of("nope").size == 0
        with pytest.raises(IndexError):
            r.read(5)
        part = r.read(0, fields=("image", "superpixels"))       # what an episode reads
        assert sorted(part) == ["image", "superpixels"] and np.array_equal(part["image"], expected[0]["image"])
        assert r.read(3, fields=("label",)) == {"label": None}
        with pytest.raises(ValueError, match="'mask'"):
            r.read(0, fields=("image", "mask"))


def test_provenance_and_virtual_datasets(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    expected = write_store(path, failures=[{"ref": "ref9", "path": "/data/image_9.nii.gz", "reason": "truncated"}])
    with StoreReader(path) as r:
        m = r.meta
        assert m["schema_version"] == 1 and m["method"] == "slic" and m["params"] == {"n_segments": 5}
        assert m["prepare"] == {"size": 16} and m["source"]["input"] == "test"
        assert m["code_version"] == "rev1" and m["created"] and m["complete"] is True
        assert m["compression"] == "maps-gzip-1" and len(m["settings_hash"]) == 16
        assert m["log"] == [{"ref": "ref9", "path": "/data/image_9.nii.gz", "reason": "truncated"}]
        v = r.volumes[0]
        assert v["id"] == "1" and v["n_slices"] == 3 and v["spacing"] == [1.0, 1.0, 5.0]
        assert v["orientation"] == "LAS" and v["checksum"] == "sha1" and v["has_label"] is True
        assert v["path"] == "/data/image_1.nii.gz" and np.array_equal(v["affine"], np.eye(4))
        assert [x["id"] for x in r.volumes] == ["1", "2"]
    # the index is a plain HDF5 file whose virtual datasets map the shards (h5py / h5dump / HDFView)
    monkeypatch.chdir(tmp_path.parent)          # relative shard paths resolve against the index's folder
    with h5py.File(path, "r") as f:
        assert f["image"].is_virtual and f["image"].shape == (5,) + SHAPE
        for i, px in enumerate(expected):
            assert np.array_equal(f["image"][i], px["image"])
            assert np.array_equal(f["superpixels"][i], px["superpixels"])
        assert f["superpixels"].dtype == np.uint16
    with h5py.File(parts_dir(path) / shard_name(0), "r") as f:
        assert f["image"].chunks == (1,) + SHAPE and f["superpixels"].compression == "gzip"
        assert f["image"].compression is None


def test_codec_rejects_unknown_specs_and_encodes_deflate():
    for bad in ("lzf", "gzip-0", "gzip", "blosc", ""):
        with pytest.raises(ValueError, match="engine.compression"):
            Codec.parse(bad)
    arr = np.arange(256, dtype=np.uint16).reshape(16, 16)
    enc = Codec.parse("gzip-3").encode("superpixels", arr)
    assert np.array_equal(np.frombuffer(zlib.decompress(enc), np.uint16).reshape(16, 16), arr)


def test_superpixel_ids_beyond_uint16_are_refused_and_leave_no_shard(tmp_path):
    import dataclasses
    from engine.store import MAX_SUPERPIXEL_ID, parts_dir
    path = tmp_path / "s.h5"
    codec = Codec.parse("maps-gzip-1")
    w = StoreWriter.open(path, SETTINGS, codec, SHAPE, "rev1")
    good, bad = (make_slice(codec, "1", z)[0] for z in range(2))
    bad = dataclasses.replace(bad, n_superpixels=MAX_SUPERPIXEL_ID + 1)
    with pytest.raises(StoreError, match=r"volume 1 slice 1 has 65536 superpixels, more than the store's uint16"):
        w.commit(Batch(0, 0, [good, bad], {"ref1": row("1", 2)}, []))
    assert w.shards == [] and sorted(p.name for p in parts_dir(path).iterdir()) == []
    w.commit(Batch(0, 0, [good], {"ref1": row("1", 2)}, []))        # the next commit still fits
    assert [s.n for s in w.shards] == [1]


def test_open_reader_keeps_its_snapshot_while_batches_are_added(tmp_path):
    path = tmp_path / "s.h5"
    codec = Codec.parse("maps-gzip-1")
    w = StoreWriter.open(path, SETTINGS, codec, SHAPE, "rev1")
    res = [make_slice(codec, "1", z)[0] for z in range(3)]
    w.commit(Batch(0, 0, res[:2], {"ref1": row("1", 3)}, []))
    early = StoreReader(path)
    assert early.n_slices == 2 and early.meta["complete"] is False
    first = early.read(1)["image"].copy()
    w.commit(Batch(1, 2, res[2:], {"ref1": row("1", 3)}, []))
    assert early.n_slices == 2 and np.array_equal(early.read(1)["image"], first)
    with StoreReader(path) as late:
        assert late.n_slices == 3
    w.finish(complete=True)
    early.close()


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "s.h5"
    w = StoreWriter.open(path, SETTINGS, Codec.parse("none"), SHAPE, "rev1", command="first-run --x")
    with pytest.raises(StoreLocked) as err:
        StoreWriter.open(path, SETTINGS, Codec.parse("none"), SHAPE, "rev1")
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and "first-run --x" in msg and "another run is writing" in msg
    assert "\n" not in msg
    w.finish(complete=True)
    assert not lock_path(path).exists()
    StoreWriter.open(path, SETTINGS, Codec.parse("none"), SHAPE, "rev1").finish(complete=True)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "s.h5"
    lock_path(path).write_text('{"pid": 999999, "host": "gone", "started": "yesterday", "command": "x"}')
    lock = StoreLock(path).acquire("me")
    assert lock.stale["pid"] == 999999
    lock.release()


def test_settings_mismatch_is_refused_and_overwrite_discards(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path)
    other = {**SETTINGS, "params": {"n_segments": 6}}
    with pytest.raises(SettingsMismatch, match=r"params\.n_segments: store has 5, this run 6"):
        StoreWriter.open(path, other, Codec.parse("none"), SHAPE, "rev1")
    assert not lock_path(path).exists()                     # a refused run leaves no lock behind
    w = StoreWriter.open(path, other, Codec.parse("none"), SHAPE, "rev1", overwrite=True)
    assert w.n_committed == 0 and not list(parts_dir(path).glob("0*.h5"))
    w.finish(complete=True)
    with StoreReader(path) as r:
        assert r.n_slices == 0 and r.meta["params"] == {"n_segments": 6}


def test_a_file_that_is_not_a_store_is_never_overwritten(tmp_path):
    path = tmp_path / "image.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a store written by this engine"):
            StoreWriter.open(path, SETTINGS, Codec.parse("none"), SHAPE, "rev1", overwrite=overwrite)
    with h5py.File(path, "r") as f:
        assert f["x"][()] == 1


@pytest.mark.parametrize("depth", [1, 2])
def test_a_store_under_a_file_names_the_file(tmp_path, depth):
    # was: "cannot create its folder: File exists" / "Not a directory", naming neither the file nor where it is
    blocker = tmp_path / "notes.txt"
    blocker.write_text("kept\n")
    path = blocker.joinpath(*["sub"] * (depth - 1), "s.h5")
    with pytest.raises(StoreError) as err:
        StoreWriter.open(path, SETTINGS, Codec.parse("none"), SHAPE, "rev1")
    assert str(err.value) == f"{path}: cannot create its folder: {blocker} is a file, not a folder"
    assert blocker.read_text() == "kept\n"


def test_resume_scan_keeps_committed_shards_and_removes_debris(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, batches=((("1", 0), ("1", 1)), (("1", 2),), (("2", 0),)))
    parts = parts_dir(path)
    (parts / ".000003.h5.tmp-123").write_bytes(b"half a shard")           # a commit cut by kill -9
    (tmp_path / ".s.h5.tmp-123").write_bytes(b"half an index")
    (parts / shard_name(2)).write_bytes(b"garbage")                        # damaged shard: recomputed
    w = StoreWriter.open(path, SETTINGS, Codec.parse("none"), SHAPE, "rev1")
    try:
        assert [s.index for s in w.shards] == [0, 1] and w.n_committed == 3 and w.resumed
        assert any("unreadable" in d for d in w.dropped)
        assert not (parts / ".000003.h5.tmp-123").exists() and not (tmp_path / ".s.h5.tmp-123").exists()
        assert not (parts / shard_name(2)).exists()
        by_ref, failed, rows = w.committed_progress()
        assert by_ref == {"ref1": {0, 1, 2}} and not failed and rows["ref1"]["n_slices"] == 3
        with StoreReader(path) as r:                                       # the index was rebuilt
            assert r.n_slices == 3 and r.meta["complete"] is False
    finally:
        w.finish(complete=False)


def test_commit_out_of_order_is_an_error(tmp_path):
    codec = Codec.parse("none")
    w = StoreWriter.open(tmp_path / "s.h5", SETTINGS, codec, SHAPE, "rev1")
    try:
        with pytest.raises(StoreError, match="does not follow"):
            w.commit(Batch(1, 0, [make_slice(codec, "1", 0)[0]], {"ref1": row("1", 1)}, []))
    finally:
        w.finish(complete=False)


def _read_in_child(reader, i, q):
    q.put(reader.read(i)["superpixels"].sum())


def test_reader_works_after_fork_and_pickling(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path)
    reader = StoreReader(path)
    want = int(reader.read(2)["superpixels"].sum())          # the parent has opened a shard handle
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(reader, 2, q))
    p.start()
    got = q.get(timeout=30)
    p.join(timeout=30)
    assert p.exitcode == 0 and got == want
    clone = pickle.loads(pickle.dumps(reader))
    assert int(clone.read(2)["superpixels"].sum()) == want
    reader.close()
    clone.close()


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        StoreReader(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"nope")
    with pytest.raises(StoreError, match="cannot read the store index"):
        StoreReader(bad)
    path = tmp_path / "s.h5"
    write_store(path)
    (parts_dir(path) / shard_name(1)).unlink()
    with StoreReader(path) as r:
        r.read(0)
        with pytest.raises(StoreError, match="cannot be opened"):
            r.read(4)


def test_reader_cleanup_survives_interpreter_exit(tmp_path, monkeypatch):
    # At interpreter exit a module's globals may be None before a reader left open is collected; its
    # ``__del__`` then used to fail with "'NoneType' object is not callable" (printed as "Exception ignored").
    from engine import store_reader
    path = tmp_path / "s.h5"
    write_store(path)
    reader = StoreReader(path)
    reader.read(0)
    assert reader._files
    monkeypatch.setattr(store_reader, "os", None)
    reader.__del__()
    assert reader._files == {}


def test_zlib_and_isal_encodings_decode_the_same(tmp_path, monkeypatch):
    """ISA-L is an optional accelerator: without it zlib writes an equivalent store, and either reads both."""
    from engine import store_codec
    expected = write_store(tmp_path / "a.h5", "gzip-1")
    monkeypatch.setattr(store_codec, "_fast_zlib", None)
    write_store(tmp_path / "b.h5", "gzip-1")
    with StoreReader(tmp_path / "a.h5") as a, StoreReader(tmp_path / "b.h5") as b:
        for i, px in enumerate(expected):
            da, db = a.read(i), b.read(i)
            assert np.array_equal(da["image"], px["image"]) and np.array_equal(db["image"], px["image"])
            assert np.array_equal(da["superpixels"], db["superpixels"])


@pytest.mark.parametrize("early_sync_bytes", [1, 1 << 40])
def test_shard_builder_streams_slices_and_shows_nothing_before_its_commit(tmp_path, monkeypatch, early_sync_bytes):
    # The engine adds slices as they complete; until ``end_shard`` the shard exists only under a temporary name,
    # the datasets grow past the announced capacity and shrink to the real count on commit. Chunks sent to the
    # disk early (after every slice, or never before the commit) change nothing in the content.
    from engine import store_shards
    monkeypatch.setattr(store_shards, "EARLY_SYNC_BYTES", early_sync_bytes)
    codec = Codec.parse("maps-gzip-1")
    w = StoreWriter.open(tmp_path / "s.h5", SETTINGS, codec, SHAPE, "rev1")
    builder = w.begin_shard(0, 0, capacity=2)
    expected = []
    for z in range(3):
        res, px = make_slice(codec, "1", z)
        builder.add(res)
        expected.append(px)
    assert not (parts_dir(tmp_path / "s.h5") / shard_name(0)).exists() and builder.tmp.exists()
    info = w.end_shard(builder, {"ref1": row("1", 3)}, [])
    assert info.n == 3 and not builder.tmp.exists()
    w.finish(complete=True)
    with StoreReader(tmp_path / "s.h5") as r:
        assert r.n_slices == 3
        for i, px in enumerate(expected):
            got = r.read(i)
            assert np.array_equal(got["image"], px["image"]) and np.array_equal(got["superpixels"], px["superpixels"])
    with pytest.raises(StoreError, match="does not follow"):
        StoreWriter.open(tmp_path / "t.h5", SETTINGS, codec, SHAPE, "rev1").begin_shard(1, 0, capacity=2)


def _shard_contents(path):
    with h5py.File(path, "r") as f:
        out = {k: v for k, v in f.attrs.items() if k != "created"}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_prepared_shard_holds_what_an_unprepared_one_holds(tmp_path):
    # The engine writes a closed batch's volumes, failures and attributes while its last slices are computed
    # (``prepare``); the committed shard must not differ from one written all at its commit.
    codec = Codec.parse("maps-gzip-1")
    shards = []
    for name, prepare in (("a.h5", False), ("b.h5", True)):
        w = StoreWriter.open(tmp_path / name, SETTINGS, codec, SHAPE, "rev1")
        builder = w.begin_shard(0, 0, capacity=8)
        volumes, failures = {"ref1": row("1", 3)}, [{"ref": "bad", "path": "bad.nii", "reason": "truncated"}]
        for z in range(3):
            builder.add(make_slice(codec, "1", z)[0])
            if prepare and z == 0:
                builder.prepare(volumes, failures, 3)
        w.end_shard(builder, volumes, failures)
        w.finish(complete=True)
        shards.append(_shard_contents(parts_dir(tmp_path / name) / shard_name(0)))
    a, b = shards
    assert a.keys() == b.keys() and "volumes/id" in a and "failures" in a
    for key in a:
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


def test_prepared_slice_count_must_match_the_commit(tmp_path):
    codec = Codec.parse("maps-gzip-1")
    w = StoreWriter.open(tmp_path / "s.h5", SETTINGS, codec, SHAPE, "rev1")
    builder = w.begin_shard(0, 0, capacity=4)
    builder.add(make_slice(codec, "1", 0)[0])
    builder.prepare({"ref1": row("1", 3)}, [], 2)
    with pytest.raises(StoreError, match="prepared for 2 slices, committed with 1"):
        w.end_shard(builder, {"ref1": row("1", 3)}, [])
    assert not builder.tmp.exists() and not (parts_dir(tmp_path / "s.h5") / shard_name(0)).exists()


def test_early_syncs_run_beside_the_writer_and_their_errors_reach_the_commit(tmp_path, monkeypatch):
    # The writer hands the early fdatasync to the store's sync thread and goes on writing; an error of that
    # sync (a failing disk) is raised by the commit, which then leaves no temporary shard behind.
    import threading

    from engine import store_shards
    monkeypatch.setattr(store_shards, "EARLY_SYNC_BYTES", 1)
    synced_in = []
    real = os.fdatasync

    def recording(fd):
        synced_in.append(threading.current_thread().name)
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", recording)
    codec = Codec.parse("maps-gzip-1")
    w = StoreWriter.open(tmp_path / "s.h5", SETTINGS, codec, SHAPE, "rev1")
    builder = w.begin_shard(0, 0, capacity=2)
    for z in range(2):
        builder.add(make_slice(codec, "1", z)[0])
    info = w.end_shard(builder, {"ref1": row("1", 2)}, [])
    assert info.n == 2 and synced_in and all(n.startswith("engine-syncer") for n in synced_in)

    def failing(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    builder = w.begin_shard(1, 2, capacity=2)
    builder.add(make_slice(codec, "1", 2)[0])
    with pytest.raises(OSError, match="Input/output error"):
        w.end_shard(builder, {"ref1": row("1", 3)}, [])
    assert not builder.tmp.exists() and len(w.shards) == 1
    w.abort()


def test_discarded_shard_builder_leaves_no_file(tmp_path):
    codec = Codec.parse("none")
    w = StoreWriter.open(tmp_path / "s.h5", SETTINGS, codec, SHAPE, "rev1")
    builder = w.begin_shard(0, 0, capacity=4)
    builder.add(make_slice(codec, "1", 0)[0])
    builder.discard()
    assert not [p for p in parts_dir(tmp_path / "s.h5").iterdir() if p.suffix == ".h5" or ".tmp" in p.name]
    assert w.shards == []
    w.abort()


def test_organ_bits_kernel_follows_the_store_rule():
    from engine._mask_kernels import organ_bits_kernel
    from engine.store import slice_organ_bits
    rng = np.random.default_rng(3)
    label = rng.choice(np.array([0, 1, 2, 5, 63, 64, 200, 255], np.uint8), size=(6, 9, 7), p=[.6] + [.4 / 7] * 7)
    label[2] = 0
    out = np.zeros(6, np.uint64)
    organ_bits_kernel(label, out)
    assert out.tolist() == [slice_organ_bits(label[z]) for z in range(6)]
    assert out[2] == 0 and all(int(b) & 1 == 0 for b in out)


def test_error_text_is_one_line_in_the_systems_words():
    from engine.store import error_text
    hdf5 = OSError(28, "Can't write unprocessed chunk data (file write failed: time = Fri Nov 27 00:18:14 2026\n"
                       ", filename = 'x.h5', errno = 28, error message = 'No space left on device', buf = 0x5638)")
    assert error_text(hdf5) == "No space left on device (errno 28)"
    assert error_text(PermissionError(13, "Permission denied", "/data/s.h5")) == \
        "Permission denied (errno 13): /data/s.h5"
    assert error_text(OSError("Unable to synchronously open file\n(file signature not found)")) == \
        "Unable to synchronously open file (file signature not found)"
    assert error_text(RuntimeError("Disable slist on flush dest failure failed (file write failed: errno = 28,\n"
                                   "error message = 'No space left on device')")) \
        == "No space left on device (errno 28)"
    assert error_text(KeyError("volumes")) == "'volumes'"
    assert error_text(OSError()) == "OSError"


def test_a_shard_leaves_the_page_cache_after_its_commit_not_before(tmp_path, monkeypatch):
    # Dropping pages after each early sync made HDF5's close read back every partial page of metadata it
    # rewrote (inside the commit the workers wait for); the drop now follows the commit's fsync, in the sync
    # thread, which then closes the descriptor.
    import threading

    from engine import store_shards
    monkeypatch.setattr(store_shards, "EARLY_SYNC_BYTES", 1)
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(store_shards, "_drop_cached", lambda fd: events.append(
        ("drop", threading.current_thread().name, os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), fd)))
    codec = Codec.parse("maps-gzip-1")
    w = StoreWriter.open(tmp_path / "s.h5", SETTINGS, codec, SHAPE, "rev1")
    builder = w.begin_shard(0, 0, capacity=2)
    for z in range(2):
        builder.add(make_slice(codec, "1", z)[0])
    assert not [e for e in events if e != "fsync"]            # early syncs (one per slice here) drop nothing
    w.end_shard(builder, {"ref1": row("1", 2)}, [])
    store_shards._in_sync_thread(lambda fd: None, -1).result()    # the sync thread's jobs run in order
    drops = [e for e in events if e != "fsync"]
    assert len(drops) == 1 and drops[0][1].startswith("engine-syncer")
    # the tmp file's descriptor, renamed by now: the committed shard's pages; fsync came first
    assert drops[0][2] in (shard_name(0), builder.tmp.name) and events.index(drops[0]) > events.index("fsync")
    with pytest.raises(OSError):
        os.fstat(drops[0][3])                                  # closed by the sync thread
    w.finish(complete=True)


def test_a_shard_written_in_any_order_holds_what_one_written_in_order_holds(tmp_path):
    # The engine writes each slice as soon as it is computed: each chunk goes to its slice's index and the
    # slice table is written in position order at the commit.
    codec = Codec.parse("maps-gzip-1")
    shards = []
    for name, order in (("a.h5", [0, 1, 2, 3]), ("b.h5", [2, 0, 3, 1])):
        w = StoreWriter.open(tmp_path / name, SETTINGS, codec, SHAPE, "rev1")
        builder = w.begin_shard(0, 0, capacity=4)
        for z in order:
            builder.add(make_slice(codec, "1", z)[0], z)
        w.end_shard(builder, {"ref1": row("1", 4)}, [])
        w.finish(complete=True)
        shards.append(_shard_contents(parts_dir(tmp_path / name) / shard_name(0)))
    a, b = shards
    assert a.keys() == b.keys() and "slices/z" in a
    for key in a:
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
    assert list(a["slices/z"]) == [0, 1, 2, 3]


def test_a_shard_refuses_a_slice_position_twice_and_a_gap_at_its_commit(tmp_path):
    codec = Codec.parse("maps-gzip-1")
    w = StoreWriter.open(tmp_path / "s.h5", SETTINGS, codec, SHAPE, "rev1")
    builder = w.begin_shard(0, 0, capacity=4)
    builder.add(make_slice(codec, "1", 0)[0], 0)
    with pytest.raises(StoreError, match="slice position 0 written twice"):
        builder.add(make_slice(codec, "1", 0)[0], 0)
    builder.add(make_slice(codec, "1", 2)[0], 2)          # two slices added, position 1 never written
    with pytest.raises(StoreError, match="1 slice position.s. not written, the first 1"):
        w.end_shard(builder, {"ref1": row("1", 3)}, [])
    assert not builder.tmp.exists() and not (parts_dir(tmp_path / "s.h5") / shard_name(0)).exists()
    w.abort()
