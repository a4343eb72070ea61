"""The MAML meta-update: per-task gradients split over worker threads equal the plain one-graph form
(``maml_loss``), independently of the number of workers; frozen parameters; a real step lowers the loss."""

from __future__ import annotations

import pytest
import torch

from baselines.maml import maml_grads, maml_loss, maml_step
from dfml_bench.backbones import BackboneSpec, build_backbone


def _tasks(n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sx = torch.rand(6, 3, 16, 16, generator=g, dtype=dtype)
        qx = torch.rand(9, 3, 16, 16, generator=g, dtype=dtype)
        out.append((sx, torch.arange(3).repeat(2), qx, torch.arange(3).repeat(3)))
    return out


def _model(dtype=torch.float32):
    return build_backbone(BackboneSpec("conv4", 8), 3, (3, 16, 16), seed=0).to(dtype)


@pytest.mark.parametrize("first_order", [False, True])
def test_grads_equal_the_plain_maml_loss_gradient(first_order: bool) -> None:
    model = _model(torch.float64)
    tasks = _tasks(4, dtype=torch.float64)
    loss = maml_loss(model, tasks, steps=3, lr=0.1, first_order=first_order)
    ref = torch.autograd.grad(loss, list(model.parameters()))
    value, grads = maml_grads(model, tasks, steps=3, lr=0.1, first_order=first_order, workers=2)
    assert value == pytest.approx(float(loss.detach()), rel=1e-12)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_second_and_first_order_differ() -> None:
    model, tasks = _model(torch.float64), _tasks(2, dtype=torch.float64)
    _, g2 = maml_grads(model, tasks, steps=3, lr=0.1)
    _, g1 = maml_grads(model, tasks, steps=3, lr=0.1, first_order=True)
    assert max(float((a - b).abs().max()) for a, b in zip(g1, g2)) > 1e-6


def test_grads_do_not_depend_on_workers() -> None:
    model, tasks = _model(), _tasks(5, seed=1)
    runs = [maml_grads(model, tasks, steps=2, lr=0.1, workers=w) for w in (1, 2, 3)]
    for value, grads in runs[1:]:
        assert value == runs[0][0]
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_frozen_parameters_get_no_gradient_and_step_lowers_loss() -> None:
    model, tasks = _model(), _tasks(4, seed=2)
    model.head.bias.requires_grad_(False)
    _, grads = maml_grads(model, tasks, steps=2, lr=0.1, workers=2)
    names = [n for n, _ in model.named_parameters()]
    assert grads[names.index("head.bias")] is None
    assert all(g is not None for n, g in zip(names, grads) if n != "head.bias")
    bias = model.head.bias.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = maml_step(model, opt, tasks, steps=2, lr=0.1, workers=2)
    for _ in range(15):
        last = maml_step(model, opt, tasks, steps=2, lr=0.1, workers=2)
    assert last < first
    assert torch.equal(model.head.bias, bias)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        maml_grads(_model(), [], steps=1, lr=0.1)
    with pytest.raises(ValueError, match="workers"):
        maml_grads(_model(), _tasks(1), steps=1, lr=0.1, workers=0)
