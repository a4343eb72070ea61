"""White-box model inversion shared by FREE and the from-scratch recovery baseline.

The loss a generator is trained with to recover a pre-trained model's data (free-tgr.md 2.3 step 1,
3.3 step 2):

    L_gen = w_ce * CE(T(A(x)), y) + w_adv * L_adv(T, S; A(x)) + w_bn * L_bn(T; A(x))

- :func:`adversarial_loss`: after warm-up, push the generator towards images on which the student
  (the meta-learner) disagrees with the teacher, on the samples where they currently agree. The
  principled form (``mode="kl"``, default) is the CMI / Fast adversarial term ``-mean(mask * KL(p_t || p_s))``;
  ``mode="reference"`` reproduces the reference's probability-space surrogate (bug P3).
- :class:`BNStatHooks` / :func:`bn_matching_loss`: DeepInversion BatchNorm-statistics matching
  (per BN layer ``||mu_batch - mu_running||_2 + ||var_batch - var_running||_2`` of the layer's input, as
  TGR). Hooks are registered in a context manager and always removed (fixes TGR bug T3).
- :func:`invert_from_scratch`: the recovery BiDf-MKD and TGR use in white-box form: a freshly
  re-initialised generator and fresh latent codes, Adam (lr 1e-3, betas 0.5/0.999) for 200 iterations,
  keeping the lowest-loss iterate's images.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .generator import Generator, augment, reset_generator


# --------------------------------------------------------------------------------------------------
# loss terms


def target_labels(ways: int, per_class: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Relative labels 0..ways-1, class-interleaved (0,1,..,K-1,0,1,..) as in the reference."""
    return torch.arange(ways, device=device).repeat(per_class)


