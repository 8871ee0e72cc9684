"""What a worker does: one slice (body mask, pseudo-labels, chunk encoding), and the body of a worker process.

``compute_slice`` is the same code for both backends; ``process_worker`` wraps it for the ``processes``
backend (messages in over a pipe, chunks out into a shared-memory ring), and ``load_in_worker`` loads a volume
into the shared arena there. ``engine.pipeline`` runs them.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engine._mask_kernels import organ_bits_kernel
from engine.prepare import body_mask, zscore_slice
from engine.schedule import Failure, SourceChanged
from engine.shm import Ring, VolumeBuffers, map_volume, send_volume
from engine import _slice_kernels
from engine._slice_kernels import mask_slic_deflate, mask_slic_deflate_run
from engine.map_deflate import layout, scratch, streams
from engine.store_codec import Codec
from engine.store_format import DATASETS, MAP_DATASETS, MAX_SUPERPIXEL_ID
from engine.superpixels import check_slic_status, engine_slic_args, pseudolabels_u16

if TYPE_CHECKING:
    import socket
    from multiprocessing.connection import Connection

    from engine.config import SuperpixelConfig
    from engine.schedule import Loaded

# A worker process answers up to RESULT_RUN slices in one message (``("many", [answer, ...])``): each message
# wakes the parent's dispatcher, and each wake-up takes a core from a worker. It never waits for a new job
# while holding answers, so a held answer is late by at most RESULT_RUN - 1 slices' compute time.
RESULT_RUN = 3


def compute_slice(raw: np.ndarray, image: np.ndarray, label: np.ndarray | None, threshold: float,
                  sp_cfg: SuperpixelConfig, codec: Codec, zero_label: bytes | np.ndarray) -> tuple[dict, int, dict]:
    """Everything a worker does for one slice: body mask, pseudo-labels, the chunks to store.

    With the default settings (maskSLIC without smoothing, label maps deflated at level 1) it is one GIL-free
    call (``_slice_kernels.mask_slic_deflate``), so that a worker thread waits for the GIL once per slice;
    otherwise one call per step. Both give the same chunks.

    Parameters
    ----------
    raw : (H, W) float32
        Source intensities (input of the body mask and of the superpixels).
    image : (H, W) float32
        The z-scored slice that is stored.
    label : (H, W) uint8 or None
    threshold : float
        Body-mask threshold (``prepare.fg_threshold``).
    sp_cfg : SuperpixelConfig
    codec : Codec
    zero_label : encoded all-zero label chunk (stored when the volume has no labels)

    Returns
    -------
    chunks : dict name -> encoded chunk
    n_superpixels : int
    stages : dict stage -> seconds
        ``mask``, ``superpixels``, ``encode``: wall time. A thread's wait to take the GIL back after a call
        counts in the step of that call; in the one call that is the last step, ``encode``.
    """
    args = _one_call_args(raw, label, sp_cfg, codec)
    if args is not None:
        return _compute_in_one_call(raw, image, label, threshold, args, codec, zero_label)
    t0 = time.perf_counter()
    fg = body_mask(raw, threshold)
    t1 = time.perf_counter()
    sp, nsp = pseudolabels_u16(raw, fg, sp_cfg)
    t2 = time.perf_counter()
    _check_superpixel_count(nsp)
    maps = {"superpixels": sp, "fg": fg.view(np.uint8)}
    if label is not None:
        maps["label"] = label
    chunks = {"image": codec.encode("image", image), **codec.encode_maps(maps)}
    if label is None:
        chunks["label"] = zero_label
    t3 = time.perf_counter()
    return chunks, nsp, {"mask": t1 - t0, "superpixels": t2 - t1, "encode": t3 - t2}


def _check_superpixel_count(n: int) -> None:
    """Both paths of ``compute_slice``: the store's superpixel ids are uint16."""
    if n > MAX_SUPERPIXEL_ID:
        raise ValueError(f"{n} superpixels in one slice; the store's uint16 ids allow {MAX_SUPERPIXEL_ID}")


def _one_call_args(raw, label, sp_cfg, codec: Codec) -> tuple | None:
    """``masked_slic_u16``'s settings arguments when ``compute_slice`` can run in one GIL-free call
    (``_slice_kernels.mask_slic_deflate``): maskSLIC without smoothing on a float32 slice, the label maps
    deflated at level 1, a uint8 label or none, a platform whose clock the compiled code reads."""
    if not (_slice_kernels.AVAILABLE and all(codec.map_fast(name) for name in MAP_DATASETS)):
        return None
    if label is not None and not (isinstance(label, np.ndarray) and label.dtype == np.uint8
                                  and label.shape == getattr(raw, "shape", None) and label.flags.c_contiguous):
        return None
    return engine_slic_args(raw, sp_cfg)


_NO_LABEL = np.zeros((0, 0), np.uint8)


