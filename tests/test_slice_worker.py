"""compute_slice: the one GIL-free call per slice (body mask, SLIC, the label maps' streams) against the general
path of separate calls, which it must match chunk for chunk."""
import time
import zlib

import numpy as np
import pytest
from numba import njit

from engine import _slice_kernels, slice_worker
from engine.config import PrepareConfig, SuperpixelConfig
from engine.phantom import make_volume
from engine.prepare import prepare_volume
from engine.store_codec import Codec

THR = PrepareConfig().fg_threshold
CODEC = Codec.parse("maps-gzip-1")
ZERO_LABEL = CODEC.encode("label", np.zeros((256, 256), np.uint8))


@pytest.fixture
def general_path(monkeypatch):
    """Switch compute_slice to its general path (one call per step)."""
    def use():
        monkeypatch.setattr(slice_worker, "_one_call_args", lambda *a: None)
    return use


def phantom_slices(n=6):
    prep = prepare_volume(make_volume(0, n_slices=24), PrepareConfig())
    for z in np.linspace(0, prep.raw.shape[2] - 1, n).astype(int):
        yield (np.ascontiguousarray(prep.raw[:, :, z]), np.ascontiguousarray(prep.image[:, :, z]),
               np.ascontiguousarray(prep.label[:, :, z]))


def decoded(chunks):
    return {k: (zlib.decompress(bytes(v)) if k != "image" else np.asarray(v).tobytes()) for k, v in chunks.items()}


def both_paths(raw, image, label, general_path, cfg=None, codec=CODEC):
    cfg = cfg or SuperpixelConfig()
    one = slice_worker.compute_slice(raw, image, label, THR, cfg, codec, ZERO_LABEL)
    general_path()
    general = slice_worker.compute_slice(raw, image, label, THR, cfg, codec, ZERO_LABEL)
    return one, general


@pytest.mark.parametrize("with_label", [True, False])
def test_one_call_gives_the_chunks_of_the_general_path(general_path, monkeypatch, with_label):
    assert _slice_kernels.AVAILABLE
    for raw, image, label in phantom_slices():
        (c1, n1, s1), (c2, n2, s2) = both_paths(raw, image, label if with_label else None, general_path)
        monkeypatch.undo()
        assert n1 == n2 > 0
        assert decoded(c1) == decoded(c2)
        assert set(s1) == set(s2) == {"mask", "superpixels", "encode"}
        if not with_label:
            assert c1["label"] is ZERO_LABEL


def test_one_call_on_chaos_slices(chaos_dir, general_path, monkeypatch):
    from engine.sources import open_source
    src = open_source(str(chaos_dir))
    ref = src.refs()[0]
    prep = prepare_volume(src.load(ref), PrepareConfig())
    for z in range(0, prep.raw.shape[2], 7):
        raw, image = np.ascontiguousarray(prep.raw[:, :, z]), np.ascontiguousarray(prep.image[:, :, z])
        label = np.ascontiguousarray(prep.label[:, :, z])
        (c1, n1, _), (c2, n2, _) = both_paths(raw, image, label, general_path)
        monkeypatch.undo()
        assert n1 == n2 and decoded(c1) == decoded(c2)


def test_the_general_path_takes_other_settings_and_inputs():
    raw, image, label = next(phantom_slices(1))
    assert slice_worker._one_call_args(raw, label, SuperpixelConfig(), CODEC) is not None
    smoothed = SuperpixelConfig()
    smoothed.slic.sigma = 1.0
    assert slice_worker._one_call_args(raw, label, smoothed, CODEC) is None
    assert slice_worker._one_call_args(raw, label, SuperpixelConfig(method="felzenszwalb"), CODEC) is None
    assert slice_worker._one_call_args(raw, label, SuperpixelConfig(), Codec.parse("gzip-3")) is None
    assert slice_worker._one_call_args(raw.astype(np.float64), label, SuperpixelConfig(), CODEC) is None
    assert slice_worker._one_call_args(raw, label.astype(np.int32), SuperpixelConfig(), CODEC) is None
    # gzip-1 deflates the image too: the one call still makes the maps, the image goes through ISA-L / zlib
    gz = Codec.parse("gzip-1")
    assert slice_worker._one_call_args(raw, label, SuperpixelConfig(), gz) is not None
    chunks, n, _ = slice_worker.compute_slice(raw, image, label, THR, SuperpixelConfig(), gz, ZERO_LABEL)
    assert np.frombuffer(zlib.decompress(bytes(chunks["image"])), np.float32).reshape(256, 256).tolist() == \
        image.tolist()