def adversarial_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, mode: str = "kl") -> torch.Tensor:
    """Generator term that seeks teacher/student disagreement on samples where they agree.

    ``s_logits`` should be detached (the student is not trained here). ``mode="kl"``: minimise
    ``-mean_i mask_i KL(p_t,i || p_s,i)`` (maximise the divergence). ``mode="reference"``:
    ``mean_i mask_i (sum_c p_s p_t - sum_c p_s log p_s)``, the reference's surrogate.
    """
    mask = (s_logits.argmax(1) == t_logits.argmax(1)).float()
    if mode == "kl":
        log_pt = F.log_softmax(t_logits, 1)
        log_ps = F.log_softmax(s_logits, 1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
        return -(mask * kl).mean()
    if mode == "reference":
        p_t = F.softmax(t_logits, 1)
        p_s = F.softmax(s_logits, 1)
        term = (p_s * p_t).sum(1) - (p_s * torch.log(p_s.clamp_min(1e-12))).sum(1)
        return (mask * term).mean()
    raise ValueError(f"adversarial mode must be 'kl' or 'reference', got {mode!r}")


def distill_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0, mode: str = "kl") -> torch.Tensor:
    """Student-to-teacher distillation. ``mode="kl"``: the true ``T^2 * KL(p_t^T || p_s^T)`` (batch mean).
    ``mode="reference"``: the reference's surrogate ``mean_{i,c} p_t (log p_t - p_s)`` (bug P3)."""
    if mode == "kl":
        t = float(temperature)
        log_ps = F.log_softmax(s_logits / t, 1)
        log_pt = F.log_softmax(t_logits.detach() / t, 1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * t * t
    if mode == "reference":
        p_t = F.softmax(t_logits.detach(), 1)
        p_s = F.softmax(s_logits, 1)
        return (p_t * (torch.log(p_t.clamp_min(1e-12)) - p_s)).mean()
    raise ValueError(f"distillation mode must be 'kl' or 'reference', got {mode!r}")


class BNStatHooks:
    """Forward hooks on every BatchNorm2d of a (teacher) model that record the distance between the
    batch statistics of the layer's input and the layer's running statistics."""

    def __init__(self, model: nn.Module):
        self.losses: list[torch.Tensor] = []
        self._handles = []
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                self._handles.append(m.register_forward_hook(self._hook))
        if not self._handles:
            raise ValueError("BN-statistics matching needs a model with BatchNorm2d layers that track running statistics")

    def _hook(self, module: nn.BatchNorm2d, inputs, _output) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    def pop(self) -> torch.Tensor:
        """Sum of the recorded layer distances since the last pop (0 if none)."""
        out = torch.stack(self.losses).sum() if self.losses else torch.zeros(())
        self.losses = []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def bn_hooks(model: nn.Module, enabled: bool = True) -> Iterator[BNStatHooks | None]:
    """Register :class:`BNStatHooks` on ``model`` for the duration of the block (``None`` if disabled)."""
    if not enabled:
        yield None
        return
    hooks = BNStatHooks(model)
    try:
        yield hooks
    finally:
        hooks.remove()


def bn_matching_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The BN-statistics term of ``model`` on images ``x`` alone (one forward pass)."""
    with bn_hooks(model) as hooks:
        model(x)
        return hooks.pop()


@dataclass
class LossWeights:
    """Weights of the inversion loss terms (reference FREE: CE 1, adversarial 1 after warm-up, BN 0)."""

    ce: float = 1.0
    adv: float = 0.0
    bn: float = 0.0
    adv_mode: str = "kl"


def inversion_loss(teacher: nn.Module, x_aug: torch.Tensor, y: torch.Tensor, w: LossWeights, *,
                   student: nn.Module | None = None, hooks: BNStatHooks | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_gen`` on augmented images ``x_aug`` (differentiable w.r.t. them). The adversarial term is
    used only when ``student`` is given and ``w.adv > 0``; the BN term only when ``hooks`` are active
    on ``teacher`` and ``w.bn > 0``."""
    if hooks is not None:
        hooks.pop()  # discard anything recorded outside this call
    t_logits = teacher(x_aug)
    loss = w.ce * F.cross_entropy(t_logits, y)
    parts = {"ce": float(loss.detach())}
    if student is not None and w.adv > 0:
        with torch.no_grad():
            s_logits = student(x_aug)
        adv = adversarial_loss(t_logits, s_logits, w.adv_mode)
        loss = loss + w.adv * adv
        parts["adv"] = float(adv.detach())
    if hooks is not None:
        bn = hooks.pop()
        if w.bn > 0:
            loss = loss + w.bn * bn
        parts["bn"] = float(bn.detach())
    return loss, parts


@torch.no_grad()
def teacher_accuracy(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of recovered images ``x`` the teacher classifies as their target label."""
    return float((teacher(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------------------------------
# from-scratch recovery


@dataclass
class Recovery:
    """One model's recovered batch: images in [0, 1], local labels, wall seconds, teacher accuracy."""

    images: torch.Tensor
    labels: torch.Tensor
    seconds: float
    teacher_acc: float
    final_loss: float
    history: list[float] = field(default_factory=list)


def invert_from_scratch(teacher: nn.Module, ways: int, per_class: int, *, image_shape: tuple[int, int, int],
                        generator: torch.Generator, device: str | torch.device = "cpu", iterations: int = 200,
                        lr: float = 1e-3, z_lr: float = 1e-3, nz: int = 256, ngf: int = 64,
                        weights: LossWeights | None = None, student: nn.Module | None = None,
                        keep_best: bool = True) -> Recovery:
    """Recover ``ways * per_class`` images of ``teacher`` with a freshly initialised generator and fresh
    latent codes, ``iterations`` Adam steps (lr 1e-3, betas 0.5/0.999, as BiDf-MKD / TGR). Keeps the
    images of the lowest-loss iterate (checked before each step, as TGR) if ``keep_best``, else the last."""
    w = weights or LossWeights()
    c, h, _ = image_shape
    t0 = time.perf_counter()
    gen = Generator(nz=nz, ngf=ngf, img_size=h, channels=c)
    reset_generator(gen, generator)
    gen = gen.to(device).train()
    z = torch.randn(ways * per_class, nz, generator=generator).to(device).requires_grad_(True)
    y = target_labels(ways, per_class, device)
    opt = torch.optim.Adam([{"params": gen.parameters(), "lr": lr}, {"params": [z], "lr": z_lr}], betas=(0.5, 0.999))
    best_loss, best_x, history = float("inf"), None, []
    with bn_hooks(teacher, enabled=w.bn > 0) as hooks:
        for _ in range(iterations):
            x = gen(z)
            loss, _parts = inversion_loss(teacher, augment(x, generator), y, w, student=student, hooks=hooks)
            history.append(float(loss.detach()))
            if not keep_best or history[-1] < best_loss:
                best_loss, best_x = history[-1], x.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    acc = teacher_accuracy(teacher, best_x, y)
    return Recovery(best_x, y, seconds, acc, best_loss, history)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (DeepInversion's image prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def deep_inversion(teacher: nn.Module, ways: int, per_class: int, *, image_shape: tuple[int, int, int],
                   generator: torch.Generator, iterations: int = 100, lr: float = 0.05, w_bn: float = 1.0,
                   w_tv: float = 1.0) -> Recovery:
    """Exact white-box inversion in pixel space (DeepInversion, Yin et al. 2020): ``ways * per_class``
    images optimised directly with Adam (betas 0.5/0.999) on CE to the targets + ``w_bn`` x BN-statistics
    matching + ``w_tv`` x total variation, through the reference's crop/flip augmentation; pixels are
    clamped to [0, 1]. About half the cost of a generator inversion per step (no generator), so it is
    what the proxy validation study uses as "exact inversion of each teacher"."""
    t0 = time.perf_counter()
    y = target_labels(ways, per_class)
    x = (0.4 + 0.2 * torch.rand((len(y), *image_shape), generator=generator)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.999))
    history = []
    with bn_hooks(teacher, enabled=w_bn > 0) as hooks:
        for _ in range(iterations):
            xc = x.clamp(0, 1)
            loss, _parts = inversion_loss(teacher, augment(xc, generator), y, LossWeights(1.0, 0.0, w_bn), hooks=hooks)
            loss = loss + w_tv * total_variation(xc)
            history.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    images = x.detach().clamp(0, 1)
    return Recovery(images, y, time.perf_counter() - t0, teacher_accuracy(teacher, images, y), history[-1], history)