def _compute_in_one_call(raw, image, label, threshold, args, codec: Codec, zero_label) -> tuple[dict, int, dict]:
    """``compute_slice`` as one GIL-free call for the body mask, SLIC and the label maps' streams (the image's
    chunk is the z-scored slice itself, or deflated here for ``gzip-N``). Stage times: the kernel's own clock
    for the mask and SLIC; ``encode`` is the rest, the streams, the image chunk and the return to Python."""
    t0 = time.perf_counter()
    h, w = raw.shape
    fg = np.empty((h, w), np.bool_)
    sp16 = np.empty(h * w, np.uint16)
    caps, starts, size = _map_streams_layout(h, w)
    out = scratch(size)
    lens = np.empty(3, np.int64)
    times = np.zeros(3, np.int64)
    n, status = mask_slic_deflate(raw, np.float32(threshold), *args, _NO_LABEL if label is None else label, fg,
                                  np.empty(h * w, np.int32), sp16, out, caps, lens, times)
    check_slic_status(status)
    _check_superpixel_count(n)
    chunks = _one_call_chunks(codec, zero_label, image, (sp16.reshape(h, w), fg.view(np.uint8), label),
                              streams(out, starts, lens))
    mask_s, sp_s = float(times[0]) * 1e-9, float(times[1]) * 1e-9
    return chunks, int(n), {"mask": mask_s, "superpixels": sp_s, "encode": time.perf_counter() - t0 - mask_s - sp_s}


