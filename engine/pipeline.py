"""The engine: per-slice pseudo-labels on N workers that also read the volumes, batched crash-safe commits.

::

    load plan: volumes in source order, at most ``engine.readers`` loading or loaded ahead (``LoadPlan``)
        -> N workers take a load job (read + prepare one volume): threads when no slice is waiting; processes
           as soon as the look-ahead allows, at most half of them while slices wait
        -> producer: takes loaded volumes in source order, numbers their slices, opens / closes batches
        -> work queue (threads) | shared-memory ring + per-worker pipes (processes)
        -> the same N workers: body mask, pseudo-labels, chunk encoding (zlib releases the GIL)
        -> one writer thread: writes each slice into the open shard as soon as it is done (in any order),
           and commits the shard (tables, fsync, rename) when the batch is complete

N workers are N cores of work: reading a CHAOS .nii.gz pair costs about as much CPU as its superpixels, so
reader threads next to the workers (the design before) made one worker use 1.3-1.4 cores and left a second
worker little to gain on 2 cores (1.10x). With threads, loads fill the gaps where a worker would otherwise
wait; the processes backend starts them earlier, because its workers hold several queued slices and at 16 of
them a load begun only when one ran dry left them all without input (``ProcessBackend._hand_out``).

At most one batch is uncommitted at any time: the producer opens batch k+1 once batch k's shard is renamed
(its commit point), so a ``kill -9`` loses at most one batch of computed slices (design.md, Store,
requirement 2). Because the writer streams slices into the shard while the batch is computed (and sends them
to the disk every 4 MB), closing a batch costs only its tables, a short fsync and the rename (2.3 ms of CPU per
128-slice CHAOS batch here; 6-11 ms of wall time with the writer sharing 2 cores with the workers).
The index rebuild that shows the shard to readers runs after that, overlapped with batch k+1. Memory is
bounded by the batch size, the queue bound and the load look-ahead, never by the dataset.

Backends
--------
``threads`` (default): workers are threads; the numba kernels, inflating and zlib release the GIL.
``processes``: workers are forked processes. A worker that loads a volume prepares it into a slot of a
shared arena, or into a memfd when it does not fit (``engine.shm``); the workers computing its slices read it
there and put the encoded chunks into a ``multiprocessing.shared_memory`` ring of output slots. The parent
never touches volume pixels: the writer writes each slice's encoded chunks straight from its ring slot, which
is reused only after that, and only slot numbers and a few integers travel through one pair of pipes per
worker. The parent waits on the result pipes *and* the process sentinels, so a worker that dies (killed,
segfault, out of memory) is noticed at once; the run then stops, naming the slice or volume the worker held,
and commits nothing of the unfinished batch.

Modules: this one runs a whole run (``preprocess``); ``engine.schedule`` holds what its threads share (load
plan, work queue, batches), ``engine.slice_worker`` what a worker does (one slice; a worker process's body),
``engine.process_backend`` the parent's side of the processes backend (pool, dispatcher, shared memory).
"""
from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from engine.config import to_dict
from engine.prepare import prepare_volume
from engine.process_backend import ProcessBackend, SharedMemoryTooSmall
from engine.profile import Profiler, run_queue_seconds, summary_lines
from engine.runinfo import git_revision, write_run_info
from engine.sources import open_source
from engine.schedule import Batches, BatchState, Failure, Loaded, LoadPlan, SourceChanged, Stopped, Task, WorkQueue
from engine.slice_worker import RunSliceError, compute_run, compute_slice, organ_bits, warm_slice
from engine.store import StoreWriter
from engine.store_codec import Codec
from engine.store_format import (SCHEMA_VERSION, RunRecordError, SettingsMismatch, SliceResult, StoreError, StoreLocked,
                                 error_text, settings_hash, volume_row)
from engine.stops import raise_terminated, stop_status
from engine.volume import Volume, VolumeError

if TYPE_CHECKING:
    # a whole-project ``cfg`` (alpnet.config.Config) is annotated Any: engine never imports alpnet
    from engine.config import PrepareConfig

# The index lists every shard, so rebuilding it costs O(shards) (0.14 s at 1,000 shards here): republishing it
# after every commit would make a long run quadratic. It is republished at most every PUBLISH_INTERVAL_S and at
# most 1/PUBLISH_COST_SHARE of the time (and always at the end); shards stay the commit point.
PUBLISH_INTERVAL_S = 0.5
PUBLISH_COST_SHARE = 10
# A worker thread leaving a numba kernel needs the GIL back; while another thread runs Python code or a
# GIL-holding h5py call, CPython hands the GIL over only after the switch interval (default 5 ms, five times a
# SLIC kernel call). The engine lowers it for the duration of a run.
SWITCH_INTERVAL_S = 0.0005


