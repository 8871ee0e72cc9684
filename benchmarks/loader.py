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
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from alpnet.config import load  # noqa: E402
from alpnet.episodes import EpisodeStream, worker_init  # noqa: E402
from alpnet.model import ALPNet  # noqa: E402


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


def bench_stream(store: str, cfg, workers: int, n: int, warmup: int = 20) -> dict:
    torch.set_num_threads(1)
    s = stream(store, cfg, n + warmup)
    loader = DataLoader(s, batch_size=1, num_workers=workers, worker_init_fn=worker_init if workers else None,
                        prefetch_factor=8 if workers else None)
    with PeakRSS() as mem:
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        count = sum(1 for _ in it)
        dt = time.perf_counter() - t0
    rec = {"workers": workers, "episodes": count, "episodes_per_s": count / dt, "peak_rss_mb": mem.peak_mb}
    if workers == 0:
        st = s.stats
        rec.update(read_ms=1000 * st["read_s"] / st["episodes"], augment_ms=1000 * st["augment_s"] / st["episodes"],
                   empty_id_rate=st["empty_redraws"] / st["id_draws"],
                   vanishing_id_rate=st["vanishing_redraws"] / st["id_draws"])
    return rec


def bench_train(store: str, cfg, label: str, encoder: str, steps: int, workers: int, threads: int,
                channels_last: bool, device: str = "cpu", amp: bool = False, warmup: int = 2) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg.model.encoder = encoder
    cfg.model.pretrained = ""
    dev = torch.device(device)
    model = ALPNet(cfg.model, quiet=True).to(dev)
    mem_fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=mem_fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    s = stream(store, cfg, steps + warmup)
    loader = DataLoader(s, batch_size=1, num_workers=workers, worker_init_fn=worker_init if workers else None,
                        pin_memory=dev.type == "cuda", prefetch_factor=4 if workers else None)
    data_t = step_t = 0.0
    counted = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t_prev = time.perf_counter()
        t_start = None
        for i, b in enumerate(loader):
            t_data = time.perf_counter()
            sup = b["support_image"].to(dev, non_blocking=True).contiguous(memory_format=mem_fmt)
            qry = b["query_image"].to(dev, non_blocking=True).contiguous(memory_format=mem_fmt)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                out = model(sup, b["support_mask"].to(dev).float(), qry, b["query_mask"].to(dev))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            float(out["loss"].detach())
            t_step = time.perf_counter()
            if i == warmup - 1:
                t_start = t_step
            elif i >= warmup:
                data_t += t_data - t_prev
                step_t += t_step - t_data
                counted += 1
            t_prev = t_step
        wall = time.perf_counter() - t_start
    rec = {"label": label, "encoder": encoder, "workers": workers, "torch_threads": threads,
           "channels_last": channels_last, "device": device, "amp_bf16": amp, "steps": counted,
           "step_ms": 1000 * step_t / counted, "data_ms": 1000 * data_t / counted,
           "data_share": data_t / (data_t + step_t), "iterations_per_s": counted / wall, "peak_rss_mb": mem.peak_mb}
    if dev.type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="store file, e.g. the CHAOS store from `cli.py preprocess`")
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--episodes", type=int, default=400, help="episodes per stream measurement")
    p.add_argument("--steps", type=int, default=30, help="timed training steps, default encoder")
    p.add_argument("--paper-steps", type=int, default=4, help="timed training steps, ResNet-101 (0: skip)")
    p.add_argument("--gpu", action="store_true", help="time the paper config on CUDA instead (GPU machine)")
    p.add_argument("--out", help="JSON output (default benchmarks/results/loader-cpu.json or -gpu.json)")
    args = p.parse_args(argv)
    if not Path(args.store).exists():
        print(f"{args.store}: store not found (build it with `python cli.py preprocess --out {args.store}`)",
              file=sys.stderr)
        return 2
    cfg = load(args.config)
    rec = {"store": str(Path(args.store).resolve()), "host": platform.node(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "load_avg_start": os.getloadavg(), "stream": [], "train": []}
    print(f"loader benchmark on {args.store}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.gpu:
        paper = load(str(ROOT / "configs" / "paper.yaml"))
        for amp in (False, True):
            r = bench_train(args.store, paper, "paper-gpu", "resnet101", args.steps, workers=4,
                            threads=max(1, (os.cpu_count() or 2) - 4), channels_last=amp, device="cuda", amp=amp,
                            warmup=10)
            rec["train"].append(r)
            print(json.dumps(r))
    else:
        for w in (0, 1, 2):
            r = bench_stream(args.store, cfg, w, args.episodes)
            rec["stream"].append(r)
            print(f"stream, {w} workers: {r['episodes_per_s']:.0f} episodes/s, peak RSS {r['peak_rss_mb']:.0f} MB"
                  + (f" (read {r['read_ms']:.2f} ms + augment {r['augment_ms']:.2f} ms per episode)" if w == 0
                     else ""))
        layouts = [("default: 0 workers, 2 threads", 0, 2), ("1 worker, 1 thread", 1, 1),
                   ("1 worker, 2 threads", 1, 2)]
        for label, w, t in layouts:
            r = bench_train(args.store, load(args.config), label, cfg.model.encoder, args.steps, w, t,
                            cfg.train.channels_last)
            rec["train"].append(r)
            print(f"train {cfg.model.encoder} ({label}): step {r['step_ms']:.0f} ms, data {r['data_ms']:.1f} ms "
                  f"({100 * r['data_share']:.1f}%), {r['iterations_per_s']:.2f} it/s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB")
        if args.paper_steps:
            r = bench_train(args.store, load(args.config), "paper encoder, 0 workers, 2 threads", "resnet101",
                            args.paper_steps, 0, 2, cfg.train.channels_last, warmup=1)
            rec["train"].append(r)
            print(f"train resnet101: step {r['step_ms']:.0f} ms, data {r['data_ms']:.1f} ms "
                  f"({100 * r['data_share']:.1f}%), {r['iterations_per_s']:.2f} it/s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB")
    rec["load_avg_end"] = os.getloadavg()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "loader-gpu.json" if args.gpu else "loader-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
