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
"""

from __future__ import annotations

from typing import Callable

import torch

from dfml_bench.access import BlackBoxAPI, TopK

# loss(outputs as logits [N, K], sample index b in 0..B-1 for each row [N]) -> per-row loss [N]
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class UnsupportedOutput(ValueError):
    """The API answers an output kind the estimator cannot use (hard labels)."""


def outputs_to_logits(out, kind: str, num_classes: int) -> torch.Tensor:
    """API outputs as logits (log-probabilities up to a per-row constant), so one loss serves every kind.

    ``probs`` -> ``log p``; ``topk`` -> the k probabilities and the leftover mass spread evenly over the
    other classes (exact when k == num_classes); ``label`` is refused: a hard label is piecewise
    constant in the input, so finite differences at small ``mu`` are zero almost everywhere.
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
    raise UnsupportedOutput(f"output kind {kind!r} carries no usable signal for zero-order estimation; use logits/probs/topk")


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


def zo_gradient(
    api: BlackBoxAPI,
    x: torch.Tensor,
    loss_fn: PerSampleLoss,
    *,
    q: int,
    mu: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ZO estimate of the per-sample input gradient of ``loss_fn`` at ``x`` ([B, C, H, W] in [0, 1]).

    Returns ``(grad_est [B, C, H, W], clean_loss [B], clean_logits [B, K])``. Uses ``(q + 1) * B``
    queries in one batched call.
    """
    if q < 1 or not mu > 0:
        raise ValueError(f"zo_gradient needs q >= 1 and mu > 0, got q={q}, mu={mu}")
    with torch.no_grad():
        b = x.shape[0]
        d = x[0].numel()
        xc = x.detach().clamp(mu, 1.0 - mu)
        u = sphere_directions(q, tuple(xc.shape), generator, xc.device)  # [q, B, C, H, W]
        batch = torch.cat([xc, (xc.unsqueeze(0) + mu * u).flatten(0, 1)])  # [(q+1)B, C, H, W]
        logits = query_logits(api, batch)
        idx = torch.arange(b, device=x.device).repeat(q + 1)
        losses = loss_fn(logits, idx).view(q + 1, b)
        diff = (losses[1:] - losses[0:1]) / mu  # [q, B]
        g = (d / q) * (diff.view(q, b, *([1] * (x.dim() - 1))) * u).sum(0)
    return g, losses[0], logits[:b]


def surrogate(grad_est: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The loss that carries the estimate into whatever produced ``x``: d/dx = grad_est / B."""
    return (grad_est.detach() * x).sum() / x.shape[0]
