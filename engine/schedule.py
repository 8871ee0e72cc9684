"""What the engine's threads share to schedule a run: the volumes to load, the slices to compute, the batches
to commit.

``LoadPlan`` hands out load jobs (read + prepare one volume) and gives their results back to the producer in
source order; ``WorkQueue`` is the threads backend's dynamic queue of slices and load jobs; ``Batches`` is
the barrier between the producer, the workers and the writer (at most ``INFLIGHT_BATCHES`` uncommitted). The
records (``Loaded``, ``Failure``, ``Task``, ``LoadMark``) are what travels between them.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time

import numpy as np

from engine.profile import BlockClock
from engine.store_format import SliceResult

INFLIGHT_BATCHES = 1          # batch k+1 opens when batch k is committed: at most one batch lost to a kill
WRITE_RUN = 8                 # computed slices waiting for the writer that wake it (Batches.add_result)


class Stopped(Exception):
    """Raised inside engine threads when the run is being stopped."""


class SourceChanged(Exception):
    """A partly committed volume's file no longer matches the checksum the store recorded: resuming would
    mix two versions of it, so the run stops."""


@dataclasses.dataclass
class Loaded:
    """A prepared volume, slices first: ``raw[z]``, ``image[z]``, ``label[z]`` are contiguous (H, W). The processes
    backend's volumes have no ``image``: its workers z-score each slice with ``zstats`` (``prepare.zscore_slice``)."""
    ref: str
    id: str
    path: str
    raw: np.ndarray
    image: np.ndarray
    label: np.ndarray | None
    row: dict
    skip: set
    notes: list
    organs: np.ndarray
    key: int = -1          # processes backend: the load job's index, by which workers know the volume
    fd: int = -1           # processes backend: the memfd holding raw and label (the arrays are then None)
    arena: int = -1        # processes backend: or the slot of the volume arena holding them
    zstats: tuple = ()     # (mean, std) of the z-score


