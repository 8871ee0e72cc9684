"""Crash safety with real processes: ``kill -9`` of a running preprocess, a killed worker process, two
concurrent writers, readers during a run. Every store is compared with a clean run's store."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from engine import pipeline
from engine.inspect import check_integrity
from engine.store_format import lock_path, parts_dir
from engine.store_reader import StoreReader
from test_pipeline import SIZE, assert_same_store, make_cfg, synthetic_volume, write_folder

ROOT = Path(__file__).resolve().parent.parent
BATCH = 4
N_VOLUMES, N_SLICES = 8, 8          # 8 volumes of 8-9 slices: 68 slices, 17 batches


def command(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "preprocess", "--input", str(src), "--out", str(out),
            "--batch", str(BATCH), "--threads", "2", "--no-progress", "--set", f"prepare.size={SIZE}",
            "--set", "superpixels.slic.n_segments=12", *extra]


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    return e


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def shards(out: Path) -> int:
    parts = parts_dir(out)
    return len(list(parts.glob("0*.h5"))) if parts.is_dir() else 0


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, step: float = 0.005) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(step)
    return False


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("rel") / "in", n=N_VOLUMES, n_slices=N_SLICES)


@pytest.fixture(scope="module")
def clean(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "store.h5"
    assert pipeline.preprocess(make_cfg(src, out, batch=BATCH), progress=False) == 0
    return out


def kill_and_resume(src: Path, clean: Path, out: Path, rng: random.Random, backend: str = "threads") -> None:
    """Start a run, SIGKILL it after a random number of commits plus a random delay, rerun to the end."""
    with StoreReader(clean) as r:
        total = r.n_slices
    n_batches = -(-total // BATCH)
    target = rng.randrange(0, n_batches)           # commits to wait for (0: kill during start-up/first batch)
    delay = rng.uniform(0.0, 0.05)
    proc = start(command(src, out, "--backend", backend))
    try:
        wait_for(lambda: shards(out) >= target, timeout=120, proc=proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = 0
    if out.exists():
        with StoreReader(out) as r:                # whatever was published is whole and consistent
            assert r.n_slices % BATCH == 0 or r.meta["complete"]
            assert check_integrity(r) == []
    if parts_dir(out).is_dir():
        before = sum(1 for _ in parts_dir(out).glob("0*.h5"))
    # the same command again (in this process: saves an interpreter start-up per trial)
    assert pipeline.preprocess(make_cfg(src, out, batch=BATCH, backend=backend), progress=False) == 0
    assert_same_store(clean, out)
    with StoreReader(out) as r:
        keys = list(zip(r.slices["volume"].tolist(), r.slices["z"].tolist()))
        assert len(keys) == len(set(keys)) == total           # nothing lost, nothing duplicated
        assert check_integrity(r) == []
    runs = [json.loads(line) for line in (parts_dir(out) / "runs.jsonl").read_text().splitlines()]
    # the rerun computed only what no committed shard held (the killed run could lose at most one batch:
    # test_pipeline.py::test_a_kill_can_lose_at_most_one_batch)
    assert runs[-1]["status"] == "complete"
    assert runs[-1]["slices_committed"] <= total - BATCH * min(before, n_batches - 1) or before == n_batches
    leftovers = [p.name for p in parts_dir(out).iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not lock_path(out).exists()
    assert not list(out.parent.glob(".store.h5.tmp-*"))


def test_kill_9_at_random_moments_then_rerun_is_identical(src, clean, tmp_path):
    rng = random.Random(1234)
    for trial in range(3):
        kill_and_resume(src, clean, tmp_path / f"t{trial}" / "store.h5", rng)


def test_kill_9_of_a_processes_run_leaks_nothing_and_resumes(src, clean, tmp_path):
    # Worker processes hold volumes in an anonymous shared arena or in memfds, and the ring's name is removed
    # right after the fork: a killed parent leaves no shared-memory file, and its workers leave by themselves.
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    rng = random.Random(7)
    for trial in range(2):
        kill_and_resume(src, clean, tmp_path / f"p{trial}" / "store.h5", rng, backend="processes")
    def orphans():                 # forked workers keep the killed run's command line, with this test's paths
        return [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]

    deadline = time.time() + 10
    while orphans() and time.time() < deadline:
        time.sleep(0.2)
    assert orphans() == []
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) - shm_before == set()


@pytest.mark.slow
def test_kill_9_ten_trials(src, clean, tmp_path):
    rng = random.Random(99)
    for trial in range(10):
        kill_and_resume(src, clean, tmp_path / f"t{trial}" / "store.h5", rng)


@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_sigterm_stops_like_ctrl_c_and_the_rerun_completes(src, clean, tmp_path, backend):
    # A job scheduler's stop or time limit sends SIGTERM to every process of the job: the run stops in order
    # (exit 143, one line, the run recorded, the lock released, no worker left) and the rerun completes.
    out = tmp_path / "store.h5"
    proc = start(command(src, out, "--backend", backend))
    try:
        assert wait_for(lambda: shards(out) >= 2, timeout=120, proc=proc, step=0.002), "run ended too early"
        procs = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children()
                              if "resource_tracker" not in " ".join(c.cmdline())]
        for pid in procs:
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    stops = [line for line in err.splitlines() if "stopped" in line]
    assert stops == ["preprocess: stopped: terminated (SIGTERM); committed batches are kept, rerun the same "
                     "command to resume"]
    runs = [json.loads(line) for line in (parts_dir(out) / "runs.jsonl").read_text().splitlines()]
    assert runs[-1]["status"] == "interrupted" and runs[-1]["slices_committed"] >= 2 * BATCH
    assert not lock_path(out).exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert pipeline.preprocess(make_cfg(src, out, batch=BATCH, backend=backend), progress=False) == 0
    assert_same_store(clean, out)


def test_killed_worker_process_fails_cleanly_and_rerun_completes(src, clean, tmp_path):
    out = tmp_path / "store.h5"
    proc = start(command(src, out, "--backend", "processes"))
    try:
        assert wait_for(lambda: shards(out) >= 2, timeout=120, proc=proc, step=0.002), "run ended too early"
        workers = [c for c in psutil.Process(proc.pid).children()
                   if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(workers) == 2
        workers[0].send_signal(signal.SIGKILL)
        t_kill = time.time()
        _, err = proc.communicate(timeout=60)
        elapsed = time.time() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert elapsed < 10, f"took {elapsed:.1f} s to notice the dead worker"
    assert f"(pid {workers[0].pid}) died (killed by signal 9 (SIGKILL))" in err
    assert "rerun the same command to resume" in err
    with StoreReader(out) as r:
        assert r.meta["complete"] is False and r.n_slices % BATCH == 0 and check_integrity(r) == []
    assert not workers[1].is_running() or workers[1].status() == psutil.STATUS_ZOMBIE
    assert pipeline.preprocess(make_cfg(src, out, batch=BATCH, backend="processes"), progress=False) == 0
    assert_same_store(clean, out)


def test_failing_slice_in_a_worker_process_is_named_behind_held_answers(src, tmp_path, capsys, before_each_slice):
    """With batches of 64 a worker process holds the answers of the slices before the failing one; it sends
    them before the error, so the parent pairs the error with the right slice."""
    img, _ = synthetic_volume(3, N_SLICES)
    target = np.ascontiguousarray(img[:, :, 5], dtype=np.float32)

    def fails_on_target(raw):
        if raw.shape == target.shape and np.array_equal(raw, target):
            raise RuntimeError("simulated kernel failure")

    before_each_slice(fails_on_target)
    out = tmp_path / "store.h5"
    rc = pipeline.preprocess(make_cfg(src, out, batch=64, backend="processes"), progress=False)
    err = capsys.readouterr().err
    assert rc == 1
    assert "volume 3 slice z=5" in err and "simulated kernel failure" in err


def assert_worker_death_named(src, out, capsys, before_each_slice, vid: int, n_slices: int, z: int,
                              pause: float = 0.0) -> None:
    """A worker process killed (SIGKILL) inside the kernel on slice ``z`` of volume ``vid`` (``pause`` s into
    it): the run stops within a minute, its message names that slice, and the store stays consistent without
    it."""
    img, _ = synthetic_volume(vid, n_slices)
    target = np.ascontiguousarray(img[:, :, z], dtype=np.float32)

    def dies_on_target(raw):
        if raw.shape == target.shape and np.array_equal(raw, target):
            time.sleep(pause)
            os.kill(os.getpid(), signal.SIGKILL)

    before_each_slice(dies_on_target)
    t0 = time.time()
    rc = pipeline.preprocess(make_cfg(src, out, batch=BATCH, backend="processes"), progress=False)
    err = capsys.readouterr().err
    assert rc == 1 and time.time() - t0 < 60
    assert f"died (killed by signal 9 (SIGKILL)) while computing volume {vid} slice z={z}" in err
    with StoreReader(out) as r:
        assert check_integrity(r) == []
        assert (str(vid), z) not in set(zip(r.slices["volume"].tolist(), r.slices["z"].tolist()))


def test_dead_worker_message_names_the_slice(src, tmp_path, capsys, before_each_slice):
    """A worker process that dies inside the kernel on one known slice: the message names that slice."""
    # volume id 3 is the third one written (k = 2: N_SLICES slices)
    assert_worker_death_named(src, tmp_path / "store.h5", capsys, before_each_slice, 3, N_SLICES, 5)


def test_a_worker_that_dies_on_the_last_slice_after_being_let_go_is_named(src, tmp_path, capsys, before_each_slice):
    """Once nothing is left to hand out the workers are told to stop after their jobs (and their exits are
    expected): one that dies on the input's last slice, after that, is still a dead worker with a job."""
    n_last = N_SLICES + (N_VOLUMES - 1) % 2          # the last volume's slices (write_folder)
    # 0.3 s into the slice: every other slice is handed out by then, and the workers are let go
    assert_worker_death_named(src, tmp_path / "store.h5", capsys, before_each_slice, N_VOLUMES, n_last,
                              n_last - 1, pause=0.3)


