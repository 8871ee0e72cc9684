"""The trainer's config sections and the top-level ``Config`` every command loads.

Defaults are the paper's values (method.md sections 2-5). This module must stay free of torch so that
``cli.py preprocess`` starts fast and runs where torch is absent.
"""
from __future__ import annotations

import dataclasses

from engine.config import (ConfigError, DataConfig, EngineConfig, PrepareConfig, SuperpixelConfig,
                           load_config)


@dataclasses.dataclass
class ModelConfig:
    encoder: str = "resnet18"            # resnet101 (paper) | resnet50 | resnet18 | tiny
    pretrained: str = ""                 # local weights file; empty = random init
    feature_dim: int = 256
    local_size_train: int = 4            # L: ALP window at training time (method.md 3.3)
    local_size_test: int = 2             # L at test time
    fg_rule_window: int = 4              # the "global fg prototype only?" test uses 4x4 even at test
    threshold: float = 0.95              # pooled mask value a window must exceed
    alpha: float = 20.0                  # cosine similarity scale
    bg_weight: float = 0.05              # weighted CE on the query
    fg_weight: float = 1.0
    par_weight: float = 1.0              # prototype alignment loss weight


@dataclasses.dataclass
class EpisodeConfig:
    setting: int = 2                     # 1: no exclusion; 2: drop slices containing the fold's test organs
    label_group: int = 0                 # setting 2: 0 = kidney model (exclude 2, 3), 1 = liver/spleen (1, 4)
    exclude_labels: list[int] = dataclasses.field(default_factory=list)  # explicit override of the group
    fold: int = 0                        # held-out scans of this fold never enter training (method.md 5.2)
    holdout: bool = True                 # False: train on every volume (e.g. phantom smoke runs)
    epoch_length: int = 1000


@dataclasses.dataclass
class AugmentConfig:
    rotate_deg: float = 5.0
    translate_px: float = 5.0
    shear_deg: float = 5.0
    zoom: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.2])
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0
    gamma: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.5])


@dataclasses.dataclass
class TrainConfig:
    store: str = "data/store.h5"
    out: str = "runs/default"
    iterations: int = 100_000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 1000                  # lr *= lr_gamma every lr_step iterations
    lr_gamma: float = 0.95
    seed: int = 1234
    num_workers: int = 0                 # DataLoader workers
    torch_threads: int = 0               # 0 = torch default
    device: str = "auto"                 # auto | cpu | cuda
    amp: bool = False                    # CUDA autocast
    log_every: int = 20
    ckpt_every: int = 1000


@dataclasses.dataclass
class EvaluateConfig:
    data: str = "../shared/data/chaos_t2"
    fold: str = "0"                      # 0..4 or "all"
    chunks: int = 3                      # C of the Roy et al. protocol
    classes: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"LIVER": 1, "RK": 2, "LK": 3, "SPLEEN": 4})
    n_folds: int = 5
    overlays: int = 2                    # scans per organ with overlay PNGs
    out: str = "runs/eval"


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    superpixels: SuperpixelConfig = dataclasses.field(default_factory=SuperpixelConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    episodes: EpisodeConfig = dataclasses.field(default_factory=EpisodeConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load the full project config (YAML file + ``a.b=value`` overrides)."""
    return load_config(Config, path, overrides)


__all__ = ["Config", "ConfigError", "load", "ModelConfig", "EpisodeConfig", "AugmentConfig",
           "TrainConfig", "EvaluateConfig"]
