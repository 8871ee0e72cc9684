"""The ``processes`` backend's side of a run: the worker pool, the dispatcher thread, the shared memory.

``ProcessBackend`` is mixed into the run (``engine.pipeline``); it uses the run's configuration, store writer,
profiler, batches, load plan and ``fail``/``stop``. The dispatcher sends each worker process slices (ring slot,
sequence number, volume key, z) and load jobs over its pipe, keeps ``PREFETCH_PER_WORKER`` tasks queued at
each, and waits on the result pipes and the process sentinels together, so that a worker that dies is noticed
at once (``_worker_died`` names the slice it was computing). A worker answers several slices in one message
when it has more work queued (``slice_worker.RESULT_RUN``). Volumes live in a shared arena slot or a memfd
until every slice of them is computed.
"""
from __future__ import annotations

import collections
import errno
import functools
import multiprocessing as mp
import os
import queue
import select
import socket
import time
from multiprocessing import shared_memory

from engine.profile import run_queue_seconds
from engine.schedule import WRITE_RUN, Failure, Loaded, LoadMark, SourceChanged, Task
from engine.shm import Ring, VolumeArena, receive_fd
from engine.slice_worker import RESULT_RUN, process_worker, signal_name
from engine.store_format import DATASETS, error_text

# Arena slots for prepared volumes (the load look-ahead plus the volumes being computed), each for up to
# ARENA_SLOT_SLICES slices; larger volumes get their own memfd.
ARENA_EXTRA_SLOTS = 2
ARENA_SLOT_SLICES = 64
# Jobs queued at each worker: one more than the answers it may hold back (slice_worker.RESULT_RUN), so that
# it still has a slice to compute while its answers are on their way and the next jobs come back.
PREFETCH_PER_WORKER = RESULT_RUN + 1