def test_dead_worker_while_loading_names_the_volume(src, tmp_path, monkeypatch, capsys):
    """Worker processes also load volumes: one that dies while preparing volume 3 is named as such."""
    parent = os.getpid()
    real = pipeline.prepare_volume

    def dies_on_volume_3(vol, *args):
        if vol.id == "3" and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(vol, *args)

    monkeypatch.setattr(pipeline, "prepare_volume", dies_on_volume_3)
    out = tmp_path / "store.h5"
    rc = pipeline.preprocess(make_cfg(src, out, batch=BATCH, backend="processes"), progress=False)
    err = capsys.readouterr().err
    assert rc == 1
    assert f"died (killed by signal 9 (SIGKILL)) while loading volume 3 of {src}" in err
    with StoreReader(out) as r:
        assert check_integrity(r) == []
        assert "3" not in set(r.slices["volume"].tolist())
    monkeypatch.setattr(pipeline, "prepare_volume", real)
    assert pipeline.preprocess(make_cfg(src, out, batch=BATCH, backend="processes"), progress=False) == 0


def test_second_concurrent_run_fails_at_once(src, tmp_path, capsys):
    out = tmp_path / "store.h5"
    first = start(command(src, out, "--threads", "1"))
    try:
        assert wait_for(lambda: lock_path(out).exists() and str(first.pid) in lock_path(out).read_text(),
                        timeout=120, proc=first), "the first run never took the lock"
        t0 = time.time()
        rc = pipeline.preprocess(make_cfg(src, out, batch=BATCH), progress=False)
        elapsed = time.time() - t0
        err = capsys.readouterr().err
        still_running = first.poll() is None
    finally:
        first.kill()
        first.communicate(timeout=30)
    if not still_running:
        pytest.skip("the first run finished before the second one started (machine too fast)")
    assert rc == 2 and elapsed < 2.0
    assert "another run is writing this store" in err and f"pid {first.pid}" in err
    assert len(err.strip().splitlines()) == 1


def test_readers_during_a_run_see_only_whole_batches(src, clean, tmp_path):
    out = tmp_path / "store.h5"
    proc = start(command(src, out, "--threads", "1"))
    seen = []
    try:
        while proc.poll() is None:
            if out.exists():
                with StoreReader(out) as r:
                    if r.n_slices and not r.meta["complete"]:
                        assert r.n_slices % BATCH == 0
                        assert check_integrity(r) == []
                        seen.append(r.n_slices)
            time.sleep(0.01)
        assert proc.returncode == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert seen, "no snapshot was taken while the run was writing"
    assert_same_store(clean, out)
