"""Shared memory of the engine's processes backend: the output ring, the volume arena, memfd volumes.

The parent never touches a volume: a worker process that loads one prepares it into an arena slot (or,
when it does not fit, a memfd whose descriptor travels over a Unix socket), the workers computing its
slices read it there, and they put each slice's encoded chunks into a ring slot, from which the parent's
writer writes them. A volume is shared as its raw intensities and labels only: the worker computing a slice
z-scores it straight into the ring slot (``prepare.zscore_slice``), which replaces the copy a z-scored volume
would need there, and takes 4 of the 9 bytes per voxel out of the shared memory (fewer first touches of
fresh shared pages, and fewer pages to free at the end). Nothing here has a name in the file system, so no
process that is killed can leak it.
"""
from __future__ import annotations

import mmap
import os
import socket
from typing import TYPE_CHECKING

import numpy as np

from engine.store_format import DATASETS, DTYPES

if TYPE_CHECKING:
    from engine.schedule import Loaded


def out_capacity(shape: tuple[int, int]) -> int:
    n = 0
    for name in DATASETS:
        nbytes = int(np.prod(shape)) * DTYPES[name].itemsize
        n += nbytes + nbytes // 1000 + 64         # above zlib's worst-case expansion (compressBound)
    return n


class Ring:
    """The shared-memory ring: one output byte area (a slice's encoded chunks) per slot. Inputs need no slot:
    workers read them where the volume lives (its arena slot or memfd)."""

    def __init__(self, buf, slots: int, shape: tuple[int, int]):
        self.slots = slots
        self.cap = out_capacity(shape)
        self.out = np.ndarray((slots, self.cap), np.uint8, buffer=buf)

    @staticmethod
    def nbytes(slots: int, shape: tuple[int, int]) -> int:
        return slots * out_capacity(shape)


class VolumeArena:
    """Slots for prepared volumes in anonymous shared memory, mapped before the workers are forked.

    A worker that loads a volume prepares it into the slot the parent gave it, and the workers computing its
    slices read it there; the parent frees the slot once all of them are computed. Fresh shared pages cost
    ~0.5 ms of page faults per CHAOS slice (a new memfd per volume measured 18 ms per volume), reused ones
    nothing. A volume larger than a slot goes through its own memfd (``VolumeBuffers``).
    """

    def __init__(self, slots: int, capacity: int, shape: tuple[int, int]):
        self.slots, self.capacity, self.shape = slots, capacity, shape
        self.slot_bytes = volume_nbytes(capacity, shape, True)
        self.mm = mmap.mmap(-1, max(slots * self.slot_bytes, 1), flags=mmap.MAP_SHARED)

    def views(self, slot: int, n_slices: int, has_label: bool) -> tuple:
        """(raw, None, label or None) arrays (n_slices, H, W) in ``slot`` (``volume_views``)."""
        return volume_views(self.mm, slot * self.slot_bytes, n_slices, self.shape, has_label)


def volume_nbytes(n_slices: int, shape: tuple[int, int], has_label: bool) -> int:
    """Bytes of a volume laid out as ``volume_views`` reads it: float32 raw, uint8 label."""
    return n_slices * int(shape[0]) * int(shape[1]) * (5 if has_label else 4)


def volume_views(buf: mmap.mmap, offset: int, n_slices: int, shape: tuple[int, int], has_label: bool) -> tuple:
    """(raw float32, None, label uint8 or None): arrays (n_slices, H, W) one after the other in ``buf`` from
    ``offset``, the layout of a volume in an arena slot and in a memfd. The None stands for the z-scored image,
    which is made per slice (``prepare_volume``'s buffers contract)."""
    n = n_slices * shape[0] * shape[1]
    raw = np.frombuffer(buf, np.float32, n, offset).reshape((n_slices,) + tuple(shape))
    label = np.frombuffer(buf, np.uint8, n, offset + 4 * n).reshape((n_slices,) + tuple(shape)) if has_label else None
    return raw, None, label


class VolumeBuffers:
    """``prepare_volume`` buffers for a worker process that loads a volume: its arena slot, or a fresh memfd
    when there is none or the volume does not fit. A memfd has no name, so nothing can leak when a process is
    killed: its memory goes with the last descriptor or mapping."""

    def __init__(self, shape: tuple[int, int], arena: VolumeArena, slot: int):
        self.shape, self.arena, self.slot = shape, arena, slot
        self.fd = -1
        self.raw = None
        self.home: tuple = ()

    def __call__(self, n_slices: int, has_label: bool) -> tuple:
        self.close()
        if self.slot >= 0 and n_slices <= self.arena.capacity:
            out = self.arena.views(self.slot, n_slices, has_label)
            self.home = ("arena", self.slot)
        else:
            nbytes = max(volume_nbytes(n_slices, self.shape, has_label), 1)
            self.fd = os.memfd_create("engine-volume", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, nbytes)
            out = volume_views(mmap.mmap(self.fd, nbytes), 0, n_slices, self.shape, has_label)
            self.home = ("memfd",)
        self.raw = out[0]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def send_volume(vol: Loaded, bufs: VolumeBuffers, sock: socket.socket) -> tuple:
    """Hand a volume prepared into ``bufs`` to the parent (a memfd goes over ``sock``); returns the picklable
    rest of the volume and where it lives."""
    if bufs.raw is None or not np.may_share_memory(vol.raw, bufs.raw):   # a copy was made somewhere: a bug
        raise OSError("the volume was not prepared into its shared memory")
    if bufs.home[0] == "memfd":
        socket.send_fds(sock, [b"v"], [bufs.fd])
    return (vol.ref, vol.id, vol.path, tuple(vol.raw.shape), vol.label is not None, vol.row, vol.skip, vol.notes,
            vol.organs, vol.zstats, bufs.home)


def receive_fd(sock: socket.socket) -> int:
    """The parent's side of ``send_volume`` for a memfd volume: the descriptor, which goes on to the workers
    that compute the volume's slices (``map_volume``); the parent itself never touches the pixels."""
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError("a worker announced a volume but passed no descriptor")
    return fds[0]


def map_volume(sock: socket.socket, shape: tuple, has_label: bool) -> tuple:
    """A worker's view of a volume whose memfd the parent passes over ``sock``: (raw, None, label or None)."""
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if len(fds) != 1:
        raise OSError("the parent announced a volume but passed no descriptor")
    try:
        # writable like the arena's views (never written): read-only arrays would be another numba signature
        mm = mmap.mmap(fds[0], max(volume_nbytes(shape[0], shape[1:], has_label), 1))
    finally:
        os.close(fds[0])
    return volume_views(mm, 0, shape[0], shape[1:], has_label)
