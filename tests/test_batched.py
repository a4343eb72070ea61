"""dfml_bench.batched (episode-batched Conv4 as im2col + bmm) against the plain network: same logits,
same adaptation, same second-order MAML gradient (float64), max-pool ties broken as max_pool2d, results
independent of how many episodes share a chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from baselines.maml import maml_loss
from dfml_bench import batched
from dfml_bench.backbones import BackboneSpec, build_backbone
from dfml_bench.evaluation import batch_stat_copy, inner_adapt


def _net(size: int = 16, width: int = 8, dtype=torch.float64):
    return batch_stat_copy(build_backbone(BackboneSpec("conv4", width), 3, (3, size, size), seed=0)).to(dtype)


def _per_episode(net, e: int, seed: int = 0):
    """Different weights per episode (the state after some adaptation), as a dict of [e, ...] tensors."""
    g = torch.Generator().manual_seed(seed)
    return {k: v.detach().unsqueeze(0) + 0.05 * torch.randn(e, *v.shape, generator=g, dtype=v.dtype)
            for k, v in net.named_parameters()}


@pytest.mark.parametrize("size", [16, 20])  # 20: odd sizes after pooling (5 -> 2), dropped as max_pool2d does
def test_forward_equals_plain_network_per_episode(size: int) -> None:
    net = _net(size)
    e = 3
    params = _per_episode(net, e)
    x = torch.rand(e, 4, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = batched.conv4_forward(net, params, x)
    buffers = dict(net.named_buffers())
    for i in range(e):
        ref = functional_call(net, ({k: v[i] for k, v in params.items()}, buffers), (x[i],))
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-10)


def test_adapt_equals_inner_adapt_and_is_chunk_invariant() -> None:
    net = _net()
    e = 4
    g = torch.Generator().manual_seed(2)
    x = torch.rand(e, 6, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(e, 6).contiguous()
    base = {k: v.detach() for k, v in net.named_parameters()}
    fast = batched.adapt(net, batched.expand_params(base, e), x, y, steps=3, lr=0.3, create_graph=False)
    buffers = dict(net.named_buffers())
    for i in range(e):
        ref = inner_adapt(net, base, buffers, x[i], y[i], steps=3, lr=0.3, create_graph=False)
        for k in ref:
            torch.testing.assert_close(fast[k][i], ref[k], rtol=1e-9, atol=1e-11)
    net32 = _net(dtype=torch.float32)
    b32 = {k: v.detach() for k, v in net32.named_parameters()}
    whole = batched.adapt(net32, batched.expand_params(b32, e), x.float(), y, steps=3, lr=0.3, create_graph=False)
    part = batched.adapt(net32, batched.expand_params(b32, 1), x[2:3].float(), y[2:3], steps=3, lr=0.3, create_graph=False)
    assert all(torch.equal(whole[k][2:3], part[k]) for k in whole)


def test_second_order_gradient_equals_plain_maml() -> None:
    model = build_backbone(BackboneSpec("conv4", 8), 3, (3, 16, 16), seed=3).double()
    g = torch.Generator().manual_seed(4)
    sx = torch.rand(2, 6, 3, 16, 16, generator=g, dtype=torch.float64)
    qx = torch.rand(2, 9, 3, 16, 16, generator=g, dtype=torch.float64)
    sy = torch.arange(3).repeat(2).expand(2, 6).contiguous()
    qy = torch.arange(3).repeat(3).expand(2, 9).contiguous()
    ref = torch.autograd.grad(maml_loss(model, [(sx[i], sy[i], qx[i], qy[i]) for i in range(2)], steps=2, lr=0.2),
                              list(model.parameters()))
    params = dict(model.named_parameters())
    fast = batched.adapt(model, batched.expand_params(params, 2), sx, sy, steps=2, lr=0.2, create_graph=True)
    got = torch.autograd.grad(batched.episode_losses(model, fast, qx, qy).mean(), list(params.values()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_max_pool_ties_break_as_max_pool2d_in_value_and_gradient() -> None:
    x = torch.tensor([[1.0, 1.0, 0.0, 2.0], [1.0, 0.5, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0], [0.0, 3.0, 3.0, 3.0]],
                     dtype=torch.float64).reshape(1, 1, 1, 4, 4)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out = batched._maxpool2(a)
    ref = F.max_pool2d(b.reshape(1, 1, 4, 4), 2).reshape(out.shape)
    assert torch.equal(out, ref)
    (out.squeeze() * w).sum().backward()
    (ref.squeeze() * w).sum().backward()
    assert torch.equal(a.grad, b.grad)  # every window has ties: the first maximum gets the gradient
    # second order: the pool's backward is linear in its incoming gradient, and differentiable
    c = x.clone().requires_grad_(True)
    gout = torch.ones(1, 1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    (gin,) = torch.autograd.grad(batched._maxpool2(c), c, gout, create_graph=True)
    (gg,) = torch.autograd.grad((gin * x).sum(), gout)
    torch.testing.assert_close(gg, out.detach())  # d/dg <unpool(g), x> = select(x) = the pooled values


def test_supports_only_plain_batch_statistics_conv4() -> None:
    assert batched.supports(_net())
    assert not batched.supports(build_backbone(BackboneSpec("conv4", 8), 3, (3, 16, 16), track_running_stats=True))
    assert not batched.supports(batch_stat_copy(build_backbone(BackboneSpec("resnet10", 4), 3, (3, 16, 16))))
    with pytest.raises(ValueError, match="episodes, batch"):
        batched.conv4_forward(_net(), _per_episode(_net(), 1), torch.rand(2, 3, 16, 16, dtype=torch.float64))
