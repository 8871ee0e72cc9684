"""Encoder registry: every encoder maps (B, 3, H, W) images to (B, C, H/8, W/8) features (C = 256 by default).

- ``resnet101``: torchvision ResNet-101 with dilated layer3/layer4 (output stride 8), i.e. the backbone of
  torchvision's DeepLabv3-ResNet-101, then a 1x1 conv 2048 -> C without bias (method.md 3.1; the paper's encoder).
- ``resnet50``: the same construction on ResNet-50.
- ``resnet18``: ResNet-18 with stride-1, dilated layer3 and layer4 (512 -> C).
- ``resnet18_l3``: ResNet-18 cut after a stride-1, dilated layer3 (256 -> C). The CPU default: about 3x cheaper
  than ``resnet18`` per step (benchmarks/loader.py measures it) while keeping the 1/8 feature grid.
- ``tiny``: three strided convs, for tests only.

Pretrained weights are read only from a local file (``model.pretrained``): torchvision's COCO DeepLabv3
checkpoint (keys ``backbone.*``) or an ImageNet ResNet checkpoint (keys ``conv1.*``, ``layer1.*``, ``fc.*``).
Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision

from engine.volume import one_line


class EncoderError(ValueError):
    """An encoder name or a weights file cannot be used; the message is one line."""


class ResNetEncoder(nn.Module):
    """A torchvision ResNet trunk (stem + ``layers``) followed by a bias-free 1x1 projection.

    Parameters
    ----------
    trunk : torchvision.models.ResNet
        Its ``fc``/``avgpool`` are removed; the layers not listed in ``layers`` are removed too.
    layers : tuple of str
        Residual stages to run, e.g. ``("layer1", "layer2", "layer3", "layer4")``.
    in_channels : int
        Channels out of the last stage.
    feature_dim : int
        Output channels C.
    """

    def __init__(self, trunk: torchvision.models.ResNet, layers: tuple[str, ...], in_channels: int,
                 feature_dim: int):
        super().__init__()
        for name in ("fc", "avgpool", "layer1", "layer2", "layer3", "layer4"):
            if name not in layers and hasattr(trunk, name):
                delattr(trunk, name)
        # Keeping torchvision's attribute names under ``backbone`` makes COCO keys (backbone.layer1...) map 1:1.
        self.backbone = trunk
        self.layers = layers
        self.proj = nn.Conv2d(in_channels, feature_dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> (B, C, H/8, W/8)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        for name in self.layers:
            x = getattr(b, name)(x)
        return self.proj(x)


class TinyEncoder(nn.Module):
    """Three stride-2 conv blocks and a projection: (B, 3, H, W) -> (B, C, H/8, W/8). For tests."""

    def __init__(self, feature_dim: int = 256, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(3, width, 2), block(width, 2 * width, 2),
                                  block(2 * width, 4 * width, 2), block(4 * width, 4 * width, 1))
        self.proj = nn.Conv2d(4 * width, feature_dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turn a BasicBlock stage with stride 2 into stride 1 with ``dilation`` (DeepLab style).

    torchvision refuses ``replace_stride_with_dilation`` for BasicBlock, so the convolutions are edited in place:
    the first conv keeps the incoming dilation (``dilation // 2``, at least 1), every later 3x3 conv uses
    ``dilation``; padding equals dilation so the spatial size is kept.
    """
    first = True
    for block in layer:
        for conv_name in ("conv1", "conv2"):
            conv = getattr(block, conv_name)
            d = max(dilation // 2, 1) if (first and conv_name == "conv1") else dilation
            conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        first = False


def _resnet_bottleneck(arch: str, feature_dim: int) -> nn.Module:
    trunk = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=[False, True, True])
    return ResNetEncoder(trunk, ("layer1", "layer2", "layer3", "layer4"), 2048, feature_dim)


