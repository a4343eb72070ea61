"""MAML meta-updates in the torch.func style (learn2learn does not build on Python 3.11).

Used by the oracle (real tasks) and by BiDf-MKD / FREE (replay of recovered tasks).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dfml_bench.evaluation import inner_adapt

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # sx, sy, qx, qy


def maml_loss(model: nn.Module, tasks: Iterable[Task], *, steps: int, lr: float, first_order: bool = False) -> torch.Tensor:
    """Mean query cross-entropy after ``steps`` inner SGD steps on each task's support set
    (second-order unless ``first_order``)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    losses = []
    for sx, sy, qx, qy in tasks:
        fast = inner_adapt(model, params, buffers, sx, sy, steps=steps, lr=lr, create_graph=not first_order)
        losses.append(F.cross_entropy(functional_call(model, (fast, buffers), (qx,)), qy))
    return torch.stack(losses).mean()


def maml_step(model: nn.Module, opt: torch.optim.Optimizer, tasks: list[Task], *, steps: int, lr: float,
              first_order: bool = False) -> float:
    """One outer Adam step over a meta-batch of tasks. Returns the meta-loss."""
    loss = maml_loss(model, tasks, steps=steps, lr=lr, first_order=first_order)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
