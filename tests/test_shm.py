"""The processes backend's shared volumes (engine.shm), without the engine: arena slots and memfds."""
from __future__ import annotations

import os
import socket
import types

import numpy as np
import pytest

from engine.shm import VolumeArena, VolumeBuffers, map_volume, receive_fd, send_volume

SHAPE = (8, 6)


def fill(bufs: VolumeBuffers, n: int, labelled: bool) -> types.SimpleNamespace:
    raw, image, label = bufs(n, labelled)
    assert image is None                                            # workers z-score each slice themselves
    raw[...] = np.arange(raw.size, dtype=np.float32).reshape(raw.shape)
    if labelled:
        label[...] = np.arange(label.size).reshape(label.shape) % 5
    return types.SimpleNamespace(ref="r", id="1", path="p", raw=raw, image=None, label=label, row={}, skip=set(),
                                 notes=[], organs=np.zeros(n, np.uint64), zstats=(np.float32(2), np.float32(4)))


def test_a_volume_that_fits_stays_in_its_arena_slot():
    arena = VolumeArena(slots=2, capacity=4, shape=SHAPE)
    a, b = socket.socketpair()
    try:
        bufs = VolumeBuffers(SHAPE, arena, slot=1)
        vol = fill(bufs, 3, True)
        meta = send_volume(vol, bufs, a)
        assert meta[-1] == ("arena", 1) and bufs.fd == -1 and meta[-2] == (2, 4)
        raw, image, label = arena.views(1, 3, True)                 # what a worker that computes slices sees
        assert np.array_equal(raw, vol.raw) and image is None and np.array_equal(label, vol.label)
        # raw and label only: 5 bytes a voxel, and the next slot starts right after them
        assert arena.slot_bytes == 4 * SHAPE[0] * SHAPE[1] * 5
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("slot,labelled", [(-1, True), (0, False)])
def test_a_volume_without_a_slot_or_too_large_goes_through_a_memfd(slot, labelled):
    arena = VolumeArena(slots=1, capacity=2, shape=SHAPE)           # 5 slices never fit a 2-slice slot
    a, b = socket.socketpair()
    try:
        bufs = VolumeBuffers(SHAPE, arena, slot)
        vol = fill(bufs, 5, labelled)
        meta = send_volume(vol, bufs, a)
        bufs.close()
        assert meta[-1] == ("memfd",) and meta[3] == (5,) + SHAPE
        fd = receive_fd(b)                                          # the parent keeps the descriptor ...
        c, d = socket.socketpair()
        try:
            socket.send_fds(c, [b"v"], [fd])                        # ... and passes it on to a worker
            os.close(fd)
            raw, image, label = map_volume(d, (5,) + SHAPE, labelled)
        finally:
            c.close()
            d.close()
        assert np.array_equal(raw, vol.raw) and image is None and meta[-2] == (2, 4)
        assert (label is None) == (not labelled) and (label is None or np.array_equal(label, vol.label))
    finally:
        a.close()
        b.close()


def test_a_volume_prepared_elsewhere_is_refused():
    arena = VolumeArena(slots=1, capacity=4, shape=SHAPE)
    bufs = VolumeBuffers(SHAPE, arena, 0)
    vol = fill(bufs, 2, False)
    vol.raw = vol.raw.copy()                                        # a copy the other processes cannot see
    a, b = socket.socketpair()
    try:
        with pytest.raises(OSError, match="not prepared into its shared memory"):
            send_volume(vol, bufs, a)
    finally:
        a.close()
        b.close()
