"""Per-run statistics of the engine: where each slice's time goes, how busy the workers are, memory and CPU.

``per_slice_ms`` is, for each stage, the time threads spent in it divided by the slices of the run (wall time
inside the stage: on an idle machine close to its CPU time, on a busy one inflated by waiting for a core or
the GIL); ``cpu.cpu_s`` is the true CPU time of the process and its workers.

A ``Profiler`` is shared by the engine's threads. Workers add their per-stage times and their idle intervals;
idle time is split into *waiting* (no slice was ready) and *barrier* (the producer was held back because
the uncommitted batch was still in flight, i.e. the writer or a straggling slice of it held the line). The
split uses ``BlockClock``: the producer's cumulative blocked time, sampled at both ends of each idle
interval. Two more clocks tell why a worker waited: the producer was waiting for its next volume to be
loaded (``waiting_volume``: loading is the bottleneck), or for room in the work queue or the ring
(``waiting_room``: the slices ahead are computed but not yet written). Waiting with neither is the hand-over
itself: the producer had a slice for the worker, which had not reached it yet. The rest of a worker's wall
time is *other*: handing results over between slices (with worker processes, the parent's threads mostly run
when an answer wakes them, so the time a worker loses to them falls here rather than in *busy*) and the
run's end after the worker's last job (worker processes exiting, the shared memory freed). A sampler thread
records queue depth, CPU utilisation (psutil, this process and its children) and resident memory over time.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from engine.runinfo import write_text_atomic

STAGES_READ = ("load", "prepare")                 # per volume, in the load jobs of the workers
STAGES_WORK = ("mask", "superpixels", "encode")   # per slice, in the workers
STAGES_WRITE = ("write", "index")                 # per batch, in the writer thread


class BlockClock:
    """Cumulative time some party has spent blocked; ``value(t)`` is the total up to time ``t``."""

    def __init__(self) -> None:
        self._total = 0.0
        self._since: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._since = time.perf_counter()

    def stop(self) -> None:
        with self._lock:
            if self._since is not None:
                self._total += time.perf_counter() - self._since
                self._since = None

    def value(self, t: float | None = None) -> float:
        with self._lock:
            t = time.perf_counter() if t is None else t
            return self._total + (max(0.0, t - self._since) if self._since is not None else 0.0)

    def __enter__(self) -> "BlockClock":
        """``with clock:`` counts the block's time, however it ends (``Stopped`` included)."""
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerStats:
    """Times of one compute worker, in seconds."""

    def __init__(self) -> None:
        self.slices = 0
        self.busy = 0.0
        self.busy_cpu = 0.0      # CPU time while busy; for the rest of ``busy`` it waited for the GIL or a core
        self.run_queue: float | None = None   # time runnable but without a core (Linux schedstat), if known
        self.waiting = 0.0
        self.waiting_volume = 0.0   # parts of ``waiting``: the producer waited for a volume / for room
        self.waiting_room = 0.0
        self.barrier = 0.0
        self.stages = {k: 0.0 for k in STAGES_WORK}

    def to_dict(self, wall: float) -> dict:
        return {"slices": self.slices, "busy_s": round(self.busy, 4), "busy_cpu_s": round(self.busy_cpu, 4),
                "waiting_s": round(self.waiting, 4), "waiting_volume_s": round(self.waiting_volume, 4),
                "waiting_room_s": round(self.waiting_room, 4),
                "barrier_s": round(self.barrier, 4),
                "other_s": round(max(0.0, wall - self.busy - self.waiting - self.barrier), 4),
                "run_queue_s": None if self.run_queue is None else round(self.run_queue, 4),
                "busy_frac": round(self.busy / wall, 4) if wall > 0 else 0.0,
                "stages_s": {k: round(v, 4) for k, v in self.stages.items()}}