# --------------------------------------------------------------------------------------------- settings
def store_settings(cfg: Any, spec: str, refs: list[str]) -> dict:  # cfg: alpnet.config.Config
    """What a store's content depends on: a run whose settings differ is refused (design.md Store, 4).

    Worker count, backend, batch size and compression are left out on purpose: they change how the content
    is computed and packed, never the content itself.
    """
    import hashlib
    method = cfg.superpixels.method
    spec = str(spec)
    is_phantom = spec == "phantom" or spec.startswith("phantom:")
    source = {"input": spec if is_phantom else os.path.realpath(spec), "n_refs": len(refs),
              "refs_sha256": hashlib.sha256("\n".join(map(str, refs)).encode()).hexdigest()[:16]}
    if is_phantom:
        source["phantom_seed"] = cfg.data.phantom_seed
        if spec == "phantom":
            source["phantom_volumes"] = cfg.data.phantom_volumes
    return {"schema_version": SCHEMA_VERSION, "method": method,
            "params": to_dict(getattr(cfg.superpixels, method)), "prepare": prepare_settings(cfg.prepare),
            "source": source}


def prepare_settings(prepare: PrepareConfig) -> dict:
    """The preparation settings recorded in (and hashed into) a store. ``zscore`` is recorded only when it is
    not the default, so that stores written before the option existed keep their settings hash."""
    out = to_dict(prepare)
    if out.get("zscore") == "volume":
        del out["zscore"]
    return out


def n_readers(cfg: Any, workers: int) -> int:  # cfg: alpnet.config.Config
    """Volumes loaded ahead (``engine.readers``), with 0 meaning one per worker, at least 2 and at most 8 (memory:
    one prepared volume each)."""
    if cfg.engine.readers > 0:
        return int(cfg.engine.readers)
    return max(2, min(workers, 8))


