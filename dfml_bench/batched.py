"""Episode-batched Conv4: many episodes' forward passes, each with its own weights, as batched matrix products.

Why: on a CPU, one episode's support set (5 images at 32x32, 32 channels) is far too small a
convolution to keep a core busy, and ``vmap`` turns per-episode weights into a grouped convolution that
oneDNN runs no faster than a Python loop. Written as im2col + ``bmm`` over episodes, the same arithmetic
becomes a few large batched GEMMs per layer, which run near the machine's matrix-product speed and,
unlike autograd over a loop, cost one dispatch per layer for a whole chunk of episodes.

The kernel is the plain network's arithmetic, nothing else: :func:`conv4_forward` computes, for every
episode ``e``, exactly ``functional_call(net, params[e], x[e])`` of a :class:`~dfml_bench.backbones.Conv4`
whose BatchNorm uses batch statistics (per episode), up to float rounding (tested against the plain
network in float64, where they agree to 1e-10). Everything is ordinary differentiable torch, so
``torch.autograd.grad`` gives per-episode gradients (the episodes' losses are summed; each episode's
weights only see their own loss) and second-order MAML works through it with ``create_graph=True``.

Layout: activations are kept episode- and channel-major, ``[E, C, B, H, W]``, so a convolution is
``W [E, Cout, 9C] @ cols [E, 9C, B*H*W]`` and the per-episode BatchNorm is a reduction over the contiguous
last dimension of that product; im2col has a hand-written adjoint (col2im) as its backward. Per-episode results do not depend on
how many episodes share a chunk (tested), which is what makes the evaluation independent of chunking
and of the number of workers.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Conv4

Params = Mapping[str, torch.Tensor]


def supports(net: nn.Module) -> bool:
    """True if ``net`` is a Conv4 whose BatchNorm layers use batch statistics only (see
    :func:`dfml_bench.evaluation.batch_stat_copy`) and whose layers are the standard ones."""
    if type(net) is not Conv4:
        return False
    blocks = list(net.features)[:-1]
    if len(blocks) != 4 or not isinstance(net.features[-1], nn.Flatten):
        return False
    for b in blocks:
        conv, bn = getattr(b, "conv", None), getattr(b, "bn", None)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            return False
        if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1):
            return False
        if conv.groups != 1 or conv.bias is None or not bn.affine or bn.running_mean is not None:
            return False
    return True


def _im2col_raw(h: torch.Tensor) -> torch.Tensor:
    """``[E, C, B, H, W]`` -> ``[E, C, 9, B, H, W]``: the 3x3 neighbourhoods (zero padding 1), taps (kh, kw)."""
    hh, ww = h.shape[-2:]
    hp = F.pad(h, (1, 1, 1, 1))
    return torch.stack([hp[..., i : i + hh, j : j + ww] for i in range(3) for j in range(3)], dim=2)


def _col2im_raw(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_im2col_raw`: ``[E, C, 9, B, H, W]`` -> ``[E, C, B, H, W]`` (taps summed back)."""
    e, c, _t, b, hh, ww = g.shape
    out = g.new_zeros(e, c, b, hh + 2, ww + 2)
    for t in range(9):
        i, j = divmod(t, 3)
        out[..., i : i + hh, j : j + ww] += g[:, :, t]
    return out[..., 1 : hh + 1, 1 : ww + 1]


class _Im2col(torch.autograd.Function):
    """im2col whose backward is one col2im (autograd's own would build nine zero-padded copies); the two
    are each other's adjoint, so second-order gradients (MAML) go through as well."""

    @staticmethod
    def forward(ctx, h):  # type: ignore[override]
        return _im2col_raw(h)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _Col2im.apply(g)


class _Col2im(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g):  # type: ignore[override]
        return _col2im_raw(g)

    @staticmethod
    def backward(ctx, h):  # type: ignore[override]
        return _Im2col.apply(h)