class Profiler:
    """Collects the run's profile; ``to_dict`` is what ``STORE.profile.json`` holds.

    Parameters
    ----------
    n_workers : int
    backend : str
    queue_depth : callable returning int
        Slices waiting for a worker, sampled by the sampler thread.
    interval : float
        Sampling period in seconds.
    child_pids : callable returning a list of pids, optional
        The worker processes (processes backend). Given explicitly because asking psutil for a process's
        children scans every process of the machine, which costs real CPU on a busy host.
    """

    def __init__(self, n_workers: int, backend: str, queue_depth: Callable[[], int] | None = None,
                 interval: float = 0.25, child_pids: Callable[[], list] | None = None):
        self.backend = backend
        self.workers = [WorkerStats() for _ in range(n_workers)]
        self.barrier_clock = BlockClock()   # the producer held at the batch barrier
        self.volume_clock = BlockClock()    # ... waiting for its next volume to be loaded
        self.room_clock = BlockClock()      # ... waiting for room in the work queue / the ring
        self.read = {k: 0.0 for k in STAGES_READ}
        self.write = {k: 0.0 for k in STAGES_WRITE}
        self.volumes_read = 0
        self.batches_written = 0
        self.commits: list[float] = []           # seconds of each batch's commit (tables, fsync, rename)
        self.commit_tails: list[float] = []      # seconds from a batch's last slice computed to its commit point
        self.n_results = 0                       # slice results handed to the writer, and the first and last times
        self.t_first_result: float | None = None
        self.t_last_result: float | None = None
        self.bytes_written = 0
        self.samples: list[dict] = []
        self._queue_depth = queue_depth or (lambda: 0)
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc = psutil.Process()
        self._child_pids = child_pids or (lambda: [])
        self._children: dict[int, psutil.Process] = {}
        self._n_samples = 0
        self.t0 = time.perf_counter()
        self.t_end: float | None = None
        self.peak_rss_total = 0
        self._cpu0 = self._cpu_times()
        self._faults0 = _minor_faults()
        self.minor_faults: int | None = None

    # ------------------------------------------------------------------ recording
    def clocks(self, t: float) -> tuple[float, float, float]:
        """The producer's blocked-time clocks (barrier, volume, room) at time ``t``: taken when a worker goes
        idle, for ``add_idle``."""
        return self.barrier_clock.value(t), self.volume_clock.value(t), self.room_clock.value(t)

    def add_idle(self, w: int, t0: float, t1: float, clocks0: tuple[float, float, float]) -> None:
        """Worker ``w`` was idle from ``t0`` to ``t1``; ``clocks0`` = ``clocks(t0)``. The producer blocks in one
        place at a time, so the three clocks' advances over the interval do not overlap."""
        idle = max(0.0, t1 - t0)
        b1, v1, r1 = self.clocks(t1)
        barrier = min(idle, max(0.0, b1 - clocks0[0]))
        waiting = idle - barrier
        volume = min(waiting, max(0.0, v1 - clocks0[1]))
        room = min(waiting - volume, max(0.0, r1 - clocks0[2]))
        st = self.workers[w]
        st.barrier += barrier
        st.waiting += waiting
        st.waiting_volume += volume
        st.waiting_room += room

    def add_work(self, w: int, stages: dict, cpu: float = 0.0) -> None:
        """Worker ``w`` computed a slice: wall seconds per stage, and ``cpu`` seconds of its own CPU time."""
        st = self.workers[w]
        st.slices += 1
        st.busy_cpu += cpu
        for k, v in stages.items():
            st.stages[k] = st.stages.get(k, 0.0) + v
            st.busy += v

    def add_busy(self, w: int, seconds: float, cpu: float = 0.0) -> None:
        """Worker ``w`` spent ``seconds`` (``cpu`` of them on a core) on something other than a slice (loading a
        volume: ``add_read`` records its stages)."""
        self.workers[w].busy += seconds
        self.workers[w].busy_cpu += cpu

    def add_run_queue(self, w: int, seconds: float | None) -> None:
        """Worker ``w`` waited ``seconds`` in all for a core while runnable (``run_queue_seconds``)."""
        if seconds is not None:
            st = self.workers[w]
            st.run_queue = (st.run_queue or 0.0) + seconds

    def add_read(self, load: float, prepare: float) -> None:
        with self._lock:
            self.read["load"] += load
            self.read["prepare"] += prepare
            self.volumes_read += 1

    def add_write(self, write: float, index: float, nbytes: int) -> None:
        with self._lock:
            self.write["write"] += write
            self.write["index"] += index
            self.batches_written += 1
            self.bytes_written += nbytes

    def add_commit(self, commit: float, tail: float | None) -> None:
        """A batch was committed: ``commit`` seconds for its tables, fsync and rename, ``tail`` seconds from
        its last slice computed to the commit point (writing what was left of it, then the commit): the part
        of the barrier that the writer holds (None when not known)."""
        with self._lock:
            self.commits.append(commit)
            if tail is not None:
                self.commit_tails.append(tail)

    def add_result(self, t: float) -> None:
        """A slice's result reached the writer's side at ``t`` (``time.perf_counter``). The first and the last
        mark the run's two ends: before the first, volumes load and workers start; after the last, the final
        commit, the index and the workers' exit. Called under the run's lock."""
        if self.t_first_result is None:
            self.t_first_result = t
        self.t_last_result = t
        self.n_results += 1

    def ends(self) -> dict:
        """The run's two ends and its rate between them (``add_result``): milliseconds from the start of the
        clock to the first result, from the last result to the end of the clock, and slices/s from the first
        result to the last (None with fewer than 2 results). A short run on many workers spends a larger share
        of its time at its ends, where most workers have nothing to compute."""
        if self.t_first_result is None:
            return {"first_result_ms": None, "after_last_result_ms": None, "between_slices_per_s": None}
        span = self.t_last_result - self.t_first_result
        return {"first_result_ms": round(1000 * (self.t_first_result - self.t0), 2),
                "after_last_result_ms": round(1000 * max(0.0, self.t0 + self.wall - self.t_last_result), 2),
                "between_slices_per_s": round((self.n_results - 1) / span, 1)
                if self.n_results > 1 and span > 0 else None}

    # ------------------------------------------------------------------ sampling
    def _children_now(self) -> list:
        pids = set(self._child_pids())
        for pid in list(self._children):
            if pid not in pids:
                del self._children[pid]
        for pid in pids:
            if pid not in self._children:
                try:
                    self._children[pid] = psutil.Process(pid)
                except psutil.Error:
                    pass
        return list(self._children.values())

    def _cpu_times(self) -> float:
        """CPU seconds of this process, its live workers and its reaped children."""
        try:
            t = self._proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            return 0.0
        for child in self._children_now():
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total

    def _rss_total(self, full: bool) -> int:
        """Resident memory of this process plus its worker processes.

        Forked workers share most pages with the parent, so summing their RSS would count those pages
        several times; with workers present the proportional set size (PSS, Linux) is summed instead, every
        few samples only (reading it costs a few milliseconds per process). Workers that have exited are left
        out: once none is running the parent's pages are its own again and its RSS is the answer, which spares
        the run's last sample the walk over the parent's page tables (4-5 ms on CHAOS, inside the timed run).
        """
        children = [c for c in self._children_now() if _running(c)]
        try:
            if not children:
                return self._proc.memory_info().rss
            if not full:
                return 0
            total = 0
            for proc in [self._proc] + children:
                try:
                    info = proc.memory_full_info()
                    total += getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0

    def sample(self, full: bool | None = None) -> None:
        now = time.perf_counter()
        self._n_samples += 1
        rss = self._rss_total(full if full is not None else self._n_samples % 4 == 1)
        self.peak_rss_total = max(self.peak_rss_total, rss)
        if rss == 0 and self.samples:
            rss = int(self.samples[-1]["rss_mb"] * 2 ** 20)
        cpu = self._cpu_times()
        prev = self.samples[-1] if self.samples else {"t": 0.0, "cpu_s": self._cpu0}
        dt = (now - self.t0) - prev["t"]
        self.samples.append({"t": round(now - self.t0, 3), "queue": int(self._queue_depth()),
                             "cpu_s": cpu, "cpu_pct": round(100.0 * (cpu - prev["cpu_s"]) / dt, 1) if dt > 0 else 0.0,
                             "rss_mb": round(rss / 2 ** 20, 1)})

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def start(self) -> "Profiler":
        self.t0 = time.perf_counter()
        self._cpu0 = self._cpu_times()
        self._faults0 = _minor_faults()
        self._thread = threading.Thread(target=self._loop, name="profile-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sample(full=True)
        self.t_end = time.perf_counter()
        self.minor_faults = _minor_faults() - self._faults0

    # ------------------------------------------------------------------ report
    @property
    def wall(self) -> float:
        return (self.t_end or time.perf_counter()) - self.t0

    def to_dict(self, slices: int, extra: dict | None = None) -> dict:
        """The profile as a JSON-able dict (``slices`` = slices computed by this run)."""
        wall = self.wall
        out = {
            "backend": self.backend, "workers": len(self.workers), "wall_s": round(wall, 4),
            "slices": slices, "slices_per_s": round(slices / wall, 2) if wall > 0 else 0.0,
            "volumes_read": self.volumes_read, "batches_written": self.batches_written,
            "bytes_written": self.bytes_written,
            "worker_time": self._worker_time(wall),
            "per_worker": [w.to_dict(wall) for w in self.workers],
            # where the producer itself waited, in all (it runs alone: these add up to at most the wall time)
            "producer_wait_s": {"volume": round(self.volume_clock.value(), 4),
                                "room": round(self.room_clock.value(), 4),
                                "barrier": round(self.barrier_clock.value(), 4)},
            "per_slice_ms": {k: round(1000.0 * v / slices, 4) for k, v in self._stage_totals().items()}
            if slices else {},
            "stage_totals_s": {k: round(v, 4) for k, v in self._stage_totals().items()},
            "cpu": self._cpu(wall),
            "memory": self._memory(),
            # the writer's side of the batch barrier: per batch, the commit and the time from its last slice
            # computed to the commit point (the workers wait at least that long for the next batch)
            "commits": {"n": len(self.commits), "commit_ms": _ms_summary(self.commits),
                        "last_slice_to_commit_ms": _ms_summary(self.commit_tails)},
            "ends": self.ends(),
            "timeline": [{k: s[k] for k in ("t", "queue", "cpu_pct", "rss_mb")} for s in self.samples],
            "n_processed_by_workers": sum(w.slices for w in self.workers),
        }
        out.update(extra or {})
        return out

    def _stage_totals(self) -> dict[str, float]:
        """Seconds per stage over the run: reading, the workers' stages summed, writing."""
        return {**self.read, **{k: sum(w.stages.get(k, 0.0) for w in self.workers) for k in STAGES_WORK},
                **self.write}

    def _worker_time(self, wall: float) -> dict:
        """The workers' time summed over all of them, split as in ``WorkerStats``."""
        busy = sum(w.busy for w in self.workers)
        busy_cpu = sum(w.busy_cpu for w in self.workers)
        waiting = sum(w.waiting for w in self.workers)
        barrier = sum(w.barrier for w in self.workers)
        core_wait = _core_wait(self.workers)
        return {"busy_s": round(busy, 4), "busy_cpu_s": round(busy_cpu, 4),
                "busy_on_cpu_pct": round(100 * busy_cpu / busy, 1) if busy > 0 else 0.0,
                # the rest of busy split: waiting for a core (runnable, Linux schedstat) and the
                # remainder, asleep in busy: the GIL, a lock or I/O; None where not measured
                "busy_core_wait_s": None if core_wait is None else round(core_wait, 4),
                "busy_core_wait_pct": (None if core_wait is None else
                                       round(100 * core_wait / busy, 1) if busy > 0 else 0.0),
                "waiting_s": round(waiting, 4), "barrier_s": round(barrier, 4),
                # parts of waiting: the producer waited for a volume to load / for room
                "waiting_volume_s": round(sum(w.waiting_volume for w in self.workers), 4),
                "waiting_room_s": round(sum(w.waiting_room for w in self.workers), 4),
                "other_s": round(max(0.0, wall * len(self.workers) - busy - waiting - barrier), 4),
                "busy_frac": round(busy / (wall * len(self.workers)), 4) if wall > 0 and self.workers else 0.0}

    def _cpu(self, wall: float) -> dict:
        """CPU seconds of the whole run (this process and its workers) and the utilisation they make."""
        cpu_total = self._cpu_times() - self._cpu0
        return {"cpu_s": round(cpu_total, 3), "utilisation_pct": round(100 * cpu_total / wall, 1) if wall else 0,
                "cores": os.cpu_count(), "of_all_cores_pct":
                    round(100 * cpu_total / wall / (os.cpu_count() or 1), 1) if wall else 0}

    def _memory(self) -> dict:
        """Peak resident memory (this process, its children, the sampled total) and the main's page faults."""
        ru_self = _peak_rss_self()
        ru_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        return {"peak_rss_mb": round(max(self.peak_rss_total, ru_self) / 2 ** 20, 1),
                "peak_rss_main_mb": round(ru_self / 2 ** 20, 1),
                "peak_rss_children_mb": round(ru_children / 2 ** 20, 1),
                "peak_rss_sampled_total_mb": round(self.peak_rss_total / 2 ** 20, 1),
                # memory touched for the first time shows here: a run in a fresh process faults in its
                # whole working set, a second run in the same process reuses it
                "minor_page_faults_main": (self.minor_faults if self.minor_faults is not None
                                           else _minor_faults() - self._faults0)}

    def write_json(self, path: str | Path, slices: int, extra: dict | None = None) -> dict:
        data = self.to_dict(slices, extra)
        write_text_atomic(path, json.dumps(data, indent=1))
        return data


def _ms_summary(seconds: list[float]) -> dict | None:
    """Median and largest of some durations, in milliseconds; None for none."""
    if not seconds:
        return None
    return {"median": round(1000 * statistics.median(seconds), 2), "max": round(1000 * max(seconds), 2)}


def _running(proc: psutil.Process) -> bool:
    """The process exists and has not exited (an exited worker not yet reaped is a zombie holding no memory)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _minor_faults() -> int:
    """Minor page faults of this process so far (all its threads; worker processes not included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_queue_seconds(pid: int | None = None) -> float | None:
    """Seconds a thread (``pid`` None: the calling one) or a single-threaded process has been runnable but
    without a core, from Linux's ``schedstat`` (its second field, run-queue delay); None where not reported."""
    path = "/proc/thread-self/schedstat" if pid is None else f"/proc/{pid}/task/{pid}/schedstat"
    try:
        with open(path, "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _core_wait(workers: list[WorkerStats]) -> float | None:
    """Time within busy the workers waited for a core, or None unless every worker measured it.

    The run-queue delay of a worker also holds the short waits for a core after waking from idle; it is
    capped per worker at the busy time it spent off a core, so that the split adds up."""
    if not workers or any(w.run_queue is None for w in workers):
        return None
    return sum(min(w.run_queue, max(0.0, w.busy - w.busy_cpu)) for w in workers)


def _peak_rss_self() -> int:
    """Peak resident memory of this process in bytes.

    ``VmHWM`` (Linux) rather than ``getrusage``: ``ru_maxrss`` survives ``execve``, so a process started by a
    big parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_WORKER_NOUNS = {"threads": ("worker thread", "worker threads"), "processes": ("worker process", "worker processes")}


WORKER_TIME_PARTS = ("busy", "waiting", "barrier", "other")
WAITING_PARTS = ("waiting_volume", "waiting_room")     # parts of "waiting", in profiles since stop 27


def worker_time_pcts(wt: dict) -> dict[str, float] | None:
    """The workers' busy / waiting / barrier / other time (a profile's ``worker_time``) as % of their wall time,
    keyed by part, with the parts of waiting (``WAITING_PARTS``) where the profile has them; None when there is
    no time at all.

    Profiles written before ``other_s`` was recorded count it as 0, so their three shares are of their sum.
    """
    total = sum(wt.get(f"{k}_s", 0.0) for k in WORKER_TIME_PARTS)
    if total <= 0:
        return None
    return {k: 100.0 * wt.get(f"{k}_s", 0.0) / total for k in WORKER_TIME_PARTS} | \
        {k: 100.0 * wt[f"{k}_s"] / total for k in WAITING_PARTS if f"{k}_s" in wt}


def _waiting_why(pcts: dict[str, float] | None, backend: str) -> str:
    """What the producer was doing while the workers waited for input (``worker_time_pcts``' shares): e.g.
    ' (4% while a volume loaded, 1% with the ring full)'; empty when under 1% or not recorded."""
    if not pcts or "waiting_volume" not in pcts or pcts["waiting"] < 1:
        return ""
    parts = [f"{pcts['waiting_volume']:.0f}% while a volume loaded"]
    if pcts["waiting_room"] >= 0.5:
        room = "ring" if backend == "processes" else "queue"
        parts.append(f"{pcts['waiting_room']:.0f}% with the {room} full")
    return f" ({', '.join(parts)})"


def summary_lines(p: dict) -> list[str]:
    """A few human lines from a profile dict (``Profiler.to_dict``)."""
    wt = p["worker_time"]
    pcts = worker_time_pcts(wt)
    frac = (lambda k: f"{pcts[k]:.0f}%" if pcts else "-")
    cpu_per_slice = f", {1000 * p['cpu']['cpu_s'] / p['slices']:.2f} CPU ms per slice" if p["slices"] else ""
    on_core = wt.get("busy_on_cpu_pct", 0)
    if wt.get("busy_core_wait_pct") is None:
        off_core = "the rest waiting for the GIL or a core"
    else:
        rest = max(0.0, 100 - on_core - wt["busy_core_wait_pct"])
        off_core = f"{wt['busy_core_wait_pct']:.0f}% waiting for a core, {rest:.0f}% for the GIL, a lock or I/O"
    one, many = _WORKER_NOUNS.get(p["backend"], ("worker", "workers"))
    lines = [f"{p['slices']} slices in {p['wall_s']:.2f} s = {p['slices_per_s']:.1f} slices/s with "
             f"{p['workers']} {one if p['workers'] == 1 else many}"]
    if not p["slices"]:                # nothing computed (a resume with nothing left): no shares to speak of
        return lines
    lines += [f"workers: busy {frac('busy')} ({on_core:.0f}% of it on a core, {off_core}), waiting for input "
             f"{frac('waiting')}{_waiting_why(pcts, p['backend'])}, "
             f"barrier {frac('barrier')}, other {frac('other')} (handing results over, the run's end); "
             f"CPU {p['cpu']['utilisation_pct']:.0f}% ({p['cpu']['cores']} cores){cpu_per_slice}; "
             f"peak RSS {p['memory']['peak_rss_mb']:.0f} MB"]
    ps = p["per_slice_ms"]
    if ps:
        part = (lambda keys: ", ".join(f"{k} {ps[k]:.2f}" for k in keys if k in ps))
        # Worker threads take the GIL back after each compiled call; at the default settings a slice is one
        # call whose last step is encode, so with other threads about, that wait reads as encoding time.
        gil = (" (threads: a step's time includes taking the GIL back after it; at the default settings all of "
               "it falls in encode)" if p["backend"] == "threads" and p["workers"] > 1 else "")
        lines.append(f"ms per slice in each stage: read [{part(STAGES_READ)}] | workers [{part(STAGES_WORK)}] | "
                     f"writer [{part(STAGES_WRITE)}]{gil}")
    ends = p.get("ends") or {}
    if ends.get("first_result_ms") is not None:
        between = ends.get("between_slices_per_s")
        lines.append(f"ends: first slice result {ends['first_result_ms']:.0f} ms after the start, the last "
                     f"{ends['after_last_result_ms']:.0f} ms before the end"
                     + (f"; {between:.1f} slices/s between them" if between else ""))
    commits = p.get("commits") or {}
    tail, commit = commits.get("last_slice_to_commit_ms"), commits.get("commit_ms")
    if tail and commit:
        lines.append(f"batches: {commits['n']} committed; from a batch's last slice computed to its commit "
                     f"{tail['median']:.1f} ms (median; max {tail['max']:.1f}), of it the commit itself "
                     f"{commit['median']:.1f} ms")
    return lines
