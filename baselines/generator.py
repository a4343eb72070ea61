"""The synthetic-image generator shared by BiDf-MKD, FREE and from-scratch inversion.

Architecture as in both reference codebases (bidf-mkd.md 2.3, free-tgr.md 1.4): z (256) -> Linear to
128 x s/4 x s/4 -> BN -> up x2 -> conv3x3 128->128 -> BN -> LeakyReLU(0.2) -> up x2 -> conv3x3 128->64
-> BN -> LeakyReLU(0.2) -> conv3x3 64->C -> sigmoid. Output: images in [0, 1] (the value range APIs
and zoo models take). The generator is always used in train mode (BN on batch statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, channels: int = 3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"Generator img_size must be divisible by 4, got {img_size}")
        self.nz, self.img_size, self.init_size = nz, img_size, img_size // 4
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z.flatten(1))
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)


def reset_generator(gen: nn.Module, generator: torch.Generator | None = None) -> None:
    """Re-initialise as the reference's ``reset_model``: conv/linear N(0, 0.02), bias 0; BN gamma
    N(1, 0.02), beta 0. Uses the explicit ``generator`` for reproducibility."""
    with torch.no_grad():
        for m in gen.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.02 * torch.randn(m.weight.shape, generator=generator))
                m.bias.zero_()
                m.reset_running_stats()


def make_generator_module(img_size: int, channels: int, seed_generator: torch.Generator, device, nz: int = 256,
                          ngf: int = 64) -> Generator:
    gen = Generator(nz=nz, ngf=ngf, img_size=img_size, channels=channels)
    reset_generator(gen, seed_generator)
    return gen.to(device).train()


def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """The reference's input pipeline A(.) into a teacher: random crop with 4-pixel zero padding and a
    random horizontal flip, one offset and one flip decision for the whole batch (as in the reference).
    Differentiable w.r.t. ``x``. (Normalisation is done by the teacher itself in dfml-bench.)"""
    n, c, h, w = x.shape
    dev = generator.device if generator is not None else "cpu"
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator, device=dev).tolist()
    flip = bool(torch.rand((), generator=generator, device=dev) < 0.5)
    xp = F.pad(x, (pad, pad, pad, pad))
    out = xp[:, :, dy : dy + h, dx : dx + w]
    return out.flip(3) if flip else out