def _map_streams_layout(h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Capacities and offsets of the one call's three streams (superpixels uint16, mask, label) for an h x w
    slice, and the bytes they take together."""
    _, _, caps, starts = layout((((h, w), 2), ((h, w), 1), ((h, w), 1)))
    return caps, starts, int(starts[-1] + caps[-1])


def _one_call_chunks(codec: Codec, zero_label, image, maps: tuple, map_streams: list) -> dict:
    """A slice's chunks from the one call: the image's, and per map (superpixels, mask, label) its stream; no
    label: the all-zero label's chunk; no stream (a map that did not compress below its size, noise): the map
    deflated the general way."""
    chunks = {"image": codec.encode("image", image)}
    for name, arr, stream in zip(MAP_DATASETS, maps, map_streams):
        if arr is None:
            chunks[name] = zero_label
        else:
            chunks[name] = stream if stream is not None else codec.general_deflate(name, arr)
    return chunks


class RunSliceError(Exception):
    """Slice ``index`` of a run (``compute_run``) failed with ``error``; the slices before it are done."""

    def __init__(self, index: int, error: Exception, done: list):
        super().__init__(str(error))
        self.index, self.error, self.done = index, error, done


def compute_run(raw3: np.ndarray, image3: np.ndarray, label3: np.ndarray | None, zs: list[int], threshold: float,
                sp_cfg: SuperpixelConfig, codec: Codec, zero_label: bytes | np.ndarray
                ) -> list[tuple[dict, int, dict]] | None:
    """``compute_slice`` for the slices ``zs`` of one volume in one GIL-free call, or None where that call does
    not apply (then each slice goes through ``compute_slice``).

    A worker thread takes the GIL back once per call: on many threads that wait is the largest cost after the
    slice itself (``_slice_kernels.mask_slic_deflate_run``).

    Parameters
    ----------
    raw3, image3 : (Z, H, W) float32, C-contiguous
        The volume's source intensities and its z-scored image.
    label3 : (Z, H, W) uint8, C-contiguous, or None
    zs : the slices, in the order their results are wanted
    threshold, sp_cfg, codec, zero_label : as for ``compute_slice``

    Returns
    -------
    list of (chunks, n_superpixels, stages), one per slice of ``zs``, as ``compute_slice`` returns them; each
    slice's ``encode`` holds its own deflates and an equal share of the rest of the call.

    Raises
    ------
    RunSliceError
        A slice failed; it names its position in ``zs`` and carries the results of the slices before it.
    """
    if not (isinstance(raw3, np.ndarray) and raw3.ndim == 3 and raw3.dtype == np.float32
            and raw3.flags.c_contiguous):
        return None
    if label3 is not None and not (isinstance(label3, np.ndarray) and label3.dtype == np.uint8
                                   and label3.shape == raw3.shape and label3.flags.c_contiguous):
        return None
    args = _one_call_args(raw3[zs[0]], None if label3 is None else label3[zs[0]], sp_cfg, codec)
    if args is None:
        return None
    t0 = time.perf_counter()
    r, (h, w) = len(zs), raw3.shape[1:]
    fg = np.empty((r, h, w), np.bool_)
    sp16 = np.empty((r, h * w), np.uint16)
    caps, starts, size = _map_streams_layout(h, w)
    out = scratch(r * size)[:r * size].reshape(r, size)
    lens = np.empty((r, 3), np.int64)
    times = np.zeros((r, 3), np.int64)
    ns = np.zeros(r, np.int64)
    statuses = np.empty(r, np.int64)
    mask_slic_deflate_run(raw3, np.asarray(zs, np.int64), np.float32(threshold), *args,
                          _NO_LABEL3 if label3 is None else label3, _NO_LABEL, fg, np.empty(h * w, np.int32),
                          sp16, out, caps, lens, times, ns, statuses)
    results = []
    for i, z in enumerate(zs):
        try:
            check_slic_status(int(statuses[i]))
            _check_superpixel_count(int(ns[i]))
        except ValueError as exc:
            raise RunSliceError(i, exc, _with_stages(results, times, t0, r)) from None
        maps = (sp16[i].reshape(h, w), fg[i].view(np.uint8), None if label3 is None else label3[z])
        chunks = _one_call_chunks(codec, zero_label, image3[z], maps, streams(out[i], starts, lens[i]))
        results.append((chunks, int(ns[i]), times[i]))
    return _with_stages(results, times, t0, r)


def _with_stages(results: list, times: np.ndarray, t0: float, r: int) -> list[tuple[dict, int, dict]]:
    """(chunks, n, the kernel's nanoseconds) -> (chunks, n, stages): the kernel's own clock for each slice's
    steps, and an equal share of the rest of the call (the GIL taken back, the chunks made) in ``encode``."""
    rest = max(0.0, time.perf_counter() - t0 - float(times.sum()) * 1e-9) / r
    return [(chunks, n, {"mask": float(t[0]) * 1e-9, "superpixels": float(t[1]) * 1e-9,
                         "encode": float(t[2]) * 1e-9 + rest}) for chunks, n, t in results]


_NO_LABEL3 = np.zeros((0, 0, 0), np.uint8)


def organ_bits(label: np.ndarray | None, n_slices: int) -> np.ndarray:
    """Per slice, bit v set when label value v (1..63) occurs: (Z,) uint64 from a (Z, H, W) label volume.

    Computed once per volume by whoever loads it, in a numba kernel that releases the GIL (the rule of
    ``engine.store_format.slice_organ_bits``).
    """
    bits = np.zeros(n_slices, dtype=np.uint64)
    if label is not None:
        organ_bits_kernel(np.ascontiguousarray(label, dtype=np.uint8), bits)
    return bits


def warm_slice(size: int, threshold: float) -> np.ndarray:
    """A synthetic body-like slice: compiles/loads the numba kernels before timing and before forking."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = (size - 1) / 2
    disc = ((yy - c) ** 2 + (xx - c) ** 2) < (0.4 * size) ** 2
    rng = np.random.default_rng(0)
    return (disc * (threshold + 200.0 + 50.0 * np.sin(xx / 7.0)) + rng.random((size, size)) * 5).astype(np.float32)



def process_worker(w: int, task_conn, result_conn, all_conns, lock_fd, shm, slots, shape, threshold, sp_cfg,
                    codec, zero_label, load, sock, all_socks, arena, computing) -> None:
    """Body of a worker process (forked). Messages: a slice (ring slot, sequence number, volume key, z,
    urgent) in, its encoded chunks into the ring slot, their lengths out (up to RESULT_RUN slices' in one
    message; at once for an urgent slice, one of the last of a batch); a volume to load (prepared into its
    arena slot or a memfd, ``send_volume``); where a volume lives (``"volume"``), before the first slice of
    it. ``computing[w]`` holds the sequence number of the slice in hand."""
    _settle_in(task_conn, result_conn, all_conns, lock_fd, sock, all_socks)
    ring = Ring(shm.buf, slots, shape)
    volumes: dict[int, tuple] = {}                   # key -> (raw, z-score stats, label) in the arena or a memfd
    held: list[tuple] = []                           # answers of computed slices not sent yet
    parent = os.getppid()
    while True:
        if held and not task_conn.poll(0):
            held = _answer(result_conn, held)        # never wait for work while holding answers
        while not task_conn.poll(0.5):
            if os.getppid() != parent:               # the parent died (e.g. kill -9): leave quietly
                os._exit(3)
        try:
            msg = task_conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if held and (msg is None or msg[0] == "load"):
            held = _answer(result_conn, held)        # the end, or a load that takes a while
        if msg is None:
            break
        if msg[0] == "load":
            if not load_in_worker(msg[1], msg[2], load, VolumeBuffers(shape, arena, msg[3]), sock, result_conn):
                break
            continue
        if msg[0] == "volume":
            try:
                _take_volume(msg, volumes, arena, sock)
            except OSError as exc:
                held = _answer(result_conn, held)    # answers first: the parent pairs them with its jobs in order
                result_conn.send(("error", -1, -1, f"cannot map volume {msg[1]}: {exc}"))
                break
            continue
        slot, seq, key, z, urgent = msg
        computing[w] = seq                           # read by the parent if this process dies
        try:
            held.append(_compute_into_slot(ring.out[slot], slot, seq, volumes[key], z, threshold, sp_cfg, codec,
                                           zero_label))
            if urgent or len(held) >= RESULT_RUN:
                held = _answer(result_conn, held)
        except Exception as exc:  # reported to the parent, which stops the run naming the slice
            held = _answer(result_conn, held)
            result_conn.send(("error", slot, seq, f"{type(exc).__name__}: {exc}"))
            break
    try:
        result_conn.close()
    except OSError:
        pass


def _settle_in(task_conn, result_conn, all_conns, lock_fd, sock, all_socks) -> None:
    """A forked worker's first steps: the parent handles the stop signals, and of what the fork copied the
    worker keeps only its own pipe ends and socket (so that a dead process reads as EOF at once) and never the
    store lock (which must not outlive the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C and a scheduler's SIGTERM (sent to every
    signal.signal(signal.SIGTERM, signal.SIG_IGN)    # process of the job) are handled by the parent, which stops us
    if lock_fd is not None:
        try:
            os.close(lock_fd)
        except OSError:
            pass
    for c in all_conns:
        if c is not task_conn and c is not result_conn:
            c.close()
    for c in all_socks:
        if c is not sock:
            c.close()


def _take_volume(msg: tuple, volumes: dict, arena, sock) -> None:
    """Map the volume a ``"volume"`` message announces (its arena slot, or the memfd that came over ``sock``)."""
    _, key, vshape, has_label, slot, zstats = msg
    # Slices come in sequence order, so no later task needs a volume before this one: unmapping them here
    # bounds a worker's mappings to the volumes it is working on.
    for old in [k for k in volumes if k < key]:
        del volumes[old]
    raw, _, label = arena.views(slot, vshape[0], has_label) if slot >= 0 else map_volume(sock, vshape, has_label)
    volumes[key] = (raw, zstats, label)


def _compute_into_slot(out: np.ndarray, slot: int, seq: int, volume: tuple, z: int, threshold, sp_cfg,
                       codec: Codec, zero_label) -> tuple:
    """Slice ``z`` of ``volume`` (raw, z-score stats, label) computed and encoded into its ring slot ``out``;
    the answer for the parent (the chunks' lengths, superpixel count, stage times and CPU time)."""
    c0 = time.thread_time()
    raw, zstats, label = volume
    n_image = raw.shape[1] * raw.shape[2] * 4        # bytes of a float32 image slice, first in a ring slot
    # The image is z-scored where its chunk goes (an encoding that compresses images is copied over it
    # below); its time counts as encoding, the making of the chunks.
    t_z = time.perf_counter()
    image = zscore_slice(raw[z], zstats, out[:n_image].view(np.float32).reshape(raw.shape[1:]))
    t_z = time.perf_counter() - t_z
    chunks, nsp, stages = compute_slice(raw[z], image, None if label is None else label[z], threshold,
                                        sp_cfg, codec, zero_label)
    stages["encode"] += t_z
    lens, off = [], 0
    for name in DATASETS:
        b = np.frombuffer(chunks[name], dtype=np.uint8) if isinstance(chunks[name], bytes) \
            else np.asarray(chunks[name]).reshape(-1).view(np.uint8)
        if off != 0 or b.ctypes.data != out.ctypes.data:     # not the image already in its place
            out[off:off + b.size] = b
        lens.append(int(b.size))
        off += b.size
    return ("ok", slot, seq, lens, nsp, stages, time.thread_time() - c0)


def _answer(result_conn, held: list[tuple]) -> list[tuple]:
    """Send the held answers (in order: the parent pairs them with its jobs oldest first); an empty list."""
    if held:
        result_conn.send(held[0] if len(held) == 1 else ("many", held))
    return []


def load_in_worker(i: int, item: tuple, load: Callable[..., tuple[Loaded | Failure, float, float]],
                   bufs: VolumeBuffers, sock: socket.socket, result_conn: Connection) -> bool:
    """Load job ``i`` in a worker process; False when the worker must stop (a bug: reported to the parent)."""
    c0 = time.thread_time()
    try:
        try:
            result, t_read, t_prep = load(*item, buffers=bufs)
        except SourceChanged as exc:
            result_conn.send(("changed", i, str(exc)))
            return True
        if isinstance(result, Failure):
            result_conn.send(("loadfail", i, result.ref, result.path, result.reason))
        else:
            result_conn.send(("loaded", i, send_volume(result, bufs, sock), t_read, t_prep, time.thread_time() - c0))
        return True
    except Exception as exc:
        result_conn.send(("error", -1, -1, f"{type(exc).__name__} while loading {item[0]}: {exc}"))
        return False
    finally:
        bufs.close()


def signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