def n_workers(cfg: Any) -> int:  # cfg: alpnet.config.Config
    """``engine.threads``, with 0 meaning every core this process may run on."""
    if cfg.engine.threads > 0:
        return int(cfg.engine.threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


BATCH_PER_WORKER = 16          # automatic batch: slices per worker ...
BATCH_MIN = 128                # ... and never fewer than this


def batch_size(cfg: Any, workers: int) -> int:  # cfg: alpnet.config.Config
    """``engine.batch``, with 0 meaning 16 slices per worker and at least 128: the wait at each batch's barrier
    is fixed, so the batch grows with the workers to keep its share of the run from growing with them."""
    if cfg.engine.batch > 0:
        return int(cfg.engine.batch)
    return max(BATCH_MIN, BATCH_PER_WORKER * workers)


# --------------------------------------------------------------------------------------------- the run
class _Run(ProcessBackend):
    def __init__(self, cfg, overwrite: bool, progress: bool):
        self.cfg = cfg
        self.overwrite = overwrite
        self.show_progress = progress
        self.store = Path(cfg.engine.out)
        self.n_workers = n_workers(cfg)
        self.n_readers = n_readers(cfg, self.n_workers)   # volumes loading or loaded ahead
        self.backend = cfg.engine.backend
        self.batch_size = batch_size(cfg, self.n_workers)
        self.size = int(cfg.prepare.size)
        self.shape = (self.size, self.size)
        self.stop = threading.Event()
        self.done = threading.Event()
        self.error: str | None = None
        self.interrupted = False
        self.exit_code = 130
        self.failures: list[Failure] = []
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self.computed = 0
        self.committed_this_run = 0
        self.max_uncommitted = 0     # most computed-but-uncommitted slices seen: what a kill could have lost
        self.last_publish, self.publish_cost = float("-inf"), 0.0
        self.slices_planned = 0          # slices of the volumes loaded so far (to process in this run)
        self.refs_loaded = 0
        self.producer_done = False
        self.threads: list[threading.Thread] = []
        self.bar = None
        self.output_gone = False         # stderr no longer takes lines (a closed pipe): the run goes on without them
        self.t_start = time.time()       # reset when the workers start

    # -------------------------------------------------------------- messages
    def say(self, line: str) -> None:
        if self.bar is not None:
            self._to_stderr(self.bar.write, line, file=sys.stderr)
        else:
            self._to_stderr(print, line, file=sys.stderr, flush=True)

    def _to_stderr(self, write, *args, **kwargs) -> None:
        """Progress and log lines are for the user: once stderr cannot take them (its reader has gone, as in
        ``2>&1 | head``), the run goes on without them. Letting the error through stopped the main thread's
        wait after the work was done and before the store was marked complete."""
        if self.output_gone:
            return
        try:
            write(*args, **kwargs)
        except OSError:
            self.output_gone = True

    def fail(self, message: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = message
        self.stop.set()
        self.done.set()

    # -------------------------------------------------------------- setup
    def run(self) -> int:
        cfg = self.cfg
        try:
            self.codec = Codec.parse(cfg.engine.compression)
        except ValueError as exc:
            print(f"preprocess: {exc}", file=sys.stderr)
            return 2
        try:
            self.source = open_source(cfg.data.input, cfg)
            self.refs = [str(r) for r in self.source.refs()]
        except VolumeError as exc:
            print(f"preprocess: {exc}", file=sys.stderr)
            return 2
        for line in self.source.warnings:
            self.say(f"preprocess: warning: {line}")
        settings = store_settings(cfg, cfg.data.input, self.refs)
        # One slice through the pseudo-label step checks settings that only the method can judge, before the
        # store is opened: with --overwrite, opening it discards what it holds.
        self.warm = warm = warm_slice(self.size, cfg.prepare.fg_threshold)
        self.zero_label = self.codec.encode("label", np.zeros(self.shape, np.uint8))
        try:
            # with a label: the general path's chunk encoder is compiled per number of maps, and most
            # volumes have labels
            compute_slice(warm, warm, np.zeros(self.shape, np.uint8), cfg.prepare.fg_threshold, cfg.superpixels,
                          self.codec, self.zero_label)
            # Worker threads take runs of slices only where one call computes a run: other methods and settings
            # go slice by slice anyway, and a run would only make the work coarser.
            self.run_max = 1
            if self.backend == "threads" and cfg.engine.run_slices > 1:
                stack = np.stack([warm, warm])
                if compute_run(stack, stack, np.zeros((2,) + self.shape, np.uint8), [0, 1],
                               cfg.prepare.fg_threshold, cfg.superpixels, self.codec, self.zero_label) is not None:
                    self.run_max = cfg.engine.run_slices
        except ValueError as exc:
            print(f"preprocess: the superpixel settings are not usable: {exc}", file=sys.stderr)
            return 2
        try:
            self.writer = StoreWriter.open(self.store, settings, self.codec, self.shape, git_revision(),
                                           overwrite=self.overwrite, command=" ".join(sys.argv))
        except (StoreLocked, SettingsMismatch, StoreError) as exc:
            print(f"preprocess: {exc}", file=sys.stderr)
            return 2
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(old_interval, SWITCH_INTERVAL_S))
        try:
            return self._run_locked(settings)
        finally:
            sys.setswitchinterval(old_interval)
            if self.writer.lock.fd is not None:      # any path that did not finish/abort
                self.writer.lock.release()

    def _refuse(self, message: str) -> int:
        """Give up before any slice is computed: leave no new store behind, release it, say why (exit 2)."""
        self.writer.discard_if_empty()
        self.writer.abort()
        print(f"preprocess: {message}", file=sys.stderr)
        return 2

    def _run_locked(self, settings: dict) -> int:
        self._say_store_notes()
        try:
            write_run_info(self.store.parent, to_dict(self.cfg), name=self.store.name)
        except OSError as exc:
            return self._refuse(f"cannot write the run's config next to {self.store}: {error_text(exc)}")
        if self.writer.was_complete:
            return self._already_complete(settings)
        try:
            self.plan = self._plan_left()
            if self.writer.resumed:
                self.say(f"preprocess: resuming {self.store}: {self.writer.n_committed} slices in "
                         f"{len(self.writer.shards)} committed batches kept; {len(self.plan)} of {len(self.refs)} "
                         f"volumes left")
            self._warm_up()
            self._build_schedule()
            if self.backend == "processes":
                try:
                    self._start_pool()              # fork before any thread of ours exists
                except SharedMemoryTooSmall as exc:
                    return self._refuse(str(exc))
                except OSError as exc:              # e.g. a fork at the process limit (its pool is cleaned up)
                    return self._refuse(f"processes backend: cannot start the worker processes: {error_text(exc)}")
        except KeyboardInterrupt as exc:            # no thread of ours yet: recorded and released like any stop
            return self._stopped_before_work(exc)
        self.t_start = time.time()
        try:
            # inside the guard: a stop while the bar, the profiler or the threads start must still reach the
            # cleanup below, or the workers (which ignore SIGTERM) would hang the interpreter's exit
            self._start_progress()
            self.prof.start()
            self._start_threads()
            self._wait()
        except KeyboardInterrupt as exc:
            self.interrupted = True
            self.exit_code, word = stop_status(exc)
            self.fail(f"{word}; committed batches are kept, rerun the same command to resume")
        finally:
            self._join()
            if self.backend == "processes" and not any(t.name == "engine-dispatcher" for t in self.threads):
                self._stop_pool(graceful=False)     # the dispatcher, which stops the pool, never started
            self._release_ring()
        return self._finish(settings)

    def _stopped_before_work(self, exc: KeyboardInterrupt) -> int:
        """Ctrl-C or SIGTERM after the store was opened, before any thread started: the run is recorded as
        interrupted, the store released, and the exit status is the stop's."""
        self.interrupted = True
        self.exit_code, word = stop_status(exc)
        self.error = f"{word}; committed batches are kept, rerun the same command to resume"
        self.writer.abort(run_record=self._run_record("interrupted"))
        try:
            print(f"preprocess: stopped: {self.error}", file=sys.stderr)
        except OSError:
            pass
        return self.exit_code

    def _say_store_notes(self) -> None:
        """What the writer found on opening the store: dropped leftovers, a lock left by a killed run."""
        writer = self.writer
        for line in writer.dropped:
            self.say(f"preprocess: warning: {line}")
        if writer.lock.stale:
            self.say(f"preprocess: note: the previous run (pid {writer.lock.stale.get('pid', '?')} on "
                     f"{writer.lock.stale.get('host', '?')}, started {writer.lock.stale.get('started', '?')}) ended "
                     f"without releasing the store; resuming it")

    def _already_complete(self, settings: dict) -> int:
        """A rerun on a complete store: recorded like any run, nothing computed; 1 when inputs failed before."""
        writer = self.writer
        # Recorded like any run: a run killed after its final index but before its own record (a window
        # of a few ms) otherwise leaves the store's history without any run that completed it.
        try:
            writer.finish(complete=True, run_record=self._run_record("complete"))
        except RunRecordError as exc:                # history only: the store is complete
            self.say(f"preprocess: warning: {exc}")
        log = [f for s in writer.shards for f in s.failures]
        print(f"preprocess: {self.store} is already complete ({writer.n_committed} slices, settings "
              f"{settings_hash(settings)}); nothing to do")
        if log:
            print(f"  {len(log)} volume(s) failed earlier (see `cli.py inspect {self.store}`); fix them and "
                  f"rerun with --overwrite")
        return 1 if log else 0

    def _plan_left(self) -> list:
        """(ref, committed z's, volume row) of every volume not yet whole in the store, in source order."""
        by_ref, failed, rows = self.writer.committed_progress()
        plan = []
        for ref in self.refs:
            if ref in failed:
                continue
            done = by_ref.get(ref, set())
            row = rows.get(ref)
            if row is not None and len(done) >= row["n_slices"]:
                continue
            plan.append((ref, done, row))
        return plan

    def _warm_up(self) -> None:
        """Kernels are compiled / loaded from the numba cache before any timing and before forking, so that
        worker processes inherit ready machine code (the pseudo-label kernels were loaded by ``run``)."""
        warm = self.warm
        # NIfTI volumes are column-major (float64 ones reach preparation as they are) with slice-major labels
        # (``engine.sources``), the others row-major; a small volume takes the pad path.
        for layout, dtype in (("F", np.float32), ("F", np.float64), ("C", np.float32)):
            for img in (np.dstack([warm, warm + 1]), np.dstack([warm[:4, :4], warm[:4, :4] + 1])):
                h, w, _ = img.shape
                label = np.zeros((2, h, w), np.uint8).transpose(1, 2, 0)
                prepare_volume(Volume(id="warm", image=np.asarray(img, dtype, order=layout), spacing=(1.0, 1.0, 1.0),
                                      affine=np.eye(4), orientation="RAS",
                                      label=label if layout == "F" else np.ascontiguousarray(label),
                                      path="warm-up", checksum=""), self.cfg.prepare)
        organ_bits(np.zeros((1, 2, 2), np.uint8), 1)
        self.source.warm_up()

    def _build_schedule(self) -> None:
        """The profiler, the load plan, the work queue and the batches that the run's threads share."""
        self.prof = Profiler(self.n_workers, self.backend, queue_depth=self._queue_depth,
                             child_pids=lambda: [p.pid for p in getattr(self, "procs", [])])
        self.loads = LoadPlan(self.plan, self.n_readers, threading.Condition(), self.stop,
                              on_change=self._wake if self.backend == "processes" else None,
                              clock=self.prof.volume_clock)
        if self.backend == "processes":
            self.q: queue.SimpleQueue = queue.SimpleQueue()     # C-implemented: no Condition per put
        else:
            self.q = WorkQueue(self.loads, self.cfg.engine.queue_slices, self.stop, clock=self.prof.room_clock,
                               workers=self.n_workers, run_max=self.run_max)
        self.batches = Batches(len(self.writer.shards), self.writer.n_committed, self.batch_size,
                               self.prof.barrier_clock, self.stop)

    def _start_threads(self) -> None:
        self._spawn(self._producer, "producer")
        if self.backend == "processes":
            self._spawn(self._dispatcher, "dispatcher")
        else:
            for w in range(self.n_workers):
                self._spawn(self._thread_worker, f"worker-{w}", w)
        self._spawn(self._writer, "writer")

    def _spawn(self, fn, name: str, *args) -> None:
        def body():
            try:
                fn(*args)
            except Stopped:
                pass
            except BaseException as exc:   # a bug in the engine itself: stop everything, show where
                tb = traceback.format_exc(limit=-3).strip().splitlines()
                where = tb[-3].strip() if len(tb) > 2 else ""
                self.fail(f"internal error in {name}: {type(exc).__name__}: {exc} ({where})")
        t = threading.Thread(target=body, name=f"engine-{name}", daemon=True)
        t.start()
        self.threads.append(t)

    def _queue_depth(self) -> int:
        q = getattr(self, "q", None)
        return q.qsize() if q is not None else 0

    # -------------------------------------------------------------- reading
    def _load(self, ref: str, done: set, row: dict | None, buffers=None) -> tuple[Loaded | Failure, float, float]:
        """Read and prepare one volume: (result, read seconds, prepare seconds). Runs in a worker thread or a
        worker process (``buffers``: see ``prepare_volume``); raises ``SourceChanged`` when a partly committed
        volume's file changed."""
        t0 = time.perf_counter()
        try:
            vol = self.source.load(ref)
            t1 = time.perf_counter()
            prep = prepare_volume(vol, self.cfg.prepare, buffers)
        except VolumeError as exc:
            return self._load_failure(Failure(ref, exc.path, exc.reason), row), 0.0, 0.0
        except MemoryError:
            return self._load_failure(Failure(ref, ref, "out of memory while reading/preparing this volume"),
                                      row), 0.0, 0.0
        except Exception as exc:  # a reader bug or an exotic file: one line for this volume, the run goes on
            return self._load_failure(Failure(ref, ref, f"unexpected {type(exc).__name__} while reading: {exc}"),
                                      row), 0.0, 0.0
        raw = np.ascontiguousarray(np.moveaxis(prep.raw, 2, 0), dtype=np.float32)
        image = None if prep.image is None else np.ascontiguousarray(np.moveaxis(prep.image, 2, 0), dtype=np.float32)
        label = None if prep.label is None else np.ascontiguousarray(np.moveaxis(prep.label, 2, 0), dtype=np.uint8)
        v = prep.volume
        new_row = volume_row(prep.id, ref, raw.shape[0], v.spacing, v.orientation, v.affine, v.path, v.checksum,
                             label is not None, prep.notes)
        organs = organ_bits(label, raw.shape[0])
        zstats = prep.zstats
        del prep, vol, v
        t2 = time.perf_counter()
        if row is not None and (row["checksum"] != new_row["checksum"] or row["n_slices"] != new_row["n_slices"]):
            raise SourceChanged(f"{new_row['path']}: changed since part of it was committed to {self.store} "
                                 f"(checksum or slice count differs); use --overwrite to start again")
        return Loaded(ref, new_row["id"], new_row["path"], raw, image, label, new_row, set(done), new_row["notes"],
                       organs, zstats=zstats), t1 - t0, t2 - t1

    def _load_failure(self, failure: Failure, row: dict | None) -> Failure:
        """A volume that cannot be loaded is skipped and logged, unless part of it is committed already: logging
        it then would complete the store around a cut volume, so the run stops (``SourceChanged``)."""
        if row is not None:
            raise SourceChanged(f"{failure.path}: part of it is committed to {self.store}, but it no longer loads "
                                f"({failure.reason}); fix that and rerun, or use --overwrite to start again")
        return failure

    def _load_job(self, i: int, item: tuple) -> None:
        try:
            result, t_read, t_prep = self._load(*item)
            if isinstance(result, Loaded):            # a volume that failed is not read (as in a worker process)
                self.prof.add_read(t_read, t_prep)
        except SourceChanged as exc:
            result = exc
        self.loads.finish(i, result)

    # -------------------------------------------------------------- producer
    def _producer(self) -> None:
        seq = self.writer.n_committed
        index = len(self.writer.shards)
        cur: BatchState | None = None
        try:
            for item in self.loads:
                with self._lock:
                    self.refs_loaded += 1
                if isinstance(item, Failure):
                    self.failures.append(item)
                    self.say(f"preprocess: skipped {item.line()}")
                    if cur is None:
                        cur = self.batches.begin(index, seq)
                        index += 1
                    cur.failures.append(item.record())
                    continue
                vol = item
                for note in vol.notes:
                    self.notes.append(f"{vol.path}: {note}")
                todo = [z for z in range(vol.row["n_slices"]) if z not in vol.skip]
                if vol.key >= 0:
                    self._track_volume(vol, len(todo))
                with self._lock:
                    self.slices_planned += len(todo)
                for z in todo:
                    if cur is None:
                        cur = self.batches.begin(index, seq)
                        index += 1
                    cur.volumes.setdefault(vol.ref, vol.row)
                    cur.count += 1
                    self._dispatch(Task(seq, vol, z, batch=cur.index))
                    seq += 1
                    if cur.count == self.batch_size:
                        self.batches.close(cur)
                        cur = None
                del vol, item
            if cur is not None:
                self.batches.close(cur)
        except SourceChanged as exc:
            self.fail(str(exc))
        finally:
            self.producer_done = True
            self.batches.finish()
            if self.backend == "threads":
                self.q.close()
            else:
                self._wake()

    def _dispatch(self, task: Task) -> None:
        if self.backend == "threads":
            self.q.put(task)
            return
        try:                                         # a free slot of the ring (bounds memory)
            slot = self.free_slots.get_nowait()
        except queue.Empty:
            slot = self._wait_for_slot()
        task.slot = slot
        self.q.put(task)
        if self.dispatcher_hungry:
            self._wake()

    def _wait_for_slot(self) -> int:
        """Producer, processes backend: block until the writer gives a ring slot back (the profile's room
        clock runs meanwhile)."""
        with self.prof.room_clock:
            while True:
                try:
                    return self.free_slots.get(timeout=0.1)
                except queue.Empty:
                    if self.stop.is_set():
                        raise Stopped

    # -------------------------------------------------------------- thread workers
    def _thread_worker(self, w: int) -> None:
        rq0 = run_queue_seconds()
        try:
            self._thread_work(w)
        finally:
            rq1 = run_queue_seconds()
            self.prof.add_run_queue(w, None if rq0 is None or rq1 is None else rq1 - rq0)

    def _thread_work(self, w: int) -> None:
        prof, cfg = self.prof, self.cfg
        while True:
            t0 = time.perf_counter()
            c0 = prof.clocks(t0)
            job = self.q.get()
            t1 = time.perf_counter()
            prof.add_idle(w, t0, t1, c0)
            if job is None:
                return
            c1 = time.thread_time()
            if job[0] == "load":
                self._load_job(job[1], job[2])
                prof.add_busy(w, time.perf_counter() - t1, time.thread_time() - c1)
                continue
            tasks = [job[1]] if job[0] == "slice" else job[1]
            if len(tasks) > 1:
                done = self._compute_run(w, tasks, c1)
                if done < 0:
                    return
                tasks = tasks[done:]
            for task in tasks:
                c1 = time.thread_time()
                vol, z = task.vol, task.z
                try:
                    chunks, nsp, stages = compute_slice(
                        vol.raw[z], vol.image[z], None if vol.label is None else vol.label[z],
                        cfg.prepare.fg_threshold, cfg.superpixels, self.codec, self.zero_label)
                except Exception as exc:
                    self.fail(f"{task.describe()} failed in worker {w}: {type(exc).__name__}: {exc}")
                    return
                prof.add_work(w, stages, time.thread_time() - c1)
                self._result(task, chunks, nsp)

    def _compute_run(self, w: int, tasks: list[Task], c1: float) -> int:
        """Worker thread ``w``: a run of slices of one volume in one GIL-free call (``compute_run``). Returns how
        many of ``tasks`` it computed (0 where that call does not apply), or -1 after a failure (reported)."""
        vol, cfg = tasks[0].vol, self.cfg
        failed = None
        try:
            out = compute_run(vol.raw, vol.image, vol.label, [t.z for t in tasks], cfg.prepare.fg_threshold,
                              cfg.superpixels, self.codec, self.zero_label)
        except RunSliceError as exc:
            out, failed = exc.done, (tasks[exc.index], exc.error)
        except Exception as exc:
            self.fail(f"{tasks[0].describe()} (and the {len(tasks) - 1} slice(s) after it) failed in worker {w}: "
                      f"{type(exc).__name__}: {exc}")
            return -1
        if out is None:
            return 0
        cpu = (time.thread_time() - c1) / max(1, len(out) + (failed is not None))
        for task, (chunks, nsp, stages) in zip(tasks, out):
            self.prof.add_work(w, stages, cpu)
            self._result(task, chunks, nsp)
        if failed is not None:
            task, exc = failed
            self.fail(f"{task.describe()} failed in worker {w}: {type(exc).__name__}: {exc}")
            return -1
        return len(out)

    def _result(self, task: Task, chunks: dict, nsp: int, release: Callable[[], None] | None = None) -> None:
        vol = task.vol
        self.batches.add_result(task.seq, SliceResult(vol.id, vol.ref, task.z, chunks, nsp, vol.row["has_label"],
                                                      int(vol.organs[task.z]), release))
        t = time.perf_counter()
        with self._lock:
            self.prof.add_result(t)
            self.computed += 1
            self.max_uncommitted = max(self.max_uncommitted, self.computed - self.committed_this_run)

    # -------------------------------------------------------------- writer
    def _writer(self) -> None:
        """Writes each batch's slices as they are computed, in any order; commits the shard at the batch's end."""
        prof = self.prof
        builder, t_batch = None, 0.0
        try:
            while not self.stop.is_set():
                got = self.batches.writable(timeout=0.1)
                if got is None:
                    if self.producer_done and self.batches.pending() == 0:
                        return
                    continue
                st, results, done = got
                t0 = time.perf_counter()
                try:
                    if builder is None:
                        builder = self.writer.begin_shard(st.index, st.first_slice, self.batch_size)
                    for pos, r in results:
                        builder.add(r, pos)
                    # The run's ring slots go back together: the producer, waiting for a free slot, then wakes
                    # once per run instead of once per slice (each wake-up pushed a worker off its core).
                    for _, r in results:
                        if r.release is not None:
                            r.release()
                    if not done and st.closed and builder.prepared is None:
                        # the producer no longer touches a closed batch: its tables can go in now
                        builder.prepare(st.volumes, st.failures, st.count)
                    if done:
                        nbytes = builder.nbytes
                        t_commit = time.perf_counter()
                        self.writer.end_shard(builder, st.volumes, st.failures)
                        builder = None
                except (OSError, RuntimeError, StoreError) as exc:   # RuntimeError: h5py's for some HDF5 I/O failures
                    self.fail(f"cannot commit batch {st.index} to {self.store}: {error_text(exc)}; the batches "
                              f"committed before it are kept, rerun the same command to resume")
                    return
                t_batch += time.perf_counter() - t0
                if not done:
                    continue
                with self._lock:                 # counted before the barrier opens: max_uncommitted stays exact
                    self.committed_this_run += st.count
                self.batches.committed()
                t1 = time.perf_counter()
                prof.add_commit(t1 - t_commit, None if st.t_computed is None else t1 - st.t_computed)
                try:
                    self._maybe_publish()
                except (OSError, RuntimeError, StoreError) as exc:
                    self.fail(f"cannot update the index {self.store} after batch {st.index}: {error_text(exc)}; the "
                              f"committed batches are kept, rerun the same command to resume")
                    return
                prof.add_write(t_batch, time.perf_counter() - t1, nbytes)
                t_batch = 0.0
        finally:
            if builder is not None:
                builder.discard()                # an unfinished batch: never committed
            self.done.set()

    def _maybe_publish(self) -> None:
        now = time.perf_counter()
        if now - self.last_publish >= max(PUBLISH_INTERVAL_S, PUBLISH_COST_SHARE * self.publish_cost):
            self.writer.publish()
            self.last_publish = time.perf_counter()
            self.publish_cost = self.last_publish - now

    # -------------------------------------------------------------- progress
    def _estimate_total(self) -> int:
        with self._lock:
            loaded, planned = self.refs_loaded, self.slices_planned
        left = len(self.plan) - loaded
        if loaded == 0:
            return 0
        return int(planned + left * planned / loaded)

    def _start_progress(self) -> None:
        self.tty = bool(self.show_progress and sys.stderr.isatty())
        self.last_line = 0.0
        self.last_committed = -1
        if self.tty:
            from tqdm import tqdm
            try:
                self.bar = tqdm(total=None, unit="slice", desc="preprocess", file=sys.stderr, dynamic_ncols=True,
                                smoothing=0.1)
            except OSError:                         # the terminal is gone already: see _to_stderr
                self.output_gone = True

    def _tick(self, final: bool = False) -> None:
        if not self.plan:              # a resume with every volume committed: the "resuming" line said so
            return
        total = self._estimate_total()
        with self._lock:
            done, committed = self.computed, self.committed_this_run
        if self.bar is not None:
            if total and self.bar.total != max(total, done):
                self.bar.total = max(total, done)
            self.bar.set_postfix_str(f"committed {self.writer.n_committed}", refresh=False)
            self._to_stderr(self.bar.update, done - self.bar.n)
            return
        now = time.time()
        if not final and (now - self.last_line < 2.0 or committed == self.last_committed):
            return
        self.last_line, self.last_committed = now, committed
        elapsed = max(now - self.t_start, 1e-9)
        rate = done / elapsed
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 and total >= done else "?"
        self.say(f"preprocess: {committed}/{total or '?'} slices committed ({self.writer.n_committed} in the store), "
                 f"{rate:.1f} slices/s, ETA {eta}")

    def _wait(self) -> None:
        while not self.done.wait(0.2):
            self._tick()
        self._tick(final=True)

    def _join(self) -> None:
        for t in self.threads:
            t.join(timeout=60)
        if self.bar is not None:
            self._to_stderr(self.bar.close)
            self.bar = None

    # -------------------------------------------------------------- end
    def _run_record(self, status: str) -> dict:
        """This run's line of ``runs.jsonl``."""
        return {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t_start)),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(),
                "host": os.uname().nodename, "command": " ".join(sys.argv), "code_version": self.writer.code_version,
                "backend": self.backend, "workers": self.n_workers, "batch": self.batch_size,
                "compression": self.codec.spec, "slices_committed": self.committed_this_run,
                "max_uncommitted_slices": self.max_uncommitted, "status": status, "error": self.error}

    def _finish(self, settings: dict) -> int:
        writer = self.writer
        complete = self.error is None and self.producer_done
        record = self._run_record("complete" if complete else ("interrupted" if self.interrupted else "failed"))
        if complete:
            try:
                writer.finish(complete=True, run_record=record)
            except RunRecordError as exc:            # history only: the store is complete
                self.say(f"preprocess: warning: {exc}")
            except StoreError as exc:                # e.g. the disk filled up after the last commit
                self.error, complete = str(exc), False
                record.update(status="failed", error=self.error)
        else:
            writer.abort(run_record=record)
        # The engine's clock ends here, once the store is as complete as this run leaves it (final index
        # written, workers gone, shared memory freed): its slices/s is the rate at which a user gets a store.
        self.prof.stop()
        log = [f for s in writer.shards for f in s.failures]
        profile_path = self.store.with_name(self.store.name + ".profile.json")
        extra = {"store": str(self.store), "settings_hash": settings_hash(settings), "batch": self.batch_size,
                 "compression": self.codec.spec, "readers": self.n_readers,
                 "max_uncommitted_slices": self.max_uncommitted,
                 "status": record["status"], "failed_volumes": [f.record() for f in self.failures]}
        try:
            prof = self.prof.write_json(profile_path, self.committed_this_run, extra=extra)
        except OSError as exc:                       # error_text names the file
            self.say(f"preprocess: cannot write the profile: {error_text(exc)}")
            prof = self.prof.to_dict(self.committed_this_run, extra=extra)
        try:
            print("\n".join(self._summary(complete, prof, log, profile_path)), flush=True)
            if self.error:
                print(f"preprocess: stopped: {self.error}", file=sys.stderr)
        except OSError:
            pass        # nobody reads the output any more (``| head``): the store is as this run leaves it anyway
        if self.error:
            return self.exit_code if self.interrupted else 1
        return 1 if log else 0

    def _summary(self, complete: bool, prof: dict, log: list, profile_path: Path) -> list[str]:
        """The lines that end a run on stdout: the store's state, the profile's summary, repairs and failures."""
        method = self.cfg.superpixels.method
        params = ", ".join(f"{k}={v}" for k, v in to_dict(getattr(self.cfg.superpixels, method)).items())
        state = "complete" if complete else "INCOMPLETE"
        n_volumes = len({r['ref'] for s in self.writer.shards for r in s.volumes})
        lines = [f"preprocess: {self.store} {state}: {self.writer.n_committed} slices from {n_volumes} "
                 f"volume{'' if n_volumes == 1 else 's'}; {method} ({params})"]
        lines += [f"  {line}" for line in summary_lines(prof)]
        if self.notes:
            lines.append(f"  {len(self.notes)} repair note(s) (in the store's volumes table), e.g. {self.notes[0]}")
        if log:
            lines.append(f"  {len(log)} volume(s) failed (listed in the store's log):")
            lines += [f"    {f['path']}: {f['reason']}" for f in log[:20]]
            if len(log) > 20:
                lines.append(f"    ... and {len(log) - 20} more")
        lines.append(f"  profile: {profile_path}")
        return lines