class ProcessBackend:
    """Methods of the run that exist for the ``processes`` backend only (see the module docstring)."""

    def _start_pool(self) -> None:
        n = self.n_workers
        # A slot is taken when a slice is dispatched and given back once the writer has written its chunks
        # from it: the tasks queued at the workers, up to 2 slices per worker computed ahead of the one the
        # writer waits for, and a run of WRITE_RUN that wakes the writer (2 workers: 24 slots, 12.6 MB; 16:
        # 108, 57 MB, under the 64 MB of a container's default /dev/shm).
        slots = max((PREFETCH_PER_WORKER + 2) * n + WRITE_RUN + 4, 16)
        slots = min(slots, max(self.cfg.engine.queue_slices, PREFETCH_PER_WORKER * n + 1))
        # A ring made smaller by engine.queue_slices may have no room for a run of WRITE_RUN computed slices
        # beside the tasks at the workers: the writer, never woken for a run, would wait out its timeout.
        self.batches.write_run = max(1, min(WRITE_RUN, slots - PREFETCH_PER_WORKER * n))
        self.shm = shared_memory.SharedMemory(create=True, size=Ring.nbytes(slots, self.shape))
        _reserve(self.shm, Ring.nbytes(slots, self.shape))
        self.ring = Ring(self.shm.buf, slots, self.shape)
        self.free_slots: queue.SimpleQueue = queue.SimpleQueue()   # 8 us per put as a queue.Queue
        for s in range(slots):
            self.free_slots.put(s)
        self.procs, self.task_conns, self.result_conns, self.socks = [], [], [], []
        all_conns: list = []
        all_socks: list = []
        try:
            ctx = mp.get_context("fork")
            pipes = [(ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)) for _ in range(n)]
            all_conns = [c for (a, b) in pipes for pair in (a, b) for c in pair]
            socks = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(n)]  # volumes' memfds
            all_socks = [c for pair in socks for c in pair]
            self.arena = VolumeArena(self.n_readers + ARENA_EXTRA_SLOTS, ARENA_SLOT_SLICES, self.shape)
            self.free_arena = list(range(self.arena.slots))[::-1]
            self.volume_homes: dict[int, dict] = {}  # key -> memfd / arena slot, slices still to send / compute
            self.volume_of_worker = [-1] * n             # the volume each worker was told about last
            sp_cfg, thr = self.cfg.superpixels, self.cfg.prepare.fg_threshold
            # The sequence number of the slice each worker is computing, written by the worker before each one:
            # a worker may hold the answers of slices it finished, so its oldest unanswered job need not be the
            # one it died on (_worker_died).
            self.computing = ctx.RawArray("q", [-1] * n)
            for w, ((task_r, task_w), (res_r, res_w)) in enumerate(pipes):
                p = ctx.Process(target=process_worker, name=f"engine-worker-{w}", daemon=True,
                                args=(w, task_r, res_w, all_conns, self.writer.lock.fd, self.shm, slots,
                                      self.shape, thr, sp_cfg, self.codec, self.zero_label, self._load, socks[w][1],
                                      all_socks, self.arena, self.computing))
                p.start()
                self.procs.append(p)
            for w, ((task_r, task_w), (res_r, res_w)) in enumerate(pipes):
                task_r.close()                           # the parent keeps only its own ends: a dead worker
                res_w.close()                            # then reads as EOF, never as a hang
                socks[w][1].close()
                self.task_conns.append(task_w)
                self.result_conns.append(res_r)
                self.socks.append(socks[w][0])
        except BaseException:
            # a fork, pipe or mapping that failed (EAGAIN at a process limit, ENOMEM, EMFILE): the workers
            # started so far (they ignore SIGTERM) and the ring's name must not outlive the run
            for p in self.procs:
                p.kill()
                p.join(timeout=5)
            for c in all_conns + all_socks:
                c.close()
            if getattr(self, "arena", None) is not None:
                self.arena.mm.close()
            del self.ring
            self.shm.close()
            self.shm.unlink()
            self.shm = None
            raise
        # Every worker has mapped the ring: remove its name now, so that no crash can leak it.
        self.shm.unlink()
        self.wake_r, self.wake_w = os.pipe()
        self.dispatcher_hungry = True                # the dispatcher would take a slice now (producer: wake it)
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except (BlockingIOError, OSError):
            pass                                     # the pipe is full: the dispatcher is awake anyway

    def _dispatcher(self) -> None:
        st = _Dispatch(self.n_workers, self.prof)
        sentinel_of = {p.sentinel: w for w, p in enumerate(self.procs)}
        result_of = {c.fileno(): (w, c) for w, c in enumerate(self.result_conns)}
        ready = _Poller([*result_of, *sentinel_of, self.wake_r])     # answers before deaths: see _Poller
        try:
            while not self.stop.is_set():
                st.take_queued(self.q)
                if self.producer_done and not st.pending and self.q.empty() and not st.busy():
                    break
                if not self._hand_out(st):
                    return
                if not st.let_go and self.producer_done and not st.pending and self.q.empty():
                    self._let_go(st)
                # The producer wakes this thread for a new slice only while it could take one: with every
                # worker's queue full, a result comes first anyway, and a wake-up per slice cost both threads
                # a pipe write, a read and a poll. The flag is set before the queue is looked at again, so a
                # slice put after that look always sees it.
                self.dispatcher_hungry = st.hungry()
                if self.dispatcher_hungry and not self.q.empty():
                    continue
                for fd in ready.wait(0.5):
                    if fd == self.wake_r:
                        self._drain_wake_pipe()
                    elif fd in sentinel_of:
                        w = sentinel_of[fd]
                        if not self._drain_answers(st, w):
                            return
                        if st.let_go and not st.outstanding[w]:
                            ready.drop(fd, self.result_conns[w].fileno())    # it left as it was told to
                            continue
                        self._worker_died(w, st.outstanding[w])
                        return
                    elif st.let_go and not st.outstanding[result_of[fd][0]]:
                        # no job left there, so nothing to read: the end of the pipe of a worker that left
                        ready.drop(fd, self.procs[result_of[fd][0]].sentinel)
                    elif not self._receive(st, *result_of[fd]):
                        return
            st.close()
        finally:
            for w, p in enumerate(self.procs):      # over the worker's life, read before it exits
                self.prof.add_run_queue(w, run_queue_seconds(p.pid))
            self._stop_pool(graceful=not self.stop.is_set())

    def _drain_answers(self, st: "_Dispatch", w: int) -> bool:
        """Take the answers worker ``w`` left in its pipe before it exited; False: the run stops.

        A worker told to stop after its jobs answers them, possibly in several messages, and exits: one poll
        then reports its pipe and its exit together, and the one message read from the pipe before the exit
        is looked at may not be the last. So its exit is judged only once its pipe holds nothing more for its
        jobs (the empty pipe of a worker that exited with jobs left reads as its end, which ``_receive``
        reports as a death)."""
        conn = self.result_conns[w]
        while st.outstanding[w] and conn.poll(0):
            if not self._receive(st, w, conn):
                return False
        return True

    def _let_go(self, st: "_Dispatch") -> None:
        """Nothing is left to hand out: every worker is told to stop once it has done the jobs it holds (its
        pipe is in order), so that the workers exit while the last slices are computed and committed rather
        than after. Their exits are then expected (the dispatcher's loop)."""
        st.let_go = True
        for c in self.task_conns:
            try:
                c.send(None)
            except OSError:
                pass                                 # it died: its sentinel, with jobs outstanding, says so

    def _hand_out(self, st: "_Dispatch") -> bool:
        """Queue slices at the workers (least loaded first, none behind a load), then start loads; False: the
        run stops."""
        order = st.least_loaded_first()
        for w in order:
            if st.loading[w]:
                continue                             # a slice behind a load would wait for the whole volume
            while st.pending and len(st.outstanding[w]) < PREFETCH_PER_WORKER:
                task = st.pending.popleft()
                st.starts(w)
                if not self._send_slice(w, task, st.outstanding[w]):
                    return False
                st.outstanding[w].append(task)
        # A load starts as soon as the plan allows, not when a worker has run dry: a volume takes one worker
        # about as long as its slices take all of them at 16 workers, so waiting for the dry spell to begin a
        # load left the workers without input a quarter of the time. While slices wait, at most half the
        # workers load, so that the others keep computing (with no slice anywhere, all of them may).
        cap = max(1, self.n_workers // 2) if st.pending or st.slices_queued() else self.n_workers
        for w in st.least_loaded_first():
            if st.loading[w] or len(st.outstanding[w]) >= PREFETCH_PER_WORKER:
                continue
            if sum(st.loading) >= cap:
                break
            with self.loads.cond:
                if not self.loads.startable():
                    break
                i, item = self.loads.start()
            with self._lock:
                slot = self.free_arena.pop() if self.free_arena else -1
            st.starts(w)
            st.loading[w] = True
            st.outstanding[w].append(LoadMark(i, item[0], slot))
            if not self._send(w, ("load", i, item, slot), st.outstanding[w]):
                return False
        return True

    def _receive(self, st: "_Dispatch", w: int, conn) -> bool:
        """Take worker ``w``'s answers to its oldest jobs (one, or several slices' in a ``"many"`` message);
        False: the run stops (a failure, or a dead worker)."""
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            self.procs[w].join(timeout=2)
            self._worker_died(w, st.outstanding[w])
            return False
        for answer in (msg[1] if msg[0] == "many" else (msg,)):
            task = st.outstanding[w].popleft()
            if answer[0] == "error":
                what = task.describe(self.cfg.data.input) if isinstance(task, LoadMark) else task.describe()
                self.fail(f"{what} failed in worker process {w}: {answer[3]}")
                return False
            if isinstance(task, LoadMark):
                st.loading[w] = False
                self._load_result(w, task, answer)
            else:
                self._slice_result(w, task, answer)
            if self.stop.is_set():
                return False
        st.maybe_idle(w)
        return True

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _track_volume(self, vol: Loaded, n_todo: int) -> None:
        """Producer: a worker-loaded volume with ``n_todo`` slices to dispatch. Its memfd stays open until the
        last of them has been sent (the workers then hold their own descriptors); its arena slot is freed when
        the last of them is computed."""
        home = {"fd": vol.fd, "arena": vol.arena, "to_send": n_todo, "to_finish": n_todo}
        with self._lock:
            self.volume_homes[vol.key] = home
        if not n_todo:
            self._volume_progress(vol.key, sent=0, finished=0)

    def _volume_progress(self, key: int, sent: int, finished: int) -> None:
        with self._lock:
            home = self.volume_homes[key]
            home["to_send"] -= sent
            home["to_finish"] -= finished
            if home["to_send"] <= 0 and home["fd"] >= 0:
                os.close(home["fd"])
                home["fd"] = -1
            if home["to_finish"] <= 0:
                if home["arena"] >= 0:
                    self.free_arena.append(home["arena"])
                del self.volume_homes[key]

    def _send_slice(self, w: int, task: Task, outstanding) -> bool:
        """Send a slice to worker ``w``, preceded by where its volume lives when that worker does not know yet
        (the arena slot, or the memfd itself over the worker's socket)."""
        vol = task.vol
        if self.volume_of_worker[w] != vol.key:
            if vol.fd >= 0:
                with self._lock:
                    fd = self.volume_homes[vol.key]["fd"]
                try:
                    socket.send_fds(self.socks[w], [b"v"], [fd])
                except OSError:
                    pass                             # a dead worker: ``_send`` below reports it
            msg = ("volume", vol.key, (vol.row["n_slices"],) + self.shape, vol.row["has_label"], vol.arena,
                   vol.zstats)
            if not self._send(w, msg, outstanding):
                return False
            self.volume_of_worker[w] = vol.key
        # The last slices of a batch are answered at once: the commit, which the workers wait for at the
        # barrier, needs every one of them written.
        urgent = self.batches.place(task.seq)[1] >= self.batches.size - PREFETCH_PER_WORKER * self.n_workers
        if not self._send(w, (task.slot, task.seq, vol.key, task.z, urgent), outstanding):
            return False
        self._volume_progress(vol.key, sent=1, finished=0)
        return True

    def _send(self, w: int, msg: tuple, outstanding) -> bool:
        """Send a job to worker ``w``; a worker that died in the meantime stops the run (False)."""
        try:
            self.task_conns[w].send(msg)
            return True
        except OSError:                              # BrokenPipeError: it died on what it was doing
            self.procs[w].join(timeout=2)
            self._worker_died(w, outstanding)
            return False

    def _load_result(self, w: int, mark: "LoadMark", msg: tuple) -> None:
        kind, i = msg[0], msg[1]
        if i != mark.index or kind not in ("loaded", "loadfail", "changed"):
            self.fail(f"internal error: worker {w} answered {kind} {i}, expected load {mark.index}")
            return
        if kind == "loaded":
            try:
                result = self._received_volume(msg[2], i, w)
            except OSError as exc:
                self.fail(f"cannot receive volume {mark.ref} from worker process {w}: {error_text(exc)}")
                return
            self.prof.add_read(msg[3], msg[4])
            self.prof.add_busy(w, msg[3] + msg[4], msg[5])
        elif kind == "loadfail":
            result = Failure(*msg[2:5])
        else:
            result = SourceChanged(msg[2])
        if mark.slot >= 0 and getattr(result, "arena", -1) != mark.slot:
            with self._lock:                         # not used: a failure, or a volume too large for a slot
                self.free_arena.append(mark.slot)
        self.loads.finish(i, result)

    def _received_volume(self, meta: tuple, key: int, w: int) -> Loaded:
        """A volume worker ``w`` loaded (``send_volume``): its arena slot, or the memfd it passed."""
        ref, vid, path, shape, has_label, row, skip, notes, organs, zstats, home = meta
        if home[0] == "arena":
            return Loaded(ref, vid, path, None, None, None, row, skip, notes, organs, key=key, arena=home[1],
                          zstats=zstats)
        fd = receive_fd(self.socks[w])
        return Loaded(ref, vid, path, None, None, None, row, skip, notes, organs, key=key, fd=fd, zstats=zstats)

    def _slice_result(self, w: int, task: Task, msg: tuple) -> None:
        _, slot, seq, lens, nsp, stages, cpu = msg
        if seq != task.seq or slot != task.slot:
            self.fail(f"internal error: worker {w} answered slice {seq}, expected {task.seq}")
            return
        out, off, chunks = self.ring.out[slot], 0, {}
        for name, ln in zip(DATASETS, lens):
            chunks[name] = out[off:off + ln]         # no copy: the slot stays taken until they are written
            off += ln
        self.prof.add_work(w, stages, cpu)
        self._result(task, chunks, nsp, release=functools.partial(self.free_slots.put, slot))
        self._volume_progress(task.vol.key, sent=0, finished=1)

    def _worker_died(self, w: int, outstanding) -> None:
        p = self.procs[w]
        p.join(timeout=1)
        why = signal_name(p.exitcode)
        if outstanding and isinstance(outstanding[0], LoadMark):
            what = f"while {outstanding[0].describe(self.cfg.data.input)}"
        elif outstanding:
            seq = self.computing[w]
            current = next((t for t in outstanding if isinstance(t, Task) and t.seq == seq), outstanding[0])
            what = f"while computing {current.describe()}"
        else:
            what = "while idle"
        self.fail(f"worker process {w} (pid {p.pid}) died ({why}) {what}; the unfinished batch was not "
                  f"committed; rerun the same command to resume")

    def _stop_pool(self, graceful: bool) -> None:
        if graceful:
            for c in self.task_conns:
                try:
                    c.send(None)
                except OSError:
                    pass
            deadline = time.time() + 5
            for p in self.procs:
                p.join(timeout=max(0.0, deadline - time.time()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        for c in self.task_conns + self.result_conns + self.socks:
            try:
                c.close()
            except OSError:
                pass

    def _release_ring(self) -> None:
        """Unmap the ring and close the wake pipe once no engine thread can touch them any more: numpy keeps no
        buffer export on the ring, so unmapping it while the producer still copied a slice in crashed the
        process, and a closed wake fd could be reused by a store file that ``_wake`` would then write into."""
        if getattr(self, "shm", None) is None or any(t.is_alive() for t in self.threads):
            return                                   # a thread that did not stop: all goes with the process
        # memfd volumes: those the producer took and did not finish sending, and those loaded ahead that it
        # never took (a run that stopped early); each holds a whole prepared volume in memory
        ahead = [r.fd for r in self.loads.results.values() if isinstance(r, Loaded) and r.fd >= 0]
        self.loads.results.clear()
        for fd in [self.wake_r, self.wake_w] + [h["fd"] for h in self.volume_homes.values() if h["fd"] >= 0] + ahead:
            try:
                os.close(fd)
            except OSError:
                pass
        self.volume_homes.clear()
        self.arena.mm.close()
        try:
            del self.ring
            self.shm.close()
        except (BufferError, OSError):
            pass


class SharedMemoryTooSmall(Exception):
    """/dev/shm cannot hold the ring; the message is one line."""


def _reserve(shm: shared_memory.SharedMemory, nbytes: int) -> None:
    """Reserve the ring's pages in /dev/shm now.

    A shared-memory file is created sparse: where /dev/shm is small (a Docker container gets 64 MB unless
    ``--shm-size`` says otherwise) the first worker to touch a page beyond it dies of SIGBUS, and a rerun dies
    the same way. Allocating the pages up front turns that into one clear error before any work.
    """
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot reserve: go on unchecked
            return
        shm.close()
        shm.unlink()
        raise SharedMemoryTooSmall(
            f"processes backend: /dev/shm has no room for the {nbytes / 2 ** 20:.0f} MB ring of slices "
            f"({error_text(exc)}); give it more (Docker: --shm-size) or use --backend threads") from None


class _Poller:
    """The file descriptors the dispatcher waits on, registered once.

    ``multiprocessing.connection.wait`` builds, fills and closes a new selector on every call, about once per
    slice, in the process that also writes the store (30 us of thread CPU per call here, 24 for this poll).
    With the poll registered once, a CHAOS run (workers included) used 1.6-2.8% less CPU in A/B pairs.
    """

    def __init__(self, fds):
        self.rank = {fd: i for i, fd in enumerate(fds)}
        self.poll = select.poll()
        for fd in fds:
            self.poll.register(fd, select.POLLIN)

    def drop(self, *fds: int) -> None:
        """Stop watching ``fds`` (a worker that exited as it was told to)."""
        for fd in fds:
            try:
                self.poll.unregister(fd)
            except KeyError:
                pass

    def wait(self, timeout_s: float) -> list[int]:
        """The descriptors that are readable, at end of file or in error, in the order given at construction
        (the dispatcher takes a worker's last answer before it reports that worker's death)."""
        return sorted((fd for fd, _ in self.poll.poll(int(timeout_s * 1000))), key=self.rank.__getitem__)


class _Dispatch:
    """The dispatcher's bookkeeping: slices taken from the producer's queue and not yet sent, the jobs each
    worker holds (oldest first: workers answer in order), and since when each worker has been idle (its
    profile's waiting / barrier time)."""

    def __init__(self, n: int, prof):
        self.prof = prof
        self.pending: collections.deque = collections.deque()
        self.outstanding = [collections.deque() for _ in range(n)]
        self.loading = [False] * n                   # the worker holds a load job
        self.let_go = False                          # the workers were told to stop after their jobs
        self.idle_since = [time.perf_counter()] * n
        self.clock0 = [prof.clocks(self.idle_since[0])] * n

    def take_queued(self, q: queue.SimpleQueue) -> None:
        while True:
            try:
                self.pending.append(q.get_nowait())
            except queue.Empty:
                return

    def busy(self) -> bool:
        return any(self.outstanding)

    def hungry(self) -> bool:
        """No slice waits here, and some worker could take one."""
        return not self.pending and any(len(o) < PREFETCH_PER_WORKER and not loading
                                        for o, loading in zip(self.outstanding, self.loading))

    def slices_queued(self) -> bool:
        """Some worker holds a slice job."""
        return any(len(o) > loading for o, loading in zip(self.outstanding, self.loading))

    def least_loaded_first(self) -> list[int]:
        return sorted(range(len(self.outstanding)), key=lambda k: len(self.outstanding[k]))

    def starts(self, w: int) -> None:
        """Worker ``w`` gets a job: if it held none, its idle time ends now."""
        if not self.outstanding[w]:
            self.prof.add_idle(w, self.idle_since[w], time.perf_counter(), self.clock0[w])

    def close(self) -> None:
        """The run's work is done: the idle intervals still open end now, as a worker thread's do when it is
        let go (what follows, the workers exiting, is the profile's *other* time)."""
        now = time.perf_counter()
        for w, jobs in enumerate(self.outstanding):
            if not jobs:
                self.prof.add_idle(w, self.idle_since[w], now, self.clock0[w])
                self._idle_from(w, now)

    def maybe_idle(self, w: int) -> None:
        """Worker ``w`` answered a job: with none left it is idle from now."""
        if not self.outstanding[w]:
            self._idle_from(w, time.perf_counter())

    def _idle_from(self, w: int, t: float) -> None:
        self.idle_since[w] = t
        self.clock0[w] = self.prof.clocks(t)
