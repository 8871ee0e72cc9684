"""Episode stream and training-step throughput (issue 5's performance section).

    python benchmarks/loader.py /tmp/chaos.h5 [--episodes 400] [--steps 30] [--paper-steps 4] [--out FILE]

Measures, in one run so that ratios are comparable on a shared machine:
1. episodes/s of the episode stream alone (read + id draw + two augmentations) through a DataLoader with
   0, 1 and 2 workers, and the peak RSS of the process tree while it runs;
2. training iterations on CPU with real episodes: the default config's encoder under three thread/worker
   layouts, and the paper's ResNet-101: step time, data time (waiting for the next batch), data share,
   iterations/s and peak RSS.
Targets (issue 5): stream >= 200 episodes/s on 2 cores; data share of a step < 5%; default training < 2 GB RSS.
Writes a JSON record to ``benchmarks/results/loader-<device>.json`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks import common  # noqa: E402  (sets NUMBA_CACHE_DIR before engine is imported)

from alpnet.config import Config, load  # noqa: E402
from alpnet.episodes import EpisodeStream, collate_episodes, worker_init  # noqa: E402
from alpnet.model import ALPNet  # noqa: E402
from alpnet.train import batch_to_device  # noqa: E402


class PeakRSS:
    """Peak memory of the process tree: this process's RSS plus its children's unique memory (USS).

    Forked DataLoader workers share most pages with the parent; summing their RSS would count torch's
    libraries once per worker. Sampled every 200 ms.
    """

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                rss = me.memory_info().rss + sum(c.memory_full_info().uss for c in me.children(recursive=True))
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(0.2)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2 ** 20


def stream(store: str, cfg, n: int | None, seed: int = 0) -> EpisodeStream:
    return EpisodeStream.from_store(store, cfg.episodes, cfg.augment, seed=seed, n_batches=n,
                                    n_folds=cfg.evaluate.n_folds)


def stream_round(store: str, cfg, workers: int, n: int, seed: int, warmup: int = 20) -> dict:
    """One timed pass of ``n`` episodes through a DataLoader with ``workers`` workers (after ``warmup``)."""
    torch.set_num_threads(1)
    s = stream(store, cfg, n + warmup, seed)
    loader = DataLoader(s, batch_size=1, num_workers=workers, worker_init_fn=worker_init if workers else None,
                        prefetch_factor=8 if workers else None, collate_fn=collate_episodes)
    with PeakRSS() as mem:
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        count = sum(1 for _ in it)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec = {"episodes_per_s": count / dt, "peak_rss_mb": mem.peak_mb,
           # CPU time of this process per episode: with 0 workers the whole cost of an episode, which is
           # insensitive to other processes on a shared machine (2000 / cpu_ms = the 2-core ceiling)
           "main_cpu_ms_per_episode": 1000 * cpu / count}
    if workers == 0:
        st = s.stats
        rec.update(read_ms=1000 * st["read_s"] / st["episodes"], augment_ms=1000 * st["augment_s"] / st["episodes"],
                   id_draws=st["id_draws"], empty_redraws=st["empty_redraws"],
                   vanishing_redraws=st["vanishing_redraws"])
    return rec


class TrainBench:
    """One thread/worker layout of a training step; ``run`` times a round of steps with fresh episodes."""

    def __init__(self, store: str, cfg, label: str, encoder: str, workers: int, threads: int,
                 channels_last: bool, device: str = "cpu", amp: bool = False):
        self.store, self.cfg, self.label = store, cfg, label
        self.workers, self.threads, self.amp = workers, threads, amp
        self.dev = torch.device(device)
        cfg.model.encoder = encoder
        cfg.model.pretrained = ""
        torch.manual_seed(0)
        self.mem_fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = ALPNet(cfg.model, quiet=True).to(self.dev).to(memory_format=self.mem_fmt)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.info = {"label": label, "encoder": encoder, "workers": workers, "torch_threads": threads,
                     "channels_last": channels_last, "device": device, "amp_bf16": amp}
        self.rounds: list[dict] = []

    def run(self, steps: int, seed: int, warmup: int = 2) -> dict:
        torch.set_num_threads(self.threads)
        dev, mem_fmt = self.dev, self.mem_fmt
        loader = DataLoader(stream(self.store, self.cfg, steps + warmup, seed), batch_size=1,
                            num_workers=self.workers, worker_init_fn=worker_init if self.workers else None,
                            prefetch_factor=4 if self.workers else None,
                            collate_fn=collate_episodes)
        data_t = step_t = 0.0
        with PeakRSS() as mem:
            t_prev = t_start = time.perf_counter()
            for i, b in enumerate(loader):
                t_data = time.perf_counter()
                sup, sup_fg, qry, qry_mask = batch_to_device(b, dev, mem_fmt)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = self.model(sup, sup_fg, qry, qry_mask)
                self.opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                self.opt.step()
                float(out["loss"].detach())
                t_step = time.perf_counter()
                if i == warmup - 1:
                    t_start = t_step
                elif i >= warmup:
                    data_t += t_data - t_prev
                    step_t += t_step - t_data
                t_prev = t_step
            wall = time.perf_counter() - t_start
        rec = {"step_ms": 1000 * step_t / steps, "data_ms": 1000 * data_t / steps,
               "data_share": data_t / (data_t + step_t), "iterations_per_s": steps / wall,
               "peak_rss_mb": mem.peak_mb}
        if dev.type == "cuda":
            rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        self.rounds.append(rec)
        return rec

    def summary(self) -> dict:
        out = dict(self.info, rounds=self.rounds)
        for key in self.rounds[0]:
            out[key] = (max if key.startswith("peak") else statistics.median)([r[key] for r in self.rounds])
        return out


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not Path(args.store).exists():
        print(f"{args.store}: store not found (build it with `python cli.py preprocess --out {args.store}`)",
              file=sys.stderr)
        return 2
    cfg = load(args.config)
    rec = {"store": str(Path(args.store).resolve()), "host": platform.node(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "load_avg_start": os.getloadavg(), "stream": [], "train": []}
    print(f"loader benchmark on {args.store}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.gpu:
        rec["train"] = _bench_gpu(args.store, args.steps)
    else:
        # Layouts are measured in interleaved rounds and summarised by their medians, so that a neighbour's
        # burst on this shared machine hits every layout alike.
        rec["stream"] = _bench_stream(args, cfg)
        rec["train"] = _bench_train(args, cfg)
    rec["load_avg_end"] = os.getloadavg()
    _write_record(rec, args.out, args.gpu)
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: the store, the measurements' sizes and where the record goes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="store file, e.g. the CHAOS store from `cli.py preprocess`")
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--episodes", type=common.positive_int, default=400, help="episodes per stream measurement")
    p.add_argument("--steps", type=common.positive_int, default=30, help="timed training steps per layout, default encoder")
    p.add_argument("--paper-steps", type=common.nonnegative_int, default=4, help="timed training steps, ResNet-101 (0: skip)")
    p.add_argument("--rounds", type=common.positive_int, default=3, help="interleaved rounds per measurement (medians)")
    p.add_argument("--gpu", action="store_true", help="time the paper config on CUDA instead (GPU machine)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/loader-cpu.json or -gpu.json)")
    return p.parse_args(argv)


def _bench_gpu(store: str, steps: int) -> list[dict]:
    """The paper config on CUDA, in float32 and in bf16 autocast (channels-last); one summary each."""
    paper = load(str(ROOT / "configs" / "paper.yaml"))
    threads = max(1, (os.cpu_count() or 2) - 4)
    summaries = []
    for amp in (False, True):
        b = TrainBench(store, paper, "paper-gpu" + (" bf16" if amp else ""), "resnet101", workers=4,
                       threads=threads, channels_last=amp, device="cuda", amp=amp)
        torch.cuda.reset_peak_memory_stats()
        b.run(steps, seed=0, warmup=10)
        summaries.append(b.summary())
        print(json.dumps(summaries[-1]))
    return summaries


def _bench_stream(args: argparse.Namespace, cfg: Config) -> list[dict]:
    """The episode stream alone through 0, 1 and 2 DataLoader workers, round by round; one summary each."""
    per_stream: dict[int, list] = {0: [], 1: [], 2: []}
    for r in range(args.rounds):
        for w in per_stream:
            per_stream[w].append(stream_round(args.store, cfg, w, args.episodes // args.rounds, seed=r))
    summaries = []
    for w, rounds in per_stream.items():
        summaries.append(_stream_summary(w, rounds))
        print(_stream_line(summaries[-1]))
    return summaries


def _stream_summary(w: int, rounds: list[dict]) -> dict:
    """One worker count's rounds and their summary: peaks the max, draw counts the sum, the rest the median."""
    summary = {"workers": w, "rounds": rounds}
    for key in rounds[0]:
        summary[key] = (max if key.startswith("peak") else sum if "draws" in key else statistics.median)(
            [x[key] for x in rounds])
    return summary


