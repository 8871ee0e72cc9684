"""The trainer's config sections and the top-level ``Config`` every command loads.

Defaults are the paper's values (method.md sections 2-5). This module must stay free of torch so that
``cli.py preprocess`` starts fast and runs where torch is absent.
"""
from __future__ import annotations

import dataclasses
import math

from engine.config import (ConfigError, DataConfig, EngineConfig, PrepareConfig, SuperpixelConfig,
                           check_ranges, load_config)
from engine.ranges import Range

# Values outside these make training fail deep inside torch with its own words (a zero pooling stride, an
# empty convolution, a negative weight decay) or, worse, run without learning (alpha 0 scales every
# similarity to 0; a threshold above 1 keeps every local prototype out; lr_gamma 0 stops at the first decay).
_COUNT = Range(1, integer=True)
_WEIGHT = Range(0)
_MODEL_RANGES = {"feature_dim": _COUNT, "local_size_train": _COUNT, "local_size_test": _COUNT,
                 "fg_rule_window": _COUNT, "threshold": Range(0, maximum=1), "alpha": Range(0, strict=True),
                 "bg_weight": _WEIGHT, "fg_weight": _WEIGHT, "par_weight": _WEIGHT}
_TRAIN_RANGES = {"lr": Range(0, strict=True), "weight_decay": _WEIGHT,
                 "lr_gamma": Range(0, strict=True, maximum=1), "seed": Range(0, maximum=2**32 - 1, integer=True),
                 "iterations": _COUNT, "batch_size": _COUNT, "log_every": _COUNT, "ckpt_every": _COUNT,
                 "lr_step": Range(0, integer=True), "num_workers": Range(0, integer=True),
                 "torch_threads": Range(0, integer=True),
                 "loader_timeout_s": _WEIGHT}
_AUGMENT_RANGES = {"rotate_deg": _WEIGHT, "translate_px": _WEIGHT, "shear_deg": _WEIGHT, "elastic_alpha": _WEIGHT,
                   "elastic_sigma": Range(0, strict=True)}


@dataclasses.dataclass
class ModelConfig:
    # CPU-sized default (ResNet-18 cut after a dilated layer3, ~0.12 s a step on 2 cores); the paper's
    # encoder is resnet101 (configs/paper.yaml). Registry: resnet101 | resnet50 | resnet18 | resnet18_l3 | tiny
    encoder: str = "resnet18_l3"
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

    def __post_init__(self) -> None:
        check_ranges("model", self, _MODEL_RANGES)


@dataclasses.dataclass
class EpisodeConfig:
    setting: int = 2                     # 1: no exclusion; 2: drop slices containing the fold's test organs
    label_group: int = 0                 # setting 2: 0 = kidney model (exclude 2, 3), 1 = liver/spleen (1, 4)
    exclude_labels: list[int] = dataclasses.field(default_factory=list)  # explicit override of the group
    fold: int = 0                        # held-out scans of this fold never enter training (method.md 5.2;
                                         # folds built by alpnet.protocol.make_fold with evaluate.n_folds)
    holdout: bool = True                 # False: train on every volume (e.g. phantom smoke runs)
    # Added by the episode stream (helper D). The reference draws ids 1..max-1 uniformly, empty and
    # vanishing ones included (method.md 2.1/7.2: ~8% of its episodes teach "all background"); we drop
    # them and count how often that happens. Set both False to keep them, as the reference does (our ids are
    # consecutive, so all of 1..K are drawn; the reference never draws its largest id, a relabelling quirk).
    drop_empty_ids: bool = True          # id with no pixel in the slice -> draw another id
    drop_vanishing_ids: bool = True      # id with no pixel left after the bilinear down-sampling to H/8
    feature_stride: int = 8              # encoder output stride, for the vanishing test
    max_slice_tries: int = 1000          # consecutive slices without a usable id before giving up

    def __post_init__(self) -> None:
        if self.setting not in (1, 2):
            raise ConfigError(f"episodes.setting: {self.setting!r} is not 1 or 2")
        if self.label_group not in (0, 1):
            raise ConfigError(f"episodes.label_group: {self.label_group!r} is not 0 or 1")
        check_ranges("episodes", self, {"fold": Range(0, integer=True), "feature_stride": _COUNT,
                                        "max_slice_tries": _COUNT})
        # the store records a slice's organs as bits 1..63 (engine.store_format.slice_organ_bits)
        bad = [v for v in self.exclude_labels if not 1 <= v <= 63]
        if bad:
            raise ConfigError(f"episodes.exclude_labels: organ labels that can be excluded are 1..63 (0 is "
                              f"background), got {bad[0]}")


