"""Self-supervised ALPNet training streamed from a store: ``python cli.py train``.

Layout follows the torchvision reference scripts: :func:`main` sets everything up, :func:`train_one_epoch`
runs iterations until the stream ends. One iteration = ``train.batch_size`` episodes (paper: 1), SGD with
momentum and weight decay, the learning rate multiplied by ``lr_gamma`` every ``lr_step`` iterations
(method.md 4). The run folder holds::

    train.config.yaml / train.info.json   resolved config, command line, versions (engine.runinfo)
    log.txt                               the log lines printed to stdout
    metrics.jsonl                         one record per log line (loss terms, lr, timings, counters)
    checkpoint.pt                         latest checkpoint (atomic), what --resume continues from
    checkpoint_NNNNNN.pt                  snapshots, with train.keep_checkpoints (paper: 25k, 50k, 75k, 100k)
    loss_curve.png                        loss terms against iterations
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from alpnet.backbones import EncoderError
from alpnet.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from alpnet.episodes import EpisodeError, EpisodeStream, collate_episodes, worker_init
from alpnet.model import ALPNet, COUNTERS, smallest_slice
from engine.config import to_dict
from engine.figures import save_figure
from engine.runinfo import write_run_info
from engine.stops import Terminated, stop_status
from engine.store_format import StoreError, error_text

if TYPE_CHECKING:
    from alpnet.config import Config

CHECKPOINT_NAME = "checkpoint.pt"
REDRAWS = ("empty_redraws", "vanishing_redraws", "slice_redraws")


class TrainError(RuntimeError):
    """The run cannot start as asked; the message is one line."""


class RunStopped(TrainError):
    """The run started but cannot go on (exit status 1); the message is one line."""


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written during the run (e.g. a full disk); the previous one is intact."""


class LoaderStalled(Exception):
    """No batch came from the loader workers within ``train.loader_timeout_s``; ``iteration`` is the last done."""

    def __init__(self, iteration: int, timeout: float):
        super().__init__(iteration, timeout)
        self.iteration, self.timeout = iteration, timeout


class StopWhileWaiting(BaseException):
    """A first Ctrl-C or SIGTERM that came while the trainer waited for its next batch (``StopSignals.waiting``).
    A BaseException, like KeyboardInterrupt, so that the loader's own ``except Exception`` lets it through."""


# --------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device=cuda but torch sees no CUDA device (use --device cpu or auto)")
    return torch.device(name)


def lr_step_of(cfg: Config) -> int:
    """Iterations between two decays: ``train.lr_step``, or iterations // 100 when it is 0 (short runs keep the
    paper's 100 decays of x0.95 over the whole run)."""
    return cfg.train.lr_step or max(1, cfg.train.iterations // 100)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _plain(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars/arrays -> python), so store metadata can live in a checkpoint."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


class RunLog:
    """Prints log lines and appends them to ``log.txt``; metrics records go to ``metrics.jsonl``."""

    def __init__(self, out: Path, keep_until: int | None):
        self.out = out
        self.metrics_path = out / "metrics.jsonl"
        if keep_until is not None and self.metrics_path.exists():
            # A resumed run drops records logged after its checkpoint (they will be produced again).
            kept = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["iteration"] <= keep_until]
            self.metrics_path.write_text("".join(k + "\n" for k in kept))
        elif keep_until is None:
            self.metrics_path.write_text("")
        self.log = open(out / "log.txt", "a")
        self.console = True

    def line(self, text: str) -> None:
        if self.console:
            try:
                print(text, flush=True)
            except OSError:
                # Nothing reads the console any more (``| head``, a closed terminal): training goes on and
                # log.txt keeps every line; stopping here would throw away the iterations since the last
                # checkpoint.
                self.console = False
        self.log.write(text + "\n")
        self.log.flush()

    def record(self, rec: dict) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.log.close()


def plot_loss_curve(metrics_path: Path, png: Path) -> Path | None:
    """Loss terms against iterations from ``metrics.jsonl`` into ``png`` (None when there is nothing)."""
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    if not recs:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    its = [r["iteration"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("loss_query", "--"), ("loss_par", ":")):
        ax.plot(its, [r[key] for r in recs], style, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"mean loss over {recs[0].get('window', '?')} iterations")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png, dpi=100)