def test_a_label_that_does_not_compress_falls_back_to_the_general_deflate():
    raw, image, _ = next(phantom_slices(1))
    noise = np.random.default_rng(0).integers(0, 256, raw.shape).astype(np.uint8)
    chunks, _, _ = slice_worker.compute_slice(raw, image, noise, THR, SuperpixelConfig(), CODEC, ZERO_LABEL)
    assert zlib.decompress(bytes(chunks["label"])) == noise.tobytes()


def test_one_call_errors_are_the_general_paths(general_path, monkeypatch):
    raw, image, label = next(phantom_slices(1))
    for value, words in ((np.nan, "NaN values"), (np.inf, "infinite values")):
        bad = raw.copy()
        bad[128, 128] = value                  # inside the body (a NaN pixel there is a hole, filled)
        for path in ("one call", "general"):
            if path == "general":
                general_path()
            with pytest.raises(ValueError, match=f"slic: image contains {words} inside the mask"):
                slice_worker.compute_slice(bad, image, label, THR, SuperpixelConfig(), CODEC, ZERO_LABEL)
        monkeypatch.undo()
    monkeypatch.setattr(slice_worker, "MAX_SUPERPIXEL_ID", 5)  # a real slice then has too many for the store
    for path in ("one call", "general"):
        if path == "general":
            general_path()
        with pytest.raises(ValueError, match=r"\d+ superpixels in one slice; the store's uint16 ids allow 5"):
            slice_worker.compute_slice(raw, image, label, THR, SuperpixelConfig(), CODEC, ZERO_LABEL)


def test_stage_times_come_from_the_monotonic_clock():
    @njit
    def clock():
        return _slice_kernels._monotonic_ns()

    clock()
    t0 = time.perf_counter_ns()
    t = clock()
    t1 = time.perf_counter_ns()
    assert t0 <= t <= t1                       # the clock of time.perf_counter
    raw, image, label = next(phantom_slices(1))
    t0 = time.perf_counter()
    _, _, stages = slice_worker.compute_slice(raw, image, label, THR, SuperpixelConfig(), CODEC, ZERO_LABEL)
    wall = time.perf_counter() - t0
    assert stages["mask"] > 0 and stages["superpixels"] > 0 and stages["encode"] > 0
    assert sum(stages.values()) <= wall


def phantom_volume(n=8):
    """A prepared phantom volume as the engine's worker threads hold it: (Z, H, W) C-contiguous arrays."""
    prep = prepare_volume(make_volume(0, n_slices=n), PrepareConfig())
    return tuple(np.ascontiguousarray(np.moveaxis(a, 2, 0)) for a in (prep.raw, prep.image, prep.label))


@pytest.mark.parametrize("with_label", [True, False])
def test_a_run_of_slices_gives_each_slice_the_chunks_of_compute_slice(with_label):
    raw3, image3, label3 = phantom_volume()
    label3 = label3 if with_label else None
    zs = [5, 0, 1, 2, 7]                               # any slices of the volume, in the order asked
    t0 = time.perf_counter()
    run = slice_worker.compute_run(raw3, image3, label3, zs, THR, SuperpixelConfig(), CODEC, ZERO_LABEL)
    wall = time.perf_counter() - t0
    assert len(run) == len(zs)
    for z, (chunks, n, stages) in zip(zs, run):
        one, n1, _ = slice_worker.compute_slice(raw3[z], image3[z], None if label3 is None else label3[z], THR,
                                                SuperpixelConfig(), CODEC, ZERO_LABEL)
        assert n == n1 and decoded(chunks) == decoded(one)
        assert set(stages) == {"mask", "superpixels", "encode"} and min(stages.values()) > 0
        if not with_label:
            assert chunks["label"] is ZERO_LABEL
    # each slice's steps from the kernel's clock, the rest of the call shared out: together the call's time
    assert sum(sum(st.values()) for _, _, st in run) <= wall