@dataclasses.dataclass
class AugmentConfig:
    rotate_deg: float = 5.0
    translate_px: float = 5.0
    shear_deg: float = 5.0
    zoom: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.2])
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0
    gamma: list[float] = dataclasses.field(default_factory=lambda: [0.5, 1.5])
    # the reference's blur kernel size (cv2.GaussianBlur 21x21), and a switch for debugging and tests
    # (False: support and query are the unaugmented slice)
    elastic_kernel: int = 21
    enabled: bool = True

    def __post_init__(self) -> None:
        for key in ("zoom", "gamma"):
            low_high = getattr(self, key)
            # an infinite bound passed, and gamma's blew the loss up without an error
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1] < math.inf:
                raise ConfigError(f"augment.{key}: expected [low, high] with 0 < low <= high, both finite, got "
                                  f"{low_high}")
        if self.elastic_kernel < 1 or self.elastic_kernel % 2 == 0:
            raise ConfigError(f"augment.elastic_kernel: must be odd and >= 1, got {self.elastic_kernel!r}")
        # elastic_sigma NaN passed "<= 0" and left every episode's foreground empty, without an error
        check_ranges("augment", self, _AUGMENT_RANGES)


@dataclasses.dataclass
class TrainConfig:
    store: str = "data/store.h5"
    out: str = "runs/default"
    iterations: int = 100_000
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_step: int = 1000                  # lr *= lr_gamma every lr_step iterations; 0 = iterations // 100
                                         # (the paper's 100 decays spread over a shorter run)
    lr_gamma: float = 0.95
    seed: int = 1234
    num_workers: int = 0                 # DataLoader workers
    torch_threads: int = 0               # 0 = torch default
    device: str = "auto"                 # auto | cpu | cuda
    amp: bool = False                    # autocast with amp_dtype (CUDA; also CPU bf16), opt-in
    log_every: int = 20
    ckpt_every: int = 1000
    batch_size: int = 1                  # episodes per iteration (paper: 1)
    amp_dtype: str = "bfloat16"          # with amp: bfloat16 (CUDA or CPU) | float16 (CUDA, with grad scaling)
    channels_last: bool = False          # NHWC memory format (measured 4-14% faster steps on this CPU)
    keep_checkpoints: bool = False       # also keep checkpoint_<iteration>.pt at every ckpt_every (snapshots)
    # With loader workers, a batch a worker fails to hand over (a full /dev/shm) is lost without a word to
    # the trainer, which would wait for it forever: a wait this long stops the run instead (0: no limit).
    loader_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto, cpu, cuda")
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"train.amp_dtype: {self.amp_dtype!r} is not one of bfloat16, float16")
        check_ranges("train", self, _TRAIN_RANGES)
        if not 0 <= self.momentum < 1:        # at 1 SGD's velocity would never decay
            raise ConfigError(f"train.momentum: must be >= 0 and < 1, got {self.momentum!r}")


@dataclasses.dataclass
class EvaluateConfig:
    data: str = "../shared/data/chaos_t2"
    fold: str | int = "0"                # 0..n_folds-1 or "all" (int accepted: --set evaluate.fold=1)
    chunks: int = 3                      # C of the Roy et al. protocol
    classes: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"LIVER": 1, "RK": 2, "LK": 3, "SPLEEN": 4})
    n_folds: int = 5
    overlays: int = 2                    # scans per organ with overlay PNGs
    out: str = "runs/eval"
    batch: int = 8                       # query slices per encoder pass (BN in eval mode: no effect on Dice)
    allow_train_overlap: bool = False    # evaluate a fold whose scans the checkpoint may have trained on
                                         # (another fold than its training fold); the report flags it
    label: str = ""                      # row name in results.md; empty = derived from the checkpoint

    def __post_init__(self) -> None:
        # chunks 0 and n_folds 0 or 1 were refused only once the evaluation had loaded its data
        check_ranges("evaluate", self, {"batch": _COUNT, "overlays": Range(0, integer=True), "chunks": _COUNT,
                                        "n_folds": Range(2, integer=True)})


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
