"""Numba kernels of ``engine.map_deflate``: zlib streams of label-like maps, without the GIL.

A superpixel, body or organ map is piecewise constant: almost every byte repeats the element to its left
or the one above it. The encoder therefore looks for LZ77 matches at exactly two distances, one element
(``e`` bytes) and one row (``row`` bytes), takes the longer (greedy), and writes literals and matches with
deflate's fixed Huffman codes (RFC 1951, block type 1) in one block, inside a zlib wrapper (RFC 1950) with
its Adler-32. Any inflater reads the result, HDF5's deflate filter included.

Match lengths are found eight bytes at a time: unaligned 64-bit loads of the two positions, and the first
differing byte from the count of trailing zero bits of their XOR (little-endian only; the public function
checks). Adler-32 runs over blocks of 5552 bytes, zlib's bound for 32-bit sums, as a plain sum and a
weighted sum that LLVM vectorises.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_JIT = dict(nogil=True, cache=True)

_LEN_BASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163,
             195, 227, 258)
_LEN_EXTRA = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0)
_DIST_BASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049,
              3073, 4097, 6145, 8193, 12289, 16385, 24577)
_DIST_EXTRA = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13)
MAX_DISTANCE = 32768
_ADLER_BLOCK = 5552
_ADLER_MOD = 65521


def _reversed(code: int, n: int) -> int:
    """Huffman codes go into the bit stream most significant bit first; the stream is filled from bit 0."""
    return int(f"{code:0{n}b}"[::-1], 2)


def _fixed_code(symbol: int) -> tuple[int, int]:
    """(code, bits) of a literal/length symbol in the fixed Huffman table (RFC 1951, 3.2.6)."""
    if symbol < 144:
        return 0x30 + symbol, 8
    if symbol < 256:
        return 0x190 + symbol - 144, 9
    if symbol < 280:
        return symbol - 256, 7
    return 0xC0 + symbol - 280, 8


def _tables() -> tuple[np.ndarray, ...]:
    """Bits (reversed code, extra bits above it) and bit counts of the literals 0..255 and of the match lengths
    3..258; per distance code its base, its extra bits and its reversed 5-bit code."""
    lit_bits, lit_n = np.zeros(256, np.uint64), np.zeros(256, np.int64)
    for v in range(256):
        code, n = _fixed_code(v)
        lit_bits[v], lit_n[v] = _reversed(code, n), n
    len_bits, len_n = np.zeros(259, np.uint64), np.zeros(259, np.int64)
    for ln in range(3, 259):
        i = max(j for j, base in enumerate(_LEN_BASE) if base <= ln)
        code, n = _fixed_code(257 + i)
        len_bits[ln], len_n[ln] = _reversed(code, n) | ((ln - _LEN_BASE[i]) << n), n + _LEN_EXTRA[i]
    dist = np.array([(base, extra, _reversed(i, 5)) for i, (base, extra) in enumerate(zip(_DIST_BASE, _DIST_EXTRA))],
                    np.int64)
    return lit_bits, lit_n, len_bits, len_n, dist


_LIT_BITS, _LIT_N, _LEN_BITS, _LEN_N, _DIST = _tables()
_ADLER_WEIGHTS = np.arange(_ADLER_BLOCK, 0, -1).astype(np.uint32)


@intrinsic
def _load_u64(typingctx, arr, idx):
    """Eight bytes of a uint8 array from byte ``idx``, at any alignment (no bounds check)."""
    sig = types.uint64(arr, idx)

    def codegen(context, builder, signature, args):
        a, i = args
        data = context.make_array(signature.args[0])(context, builder, a).data
        ptr = builder.bitcast(builder.gep(data, [i]), ir.IntType(64).as_pointer())
        value = builder.load(ptr)
        value.align = 1
        return value
    return sig, codegen


@intrinsic
def _trailing_zeros(typingctx, value):
    """Count of trailing zero bits of a non-zero uint64 (LLVM's cttz)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.cttz", [i64], ir.FunctionType(i64, [i64, ir.IntType(1)]))
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])
    return sig, codegen


@njit(**_JIT)
def _distance_code(d):
    """(bits, bit count) of match distance ``d`` (1..MAX_DISTANCE): its 5-bit code, then its extra bits."""
    i = _DIST.shape[0] - 1
    while _DIST[i, 0] > d:
        i -= 1
    return np.uint64(_DIST[i, 2] | ((d - _DIST[i, 0]) << 5)), 5 + _DIST[i, 1]


