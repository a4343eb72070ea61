"""Zero-order (ZO) input-gradient estimation through a black-box API (BiDf-MKD, bidf-mkd.md 2.4).

For a per-sample loss ``l_b(x) = loss(A(x_b), b)`` computed from API outputs only, the sphere-smoothed
forward-difference estimator is

    g_b = (d / q) * sum_j (l_b(x_b + mu u_bj) - l_b(x_b)) / mu * u_bj,   u_bj ~ Uniform(S^{d-1}),

with ``d = C*H*W``. The q perturbations of every sample and the clean batch go to the API as ONE
batched query of ``(q + 1) * B`` images (split into chunks only if the API's ``max_batch`` demands
it). Directions are drawn on the images' device with an explicit ``torch.Generator``.

Deviation from the reference: the APIs here take images in [0, 1] (they normalise internally), so the
perturbation lives in [0, 1] pixel space and ``mu`` is in pixel units. To keep every perturbed image a
valid query, the estimate is taken at ``x.clamp(mu, 1 - mu)`` (at most ``mu`` away from ``x``; a unit
direction has no component above 1, so ``x +- mu u`` stays in [0, 1]).

Two direction families (``directions=``):

- ``"sphere"`` (the reference): ``u`` uniform on the sphere of all ``d = C*H*W`` pixels.
- ``"subspace"`` (query-efficient): ``u`` uniform on the sphere of a low-resolution subspace, a grid of
  ``r x r`` cells per channel (``d' = C*r*r``; default ``r = H // 4``, the generator's base resolution)
  nearest-upsampled to ``H x W``. Upsampling by an integer factor ``k`` keeps the basis orthogonal with
  equal norms, so ``(d'/q) sum_j dl_j u_j`` is unbiased for the gradient *projected* on the subspace,
  and its variance scales with ``d'/q`` instead of ``d/q`` (16x smaller at 32 px). The projection loses
  the high-frequency part of the gradient, which a generator with a base resolution of ``H/4``
  barely follows anyway; measured on glyph APIs (``benchmarks/bench_recovery.py``) it reaches the
  reference's teacher agreement on recovered sets with several times fewer queries. ``orthogonal=True``
  draws each sample's ``q`` directions as an orthonormal frame (Haar, by QR of a Gaussian matrix;
  blocks of ``d'`` when ``q > d'``): unbiased as well, with lower variance when ``q`` is a sizeable
  fraction of ``d'``.

Hard labels: a ``label`` API's answer is turned into the log of a one-hot distribution (clamped at
1e-8), so the CE loss becomes a 0 / 18.4 loss (wrong / right label) and KD becomes CE on the API's
label. Such a loss is piecewise constant, so the estimator needs a smoothing radius ``mu`` large enough
for perturbed points to cross decision boundaries (a Gaussian-smoothed 0-1 loss, as in hard-label
attacks); perturbed images are then clamped to [0, 1].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from dfml_bench.access import BlackBoxAPI, TopK

# loss(outputs as logits [N, K], sample index b in 0..B-1 for each row [N]) -> per-row loss [N]
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class UnsupportedOutput(ValueError):
    """The API answers an output kind the estimator cannot use (hard labels)."""


DIRECTIONS = ("sphere", "subspace")
LABEL_LOG_FLOOR = 1e-8  # one-hot labels become log(max(onehot, floor)): 0 for the label, -18.4 elsewhere


def outputs_to_logits(out, kind: str, num_classes: int) -> torch.Tensor:
    """API outputs as logits (log-probabilities up to a per-row constant), so one loss serves every kind.

    ``probs`` -> ``log p``; ``topk`` -> the k probabilities and the leftover mass spread evenly over the
    other classes (exact when k == num_classes); ``label`` -> the log of the one-hot distribution of
    the answered label, floored at 1e-8 (CE on it is 0 for the right label and 18.4 otherwise).
    """
    if kind == "logits":
        return out.float()
    if kind == "probs":
        return out.float().clamp_min(1e-8).log()
    if kind == "topk":
        v, i = (out.values, out.indices) if isinstance(out, TopK) else out
        v = v.float()
        k = v.shape[1]
        rest = (1.0 - v.sum(1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
        p = rest.expand(v.shape[0], num_classes).clone()
        p.scatter_(1, i.long(), v)
        return p.clamp_min(1e-8).log()
    if kind == "label":
        lab = out.long().view(-1)
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise UnsupportedOutput(f"label API answered labels outside 0..{num_classes - 1}")
        return F.one_hot(lab, num_classes).float().clamp_min(LABEL_LOG_FLOOR).log()
    raise UnsupportedOutput(f"unknown output kind {kind!r}; expected logits/probs/topk/label")


def query_logits(api: BlackBoxAPI, images: torch.Tensor) -> torch.Tensor:
    """Query ``api`` with ``images`` (chunked only beyond ``info.max_batch``); outputs as logits on the
    images' device."""
    info = api.info
    n = images.shape[0]
    step = max(1, int(info.max_batch))
    outs = []
    for s in range(0, n, step):
        out = api.query(images[s : s + step])
        outs.append(outputs_to_logits(out, info.output_kind, info.num_classes).to(images.device))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def sphere_directions(q: int, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """``q`` directions per sample, uniform on the unit sphere of dimension prod(shape[1:]):
    a tensor ``[q, *shape]`` (each ``[b]`` slice unit-norm)."""
    u = torch.randn((q, *shape), generator=generator, device=device)
    flat = u.flatten(2)
    return (flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-12)).view_as(u)