def _resnet18(feature_dim: int) -> nn.Module:
    trunk = torchvision.models.resnet18(weights=None)
    _dilate_basic_layer(trunk.layer3, 2)
    _dilate_basic_layer(trunk.layer4, 4)
    return ResNetEncoder(trunk, ("layer1", "layer2", "layer3", "layer4"), 512, feature_dim)


def _resnet18_l3(feature_dim: int) -> nn.Module:
    trunk = torchvision.models.resnet18(weights=None)
    _dilate_basic_layer(trunk.layer3, 2)
    return ResNetEncoder(trunk, ("layer1", "layer2", "layer3"), 256, feature_dim)


ENCODERS: dict[str, Callable[[int], nn.Module]] = {
    "resnet101": lambda c: _resnet_bottleneck("resnet101", c),
    "resnet50": lambda c: _resnet_bottleneck("resnet50", c),
    "resnet18": _resnet18,
    "resnet18_l3": _resnet18_l3,
    "tiny": lambda c: TinyEncoder(c),
}


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint file (bare state dict, or under ``model``/``state_dict``)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EncoderError(f"{path}: not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def map_resnet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map COCO DeepLabv3 (``backbone.layer1...``) or ImageNet ResNet (``layer1...``) keys onto ``backbone.*``.

    Classifier heads (``fc.*``, ``classifier.*``, ``aux_classifier.*``) are dropped; DataParallel's ``module.``
    prefix is stripped.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith(("classifier.", "aux_classifier.", "fc.")):
            continue
        if not key.startswith("backbone."):
            key = "backbone." + key
        out[key] = value
    return out


def load_pretrained(encoder: nn.Module, path: str | Path) -> dict[str, int]:
    """Load a local ResNet checkpoint into ``encoder.backbone``; print one summary line.

    Returns
    -------
    dict
        ``loaded``, ``missing`` (encoder keys not in the file), ``unexpected`` (file keys the encoder lacks,
        e.g. layer4 for ``resnet18_l3``) and ``mismatched`` (same name, other shape) counts.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: pretrained weights file not found (model.pretrained)")
    if not isinstance(encoder, ResNetEncoder):
        raise EncoderError(f"{path}: pretrained weights apply to the ResNet encoders only")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; report one line
        raise EncoderError(f"{path}: cannot read weights ({one_line(exc, sentence=True)})") from None
    source = map_resnet_keys(_extract_state_dict(obj, path))
    own = {k: v for k, v in encoder.state_dict().items() if k.startswith("backbone.")}
    usable = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    counts = {"loaded": len(usable), "missing": len(set(own) - set(usable)),
              "unexpected": len(set(source) - set(own)),
              "mismatched": sum(1 for k, v in source.items() if k in own and own[k].shape != v.shape)}
    encoder.load_state_dict(usable, strict=False)
    print(f"encoder: loaded {counts['loaded']} tensors from {path} (missing {counts['missing']}, "
          f"unexpected {counts['unexpected']}, shape-mismatched {counts['mismatched']}); "
          f"the 1x1 projection starts from random init")
    return counts


def build_encoder(name: str, feature_dim: int = 256, pretrained: str = "", quiet: bool = False) -> nn.Module:
    """Build encoder ``name`` -> module mapping (B, 3, H, W) to (B, feature_dim, H/8, W/8).

    Parameters
    ----------
    name : str
        One of ``ENCODERS``.
    feature_dim : int
        Output channels.
    pretrained : str
        Local weights file; empty -> random init with a one-line notice (unless ``quiet``).
    quiet : bool
        Suppress the random-init notice (used when weights come from a checkpoint right after).
    """
    if name not in ENCODERS:
        raise EncoderError(f"model.encoder: {name!r} is not one of {', '.join(ENCODERS)}")
    encoder = ENCODERS[name](feature_dim)
    if pretrained:
        load_pretrained(encoder, pretrained)
    elif not quiet:
        print(f"encoder: {name} starts from random init (no model.pretrained file given)")
    return encoder
