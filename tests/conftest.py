"""Shared fixtures: the real CHAOS data (skipped with a clear message when absent) and temp stores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAOS_DIR = Path(os.environ.get("CHAOS_T2_DIR", ROOT.parent / "shared" / "data" / "chaos_t2"))
CHAOS_IDS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]

os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def chaos_dir() -> Path:
    """Folder of the 20 preprocessed CHAOS-T2 volumes; skips the test when it is not there."""
    if not (CHAOS_DIR / "image_1.nii.gz").is_file():
        pytest.skip(f"CHAOS-T2 data not found at {CHAOS_DIR} (set CHAOS_T2_DIR to its folder)")
    return CHAOS_DIR


@pytest.fixture
def episode_samples():
    """Factory of ``n`` random episode samples of ``height`` x ``width``, shaped as ``EpisodeStream`` yields them
    (images: expanded views of one channel; masks: uint8; ``meta``: episode and volume)."""
    import torch

    def make(n: int, height: int, width: int, seed: int = 0) -> list[dict]:
        g = torch.Generator().manual_seed(seed)

        def image():
            return torch.rand(1, height, width, generator=g).expand(3, -1, -1)

        def mask():
            return (torch.rand(height, width, generator=g) > 0.5).to(torch.uint8)

        return [{"support_image": image(), "query_image": image(), "support_mask": mask(), "query_mask": mask(),
                 "meta": {"episode": i, "volume": str(i)}} for i in range(n)]
    return make


@pytest.fixture
def before_each_slice(monkeypatch):
    """``before_each_slice(fn)`` runs ``fn(raw)`` before every slice's pseudo-labels, in all of the engine's
    paths (the one-call kernel, its runs of slices, and ``pseudolabels_u16``), forked worker processes
    included; ``fn`` may raise, sleep or kill. Calling it with None restores them."""
    from engine import slice_worker

    real = {name: getattr(slice_worker, name) for name in ("pseudolabels_u16", "mask_slic_deflate",
                                                           "mask_slic_deflate_run")}

    def install(fn):
        if fn is None:
            for name, f in real.items():
                monkeypatch.setattr(slice_worker, name, f)
            return

        def hooked(f):
            def call(raw, *args, **kwargs):
                fn(raw)
                return f(raw, *args, **kwargs)
            return call

        def hooked_run(f):
            def call(raw3, zs, *args, **kwargs):
                for z in zs:                     # every slice of the run, before the run's one call
                    fn(raw3[z])
                return f(raw3, zs, *args, **kwargs)
            return call

        monkeypatch.setattr(slice_worker, "pseudolabels_u16", hooked(real["pseudolabels_u16"]))
        monkeypatch.setattr(slice_worker, "mask_slic_deflate", hooked(real["mask_slic_deflate"]))
        monkeypatch.setattr(slice_worker, "mask_slic_deflate_run", hooked_run(real["mask_slic_deflate_run"]))
    return install