def default_resolution(height: int) -> int:
    """The subspace grid side for images of ``height`` px: the generator's base resolution ``H // 4``."""
    return max(1, height // 4)


def _check_resolution(r: int, h: int, w: int) -> None:
    if r < 1 or h % r or w % r:
        raise ValueError(f"subspace resolution {r} must divide the image size {h}x{w} (nearest upsampling by an integer factor)")


def _orthonormal(v: torch.Tensor) -> torch.Tensor:
    """``v`` [q, B, D] Gaussian -> per-sample orthonormal directions (rows), in blocks of D when q > D."""
    q, b, dim = v.shape
    out = []
    for s in range(0, q, dim):
        blk = v[s : s + dim].permute(1, 2, 0)  # [B, D, m]
        qm, r = torch.linalg.qr(blk)
        qm = qm * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)  # Haar: fix the QR sign ambiguity
        out.append(qm.permute(2, 0, 1))
    return torch.cat(out)


def zo_gradient(
    api: BlackBoxAPI,
    x: torch.Tensor,
    loss_fn: PerSampleLoss,
    *,
    q: int,
    mu: float,
    generator: torch.Generator,
    directions: str = "sphere",
    resolution: int | None = None,
    orthogonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZO estimate of the per-sample input gradient of ``loss_fn`` at ``x`` ([B, C, H, W] in [0, 1]).

    Returns ``(grad_est [B, C, H, W], clean_loss [B], clean_logits [B, K])``. Uses ``(q + 1) * B``
    queries in one batched call. ``directions``: ``"sphere"`` (reference) or ``"subspace"`` (grid of
    ``resolution`` cells per side, default ``H // 4``); ``orthogonal``: orthonormal directions per sample.
    """
    if q < 1 or not mu > 0:
        raise ValueError(f"zo_gradient needs q >= 1 and mu > 0, got q={q}, mu={mu}")
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
    with torch.no_grad():
        x = x.detach()
        b = x.shape[0]
        if directions == "sphere" and not orthogonal:
            return _zo_sphere(api, x, loss_fn, q, mu, generator)
        c, h, w = x.shape[1:]
        r = (resolution or default_resolution(h)) if directions == "subspace" else h
        _check_resolution(r, h, w)
        k = h // r
        dim = c * r * r
        v = torch.randn((q, b, dim), generator=generator, device=x.device)
        if orthogonal:
            v = _orthonormal(v)
        # per-pixel value of each unit direction: the low-res unit vector spread over k*k pixels of norm k
        u_low = v / (v.norm(dim=2, keepdim=True).clamp_min(1e-12) * k)  # [q, B, dim]
        edge = mu / k  # no pixel moves by more than mu * max|u| <= mu / k
        big = edge > 0.05  # hard-label radii: clamp the perturbed images instead of shrinking x
        a = 0.0 if big else edge
        xc = x.clamp(a, 1.0 - a)
        batch = torch.empty((q + 1) * b, c, h, w, dtype=x.dtype, device=x.device)
        batch[:b] = xc
        pert = batch[b:].view(q, b, c, r, k, r, k)
        torch.add(xc.view(1, b, c, r, k, r, k), u_low.view(q, b, c, r, 1, r, 1), alpha=mu, out=pert)
        if big:
            batch[b:].clamp_(0.0, 1.0)
        logits = query_logits(api, batch)
        idx = torch.arange(b, device=x.device).repeat(q + 1)
        losses = loss_fn(logits, idx).view(q + 1, b)
        diff = (losses[1:] - losses[0:1]) / mu  # [q, B]
        g_low = torch.einsum("qb,qbd->bd", diff.to(u_low.dtype), u_low) * (dim / q)  # [B, dim], per-pixel values
        g = g_low.view(b, c, r, 1, r, 1).expand(b, c, r, k, r, k).reshape(b, c, h, w)
    return g, losses[0], logits[:b]


def _zo_sphere(api: BlackBoxAPI, x: torch.Tensor, loss_fn: PerSampleLoss, q: int, mu: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference estimator (directions uniform on the full-dimensional sphere). Its arithmetic is
    kept bit for bit as the records of ``bidf-mkd`` were made with (same draws, same operation order);
    only copies are saved (directions normalised in place, the perturbed batch written next to the
    clean one instead of concatenated)."""
    b = x.shape[0]
    d = x[0].numel()
    xc = x.clamp(mu, 1.0 - mu)
    u = torch.randn((q, *xc.shape), generator=generator, device=xc.device)  # = sphere_directions(...)
    flat = u.flatten(2)
    flat.div_(flat.norm(dim=2, keepdim=True).clamp_min(1e-12))
    batch = torch.empty((q + 1) * b, *xc.shape[1:], dtype=xc.dtype, device=xc.device)
    batch[:b] = xc
    torch.add(xc.unsqueeze(0), mu * u, out=batch[b:].view(q, *xc.shape))
    logits = query_logits(api, batch)
    idx = torch.arange(b, device=x.device).repeat(q + 1)
    losses = loss_fn(logits, idx).view(q + 1, b)
    diff = (losses[1:] - losses[0:1]) / mu  # [q, B]
    g = (d / q) * (diff.view(q, b, *([1] * (x.dim() - 1))) * u).sum(0)
    return g, losses[0], logits[:b]


def surrogate(grad_est: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The loss that carries the estimate into whatever produced ``x``: d/dx = grad_est / B."""
    return (grad_est.detach() * x).sum() / x.shape[0]
