"""Training loop: run folder, checkpoints, exact resume, evaluation loader, error paths."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alpnet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from alpnet.config import load
from alpnet.episodes import collate_episodes
from alpnet.train import RunLog, batch_to_device, lr_step_of, main

try:
    from test_episodes import synthetic_volumes, write_store
except ImportError:  # tests collected as a package
    from tests.test_episodes import synthetic_volumes, write_store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "store.h5", synthetic_volumes(n=6))


def config(store: Path, out: Path, iterations: int = 4, *extra: str):
    return load(None, [f"train.store={store}", f"train.out={out}", f"train.iterations={iterations}",
                       "train.ckpt_every=2", "train.log_every=1", "train.num_workers=0", "train.device=cpu",
                       "model.encoder=tiny", "episodes.holdout=false", "episodes.setting=1", *extra])


def test_run_folder_checkpoint_and_evaluation_loader(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(config(store, out, 4), resume=False) == 0
    for name in ("train.config.yaml", "train.info.json", "log.txt", "metrics.jsonl", "checkpoint.pt",
                 "loss_curve.png"):
        assert (out / name).is_file(), name
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4]
    for key in ("loss", "loss_query", "loss_par", "lr", "episodes_per_s", "data_ms", "step_ms", "data_share",
                "fg_global_only_rate", "empty_id_rate", "vanishing_id_rate"):
        assert key in recs[-1]
    log = (out / "log.txt").read_text()
    assert "data" in log and "ep/s" in log and "fg global-only" in log
    model, cfg_dict, meta = load_checkpoint(out / "checkpoint.pt", "cpu")
    assert not model.training and meta["iteration"] == 4
    assert cfg_dict["model"]["encoder"] == "tiny" and cfg_dict["train"]["iterations"] == 4
    assert meta["store"]["method"] == "test" and meta["store"]["training_slices"] == 23
    assert meta["store"]["complete"] is True and meta["store"]["store_slices"] >= 23
    assert "INCOMPLETE" not in log
    assert meta["totals"]["episodes"] == 4
    raw = read_checkpoint(out / "checkpoint.pt")
    for key in ("optimizer", "scheduler", "rng", "iteration", "config", "store"):
        assert key in raw


def test_an_incomplete_store_trains_on_its_committed_slices_with_a_note(tmp_path, capsys):
    import h5py
    store = write_store(tmp_path / "store.h5", synthetic_volumes(n=6))
    with h5py.File(store, "r+") as f:            # as a stopped (or still running) preprocess leaves the index
        f.attrs["complete"] = False
    out = tmp_path / "run"
    assert main(config(store, out, 2), resume=False) == 0
    note = f"train: note: {store} is INCOMPLETE ("
    assert note in capsys.readouterr().out and note in (out / "log.txt").read_text()
    assert read_checkpoint(out / "checkpoint.pt")["store"]["complete"] is False


def test_resume_continues_exactly(store, tmp_path):
    straight = tmp_path / "straight"
    assert main(config(store, straight, 4), resume=False) == 0
    split = tmp_path / "split"
    assert main(config(store, split, 2), resume=False) == 0
    assert main(config(store, split, 4), resume=True) == 0
    a, b = read_checkpoint(straight / "checkpoint.pt"), read_checkpoint(split / "checkpoint.pt")
    assert a["iteration"] == b["iteration"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["totals"] == b["totals"]
    recs = [json.loads(ln)["iteration"] for ln in (split / "metrics.jsonl").read_text().splitlines()]
    assert recs == [1, 2, 3, 4]
    # nothing left to do: a second resume at the same length exits cleanly
    assert main(config(store, split, 4), resume=True) == 0


def test_resume_needs_no_pretrained_file(store, tmp_path, capsys):
    # Guards: a resumed run takes its weights from the checkpoint; it used to rebuild the encoder from
    # model.pretrained, re-reading that file and stopping with "pretrained weights file not found" (exit 2)
    # once it had been moved away, although its weights were no longer needed.
    import torchvision
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    out = tmp_path / "run"
    extra = ("model.encoder=resnet18_l3", f"model.pretrained={weights}")
    assert main(config(store, out, 1, *extra), resume=False) == 0
    assert "encoder: loaded" in capsys.readouterr().out
    weights.unlink()
    assert main(config(store, out, 2, *extra), resume=True) == 0
    captured = capsys.readouterr()
    assert "pretrained" not in captured.err and "encoder: loaded" not in captured.out
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 2


def test_resume_logs_the_lr_step_the_scheduler_keeps(store, tmp_path):
    # Guards: with train.lr_step=0 the step is iterations // 100; a run resumed with more iterations keeps its
    # checkpoint's scheduler (step 2 here), but its first log line gave the step of the new length (4).
    out = tmp_path / "run"
    assert main(config(store, out, 200, "train.lr_step=0", "train.ckpt_every=100", "train.log_every=100"),
                resume=False) == 0
    assert main(config(store, out, 400, "train.lr_step=0", "train.ckpt_every=100", "train.log_every=100"),
                resume=True) == 0
    step = read_checkpoint(out / "checkpoint.pt")["scheduler"]["step_size"]
    start = [ln for ln in (out / "log.txt").read_text().splitlines() if ln.startswith("train: resuming")]
    assert step == 2 and len(start) == 1 and start[0].endswith(f"lr step {step}")


def test_resume_says_which_changed_settings_its_checkpoint_overrides(store, tmp_path, capsys):
    # the optimizer and the scheduler come back from the checkpoint with their lr, momentum, weight decay, gamma and
    # step: a note that listed train.lr among the "changed settings" read as if the new value were in effect
    out = tmp_path / "run"
    assert main(config(store, out, 1), resume=False) == 0
    capsys.readouterr()
    assert main(config(store, out, 2, "train.lr=0.5", "train.log_every=7"), resume=True) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "note: resuming with changed settings: train.iterations, train.log_every" in lines
    assert ("note: train.lr changed, but a resumed run keeps its checkpoint's optimizer and learning-rate schedule: "
            "these take effect only in a new run") in lines
    assert read_checkpoint(out / "checkpoint.pt")["optimizer"]["param_groups"][0]["initial_lr"] != 0.5


def test_logged_lr_is_the_one_each_iteration_used(store, tmp_path):
    # the log read the lr after the scheduler's step, i.e. the next iteration's: one decay early at every step
    out = tmp_path / "run"
    assert main(config(store, out, 4, "train.lr=0.01", "train.lr_step=2", "train.lr_gamma=0.5"), resume=False) == 0
    lrs = [json.loads(ln)["lr"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.005])


def test_a_loss_that_is_not_finite_stops_the_run_with_status_1(store, tmp_path, monkeypatch, capsys):
    # Guards: a loss gone NaN mid-run is a run that stops on the way (exit 1, main's docstring), not one that
    # cannot start (exit 2): it was raised as TrainError, the "cannot start" class.
    from alpnet.model import ALPNet
    real = ALPNet.forward

    def nan_loss(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if "loss" in out:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(ALPNet, "forward", nan_loss)
    assert main(config(store, tmp_path / "run", 4), resume=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: iteration 1: loss is not finite")


def test_lr_schedule_scaling():
    assert lr_step_of(load(None, [])) == 1000
    assert lr_step_of(load(None, ["train.lr_step=0", "train.iterations=3000"])) == 30


def test_error_paths_exit_2_with_one_line(store, tmp_path, capsys):
    assert main(config(tmp_path / "absent.h5", tmp_path / "a"), resume=False) == 2
    err = capsys.readouterr().err.strip()
    assert "store not found" in err and len(err.splitlines()) == 1
    # excluding every organ leaves the organ-free z=2 slices (one per volume): still trainable
    assert main(config(store, tmp_path / "b", 2, "episodes.exclude_labels=[1,2,3,4]"), resume=False) == 0
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")[2]["store"]["training_slices"] == 6
    # fold 0 of 6 scans holds out 2 query scans and 1 support scan (scan 1 with its empty slice among them)
    assert main(config(store, tmp_path / "c", 2, "episodes.holdout=true"), resume=False) == 0
    rec = load_checkpoint(tmp_path / "c" / "checkpoint.pt")[2]["store"]
    assert rec["held_out"] == ["1", "2", "3"] and rec["training_slices"] == 12
    empty = write_store(tmp_path / "empty.h5", [dict(v, superpixels=v["superpixels"] * 0)
                                                for v in synthetic_volumes(n=2)])
    assert main(config(empty, tmp_path / "d"), resume=False) == 2
    assert "no usable training slice" in capsys.readouterr().err
    assert main(config(store, tmp_path / "e"), resume=True) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main(config(store, tmp_path / "f", 2), resume=False) == 0
    assert main(config(store, tmp_path / "f", 2), resume=False) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(config(store, tmp_path / "f", 4, "model.feature_dim=64"), resume=True) == 2
    assert "model.feature_dim" in capsys.readouterr().err
    assert main(config(store, tmp_path / "g", 2, "model.pretrained=/nonexistent/w.pth"), resume=False) == 2
    assert "pretrained weights file not found" in capsys.readouterr().err


def test_slices_too_small_to_pool_are_refused_before_any_step(tmp_path, capsys):
    # was: a traceback from torch's pooling at the first step ("Output size is too small")
    small = write_store(tmp_path / "small.h5", synthetic_volumes(n=2, size=24))
    assert main(config(small, tmp_path / "run"), resume=False) == 2
    assert capsys.readouterr().err.strip() == (
        f"train: {small}: slices of 24 x 24 px are too small for the model: its 4-cell windows at feature "
        "stride 8 need at least 32 x 32 (rebuild the store with a larger prepare.size)")
    assert not (tmp_path / "run").exists()
    assert main(config(small, tmp_path / "run", 1, "model.local_size_train=2", "model.fg_rule_window=2"),
                resume=False) == 0                     # 2-cell windows fit 24 px (3 x 3 cells)


def test_checkpoint_files_are_validated(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by"):
        load_checkpoint(tmp_path / "foreign.pt")
    # a truncated file: torch's finding, without the advice that follows it, and no sentence cut in half
    (tmp_path / "cut.pt").write_bytes((tmp_path / "foreign.pt").read_bytes()[:300])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "cut.pt")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'cut.pt'}: not a readable checkpoint (") and message.endswith(")")
    assert len(message.splitlines()) == 1 and ". " not in message.split("(", 1)[1]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {}, "config": {}, "iteration": 1})

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"model": {}, "config": {}, "iteration": 2})
    assert read_checkpoint(path)["iteration"] == 1          # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]   # no temporary left behind


def test_a_full_disk_during_training_keeps_the_last_checkpoint(store, tmp_path, monkeypatch, capsys):
    # the checkpoint of iteration 4 cannot be written (torch.save words a full disk as a RuntimeError): one line,
    # exit 1, iteration 2's checkpoint intact, and --resume goes on from it once there is room again
    from alpnet import train as train_mod
    real = train_mod.save_checkpoint

    def full_at_4(path, state):
        if state["iteration"] == 4:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real(path, state)
    monkeypatch.setattr(train_mod, "save_checkpoint", full_at_4)
    out = tmp_path / "run"
    assert main(config(store, out, 4), resume=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the checkpoint of iteration 4" in err[0]
    assert "PytorchStreamWriter failed writing file data/0" in err[0]
    assert "the checkpoint of iteration 2 is kept: free space and rerun with --resume" in err[0]
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 2
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    assert main(config(store, out, 4), resume=True) == 0
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 4


def test_a_snapshot_that_cannot_be_written_names_the_checkpoint_that_was(store, tmp_path, monkeypatch, capsys):
    # with train.keep_checkpoints, checkpoint.pt of iteration 2 is written, then its snapshot fails: the message
    # used to say that no checkpoint was written yet
    from alpnet import train as train_mod
    real = train_mod.save_checkpoint

    def snapshot_full(path, state):
        if Path(path).name != "checkpoint.pt":
            raise OSError(28, "No space left on device")
        return real(path, state)
    monkeypatch.setattr(train_mod, "save_checkpoint", snapshot_full)
    out = tmp_path / "run"
    assert main(config(store, out, 4, "train.keep_checkpoints=true"), resume=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train: {out / 'checkpoint_000002.pt'}: cannot write the "
                                               "checkpoint of iteration 2 (")
    assert err[0].endswith("the checkpoint of iteration 2 is kept: free space and rerun with --resume")
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 2


def test_a_shard_damaged_under_training_is_one_line(tmp_path, capsys):
    # a shard truncated after the store was written (a copy cut short, a failing disk): the trainer stops with
    # exit 1 and one line naming the shard and the remedy
    import os
    from engine.store_format import parts_dir
    damaged = write_store(tmp_path / "store.h5", synthetic_volumes(n=6))
    shard = sorted(parts_dir(damaged).glob("0*.h5"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    assert main(config(damaged, tmp_path / "run", 4), resume=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train: {damaged}: shard {shard} cannot be opened (")
    assert err[0].endswith("the shard is damaged: `cli.py preprocess` with the store's command recomputes it")


def test_a_stream_that_ends_early_is_an_error_not_a_finished_run(store, tmp_path, monkeypatch, capsys):
    # A loader worker that cannot hand over its batch (a full /dev/shm) has its error printed by torch and the
    # loader then ends as if the stream were done: the run used to report "done" after fewer iterations
    from alpnet.episodes import EpisodeStream
    real = EpisodeStream.__iter__

    def one_batch(self):
        it = real(self)
        yield next(it)
    monkeypatch.setattr(EpisodeStream, "__iter__", one_batch)
    out = tmp_path / "run"
    assert main(config(store, out, 4), resume=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: the episode stream ended after iteration 1 of 4: a loader")
    assert err[0].endswith("the checkpoint of iteration 1 is kept: rerun with --resume")
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 1
    monkeypatch.setattr(EpisodeStream, "__iter__", real)
    assert main(config(store, out, 4), resume=True) == 0
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 4


def test_a_data_loader_workers_error_is_told_in_its_last_line():
    import traceback

    from alpnet.train import _last_line
    from engine.store_format import StoreError
    # the worker's traceback ends with the line Python writes for the error (its class named with its module)
    original = "".join(traceback.format_exception_only(StoreError, StoreError("s.h5: shard bad")))
    relayed = StoreError("Caught StoreError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in read\n" + original)
    assert _last_line(relayed) == "s.h5: shard bad"
    assert _last_line(StoreError("s.h5: no such store")) == "s.h5: no such store"


def test_an_output_folder_that_cannot_be_made_is_one_line(store, tmp_path, capsys):
    import cli
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = ["--store", str(store), "--out", str(blocker / "run"), "--set", "model.encoder=tiny",
            "--set", "train.iterations=2", "--set", "train.num_workers=0", "--set", "train.device=cpu"]
    assert cli.main(["train", *args]) == 2                   # the user's path: refused before any work
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train: --out {blocker / 'run'}: {blocker} is a file, not a folder"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_request_without_a_gpu_is_a_one_line_error(store, tmp_path, capsys):
    assert main(config(store, tmp_path / "cuda", 2, "train.device=cuda"), resume=False) == 2
    err = capsys.readouterr().err.strip()
    assert "train.device=cuda" in err and len(err.splitlines()) == 1


def test_float16_autocast_off_cuda_is_refused_before_any_step(store, tmp_path, capsys):
    # on a CPU it ran ~200x slower than bfloat16 (17 s a step), silently
    out = tmp_path / "f16"
    cfg = config(store, out, 2, "train.device=cpu", "train.amp=true", "train.amp_dtype=float16")
    assert main(cfg, resume=False) == 2
    assert capsys.readouterr().err.strip() == (
        "train: train.amp_dtype=float16 needs a CUDA device (this run is on cpu, where a step took ~200x "
        "longer); use train.amp_dtype=bfloat16 or train.amp=false")
    assert not out.exists()


def test_batch_to_device_gives_dense_three_channel_inputs(episode_samples):
    # Collated images are stride-0 views of one channel (what pin_memory refused on the GPU machine); the model
    # must receive dense copies with the right dtypes and memory format.
    samples = episode_samples(2, 16, 16)
    batch = collate_episodes(samples)
    assert batch["support_image"].stride()[1] == 0
    sup, sup_fg, qry, qry_mask = batch_to_device(batch, torch.device("cpu"), torch.channels_last)
    for img, key in ((sup, "support_image"), (qry, "query_image")):
        assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32
        assert 0 not in img.stride() and img.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(img, torch.stack([s[key] for s in samples]))
    assert sup_fg.dtype == torch.float32 and qry_mask.dtype == torch.int64
    assert torch.equal(qry_mask, torch.stack([s["query_mask"] for s in samples]).long())


def test_the_log_goes_on_in_its_file_when_the_console_is_gone(tmp_path, monkeypatch):
    # `train ... | head`: printing fails once the reader has gone; training must not stop for it (the
    # iterations since the last checkpoint would be lost) and log.txt keeps every line
    class Gone:
        writes = 0

        def write(self, text):
            Gone.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    log = RunLog(tmp_path, keep_until=None)
    monkeypatch.setattr("sys.stdout", Gone())
    for i in range(3):
        log.line(f"it {i}")
    assert Gone.writes == 1                       # tried once, then the console is left alone
    assert (tmp_path / "log.txt").read_text() == "it 0\nit 1\nit 2\n"


def _train_until_logged(store: Path, out: Path, n_logged: int, *extra: str, **popen) -> subprocess.Popen:
    """A real ``cli.py train`` process, returned once its metrics hold ``n_logged`` iterations."""
    args = [sys.executable, str(ROOT / "cli.py"), "train", "--store", str(store), "--out", str(out),
            "--set", "train.iterations=100000", "--set", "train.ckpt_every=100000", "--set", "train.log_every=1",
            "--set", "train.device=cpu", "--set", "model.encoder=tiny", "--set", "episodes.holdout=false",
            "--set", "episodes.setting=1", *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n_logged):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig, code, word, workers, group", [
    (signal.SIGTERM, 143, "terminated (SIGTERM)", 0, False),      # kill, a scheduler's stop
    (signal.SIGINT, 130, "interrupted (Ctrl-C)", 2, True),        # a terminal's Ctrl-C reaches the loader workers too
])
def test_a_stop_from_outside_writes_a_checkpoint_to_resume_from(store, tmp_path, sig, code, word, workers, group):
    out = tmp_path / "run"
    proc = _train_until_logged(store, out, 3, "--set", f"train.num_workers={workers}", start_new_session=group)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["iteration"]
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == last >= 3       # none was due before the stop
    assert output.splitlines()[-1] == (f"train: {word} after iteration {last}; its checkpoint is "
                                       f"{out / 'checkpoint.pt'}: rerun with --resume to continue")
    if group:                                   # the loader workers ignored the signal and were ended in order
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
    # --resume goes on from there to the end
    assert main(config(store, out, last + 2), resume=True) == 0
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == last + 2


def test_stop_signals_note_the_first_signal_and_restore_the_handlers():
    from alpnet.train import StopSignals
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested and signals.status() == (143, "terminated (SIGTERM)")
        os.kill(os.getpid(), signal.SIGTERM)             # a second SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):          # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.status() == (130, "interrupted (Ctrl-C)")


def _losing_batch(monkeypatch, lost: int) -> None:
    """Loader workers whose ``lost``-th batch cannot be handed over: the queue's feeder thread fails to pickle
    it, prints the error and drops it, as it does when /dev/shm is full; the trainer never hears of it."""
    import alpnet.train
    calls = []

    def collate(samples):
        batch = collate_episodes(samples)
        calls.append(1)
        if len(calls) == lost:
            batch["unpicklable"] = lambda: None
        return batch
    monkeypatch.setattr(alpnet.train, "collate_episodes", collate)


def test_a_batch_lost_by_a_loader_worker_stops_the_run_after_the_loader_timeout(store, tmp_path, monkeypatch,
                                                                                capsys):
    # it used to wait for the lost batch forever, deaf to a first Ctrl-C or SIGTERM
    _losing_batch(monkeypatch, lost=3)
    out = tmp_path / "run"
    cfg = config(store, out, 6, "train.num_workers=1", "train.loader_timeout_s=8")
    assert main(cfg, resume=False) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train: no episode batch came from the loader's 1 worker(s) in 8 s "
                              "(train.loader_timeout_s) after iteration 2: a worker lost one or is stuck"), err
    assert "/dev/shm" in err[-1] and err[-1].endswith("the checkpoint of iteration 2 is kept: rerun with --resume")
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 2
    monkeypatch.undo()
    assert main(config(store, out, 6, "train.num_workers=1"), resume=True) == 0
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 6


def test_a_first_stop_while_waiting_for_a_lost_batch_ends_the_wait(store, tmp_path, monkeypatch, capsys):
    import threading
    _losing_batch(monkeypatch, lost=3)
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"

    def stop_once_waiting():
        deadline = time.monotonic() + 60
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)                             # the trainer is now waiting for batch 3, which never comes
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=stop_once_waiting, daemon=True).start()
    t0 = time.monotonic()
    assert main(config(store, out, 6, "train.num_workers=1", "train.loader_timeout_s=100"), resume=False) == 143
    assert time.monotonic() - t0 < 60
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"train: terminated (SIGTERM) after iteration 2; its checkpoint is {out / 'checkpoint.pt'}: rerun with "
        "--resume to continue")
    assert read_checkpoint(out / "checkpoint.pt")["iteration"] == 2


def test_the_loader_timeout_must_not_be_negative(store, tmp_path):
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="train.loader_timeout_s"):
        config(store, tmp_path, 2, "train.loader_timeout_s=-1")