def tune_allocator() -> bool:
    """Keep freed volume-sized buffers in glibc's heap instead of returning them to the system.

    By default glibc serves blocks above a moving threshold (128 kB at first) with ``mmap`` and unmaps them on
    free, so every volume's buffers (18 MB inflated, 9 MB per prepared array) are page-faulted in afresh:
    0.2-0.4 ms of CPU per CHAOS slice. A fixed 64 MB mmap threshold and a 1 GB trim threshold make them
    reused. Threads would still each get an arena of their own, made of 64 MB heaps that volume-sized
    blocks fragment: new heaps kept being mapped (900,000 page faults for 10x CHAOS on one worker, 65,000
    with one arena, and 15% more slices/s). One arena for the process fixes that; the threads then share its
    lock, which cost nothing measurable (2 workers on 10x CHAOS: 825-843 slices/s with per-thread arenas,
    839-855 with one). The process keeps its high-water mark, which the engine bounds anyway. Process-wide
    and lasting (threads started before the call keep their arena); False where glibc's ``mallopt`` is not
    available.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8           # glibc <malloc.h>
        return all(bool(libc.mallopt(opt, value)) for opt, value in
                   ((m_mmap_threshold, 64 << 20), (m_trim_threshold, 1 << 30), (m_arena_max, 1)))
    except (OSError, AttributeError):
        return False


def preprocess(cfg: Any, overwrite: bool = False, progress: bool = True) -> int:  # cfg: alpnet.config.Config
    """``cli.py preprocess``: compute pseudo-labels of every slice of ``cfg.data.input`` into ``cfg.engine.out``.

    Parameters
    ----------
    cfg : alpnet.config.Config (or any object with ``data``, ``prepare``, ``superpixels``, ``engine``)
    overwrite : bool
        Discard a store made with other settings instead of refusing.
    progress : bool
        A progress bar when stderr is a terminal; plain log lines otherwise or when False.

    Returns
    -------
    int
        0: the store is complete and no volume failed; 1: some volumes failed (skipped, listed in the store's
        log) or the run stopped (a worker died, a slice failed; Ctrl-C: 130, SIGTERM: 143, both keeping what
        was committed); 2: refused before any work (bad input path, store locked by another run, settings
        mismatch, bad settings, a store that cannot be written).
    """
    tune_allocator()
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, raise_terminated) if in_main else None
    try:
        return _Run(cfg, overwrite, progress).run()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)
