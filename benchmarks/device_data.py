"""Pack a data folder small enough to travel to the device machine, and rebuild it there bit for bit.

The device tool copies the working tree and the paths named in ``carry``, 64 MiB in all. The 20 CHAOS volumes
are 54 MiB of ``.nii.gz`` and the repository ~16 MiB, so they do not fit side by side. ``xz`` of the inflated
NIfTI is a third smaller than its gzip (float64 intensities: 2.73 -> 1.81 MB for scan 1). The gzip members can
then be rebuilt exactly when they were written by zlib with default settings (level 6, mtime 0, no name),
which is how the CHAOS files were written. ``pack`` checks that for every file and keeps the original bytes
of any file it cannot rebuild, so ``unpack`` always gives back identical files; it checks each one against
the SHA-256 recorded at packing and exits non-zero naming any file that differs.

    python benchmarks/device_data.py pack ../shared/data/chaos_t2 .devdata/chaos     # here (git-ignored)
    python3 benchmarks/device_data.py unpack .devdata/chaos /tmp/chaos_t2             # on the device

Standard library only: the device image's python has no project dependencies until they are installed.
"""
from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import struct
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MANIFEST = "SHA256SUMS"
XZ_SUFFIX = ".inflated.xz"      # the gzip member's content, xz-compressed
# The 10-byte gzip header zlib/Python write with mtime 0, no file name, compression level 6 ("xfl" 0), Unix.
GZIP_HEADER = bytes.fromhex("1f8b0800000000000003")


def rebuild_gzip(data: bytes) -> bytes:
    """The gzip file that zlib's defaults make of ``data`` (header above, raw deflate level 6, CRC and size)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = c.compress(data) + c.flush()
    return GZIP_HEADER + body + struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)


def _inflate_if_rebuildable(raw: bytes) -> bytes | None:
    """The content of a one-member gzip file that ``rebuild_gzip`` reproduces exactly; else None."""
    if not raw.startswith(GZIP_HEADER):
        return None
    d = zlib.decompressobj(-15)
    try:
        data = d.decompress(raw[len(GZIP_HEADER):]) + d.flush()
    except zlib.error:
        return None
    if len(d.unused_data) != 8 or rebuild_gzip(data) != raw:
        return None
    return data


def _pack_one(args: tuple[str, str, int]) -> tuple[str, str, str]:
    src, dst, preset = args
    raw = Path(src).read_bytes()
    name = os.path.basename(src)
    data = _inflate_if_rebuildable(raw)
    if data is not None:
        Path(dst, name + XZ_SUFFIX).write_bytes(lzma.compress(data, preset=preset))
        kind = "xz"
    else:
        Path(dst, name).write_bytes(raw)
        kind = "copy"
    return name, hashlib.sha256(raw).hexdigest(), kind


def _unpack_one(args: tuple[str, str, str, str]) -> tuple[str, bool]:
    src, dst, name, digest = args
    packed = Path(src, name + XZ_SUFFIX)
    try:
        raw = rebuild_gzip(lzma.decompress(packed.read_bytes())) if packed.exists() else Path(src, name).read_bytes()
    except (OSError, lzma.LZMAError):            # missing or damaged: reported with the mismatches
        return name, False
    Path(dst, name).write_bytes(raw)
    return name, hashlib.sha256(raw).hexdigest() == digest


def pack(src: str | Path, dst: str | Path, jobs: int = 2, preset: int = 6) -> dict[str, int]:
    """Pack every file of folder ``src`` into ``dst`` (created) with a manifest; counts of xz'd and copied files."""
    src, dst = Path(src), Path(dst)
    files = sorted(p for p in src.iterdir() if p.is_file())
    if not files:
        raise ValueError(f"{src}: no files to pack")
    dst.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max(1, jobs)) as ex:
        done = list(ex.map(_pack_one, [(str(p), str(dst), preset) for p in files]))
    (dst / MANIFEST).write_text("".join(f"{digest}  {name}\n" for name, digest, _ in done))
    return {"xz": sum(k == "xz" for *_, k in done), "copy": sum(k == "copy" for *_, k in done)}


def unpack(src: str | Path, dst: str | Path, jobs: int = 16) -> list[str]:
    """Rebuild the files packed in ``src`` into ``dst`` (created); the names that could not be rebuilt or whose
    SHA-256 differs."""
    src, dst = Path(src), Path(dst)
    manifest = src / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{manifest}: not found (not a folder made by 'device_data.py pack')")
    entries = [line.split(None, 1) for line in manifest.read_text().splitlines() if line.strip()]
    dst.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max(1, jobs)) as ex:
        done = list(ex.map(_unpack_one, [(str(src), str(dst), name, digest) for digest, name in entries]))
    return [name for name, ok in done if not ok]


def positive_int(text: str) -> int:
    """argparse type for --jobs (this script runs on the device's bare Python: no benchmarks.common there)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack SRC folder into DST")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1)
    u = sub.add_parser("unpack", help="rebuild the files packed in SRC into DST")
    u.add_argument("src")
    u.add_argument("dst")
    u.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            n = pack(args.src, args.dst, args.jobs)
            print(f"packed {n['xz'] + n['copy']} files into {args.dst} ({n['xz']} as xz, {n['copy']} copied)")
            return 0
        bad = unpack(args.src, args.dst, args.jobs)
    except (OSError, ValueError) as exc:
        print(f"device_data: {exc}", file=sys.stderr)
        return 1
    if bad:
        print(f"device_data: {len(bad)} file(s) missing, damaged or not identical to the packed originals: "
              f"{', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"unpacked into {args.dst}: every file matches its SHA-256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