@dataclasses.dataclass
class Failure:
    ref: str
    path: str
    reason: str

    def record(self) -> dict:
        return {"ref": self.ref, "path": self.path, "reason": self.reason}

    def line(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclasses.dataclass
class LoadMark:
    """A load job sent to a worker process (processes backend), with the arena slot it may use (-1: none)."""
    index: int
    ref: str
    slot: int = -1

    def describe(self, source: str) -> str:
        return f"loading volume {self.ref} of {source}"


@dataclasses.dataclass
class Task:
    seq: int
    vol: Loaded
    z: int
    slot: int = -1
    batch: int = -1          # the index of its batch (the threads backend's runs stay within one)

    def describe(self) -> str:
        """The slice as error messages name it."""
        return f"volume {self.vol.id} slice z={self.z} ({self.vol.path})"


class BatchState:
    def __init__(self, index: int, first_slice: int):
        self.index = index
        self.first_slice = first_slice
        self.count = 0
        self.closed = False
        self.results: dict[int, SliceResult] = {}     # computed, not yet handed to the writer
        self.n_written = 0                             # slices handed to the writer
        self.volumes: dict[str, dict] = {}
        self.failures: list[dict] = []
        self.t_computed: float | None = None          # when its last slice was computed (closed batches)


class Batches:
    """Batch bookkeeping shared by producer, workers and writer (one condition variable)."""

    def __init__(self, first_index: int, first_seq: int, size: int, clock, stop: threading.Event):
        self.size = size
        self.first_index = first_index
        self.first_seq = first_seq
        self.sem = threading.Semaphore(INFLIGHT_BATCHES)
        self.cond = threading.Condition()
        self.open: dict[int, BatchState] = {}
        self.next_commit = first_index
        self.clock = clock
        self.stop = stop
        self.finished = False    # no batch will be opened any more
        # computed slices waiting for the writer that wake it; the processes backend lowers it when its ring
        # has too few slots for such a run (a slot is freed only once the writer has written it)
        self.write_run = WRITE_RUN

    def begin(self, index: int, first_slice: int) -> BatchState:
        """Open a batch; blocks (the barrier) while INFLIGHT_BATCHES batches are uncommitted."""
        with self.clock:
            while not self.sem.acquire(timeout=0.1):
                if self.stop.is_set():
                    raise Stopped
        st = BatchState(index, first_slice)
        with self.cond:
            self.open[index] = st
        return st

    def close(self, st: BatchState) -> None:
        with self.cond:
            st.closed = True
            if self._uncomputed(st) == 0:
                st.t_computed = time.perf_counter()
            self.cond.notify_all()

    def finish(self) -> None:
        """The producer has opened its last batch; wakes a writer waiting for more."""
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def place(self, seq: int) -> tuple[int, int]:
        """(batch index, position in that batch) of slice ``seq``: batches are runs of ``size`` sequence
        numbers from ``first_seq``."""
        k, pos = divmod(seq - self.first_seq, self.size)
        return self.first_index + k, pos

    def add_result(self, seq: int, result: SliceResult) -> None:
        index = self.place(seq)[0]
        with self.cond:
            st = self.open[index]
            st.results[seq] = result
            left = self._uncomputed(st) if st.closed else None      # an open batch's size is not known yet
            if left == 0:
                st.t_computed = time.perf_counter()
            # Wake the writer for ``write_run`` slices, not for each one: every wake-up costs both threads a
            # futex call and a context switch. Near the end of a closed batch it is woken for every slice
            # instead, so that when the last one is computed only that slice's write and the commit stand
            # between the waiting workers and the next batch.
            run = self.write_run
            if len(st.results) >= run or (left is not None and left < run):
                self.cond.notify_all()

    def writable(self, timeout: float) -> tuple[BatchState, list, bool] | None:
        """The batch to commit next, its computed results not yet written as (position in the batch, result)
        pairs in sequence order (handed over), and whether it is complete after them; None when there is
        nothing to do within ``timeout``.

        Results go to the writer as they are computed, not in sequence: a slice that is late (a slow one, or
        one whose worker holds its answer) no longer holds back the writes of the slices after it, which then
        piled up and were all written between the batch's last slice and its commit, while the workers
        waited at the barrier.
        """
        with self.cond:
            st = self.open.get(self.next_commit)
            # Once the producer is done, an absent batch means the work is over: waiting would only add
            # ``timeout`` to every run's end.
            if (st is None and not self.finished) or (st is not None and not (st.results or self._complete(st))):
                self.cond.wait(timeout)
                st = self.open.get(self.next_commit)
            if st is None:
                return None
            out = [(seq - st.first_slice, st.results.pop(seq)) for seq in sorted(st.results)]
            st.n_written += len(out)
            done = self._complete(st)
            return (st, out, done) if out or done else None

    @staticmethod
    def _complete(st: BatchState) -> bool:
        """Every slice of the closed batch has been handed to the writer."""
        return st.closed and st.n_written == st.count

    @staticmethod
    def _uncomputed(st: BatchState) -> int:
        """Slices of the batch not computed yet (neither handed to the writer nor waiting for it)."""
        return st.count - st.n_written - len(st.results)

    def committed(self) -> None:
        with self.cond:
            self.open.pop(self.next_commit, None)
            self.next_commit += 1
        self.sem.release()

    def pending(self) -> int:
        with self.cond:
            return len(self.open)


# --------------------------------------------------------------------------------------------- work
class LoadPlan:
    """The volumes to read, handed out as load jobs and handed back to the producer in source order.

    At most ``lookahead`` volumes are loading or loaded but not yet consumed (memory: one volume each).
    Shares its condition variable with whoever schedules the jobs; ``on_change`` wakes a scheduler that
    does not wait on it (the processes dispatcher).
    """

    def __init__(self, plan: list, lookahead: int, cond: threading.Condition, stop: threading.Event,
                 on_change=None, clock: BlockClock | None = None):
        self.plan = plan
        self.clock = clock or BlockClock()      # the producer's time waiting for its next volume
        self.lookahead = max(1, lookahead)
        self.cond = cond
        self.stop = stop
        self.on_change = on_change or (lambda: None)
        self.next_job = 0                 # first job not handed out yet
        self.next_take = 0                # first job the producer has not consumed yet
        self.results: dict[int, object] = {}

    def startable(self) -> bool:
        """(Under ``cond``.) A job can be handed out now."""
        return self.next_job < len(self.plan) and self.next_job - self.next_take < self.lookahead

    def start(self) -> tuple[int, tuple]:
        """(Under ``cond``.) Hand out the next job: (job index, plan item)."""
        i = self.next_job
        self.next_job += 1
        return i, self.plan[i]

    def finish(self, i: int, result: Loaded | Failure | BaseException) -> None:
        """A job's result: ``Loaded``, ``Failure``, or an exception the producer re-raises."""
        with self.cond:
            self.results[i] = result
            self.cond.notify_all()
        self.on_change()

    def __iter__(self):
        """The producer's view: results in plan order, each as soon as it is ready."""
        while True:
            with self.cond:
                if self.next_take >= len(self.plan):
                    return
                if self.next_take not in self.results:
                    with self.clock:
                        while self.next_take not in self.results:
                            if self.stop.is_set():
                                raise Stopped
                            self.cond.wait(0.1)
                result = self.results.pop(self.next_take)
                self.next_take += 1
                self.cond.notify_all()
            self.on_change()
            if isinstance(result, BaseException):
                raise result
            yield result


class WorkQueue:
    """The threads backend's dynamic work queue: slices to compute and volumes to load, for the same workers.

    The workers load the volumes themselves, so N workers are N cores of work: reading and preparing a CHAOS
    volume costs about as much CPU as its superpixels, and dedicated reader threads would run on top of the
    N workers (on 2 cores, 2 workers then ran only 1.10x faster than 1). A worker takes a load when no slice
    is waiting: loads fill the gaps where it would otherwise idle, at the batch barrier and between volumes
    (taking loads earlier, whenever fewer than 2 slices per worker waited, left about 3x more barrier time).
    """

    def __init__(self, loads: LoadPlan, max_slices: int, stop: threading.Event, clock: BlockClock | None = None,
                 workers: int = 1, run_max: int = 1):
        self.loads = loads
        self.workers = max(1, workers)
        self.run_max = max(1, run_max)      # slices of one volume a worker may take at once (``get``)
        self.clock = clock or BlockClock()      # the producer's time waiting for room in the queue
        self.cond = loads.cond
        self.slices: collections.deque = collections.deque()
        self.max_slices = max(1, max_slices)
        self.stop = stop
        self.closed = False
        self.putters = 0                  # producers waiting in ``put`` for room

    def get(self) -> tuple[str, Task] | tuple[str, list[Task]] | tuple[str, int, tuple] | None:
        """Next job for a worker: ``("slice", task)``, ``("slices", [task, ...])`` (a run of slices of one volume,
        in queue order), ``("load", i, item)``, or None when the run is over.

        A run is taken only while the queue holds one as long of the same batch for every worker: near the end
        of a batch or of the input the slices go out one at a time, so that the workers finish it together
        and the batch's commit is not held up by a run that reaches into the next one.
        """
        with self.cond:
            while True:
                if self.stop.is_set():
                    return None
                if self.slices:
                    task = self.slices.popleft()
                    run = [task] + self._rest_of_run(task)
                    # Only a producer waiting for room needs these slices' departure. The producer also waits
                    # on this condition for its next volume, so notifying on every slice woke it ~1.4 times
                    # per slice for nothing, each time pushing a worker off its core.
                    if self.putters:
                        self.cond.notify_all()
                    return ("slices", run) if len(run) > 1 else ("slice", task)
                if self.loads.startable():
                    return ("load",) + self.loads.start()
                if self.closed:
                    return None
                self.cond.wait(0.1)

    def _rest_of_run(self, task: "Task") -> list:
        """(Under ``cond``, ``task`` just taken.) The queued slices that follow ``task`` in its run: up to
        ``run_max - 1`` of its volume, only while as many per worker of its batch remain queued."""
        more = min(self.run_max - 1, len(self.slices) // self.workers)
        # the queue is in batch order: its slice at ``more * workers - 1`` must still be this batch's
        while more > 0 and self.slices[more * self.workers - 1].batch != task.batch:
            more -= 1
        rest = []
        while len(rest) < more and self.slices[0].vol is task.vol:
            rest.append(self.slices.popleft())
        return rest

    def put(self, task: "Task") -> None:
        with self.cond:
            if len(self.slices) >= self.max_slices:
                # ``putters`` changes under the lock, which ``wait`` releases: workers see it only while we wait
                with self.clock:
                    self.putters += 1
                    try:
                        while len(self.slices) >= self.max_slices:
                            if self.stop.is_set():
                                raise Stopped
                            self.cond.wait(0.1)
                    finally:
                        self.putters -= 1
            self.slices.append(task)
            self.cond.notify_all()

    def close(self) -> None:
        """No more slices will come: workers leave once the queue is empty."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def qsize(self) -> int:
        return len(self.slices)