# --------------------------------------------------------------------------------------------- training
def batch_to_device(batch: dict, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense model inputs on ``device`` from a :func:`collate_episodes` batch.

    Returns support image (B, 3, H, W) float32, support mask (B, H, W) float32, query image (B, 3, H, W)
    float32 and query mask (B, H, W) int64. The batch's images are expanded views of one channel: only that
    channel crosses to the device, and the three copies are made there.
    """
    def image(x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].to(device, non_blocking=True).expand_as(x).contiguous(memory_format=memory_format)

    return (image(batch["support_image"]), batch["support_mask"].to(device, non_blocking=True).float(),
            image(batch["query_image"]), batch["query_mask"].to(device, non_blocking=True).long())


def train_one_epoch(model: ALPNet, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    loader: DataLoader, device: torch.device, cfg: Config, start_it: int, log: RunLog, totals: dict,
                    save_fn: Callable[[int], None], scaler: torch.amp.GradScaler | None = None,
                    signals: StopSignals | None = None) -> int:
    """Run iterations ``start_it + 1 ..`` until ``loader`` is exhausted, or until ``signals`` holds a stop
    (checked after each iteration, and at once while waiting for a batch); returns the last iteration done.
    Raises ``LoaderStalled`` when the loader's workers hand over no batch within ``train.loader_timeout_s``.

    Logs every ``train.log_every`` iterations: mean loss terms, lr, episodes/s, data time (waiting for the
    next batch) vs step time (forward, backward, update), and the prototype/id fallback counters.
    Calls ``save_fn(iteration)`` every ``train.ckpt_every`` iterations and at the last one. ``scaler``: a
    ``torch.amp.GradScaler`` for float16 autocast on CUDA, else None.
    """
    tc = cfg.train
    amp = tc.amp
    amp_dtype = getattr(torch, tc.amp_dtype)
    mem = torch.channels_last if tc.channels_last else torch.contiguous_format
    win: dict[str, float] = defaultdict(float)
    n_win = 0
    it = start_it
    t_win = t_prev = time.perf_counter()
    batches = iter(loader)
    while True:
        try:
            with signals.waiting() if signals is not None else contextlib.nullcontext():
                batch = next(batches)
        except (StopIteration, StopWhileWaiting):
            break
        except RuntimeError as exc:
            # torch's only word for its timeout; a lost batch leaves the workers alive and the wait endless
            if loader.timeout and str(exc).startswith("DataLoader timed out"):
                raise LoaderStalled(it, loader.timeout) from None
            raise
        t_data = time.perf_counter()
        sup, sup_fg, qry, qry_mask = batch_to_device(batch, device, mem)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp):
            out = model(sup, sup_fg, qry, qry_mask, train=True)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            out["loss"].backward()
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]    # the step's own: the scheduler sets the next one's
        scheduler.step()
        terms = {k: float(out[k].detach()) for k in ("loss", "loss_query", "loss_par")}   # syncs the device
        t_step = time.perf_counter()
        it += 1
        for k, v in terms.items():
            win[k] += v
        win["data_s"] += t_data - t_prev
        win["step_s"] += t_step - t_data
        for k in COUNTERS:
            win[k] += out["counters"][k]
            totals[k] = totals.get(k, 0) + out["counters"][k]
        for k in REDRAWS:
            v = int(sum(batch["meta"][k]))
            win[k] += v
            totals[k] = totals.get(k, 0) + v
        n_win += 1
        t_prev = t_step
        if not all(np.isfinite(v) for v in terms.values()):
            raise RunStopped(f"iteration {it}: loss is not finite ({terms}); lower train.lr or disable train.amp")
        if it % tc.log_every == 0 or it == tc.iterations:
            _log_window(log, it, tc, win, n_win, time.perf_counter() - t_win, lr, totals, gpu_peak_mb(device))
            win.clear()
            n_win = 0
            t_win = time.perf_counter()
        if it % tc.ckpt_every == 0 or it == tc.iterations:
            save_fn(it)
            t_prev = time.perf_counter()   # checkpoint time is neither data nor step time
        if signals is not None and signals.requested:
            break
    return it


class StopSignals:
    """Ctrl-C and SIGTERM while training (``with StopSignals() as signals``): the first one is only noted, so
    that the run can finish its iteration, write a checkpoint and end (``signals.requested``); a second Ctrl-C
    stops at once (KeyboardInterrupt), a second SIGTERM changes nothing. A job scheduler's time limit sends
    SIGTERM: before, it ended the process where it stood, losing the iterations since the last checkpoint
    (up to ``train.ckpt_every``). Handlers can only be set in the main thread; elsewhere this does nothing.
    Inside ``waiting()`` nothing is half done, so a first signal there ends the wait at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}
        self._waiting = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _note(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self._waiting:
                raise StopWhileWaiting
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def waiting(self):
        """A wait for the next batch: a batch that a loader worker lost (a full /dev/shm) makes it last until
        ``train.loader_timeout_s``, and a stop should not wait that long. Raises ``StopWhileWaiting``."""
        if self.signum is not None:
            raise StopWhileWaiting
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def status(self) -> tuple[int, str]:
        """Exit status and word of the stop (``engine.stops.stop_status``): 143 for SIGTERM, 130 for Ctrl-C."""
        return stop_status(Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt())


def gpu_peak_mb(device: torch.device) -> float | None:
    """Peak memory torch has allocated on a CUDA ``device`` so far (MiB); None on other devices."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def _log_window(log: RunLog, it: int, tc, win: dict, n: int, wall: float, lr: float, totals: dict,
                gpu_mb: float | None = None) -> None:
    eps = win["episodes"]
    data, step = win["data_s"], win["step_s"]
    draws = eps + win["empty_redraws"] + win["vanishing_redraws"]
    rec = {"iteration": it, "window": n, "loss": win["loss"] / n, "loss_query": win["loss_query"] / n,
           "loss_par": win["loss_par"] / n, "lr": lr,
           "episodes_per_s": eps / wall if wall > 0 else 0.0, "data_ms": 1000 * data / n,
           "step_ms": 1000 * step / n, "data_share": data / (data + step) if data + step > 0 else 0.0,
           "fg_global_only_rate": win["fg_global_only"] / max(eps, 1),
           "fg_local_protos_mean": win["fg_local_protos"] / max(eps, 1),
           "fg_empty": int(win["fg_empty"]), "bg_fallback_global": int(win["bg_fallback_global"]),
           "par_fg_empty": int(win["par_fg_empty"]), "par_bg_fallback_global": int(win["par_bg_fallback_global"]),
           "empty_id_rate": win["empty_redraws"] / max(draws, 1),
           "vanishing_id_rate": win["vanishing_redraws"] / max(draws, 1),
           "totals": dict(totals)}
    if gpu_mb is not None:
        rec["gpu_peak_mb"] = gpu_mb
    log.record(rec)
    log.line(f"it {it:>6}/{tc.iterations}  loss {rec['loss']:.4f} (query {rec['loss_query']:.4f} "
             f"par {rec['loss_par']:.4f})  lr {rec['lr']:.2e}  {rec['episodes_per_s']:.2f} ep/s  "
             f"data {rec['data_ms']:.1f} ms / step {rec['step_ms']:.0f} ms ({100 * rec['data_share']:.1f}% data)  "
             f"fg global-only {100 * rec['fg_global_only_rate']:.0f}%  fg-empty {rec['fg_empty']}  "
             f"bg-fallback {rec['bg_fallback_global']}  par fg-empty {rec['par_fg_empty']} "
             f"bg-fallback {rec['par_bg_fallback_global']}  id redraws: empty {int(win['empty_redraws'])} "
             f"vanishing {int(win['vanishing_redraws'])}"
             + (f"  GPU peak {gpu_mb:.0f} MiB" if gpu_mb is not None else ""))


def _check_slice_size(stream: EpisodeStream, cfg) -> None:
    """Refuse a store of slices too small to pool, before the model is built (it failed at the first step,
    with a traceback from torch)."""
    need = smallest_slice(cfg.model, cfg.episodes.feature_stride)
    if stream.slice_shape and min(stream.slice_shape) < need:
        h, w = stream.slice_shape
        raise TrainError(f"{stream.name}: slices of {h} x {w} px are too small for the model: its "
                         f"{need // cfg.episodes.feature_stride}-cell windows at feature stride "
                         f"{cfg.episodes.feature_stride} need at least {need} x {need} (rebuild the store with a "
                         f"larger prepare.size)")


def _store_record(stream: EpisodeStream, path: str) -> dict:
    meta = stream.store_meta
    return _plain({"path": str(Path(path).resolve()), "method": meta.get("method"), "params": meta.get("params"),
                   "prepare": meta.get("prepare"),
                   "code_version": meta.get("code_version"), "schema_version": meta.get("schema_version"),
                   "settings_hash": meta.get("settings_hash"), "complete": bool(meta.get("complete", False)),
                   "store_slices": int(stream.index.n_store_slices),
                   "training_slices": int(stream.index.rows.size), "dropped": stream.index.dropped,
                   "held_out": stream.index.held_out, "exclude_labels": stream.index.exclude_labels})


def _check_resume_config(saved: dict, current: dict, log) -> None:
    if saved.get("model") != current.get("model"):
        diff = sorted(k for k in set(saved.get("model", {})) | set(current["model"])
                      if saved.get("model", {}).get(k) != current["model"].get(k))
        raise TrainError("--resume: model settings differ from the checkpoint's ("
                         + ", ".join("model." + k for k in diff) + ")")
    changed = [f"{sec}.{k}" for sec in ("episodes", "augment", "train") for k in current.get(sec, {})
               if saved.get(sec, {}).get(k) != current[sec][k]]
    kept = [k for k in changed if k in _RESTORED_WITH_OPTIMIZER]
    applied = [k for k in changed if k not in _RESTORED_WITH_OPTIMIZER]
    if applied:
        log(f"note: resuming with changed settings: {', '.join(applied)}")
    if kept:
        log(f"note: {', '.join(kept)} changed, but a resumed run keeps its checkpoint's optimizer and learning-rate "
            "schedule: these take effect only in a new run")


# the optimizer's and the scheduler's state come back from the checkpoint, with the values these set
_RESTORED_WITH_OPTIMIZER = ("train.lr", "train.momentum", "train.weight_decay", "train.lr_gamma", "train.lr_step")


# --------------------------------------------------------------------------------------------- main
def main(cfg: Config, resume: bool = False) -> int:
    """Train ALPNet on the episodes of ``cfg.train.store`` into the run folder ``cfg.train.out``.

    Returns 0 on success, 2 with a one-line message on stderr when the run cannot start (missing or empty
    store, missing checkpoint for ``resume``, an occupied run folder, a bad encoder or weights file), 1 with
    one when it stops on the way (a store that cannot be read, a checkpoint that cannot be written, an episode
    stream that ended early).
    """
    try:
        return _main(cfg, resume)
    except RunStopped as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:                     # the store went bad under the run (a damaged or removed shard)
        print(f"train: {_last_line(exc)}", file=sys.stderr)
        return 1
    except (EpisodeError, CheckpointError, EncoderError, TrainError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2


def _dev_shm_note(num_workers: int) -> str:
    """Where loader workers most often fail: the batches they hand over go through /dev/shm."""
    if not num_workers:
        return "no loader workers were used"
    try:
        st = os.statvfs("/dev/shm")
        free = f"{st.f_bavail * st.f_frsize / 2 ** 20:.0f} MB free now"
    except OSError:
        free = "not found here"
    return (f"loader workers hand their batches over through /dev/shm ({free}): give it more (Docker: "
            f"--shm-size) or set train.num_workers=0")


def _last_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. A DataLoader worker's error reaches the trainer re-raised with the
    worker's traceback in its message, whose last line is the original ``Type: message``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    prefixes = (f"{StoreError.__module__}.StoreError: ", "StoreError: ")    # how a traceback names the class
    return last.split(": ", 1)[1] if last.startswith(prefixes) else last


def _resume_state(cfg, resume: bool) -> dict | None:
    """The checkpoint ``--resume`` continues from, or None for a new run (refused in an occupied run folder)."""
    out = Path(cfg.train.out)
    ckpt_path = out / CHECKPOINT_NAME
    if not resume:
        if ckpt_path.exists():
            raise TrainError(f"{out}: already holds a run ({CHECKPOINT_NAME}); use --resume to continue it or "
                             f"another --out")
        return None
    if not ckpt_path.is_file():
        raise TrainError(f"{ckpt_path}: no checkpoint to resume from (--resume needs a previous run in {out})")
    state = read_checkpoint(ckpt_path, "cpu")
    _check_resume_config(state["config"], to_dict(cfg), print)
    return state


def _seed(tc) -> None:
    if tc.torch_threads:
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)


class _Run:
    """The model and what steps it (optimizer, lr schedule, gradient scaler), the run's counters, and the
    checkpoint that holds them all, with the iteration of the last one on disk."""

    def __init__(self, cfg, device: torch.device, state: dict | None, store: dict):
        tc = cfg.train
        self.tc, self.cfg_dict, self.store = tc, to_dict(cfg), store
        self.ckpt_path = Path(tc.out) / CHECKPOINT_NAME
        # A resumed run takes every weight from its checkpoint: the pretrained file only initialises a new run
        # (as in checkpoint.load_checkpoint), so it is neither read again nor required to still exist.
        mcfg = cfg.model if state is None else dataclasses.replace(cfg.model, pretrained="")
        self.model = ALPNet(mcfg, quiet=state is not None).to(device)
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=tc.lr, momentum=tc.momentum,
                                         weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=lr_step_of(cfg),
                                                         gamma=tc.lr_gamma)
        self.scaler = (torch.amp.GradScaler("cuda")
                       if tc.amp and device.type == "cuda" and tc.amp_dtype == "float16" else None)
        self.totals: dict[str, int] = {}
        self.saved = None                            # the iteration of the last checkpoint on disk
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self.totals = dict(state.get("totals", {}))
            self.saved = int(state["iteration"])

    def save(self, it: int) -> None:
        """Checkpoint iteration ``it`` (and its snapshot with ``train.keep_checkpoints``)."""
        state = {"iteration": it, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                 "config": self.cfg_dict, "store": self.store, "rng": rng_state(), "totals": dict(self.totals)}
        snapshots = [self.ckpt_path.parent / f"checkpoint_{it:06d}.pt"] if self.tc.keep_checkpoints else []
        for path in [self.ckpt_path] + snapshots:
            try:
                save_checkpoint(path, state)
            except (OSError, RuntimeError) as exc:      # torch.save words a full disk as a RuntimeError
                kept = (f"the checkpoint of iteration {self.saved} is kept: free space and rerun with --resume"
                        if self.saved is not None else "no checkpoint was written yet: free space and rerun")
                raise CheckpointWriteError(f"{path}: cannot write the checkpoint of iteration {it} "
                                           f"({error_text(exc)}); {kept}") from None
            if path == self.ckpt_path:          # what --resume reads is on disk, whatever befalls the snapshot
                self.saved = it

    def save_unless_saved(self, it: int) -> None:
        if self.saved != it:
            self.save(it)


def _start_lines(log: RunLog, cfg, stream: EpisodeStream, store: dict, device: torch.device,
                 start_it: int | None, lr_step: int) -> None:
    tc, idx = cfg.train, stream.index
    log.line(f"train: {'resuming at iteration ' + str(start_it) if start_it is not None else 'new run'} in "
             f"{Path(tc.out)}; device {device}, {torch.get_num_threads()} torch threads, {tc.num_workers} loader "
             f"workers; encoder {cfg.model.encoder}; store {tc.store} ({store['method']}): {idx.rows.size} "
             f"training slices of {idx.n_store_slices} (dropped {idx.dropped}; held out {idx.held_out or 'none'}; "
             f"excluded labels {idx.exclude_labels or 'none'}); lr step {lr_step}")
    if not store["complete"]:
        # a store being written or left by a stopped run is readable (committed batches only); say so, since
        # its training set is smaller than the source's and differs from the finished store's
        log.line(f"train: note: {tc.store} is INCOMPLETE ({idx.n_store_slices} slices committed): training on "
                 "them; rerun its preprocess command to complete it")


def _done_line(log: RunLog, run: _Run, device: torch.device, start_it: int, last: int, wall: float) -> None:
    png = plot_loss_curve(log.metrics_path, Path(run.tc.out) / "loss_curve.png")
    totals = run.totals
    draws = totals.get("episodes", 0) + totals.get("empty_redraws", 0) + totals.get("vanishing_redraws", 0)
    gpu = gpu_peak_mb(device)
    log.line(f"train: done, iteration {last} in {wall:.0f} s ({(last - start_it) / max(wall, 1e-9):.2f} it/s"
             + (f", GPU peak {gpu:.0f} MiB" if gpu is not None else "") + "); "
             f"checkpoint {run.ckpt_path}; loss curve {png}; totals: fg global-only "
             f"{totals.get('fg_global_only', 0)}/{totals.get('episodes', 0)} episodes, fg-empty "
             f"{totals.get('fg_empty', 0)}, bg-fallback {totals.get('bg_fallback_global', 0)}, "
             f"id redraws empty {totals.get('empty_redraws', 0)}/{draws} vanishing "
             f"{totals.get('vanishing_redraws', 0)}/{draws}")


def _main(cfg, resume: bool) -> int:
    tc = cfg.train
    out = Path(tc.out)
    state = _resume_state(cfg, resume)
    start_it = int(state["iteration"]) if state else 0
    if start_it >= tc.iterations:
        print(f"train: {out / CHECKPOINT_NAME} is at iteration {start_it} >= train.iterations={tc.iterations}; "
              "nothing to do (raise train.iterations to continue)")
        return 0

    device = resolve_device(tc.device)
    if tc.amp and tc.amp_dtype == "float16" and device.type != "cuda":
        # torch's float16 autocast on a CPU runs its convolutions without a fast kernel: 17 s a step here
        # against 0.09 s with bfloat16 (3 iterations of the default encoder on 2 cores)
        raise TrainError(f"train.amp_dtype=float16 needs a CUDA device (this run is on {device.type}, where a "
                         "step took ~200x longer); use train.amp_dtype=bfloat16 or train.amp=false")
    _seed(tc)
    stream = EpisodeStream.from_store(tc.store, cfg.episodes, cfg.augment, seed=tc.seed,
                                      batch_size=tc.batch_size, start_batch=start_it,
                                      n_batches=tc.iterations - start_it, n_folds=cfg.evaluate.n_folds)
    _check_slice_size(stream, cfg)
    store = _store_record(stream, tc.store)
    run = _Run(cfg, device, state, store)
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, run.cfg_dict, "train")
    log = RunLog(out, keep_until=start_it if state else None)
    # the scheduler's own step: a resumed run keeps its checkpoint's, whatever lr_step_of(cfg) gives now
    _start_lines(log, cfg, stream, store, device, start_it if state else None, run.scheduler.step_size)

    # No pin_memory: pinning refuses the batch's expanded (stride-0) images, and one episode's 0.6 MB crosses
    # to the GPU in microseconds without it.
    loader = DataLoader(stream, batch_size=tc.batch_size, num_workers=tc.num_workers, collate_fn=collate_episodes,
                        worker_init_fn=worker_init if tc.num_workers else None,
                        prefetch_factor=4 if tc.num_workers else None,
                        timeout=tc.loader_timeout_s if tc.num_workers else 0)
    t0 = time.perf_counter()
    with StopSignals() as signals:
        try:
            last = train_one_epoch(run.model, run.optimizer, run.scheduler, loader, device, cfg, start_it, log,
                                   run.totals, run.save, run.scaler, signals=signals)
        except LoaderStalled as exc:
            run.save_unless_saved(exc.iteration)
            raise RunStopped(f"no episode batch came from the loader's {tc.num_workers} worker(s) in {exc.timeout:g} s "
                             f"(train.loader_timeout_s) after iteration {exc.iteration}: a worker lost one or "
                             f"is stuck (an error, if any, is printed above; {_dev_shm_note(tc.num_workers)}); "
                             f"the checkpoint "
                             f"of iteration {exc.iteration} is kept: rerun with --resume") from None
        finally:
            stream.close()
    if signals.requested and last < tc.iterations:
        run.save_unless_saved(last)
        code, word = signals.status()
        log.line(f"train: {word} after iteration {last}; its checkpoint is {run.ckpt_path}: rerun with --resume "
                 f"to continue")
        log.close()
        return code
    if last < tc.iterations:
        # The stream yields exactly the batches asked for: fewer means a loader worker lost some. torch prints
        # the worker's error and lets the loader end as if the stream were done.
        run.save_unless_saved(last)
        raise RunStopped(f"the episode stream ended after iteration {last} of {tc.iterations}: a loader worker "
                         f"failed (its error is printed above; {_dev_shm_note(tc.num_workers)}); the checkpoint "
                         f"of iteration {last} is kept: rerun with --resume")
    _done_line(log, run, device, start_it, last, time.perf_counter() - t0)
    log.close()
    return 0