@njit(**_JIT)
def _match_length(x, o, d, cap, n):
    """How many bytes from ``o`` (at most ``cap``) equal the bytes ``d`` before them; ``o >= d``."""
    k = 0
    while k + 8 <= cap:
        diff = _load_u64(x, o + k) ^ _load_u64(x, o + k - d)
        if diff != 0:
            return k + int(_trailing_zeros(diff) >> np.uint64(3))
        k += 8
    if o + k + 8 <= n:                       # a whole word still lies inside the array: compare it at once
        diff = _load_u64(x, o + k) ^ _load_u64(x, o + k - d)
        if diff == 0:
            return cap
        return min(cap, k + int(_trailing_zeros(diff) >> np.uint64(3)))
    while k < cap and x[o + k] == x[o + k - d]:
        k += 1
    return k


@njit(**_JIT)
def adler32(x):
    """Adler-32 (RFC 1950) of the uint8 array ``x``."""
    s1 = np.uint64(1)
    s2 = np.uint64(0)
    n = x.size
    i = 0
    while i < n:
        m = min(_ADLER_BLOCK, n - i)
        block = x[i:i + m]
        weights = _ADLER_WEIGHTS[_ADLER_BLOCK - m:]     # m, m - 1, ..., 1
        a = np.uint32(0)
        b = np.uint32(0)
        for j in range(m):
            v = np.uint32(block[j])
            a += v
            b += weights[j] * v
        s2 = (s2 + np.uint64(m) * s1 + np.uint64(b)) % np.uint64(_ADLER_MOD)
        s1 = (s1 + np.uint64(a)) % np.uint64(_ADLER_MOD)
        i += m
    return np.uint32((s2 << np.uint64(16)) | s1)


@njit(**_JIT)
def deflate_map_kernel(x, e, row, out):
    """Write the zlib stream of the bytes ``x`` into ``out``; its length, or -1 when ``out`` is too small.

    ``e`` (the element size, 1..8 bytes) and ``row`` (the bytes of one row) are the two match distances
    tried; a row longer than deflate's window (``MAX_DISTANCE``), or 0, is not tried.
    """
    if row > MAX_DISTANCE:
        row = 0
    n = x.size
    if out.size < 16:
        return -1
    out[0] = 0x78                            # deflate, 32 kB window
    out[1] = 0x01                            # fastest; 0x7801 is a multiple of 31 as RFC 1950 requires
    pos = 2
    acc = np.uint64(3)                       # BFINAL = 1, BTYPE = 01 (fixed Huffman codes)
    n_bits = 3
    e_bits, e_n = _distance_code(e)
    r_bits, r_n = _distance_code(max(row, 1))
    limit = out.size - 16                    # room for one step's 4 bytes, the last bits and the Adler-32
    o = 0
    while o < n:
        if pos > limit:
            return -1
        cap = min(258, n - o)
        left = _match_length(x, o, e, cap, n) if o >= e else 0
        up = _match_length(x, o, row, cap, n) if row > 0 and o >= row and left < cap else 0
        if left >= 3 and left >= up:
            acc |= _LEN_BITS[left] << np.uint64(n_bits)
            n_bits += _LEN_N[left]
            acc |= e_bits << np.uint64(n_bits)
            n_bits += e_n
            o += left
        elif up >= 3:
            acc |= _LEN_BITS[up] << np.uint64(n_bits)
            n_bits += _LEN_N[up]
            acc |= r_bits << np.uint64(n_bits)
            n_bits += r_n
            o += up
        else:
            v = x[o]
            acc |= _LIT_BITS[v] << np.uint64(n_bits)
            n_bits += _LIT_N[v]
            o += 1
        if n_bits >= 32:                     # under 64 bits are pending (a match adds at most 31): flush 4 bytes
            for _ in range(4):
                out[pos] = np.uint8(acc & np.uint64(0xFF))
                acc >>= np.uint64(8)
                pos += 1
            n_bits -= 32
    if pos > limit:
        return -1
    n_bits += 7                              # end of block: symbol 256, seven zero bits
    while n_bits > 0:
        out[pos] = np.uint8(acc & np.uint64(0xFF))
        acc >>= np.uint64(8)
        pos += 1
        n_bits -= 8
    a = adler32(x)
    for s in range(4):
        out[pos + s] = np.uint8((a >> np.uint32(24 - 8 * s)) & np.uint32(0xFF))
    return pos + 4


@njit(**_JIT)
def deflate_maps_kernel(maps, elem, rows, caps, out, lens):
    """``deflate_map_kernel`` of each map of the tuple ``maps`` (1D uint8 views) in one call: stream i goes to
    ``out`` from ``sum(caps[:i])``, its length to ``lens[i]`` (-1: it did not fit in ``caps[i]``)."""
    off = 0
    for i in range(len(maps)):
        lens[i] = deflate_map_kernel(maps[i], elem[i], rows[i], out[off:off + caps[i]])
        off += caps[i]