def test_a_failing_slice_of_a_run_is_named_with_the_slices_done_before_it():
    raw3, image3, label3 = phantom_volume()
    raw3 = raw3.copy()
    raw3[3, 128, 128] = np.inf                         # inside the body of slice 3
    with pytest.raises(slice_worker.RunSliceError) as err:
        slice_worker.compute_run(raw3, image3, label3, [1, 2, 3, 4], THR, SuperpixelConfig(), CODEC, ZERO_LABEL)
    assert err.value.index == 2 and str(err.value) == "slic: image contains infinite values inside the mask"
    assert isinstance(err.value.error, ValueError)
    done = err.value.done
    assert len(done) == 2
    for z, (chunks, n, stages) in zip((1, 2), done):
        assert set(stages) == {"mask", "superpixels", "encode"} and min(stages.values()) > 0
        one, n1, _ = slice_worker.compute_slice(raw3[z], image3[z], label3[z], THR, SuperpixelConfig(), CODEC,
                                                ZERO_LABEL)
        assert n == n1 and decoded(chunks) == decoded(one)


def test_a_run_needs_what_the_one_call_needs_else_none():
    raw3, image3, label3 = phantom_volume(4)
    args = (THR, SuperpixelConfig(), CODEC, ZERO_LABEL)
    assert slice_worker.compute_run(raw3, image3, label3, [0, 1], *args) is not None
    strided = np.zeros((4, 256, 512), np.float32)[:, :, ::2]
    assert slice_worker.compute_run(strided, image3, label3, [0, 1], *args) is None
    assert slice_worker.compute_run(raw3.astype(np.float64), image3, label3, [0, 1], *args) is None
    assert slice_worker.compute_run(raw3, image3, label3.astype(np.int32), [0, 1], *args) is None
    smoothed = SuperpixelConfig()
    smoothed.slic.sigma = 1.0
    assert slice_worker.compute_run(raw3, image3, label3, [0, 1], THR, smoothed, CODEC, ZERO_LABEL) is None


def test_one_call_kernel_cache_follows_the_files_it_calls():
    # numba keys a cached function on its own file; the one-call kernel has SLIC, the body mask and the encoder
    # compiled in, so its cache must also go stale when one of their files changes
    import hashlib
    from pathlib import Path

    from engine import _deflate_kernels, _kernels, _mask_kernels
    assert _slice_kernels.CACHE_FOLLOWS_CALLEES
    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (_deflate_kernels, _kernels, _mask_kernels)))
    for kernel in (_slice_kernels.mask_slic_deflate, _slice_kernels.mask_slic_deflate_run):
        assert kernel._cache._cache_file._source_stamp[1] == digest.hexdigest()


PROBE = """
import sys
import numpy as np
from engine._slice_kernels import mask_slic_deflate
from engine.config import SuperpixelConfig
from engine.map_deflate import layout
from engine.slice_worker import warm_slice
from engine.superpixels import engine_slic_args
raw = warm_slice(32, 50.0001)
h, w = raw.shape
_, _, caps, starts = layout((((h, w), 2), ((h, w), 1), ((h, w), 1)))
out = np.zeros(int(starts[-1] + caps[-1]), np.uint8)
mask_slic_deflate(raw, np.float32(50.0001), *engine_slic_args(raw, SuperpixelConfig()), np.zeros((0, 0), np.uint8),
                  np.empty((h, w), np.bool_), np.empty(h * w, np.int32), np.empty(h * w, np.uint16), out, caps,
                  np.empty(3, np.int64), np.zeros(3, np.int64))
print(out[:2].tobytes().hex())
"""


@pytest.mark.slow
def test_an_edit_of_a_called_kernel_reaches_the_cached_one_call_kernel(tmp_path):
    """In a copy of the engine with its own numba cache: the one-call kernel, cached, runs the edited encoder."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(slice_worker.__file__).resolve().parent.parent
    shutil.copytree(root / "engine", tmp_path / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))

    def header():
        return subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert header() == "7801" and header() == "7801"       # compiled, then from the cache
    src = tmp_path / "engine" / "_deflate_kernels.py"
    text = src.read_text()
    assert "    out[1] = 0x01 " in text
    src.write_text(text.replace("    out[1] = 0x01 ", "    out[1] = 0x9C "))   # another valid zlib header
    assert header() == "789c"