def _stream_line(summary: dict) -> str:
    """The printed line of a stream summary (the 0-worker one with its read / augment split and draws)."""
    w = summary["workers"]
    return (f"stream, {w} workers: {summary['episodes_per_s']:.0f} episodes/s, main-process CPU "
            f"{summary['main_cpu_ms_per_episode']:.2f} ms/episode, peak RSS {summary['peak_rss_mb']:.0f} MB"
            + (f" (read {summary['read_ms']:.2f} ms + augment {summary['augment_ms']:.2f} ms per episode; "
               f"id draws {summary['id_draws']}: empty {summary['empty_redraws']}, vanishing "
               f"{summary['vanishing_redraws']})" if w == 0 else ""))


def _bench_train(args: argparse.Namespace, cfg: Config) -> list[dict]:
    """Training steps of the default encoder under each thread/worker layout, then the paper's; one summary each."""
    layouts = [("0 workers, 2 threads", 0, 2), ("0 workers, 1 thread", 0, 1), ("1 worker, 1 thread", 1, 1),
               ("1 worker, 2 threads", 1, 2)]
    benches = [TrainBench(args.store, load(args.config), label, cfg.model.encoder, w, t, cfg.train.channels_last)
               for label, w, t in (layouts if args.steps else [])]
    for r in range(args.rounds):
        for b in benches:
            b.run(max(1, args.steps // args.rounds), seed=r)
    if args.paper_steps:
        benches.append(_bench_paper_encoder(args, cfg))
    summaries = []
    for b in benches:
        summaries.append(b.summary())
        print(_train_line(summaries[-1]))
    return summaries


def _bench_paper_encoder(args: argparse.Namespace, cfg: Config) -> TrainBench:
    """ResNet-101 (the paper's encoder), 0 workers and 2 threads, timed once."""
    # Built after the default-encoder rounds, so their peak RSS does not include ResNet-101; one round
    # is enough for its order of size.
    paper = TrainBench(args.store, load(args.config), "paper encoder, 0 workers, 2 threads", "resnet101",
                       0, 2, cfg.train.channels_last)
    paper.run(args.paper_steps, seed=0, warmup=1)
    return paper


def _train_line(s: dict) -> str:
    """The printed line of a training layout's summary."""
    return (f"train {s['encoder']} ({s['label']}): step {s['step_ms']:.0f} ms, data {s['data_ms']:.1f} ms "
            f"({100 * s['data_share']:.1f}%), {s['iterations_per_s']:.2f} it/s, peak RSS "
            f"{s['peak_rss_mb']:.0f} MB")


def _write_record(rec: dict, out: str | None, gpu: bool) -> None:
    """The JSON record to ``out`` (default: benchmarks/results/loader-cpu.json or -gpu.json)."""
    path = Path(out) if out else ROOT / "benchmarks" / "results" / ("loader-gpu.json" if gpu else "loader-cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
