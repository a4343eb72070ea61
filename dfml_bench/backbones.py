"""Backbones: the Conv4 / ResNet-10 / ResNet-18 networks of the DFML literature.

Every model takes UNNORMALISED float images in [0, 1] and begins with a fixed :class:`Normalize` layer
(mean/std are buffers, never parameters), so a model is a complete "image -> logits" function, exactly
as a deployed black-box API would be.

- ``conv4``: the CloserLook ConvNet used as meta-learner and as zoo model in DFML papers:
  4 x [conv3x3 pad 1, BatchNorm, ReLU, maxpool 2], flatten, linear head; ``width`` channels per block
  (literature: 32). The flatten size is computed from ``image_shape`` (32x32 -> 2x2, 84x84 -> 5x5).
- ``resnet10`` / ``resnet18``: CloserLook ``SimpleBlock`` ResNets ([1,1,1,1] / [2,2,2,2]) with a few-shot
  style stem (3x3 stride-1 conv, BN, ReLU; no 7x7, no stem maxpool), stage strides 1,2,2,2, stage widths
  ``width * (1, 2, 4, 8)`` (literature width 64), global average pooling, linear head.

BatchNorm: meta-learners are built with ``track_running_stats=False`` so BatchNorm always uses the batch
statistics (MAML's fast-weight BN) and the model is a pure function of (parameters, input): it works
under ``torch.func.functional_call`` + ``vmap`` with no buffer mutation. Zoo (teacher) models use
``track_running_stats=True``; their running statistics are what white-box methods such as
BN-statistics matching read.

Each model exposes ``model.embed(x)`` (features before the head), ``model.head`` (the ``nn.Linear``)
and ``model.spec`` (its :class:`BackboneSpec`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .utils import seeded_torch

ARCHS = ("conv4", "resnet10", "resnet18")
_RESNET_LAYERS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2)}


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture and width of a network.

    ``width``: channels per block for ``conv4`` (literature 32); base channels of the first stage for
    the ResNets (literature 64; smaller at CPU scale), the stages having ``width * (1, 2, 4, 8)``.
    """

    arch: str = "conv4"
    width: int = 32

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"BackboneSpec.arch must be one of {ARCHS}, got {self.arch!r}")
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise ValueError(f"BackboneSpec.width must be a positive integer, got {self.width!r}")


class Normalize(nn.Module):
    """Fixed per-channel ``(x - mean) / std``; mean and std are buffers, so no optimiser ever moves them."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if not torch.all(std_t > 0):
            raise ValueError(f"std must be positive in every channel, got {tuple(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _bn(channels: int, track_running_stats: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=track_running_stats)


class _Backbone(nn.Module):
    """Shared shape: ``normalize -> features -> head``; ``embed`` stops before the head."""

    normalize: Normalize
    features: nn.Module
    head: nn.Linear
    spec: BackboneSpec

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class ConvBlock(nn.Module):
    """CloserLook ConvBlock: conv3x3 (pad 1, with bias) -> BatchNorm -> ReLU -> maxpool 2.

    Computed as maxpool then ReLU: the two commute exactly (ReLU is monotone), values and gradients
    alike, and ReLU then runs on a 4x smaller tensor.
    """

    def __init__(self, cin: int, cout: int, track_running_stats: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = _bn(cout, track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.max_pool2d(self.bn(self.conv(x)), 2))


class Conv4(_Backbone):
    def __init__(self, spec: BackboneSpec, num_classes: int, image_shape, mean, std, track_running_stats: bool) -> None:
        super().__init__()
        c, h, w = image_shape
        self.spec = spec
        self.normalize = Normalize(mean, std)
        blocks = [ConvBlock(c if i == 0 else spec.width, spec.width, track_running_stats) for i in range(4)]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        for _ in range(4):
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"conv4 needs images of at least 16x16 (four 2x2 poolings), got {tuple(image_shape)}")
        self.feature_dim = spec.width * h * w
        self.head = nn.Linear(self.feature_dim, num_classes)


class SimpleBlock(nn.Module):
    """CloserLook SimpleBlock: two 3x3 convs with BN, identity or 1x1-conv+BN shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int, track_running_stats: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(cout, track_running_stats)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _bn(cout, track_running_stats)
        if cin != cout or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _bn(cout, track_running_stats))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(_Backbone):
    def __init__(self, spec: BackboneSpec, num_classes: int, image_shape, mean, std, track_running_stats: bool) -> None:
        super().__init__()
        c = image_shape[0]
        self.spec = spec
        self.normalize = Normalize(mean, std)
        w = spec.width
        layers: list[nn.Module] = [nn.Conv2d(c, w, 3, padding=1, bias=False), _bn(w, track_running_stats), nn.ReLU()]
        cin = w
        for stage, n_blocks in enumerate(_RESNET_LAYERS[spec.arch]):
            cout = w * 2**stage
            for j in range(n_blocks):
                stride = 2 if (stage > 0 and j == 0) else 1
                layers.append(SimpleBlock(cin, cout, stride, track_running_stats))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        self.head = nn.Linear(cin, num_classes)


def _init_weights(model: nn.Module) -> None:
    """CloserLook initialisation: conv N(0, sqrt(2 / (k*k*out))), BN weight 1 / bias 0; default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_backbone(
    spec: BackboneSpec,
    num_classes: int,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    std: tuple[float, ...] = (0.25, 0.25, 0.25),
    track_running_stats: bool = False,
    *,
    seed: int | None = None,
) -> nn.Module:
    """A fresh network ``[0,1] images -> num_classes logits`` of ``spec``.

    With ``seed`` the initial weights are a deterministic function of it (the caller's global RNG is
    left untouched); without, they come from torch's global RNG.
    ``track_running_stats=False`` (meta-learners) makes BatchNorm always use batch statistics;
    ``True`` (zoo models) keeps running statistics for eval mode.
    """
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"spec must be a BackboneSpec, got {type(spec).__name__}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape}")
    if len(mean) != image_shape[0] or len(std) != image_shape[0]:
        raise ValueError(f"mean/std need one value per channel ({image_shape[0]}), got {len(mean)} and {len(std)}")
    cls = Conv4 if spec.arch == "conv4" else ResNet
    with seeded_torch(seed) if seed is not None else contextlib.nullcontext():
        model = cls(spec, num_classes, image_shape, tuple(mean), tuple(std), track_running_stats)
        _init_weights(model)
    return model


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as Normalize's mean/std and BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
