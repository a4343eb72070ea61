"""MAML meta-updates in the torch.func style (learn2learn does not build on Python 3.11).

Used by the oracle (real tasks) and by BiDf-MKD / FREE (replay of recovered tasks).

:func:`maml_loss` is the plain form (one graph over the meta-batch) and the test oracle of
:func:`maml_grads`, which :func:`maml_step` uses: each task's meta-gradient is computed on its own
(``torch.autograd.grad`` of that task's query loss through its inner loop, second-order unless
``first_order``), the tasks split over ``workers`` threads with one intra-op thread each, and the
per-task gradients summed in task order. The sum of per-task gradients is the gradient of the mean
loss, and since every task is computed by the same single-threaded code and summed in the same order,
the result does not depend on the number of workers. Per-task backward passes also parallelise,
which one backward through the whole meta-batch cannot (the CPU autograd engine runs a backward in
one thread). Inputs go channels-last on CPU (oneDNN's faster layout).
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dfml_bench.evaluation import _cpu_layout, _intra_op_threads, inner_adapt

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


def _task_grad(template: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], task: Task,
               steps: int, lr: float, first_order: bool, scale: float) -> tuple[float, list[torch.Tensor | None]]:
    """``(query loss, d(scale * query loss)/d params)`` of one task, inner loop by ``torch.autograd.grad``."""
    sx, sy, qx, qy = task
    sx, qx = _cpu_layout(sx), _cpu_layout(qx)
    names = [k for k, p in params.items() if p.requires_grad]  # frozen parameters are neither adapted nor updated
    with torch.enable_grad():
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(template, (fast, buffers), (sx,)), sy)
            grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            fast = {k: fast[k] - lr * g for k, g in zip(names, grads)}
        qloss = F.cross_entropy(functional_call(template, (fast, buffers), (qx,)), qy)
        outer = torch.autograd.grad(scale * qloss, [params[k] for k in names], allow_unused=True)
    by_name = {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, outer)}
    return float(qloss.detach()), [by_name.get(k) for k in params]


def _mutates_buffers(model: nn.Module) -> bool:
    """True if a forward pass writes buffers (BatchNorm tracking running statistics in training mode):
    then tasks may not run concurrently."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
               for m in model.modules())


def maml_grads(model: nn.Module, tasks: list[Task], *, steps: int, lr: float, first_order: bool = False,
               workers: int | None = None) -> tuple[float, list[torch.Tensor | None]]:
    """``(mean query loss, gradient of it w.r.t. each of model.parameters(), None for frozen ones)`` over a meta-batch, one task at a
    time, split over ``workers`` threads (default: torch's intra-op thread count; serial where the model
    writes buffers in forward). Same value as differentiating :func:`maml_loss`, up to float rounding."""
    tasks = list(tasks)
    if not tasks:
        raise ValueError("maml_grads needs at least one task")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    workers = max(1, torch.get_num_threads()) if workers is None else workers
    if _mutates_buffers(model):
        workers = 1
    workers = min(workers, len(tasks))
    scale = 1.0 / len(tasks)
    local = threading.local()  # functional_call swaps a module's tensors while it runs: one template per thread

    def one(task: Task) -> tuple[float, list[torch.Tensor | None]]:
        template = model if workers == 1 else getattr(local, "template", None)
        if template is None:
            template = local.template = copy.deepcopy(model)
        return _task_grad(template, params, buffers, task, steps, lr, first_order, scale)

    with _intra_op_threads(1):
        if workers == 1:
            results = [one(t) for t in tasks]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dfml-maml") as pool:
                results = list(pool.map(one, tasks))
    grads = [None if results[0][1][i] is None else torch.stack([r[1][i] for r in results]).sum(0)
             for i in range(len(params))]  # summed in task order, whatever thread computed each
    return sum(r[0] for r in results) / len(tasks), grads


def maml_step(model: nn.Module, opt: torch.optim.Optimizer, tasks: list[Task], *, steps: int, lr: float,
              first_order: bool = False, workers: int | None = None) -> float:
    """One outer optimiser step over a meta-batch of tasks (gradients by :func:`maml_grads`). Returns the
    meta-loss (mean query cross-entropy after adaptation)."""
    loss, grads = maml_grads(model, tasks, steps=steps, lr=lr, first_order=first_order, workers=workers)
    opt.zero_grad(set_to_none=True)
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.step()
    return loss