def _pool_raw(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 max-pool of ``x [..., H, W]`` and the one-hot mask ``[..., 2h, 2w]`` of each window's winner: the
    FIRST maximum in max_pool2d's scan order (0,0), (0,1), (1,0), (1,1), so ties break exactly as there.
    Odd trailing rows / columns are dropped, as max_pool2d does."""
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    t = [x[..., i : 2 * h : 2, j : 2 * w : 2] for i in (0, 1) for j in (0, 1)]
    m = torch.maximum(torch.maximum(t[0], t[1]), torch.maximum(t[2], t[3]))
    e0, e1, e2 = (t[0] == m), (t[1] == m), (t[2] == m)
    f1 = e1 & ~e0
    f2 = e2 & ~(e0 | e1)
    f3 = ~(e0 | e1 | e2)
    top = torch.stack([e0, f1], dim=-1)  # [..., h, w, 2]
    bottom = torch.stack([f2, f3], dim=-1)
    mask = torch.stack([top, bottom], dim=-3).reshape(*x.shape[:-2], 2 * h, 2 * w).to(x.dtype)  # [..., h, 2, w, 2]
    return m, mask


def _unpool_raw(g: torch.Tensor, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The pool's backward: ``g [..., h, w]`` put at each window's winner (``mask``), zeros elsewhere."""
    h, w = g.shape[-2:]
    up = g.unsqueeze(-1).unsqueeze(-3)  # [..., h, 1, w, 1]
    out = (mask.view(*g.shape[:-2], h, 2, w, 2) * up).reshape(*g.shape[:-2], 2 * h, 2 * w)
    if out.shape[-2:] != shape[-2:]:  # odd input sizes: the dropped rows / columns get no gradient
        out = F.pad(out, (0, shape[-1] - 2 * w, 0, shape[-2] - 2 * h))
    return out


def _select_raw(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`_unpool_raw`: each window's value at its winner."""
    h, w = mask.shape[-2] // 2, mask.shape[-1] // 2
    xs = x[..., : 2 * h, : 2 * w]
    return (xs * mask).view(*x.shape[:-2], h, 2, w, 2).sum(dim=(-3, -1))


class _MaxPool2(torch.autograd.Function):
    """2x2 max-pool with max_pool2d's exact values and tie-breaking (the gradient goes to the first maximum
    of a window), several times faster than max_pool2d on ``[E, C, B, H, W]`` tensors of few images."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        m, mask = _pool_raw(x)
        ctx.save_for_backward(mask)
        ctx.shape = x.shape
        return m

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return _Unpool2.apply(g, mask, ctx.shape)


class _Unpool2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, mask, shape):  # type: ignore[override]
        ctx.save_for_backward(mask)
        return _unpool_raw(g, mask, shape)

    @staticmethod
    def backward(ctx, gg):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return _Select.apply(gg, mask), None, None


class _Select(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask):  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.shape = x.shape
        return _select_raw(x, mask)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return _Unpool2.apply(g, mask, ctx.shape), None


def _maxpool2(x: torch.Tensor) -> torch.Tensor:
    if not x.requires_grad:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        t = [x[..., i : 2 * h : 2, j : 2 * w : 2] for i in (0, 1) for j in (0, 1)]
        return torch.maximum(torch.maximum(t[0], t[1]), torch.maximum(t[2], t[3]))
    return _MaxPool2.apply(x)


def _block(h: torch.Tensor | tuple[torch.Tensor, tuple[int, ...]], weight: torch.Tensor, bias: torch.Tensor,
           gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """conv3x3 (pad 1) -> per-episode batch-statistics BatchNorm -> maxpool 2 -> ReLU, episode-batched.

    ``h [E, Cin, B, H, W]`` (or its precomputed columns, see :func:`input_columns`); ``weight
    [E, Cout, Cin, 3, 3]``, ``bias/gamma/beta [E, Cout]``; returns
    ``[E, Cout, B, H//2, W//2]``. The convolution is ``W [E, Cout, 9 Cin] @ cols [E, 9 Cin, B*H*W]``
    (the weight's natural row order (cin, kh, kw) is the columns' order); BatchNorm reduces over the
    contiguous last dimension of that product."""
    if isinstance(h, tuple):
        cols, (e, cin, b, hh, ww) = h
    else:
        e, cin, b, hh, ww = h.shape
        cols = (_Im2col.apply(h) if h.requires_grad else _im2col_raw(h)).reshape(e, 9 * cin, b * hh * ww)
    cout = weight.shape[1]
    out = torch.baddbmm(bias.unsqueeze(2), weight.reshape(e, cout, 9 * cin), cols)  # [E, Cout, B*H*W]
    d = out - out.mean(dim=2, keepdim=True)  # two-pass statistics: several times faster than var_mean here
    scale = gamma.unsqueeze(2) * torch.rsqrt(d.square().mean(dim=2, keepdim=True) + eps)
    out = torch.addcmul(beta.unsqueeze(2), d, scale)
    return F.relu(_maxpool2(out.reshape(e, cout, b, hh, ww)))


def conv4_forward(net: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits ``[E, B, classes]`` of ``net``'s architecture with per-episode ``params`` (each ``[E, *shape]``)
    on per-episode images ``x [E, B, C, H, W]`` (BatchNorm on each episode's own batch statistics)."""
    return forward_columns(net, params, input_columns(net, x))


def input_columns(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The first convolution's im2col columns of the normalised images ``x [E, B, C, H, W]`` (and the
    shape they came from): constant through an adaptation, so computed once for all its steps."""
    if x.dim() != 5:
        raise ValueError(f"x must be [episodes, batch, C, H, W], got shape {tuple(x.shape)}")
    h = ((x - net.normalize.mean) / net.normalize.std).transpose(1, 2).contiguous()  # [E, C, B, H, W]
    e, c, b, hh, ww = h.shape
    return _im2col_raw(h).reshape(e, 9 * c, b * hh * ww), (e, c, b, hh, ww)


def forward_columns(net: nn.Module, params: Params, cols: tuple[torch.Tensor, tuple[int, ...]]) -> torch.Tensor:
    """:func:`conv4_forward` from :func:`input_columns`."""
    h: torch.Tensor | tuple = cols
    e, b = cols[1][0], cols[1][2]
    for i in range(4):
        pre = f"features.{i}."
        h = _block(h, params[pre + "conv.weight"], params[pre + "conv.bias"], params[pre + "bn.weight"],
                   params[pre + "bn.bias"], net.features[i].bn.eps)
    feats = h.transpose(1, 2).reshape(e, b, -1)  # the plain network flattens each image's (c, h, w)
    return torch.baddbmm(params["head.bias"].unsqueeze(1), feats, params["head.weight"].transpose(1, 2))


def episode_losses(net: nn.Module, params: Params, x, y: torch.Tensor) -> torch.Tensor:
    """Per-episode mean cross-entropy ``[E]`` of ``conv4_forward`` on ``x [E, B, ...]`` (or its
    :func:`input_columns`) with labels ``y [E, B]``."""
    logits = forward_columns(net, params, x) if isinstance(x, tuple) else conv4_forward(net, params, x)
    e, b = y.shape
    return F.cross_entropy(logits.reshape(e * b, -1), y.reshape(-1), reduction="none").reshape(e, b).mean(1)


def adapt(
    net: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    create_graph: bool,
) -> dict[str, torch.Tensor]:
    """``steps`` plain SGD steps of each episode's own cross-entropy, from per-episode ``params`` ``[E, ...]``.

    The episode-batched twin of :func:`dfml_bench.evaluation.inner_adapt` (same arithmetic; the losses of
    the episodes are summed, so each episode's gradient is its own). ``create_graph=True`` keeps the
    graph through the inner gradients (second-order MAML); ``False`` detaches them (first-order /
    evaluation), and then the returned tensors carry no graph at all if ``params`` carry none.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    names = list(params)
    cur = dict(params)
    cols = input_columns(net, x)
    for _ in range(steps):
        if not create_graph:
            cur = {k: v.detach().requires_grad_(True) if not v.requires_grad else v for k, v in cur.items()}
        with torch.enable_grad():
            loss = episode_losses(net, cur, cols, y).sum()
            grads = torch.autograd.grad(loss, [cur[k] for k in names], create_graph=create_graph)
        if create_graph:
            cur = {k: cur[k] - lr * g for k, g in zip(names, grads)}
        else:
            cur = {k: (cur[k] - lr * g).detach() for k, g in zip(names, grads)}
    return cur


def expand_params(params: Params, e: int) -> dict[str, torch.Tensor]:
    """``params`` repeated for ``e`` episodes (``[e, *shape]`` views: differentiable w.r.t. the originals)."""
    return {k: v.unsqueeze(0).expand(e, *v.shape) for k, v in params.items()}
