"""The map encoder: standard zlib streams of label-like maps (engine.map_deflate)."""
import zlib

import h5py
import numpy as np
import pytest

from engine._deflate_kernels import MAX_DISTANCE, adler32
from engine.map_deflate import deflate_map, deflate_maps, stream_capacity
from engine.store_codec import Codec


def roundtrip(arr):
    stream = deflate_map(arr)
    assert stream is not None
    assert zlib.decompress(stream.tobytes()) == arr.tobytes()
    return stream


def blocks(shape, n_values, dtype, seed=0):
    """A piecewise-constant map: random values on a grid of rectangles (what superpixels look like)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    cells = rng.integers(0, n_values, ((h + 6) // 7, (w + 10) // 11))
    return np.ascontiguousarray(np.repeat(np.repeat(cells, 7, axis=0), 11, axis=1)[:h, :w].astype(dtype))


def test_one_zero_byte_is_the_stream_zlib_writes():
    # a literal 0 in a fixed-Huffman block, then the Adler-32 of b"\0": zlib's own level-1 output
    assert deflate_map(np.zeros((1, 1), np.uint8)).tobytes() == zlib.compress(b"\0", 1)


def test_a_run_becomes_a_match_at_distance_one():
    # header 78 01; bits: BFINAL 1, BTYPE 01, literal 0 (00110000), length 3 (symbol 257: 0000001),
    # distance 1 (code 00000), end of block (0000000) -> 63 00 02 00; Adler-32 of four zero bytes: 00 04 00 01
    assert deflate_map(np.zeros((1, 4), np.uint8)).tobytes() == bytes.fromhex("7801630002000004 0001".replace(" ", ""))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.bool_])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (3, 7), (64, 64), (256, 256), (5, 300)])
def test_maps_of_any_content_come_back_exactly(dtype, shape):
    for arr in (np.zeros(shape, dtype), blocks(shape, 2 if dtype == np.bool_ else 40, dtype),
                np.ones(shape, dtype)):
        roundtrip(arr)


def test_noise_that_does_not_compress_is_left_to_the_caller():
    noise = np.random.default_rng(1).integers(0, 65535, (256, 256)).astype(np.uint16)
    assert deflate_map(noise) is None
    # a little noise still fits: random bytes cost at most 9 bits each, below raw size + margin only when small
    small = np.random.default_rng(2).integers(0, 255, (2, 8)).astype(np.uint8)
    assert deflate_map(small) is not None and zlib.decompress(deflate_map(small).tobytes()) == small.tobytes()


def test_long_runs_vertical_copies_and_the_widest_rows():
    roundtrip(np.full((300, 300), 7, np.uint16))                     # runs far beyond 258 bytes
    stripes = np.tile(np.arange(256, dtype=np.uint8) // 3, (50, 1))   # every row repeats the row above
    first_row = roundtrip(np.ascontiguousarray(stripes[:1])).size
    assert roundtrip(np.ascontiguousarray(stripes)).size < first_row + 49 * 4       # each repeat: one match
    roundtrip(blocks((3, MAX_DISTANCE // 2), 5, np.uint16))           # a row of exactly 32 kB


def test_label_like_maps_compress_like_zlib_level_1_or_better():
    sp = blocks((256, 256), 30, np.uint16)
    assert roundtrip(sp).size <= len(zlib.compress(sp.tobytes(), 1))


def test_adler32_matches_zlib_across_block_boundaries():
    rng = np.random.default_rng(3)
    for n in (0, 1, 5551, 5552, 5553, 100_000):
        x = rng.integers(0, 256, n).astype(np.uint8)
        assert int(adler32(x)) == zlib.adler32(x.tobytes())
    assert int(adler32(np.full(100_000, 255, np.uint8))) == zlib.adler32(b"\xff" * 100_000)


def test_deflate_maps_gives_each_map_its_stream_in_one_call():
    maps = [blocks((64, 64), 20, np.uint16), np.zeros((64, 64), np.uint8),
            np.random.default_rng(4).integers(0, 65535, (64, 64)).astype(np.uint16), blocks((8, 9), 3, np.uint8)]
    streams = deflate_maps(maps)
    assert streams[2] is None
    for arr, stream in zip(maps, streams):
        if stream is not None:
            assert stream == deflate_map(arr).tobytes()
            assert zlib.decompress(stream) == arr.tobytes()
    assert deflate_maps([]) == []


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="2D integer map"):
        deflate_map(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="2D integer map"):
        deflate_map(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="2D integer map"):
        deflate_map(np.zeros((4, 8), np.uint8)[:, ::2])                # not contiguous
    with pytest.raises(ValueError, match="rows of at most"):
        deflate_map(np.zeros((2, MAX_DISTANCE // 2 + 1), np.uint16))
    with pytest.raises(ValueError, match="out must be"):
        deflate_map(np.zeros((4, 4), np.uint8), out=np.empty(100, np.uint16))
    with pytest.raises(ValueError, match="2D integer map"):
        deflate_maps([np.zeros((4, 4), np.uint8), np.zeros(4, np.uint8)])


def test_out_buffer_is_used_and_too_small_means_none():
    arr = blocks((32, 32), 10, np.uint16)
    out = np.empty(stream_capacity(arr.nbytes), np.uint8)
    stream = deflate_map(arr, out)
    assert stream.base is out or np.shares_memory(stream, out)
    assert deflate_map(arr, np.empty(12, np.uint8)) is None
    own = deflate_map(arr)                     # without ``out``: an array of the stream's own size
    assert own.base is None and own.tobytes() == stream.tobytes()


def test_codec_maps_level_1_uses_it_and_falls_back_for_noise(tmp_path):
    codec = Codec.parse("maps-gzip-1")
    sp = blocks((64, 64), 30, np.uint16)
    noise = np.random.default_rng(5).integers(0, 65535, (64, 64)).astype(np.uint16)
    assert codec.map_fast("superpixels") and not codec.map_fast("image")
    assert not Codec.parse("maps-gzip-3").map_fast("superpixels")
    enc = codec.encode_maps({"superpixels": sp, "fg": sp > 10, "label": (sp % 3).astype(np.uint8)})
    assert bytes(enc["superpixels"]) == deflate_map(sp).tobytes()
    noisy = codec.encode_maps({"superpixels": noise})["superpixels"]
    assert np.frombuffer(zlib.decompress(bytes(noisy)), np.uint16).reshape(64, 64).tolist() == noise.tolist()
    # HDF5's deflate filter reads what it writes
    with h5py.File(tmp_path / "m.h5", "w") as f:
        d = f.create_dataset("sp", shape=(2, 64, 64), dtype=np.uint16, chunks=(1, 64, 64), compression="gzip",
                             compression_opts=1)
        d.id.write_direct_chunk((0, 0, 0), bytes(enc["superpixels"]))
        d.id.write_direct_chunk((1, 0, 0), bytes(noisy))
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert np.array_equal(f["sp"][0], sp) and np.array_equal(f["sp"][1], noise)


def test_rows_wider_than_the_window_are_encoded_without_row_matches():
    # the kernel itself never writes a distance beyond deflate's 32 kB window (the one-call path passes rows of
    # any width); the public function refuses such maps outright
    from engine._deflate_kernels import deflate_map_kernel
    arr = blocks((3, MAX_DISTANCE // 2 + 8), 4, np.uint16)
    out = np.empty(arr.nbytes + 64, np.uint8)
    n = deflate_map_kernel(arr.reshape(-1).view(np.uint8), 2, arr.shape[1] * 2, out)
    assert n > 0 and zlib.decompress(out[:n].tobytes()) == arr.tobytes()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_runs_at_deflates_match_length_limits(dtype):
    # runs of exactly 3 (the shortest match), 258 (the longest) and 259 / 516 / 517 (one match and a remainder),
    # alternating between extreme values, in a single row, a single column and a 2D map: exact round trips (the
    # kernel gets room enough for the short runs, which may not compress below the map's size)
    from engine._deflate_kernels import deflate_map_kernel
    top = np.iinfo(dtype).max
    for run in (1, 2, 3, 4, 257, 258, 259, 260, 516, 517):
        flat = np.repeat(np.array([top, 0, 144, 255, top - 1], dtype), run)
        flat = np.tile(flat, -(-600 // flat.size))[:600]
        for shape in ((1, 600), (600, 1), (3, 200)):
            arr = np.ascontiguousarray(flat.reshape(shape))
            out = np.empty(2 * arr.nbytes + 64, np.uint8)
            n = deflate_map_kernel(arr.reshape(-1).view(np.uint8), arr.itemsize, shape[1] * arr.itemsize, out)
            assert zlib.decompress(out[:n].tobytes()) == arr.tobytes()
            if run >= 258:                 # long matches, not one symbol per byte
                assert roundtrip(arr).size < arr.nbytes // 20 + 16


def test_every_literal_many_ids_and_the_worst_case_output_buffer():
    roundtrip(np.arange(256, dtype=np.uint8).reshape(16, 16))    # all 256 literals: 8- and 9-bit codes
    ids = (np.arange(64 * 64, dtype=np.uint16) * 16 + 15).reshape(64, 64)  # 4096 ids spanning 15..65535
    roundtrip(np.ascontiguousarray(np.repeat(np.repeat(ids, 2, 0), 2, 1)))
    # all 9-bit literals (bytes 144..255, never 3 equal bytes in a row or a row apart) cost 9 bits per byte: past
    # a few hundred bytes the stream exceeds stream_capacity; the encoder must give None then without writing
    # beyond the capacity, and an exact stream below it
    results = set()
    for nbytes in range(1, 600):
        arr = (144 + np.arange(nbytes) * 37 % 112).astype(np.uint8).reshape(1, nbytes)
        cap = stream_capacity(nbytes)
        out = np.full(cap + 64, 0xA5, np.uint8)
        stream = deflate_map(arr, out)
        assert (out[cap:] == 0xA5).all()
        results.add(stream is None)
        if stream is not None:
            assert zlib.decompress(stream.tobytes()) == arr.tobytes()
    assert results == {True, False}


def test_row_copies_at_exactly_the_window_distance():
    # noise rows of 32768 bytes repeated below: only matches at distance 32768 (deflate's largest) compress them
    rng = np.random.default_rng(6)
    first = rng.integers(0, 256, MAX_DISTANCE).astype(np.uint8)
    arr = np.stack([first, first, first])
    arr[2, 1000:1003] = 7                           # an edit breaks one copy in two
    assert roundtrip(arr).size < MAX_DISTANCE * 9 // 8 + 2000
    wide = rng.integers(0, 2 ** 63, (2, MAX_DISTANCE // 8), dtype=np.int64)
    wide[1] = wide[0]
    roundtrip(wide)


def test_codec_chunks_of_thin_and_odd_shapes_read_back_through_hdf5(tmp_path):
    codec = Codec.parse("maps-gzip-1")
    rng = np.random.default_rng(7)
    for shape in ((1, 1), (1, 300), (300, 1), (17, 31), (512, 512)):
        sp = blocks(shape, 65535, np.uint16, seed=shape[1])
        maps = [{"superpixels": sp, "fg": sp > 30000, "label": (sp % 5).astype(np.uint8)},
                {"superpixels": rng.integers(0, 65536, shape).astype(np.uint16),       # noise: the fallback
                 "fg": rng.integers(0, 2, shape).astype(bool), "label": rng.integers(0, 256, shape).astype(np.uint8)}]
        with h5py.File(tmp_path / "t.h5", "w") as f:
            for name in maps[0]:
                f.create_dataset(name, shape=(2,) + shape, dtype=np.uint16 if name == "superpixels" else np.uint8,
                                 chunks=(1,) + shape, **codec.dataset_kwargs(name))
            for i, m in enumerate(maps):
                for name, chunk in codec.encode_maps(m).items():
                    f[name].id.write_direct_chunk((i, 0, 0), bytes(chunk))
        with h5py.File(tmp_path / "t.h5", "r") as f:
            for i, m in enumerate(maps):
                for name, arr in m.items():
                    assert np.array_equal(f[name][i], arr.astype(f[name].dtype)), (shape, i, name)
