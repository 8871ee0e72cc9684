"""``python cli.py demo``: the whole job on the built-in phantom (preprocess -> train -> evaluate).

Each step is resumable: a rerun reuses the committed store, continues or skips the training run, and
re-evaluates. The Dice table printed at the end compares the trained model with the support-copy reference.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from alpnet import evaluate, train
from alpnet.report import merge_results
from engine.pipeline import preprocess

if TYPE_CHECKING:
    from alpnet.config import Config


def main(cfg: Config, out: str = "runs/demo") -> int:
    """Run preprocess, train and evaluate on ``cfg.data.input`` (default: the phantom) into ``out``."""
    out_dir = Path(out)
    t0 = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cfg.engine.out = str(out_dir / "store.h5")
    print(f"== demo 1/3: preprocess {cfg.data.input} -> {cfg.engine.out}", flush=True)
    rc = preprocess(cfg, overwrite=False, progress=sys.stderr.isatty())
    if rc:
        return rc

    cfg.train.store = cfg.engine.out
    cfg.train.out = str(out_dir / "train")
    ckpt = Path(cfg.train.out) / train.CHECKPOINT_NAME
    print(f"== demo 2/3: train {cfg.model.encoder} for {cfg.train.iterations} iterations -> {cfg.train.out}",
          flush=True)
    rc = train.main(cfg, resume=ckpt.is_file())
    if rc:
        return rc

    data = cfg.data.input
    if data == "phantom":
        data = f"phantom:{cfg.data.phantom_volumes}"
    cfg.evaluate.data = data
    rows = []
    for label, kwargs in (("ALPNet (demo)", {"checkpoint": str(ckpt)}),
                          ("support copy", {"baseline": "support-copy"})):
        sub = "model" if "checkpoint" in kwargs else "support-copy"
        cfg.evaluate.out = str(out_dir / "eval" / sub)
        cfg.evaluate.label = label
        print(f"== demo 3/3: evaluate {label} on {data}, fold {cfg.evaluate.fold} -> {cfg.evaluate.out}",
              flush=True)
        rc = evaluate.main(cfg, setting=None, device=cfg.train.device, **kwargs)
        if rc:
            return rc
        rows.append(Path(cfg.evaluate.out) / "results.json")

    table = merge_results(rows, ["ALPNet (demo)", "support copy"])
    (out_dir / "dice.md").write_text(table + "\n")
    print(f"\nDice (%), {data}, fold {cfg.evaluate.fold}, 1-way 1-shot, C={cfg.evaluate.chunks}:\n")
    print(table)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in {out_dir}/")
    return 0
