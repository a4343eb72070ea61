"""The evaluator: fixed test-time adaptation on frozen episodes, batched across episodes.

The test-time protocol is the scenario's, not the method's (:class:`AdaptProtocol`; literature: 10 plain
SGD steps at lr 0.01 on the support set's cross-entropy, from the meta-learned initialisation, BatchNorm
on batch statistics). The query set of an episode is then predicted as ONE batch, so BatchNorm uses the
query batch's statistics (transductive BN, exactly as MAML's fast-weight BatchNorm at test time in the
reference code of every DFML paper).

Everything is written with ``torch.func`` (``functional_call``, ``grad``, ``vmap``) because learn2learn
cannot be installed here:

- :func:`inner_adapt` is the reusable functional inner loop (MAML, first- or second-order, any loss,
  e.g. soft-target distillation); methods call it for meta-training.
- :func:`evaluate` on CPU splits whole episodes over worker threads (one intra-op thread each; the
  per-episode adaptation uses ``torch.autograd.grad``, which, unlike ``torch.func.grad``, may run in
  several threads at once, and each thread has its own copy of the network because ``functional_call``
  swaps a module's tensors while it runs). Each episode's images are adapted and predicted as plain
  channels-last convolutions, which oneDNN runs at a good fraction of the machine's matrix-product
  speed; grouped convolutions (``vmap``) and im2col batched matrix products over episodes
  (:mod:`dfml_bench.batched`) were measured slower on CPU (``benchmarks/bench_evaluation.py --all``):
  at 5 support images the per-layer elementwise work (BatchNorm, pooling, im2col) dominates, and oneDNN
  fuses it better. The result of every episode is computed by the same single-threaded code, so the
  accuracies do not depend on the number of workers, the chunking or the caller's thread count, and
  equal :func:`evaluate_loop` (the plain serial loop, the test oracle) exactly.
- :func:`evaluate_vmap` is the accelerator path (and ``evaluate``'s on CUDA): episodes adapted in chunks
  with one ``vmap`` each, chunk size from a memory estimate. Grouped and plain convolutions round
  differently (~1e-4 in the logits after 10 steps), so a near-tied query can flip between it and the loop.
- :func:`summarize` gives mean +- 95 % CI as the literature reports it.
"""

from __future__ import annotations

import copy
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .datasets.base import ImageDataset
from .episodes import EpisodeSet

CPU_CHUNK = 10  # episodes per work item when episodes are split over CPU worker threads
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


class EvaluationError(RuntimeError):
    """A model and a set of episodes cannot be evaluated together; the message says why and what to do."""


@dataclass(frozen=True)
class AdaptProtocol:
    """The scenario's fixed test-time adaptation: ``steps`` plain SGD steps at ``lr`` on the support loss.

    ``steps=0`` is allowed (predict with the initialisation itself, BatchNorm still on batch statistics).
    """

    steps: int = 10
    lr: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"AdaptProtocol.steps must be a non-negative integer, got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"AdaptProtocol.lr must be a positive finite number, got {self.lr!r}")


# --------------------------------------------------------------------------------------------------
# functional inner loop


def split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(params, buffers)`` of ``model`` as name -> tensor dicts (the parameters keep their autograd identity)."""
    return dict(model.named_parameters()), dict(model.named_buffers())


def _loss(params, buffers, model: nn.Module, x, y, loss_fn: LossFn) -> torch.Tensor:
    return loss_fn(functional_call(model, (params, buffers), (x,)), y)


def inner_adapt(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    create_graph: bool,
    loss_fn: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """``steps`` plain SGD steps on ``loss_fn(model(x), y)`` from ``params``; returns the adapted params.

    ``create_graph=True``: the result is differentiable w.r.t. the initial ``params`` through the
    inner gradients (second-order MAML). ``False``: the inner gradients are detached (first-order MAML;
    the result still depends on ``params`` through the identity path). ``loss_fn(logits, target)``
    defaults to cross-entropy on integer labels; pass e.g. a KL to soft teacher targets for
    distillation. Only the tensors in ``params`` are adapted; names absent from ``params`` and
    ``buffers`` are taken from ``model`` itself. The model must not mutate buffers in forward (build it
    with ``track_running_stats=False`` or use :func:`batch_stat_copy`). Works inside ``torch.func.vmap``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    grad_fn = grad(_loss)
    params = dict(params)
    for _ in range(steps):
        grads = grad_fn(params, buffers, model, x, y, loss_fn)
        if create_graph:
            params = {k: p - lr * grads[k] for k, p in params.items()}
        else:
            params = {k: p - lr * grads[k].detach() for k, p in params.items()}
    return params


def batch_stat_copy(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """A detached copy of ``model`` whose BatchNorm layers always use batch statistics and keep none.

    This is the protocol's BatchNorm mode, and makes the copy a pure function of its parameters (no buffer
    is written in forward), as ``vmap`` needs. The original model is not touched.
    """
    net = copy.deepcopy(model)
    if device is not None:
        net = net.to(device)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    net.eval()  # dropout and the like off; BatchNorm without running stats uses batch statistics anyway
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# --------------------------------------------------------------------------------------------------
# per-episode adaptation + prediction


def _cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last images on CPU: oneDNN convolutions, BatchNorm and max-pooling run 2-3x faster so."""
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _adapt_episode(net: nn.Module, params, buffers, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float):
    """One episode's test-time adaptation with ``torch.autograd.grad`` (the same SGD as :func:`inner_adapt`
    with ``create_graph=False``); unlike ``torch.func.grad`` it may run in several threads at once."""
    fast = {k: v.detach() for k, v in params.items()}
    for _ in range(steps):
        fast = {k: v.requires_grad_(True) for k, v in fast.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(functional_call(net, (fast, buffers), (x,)), y)
            grads = torch.autograd.grad(loss, list(fast.values()))
        fast = {k: (v - lr * g).detach() for (k, v), g in zip(fast.items(), grads)}
    return fast


def adapted_query_logits(
    net: nn.Module,
    protocol: AdaptProtocol,
    sx: torch.Tensor,
    sy: torch.Tensor,
    qx: torch.Tensor,
    *,
    batched: bool = True,
    batched_query: bool | None = None,
) -> torch.Tensor:
    """Query logits ``[e, Nq, ways]`` after adapting ``net`` on each of ``e`` episodes' support sets.

    ``net`` must be pure (see :func:`batch_stat_copy`). ``batched=True`` adapts all ``e`` episodes with
    one ``vmap``; ``False`` loops over them. ``batched_query`` does the same for the query prediction;
    by default it is batched on accelerators and a per-episode loop on CPU, where each episode's query
    forward (75 images) is already large enough and oneDNN runs it 3x faster as a plain channels-last
    convolution than as the grouped convolution ``vmap`` turns it into (measured, Conv4-32 32x32).
    No outer autograd graph is built.
    """
    if batched_query is None:
        batched_query = batched and sx.device.type != "cpu"
    params, buffers = split_state(net)
    params = {k: v.detach() for k, v in params.items()}
    e = sx.shape[0]
    steps, lr = protocol.steps, protocol.lr

    def adapt(s_x, s_y):
        return inner_adapt(net, params, buffers, s_x, s_y, steps=steps, lr=lr, create_graph=False)

    def predict(p, q_x):
        return functional_call(net, (p, buffers), (q_x,))

    with torch.no_grad():  # torch.func.grad inside still differentiates; nothing outer is recorded
        if batched:
            adapted = vmap(adapt)(sx, sy) if steps > 0 else {k: v.expand(e, *v.shape) for k, v in params.items()}
            per_episode = None
        else:
            per_episode = [_adapt_episode(net, params, buffers, _cpu_layout(sx[i]), sy[i], steps, lr) for i in range(e)]
            adapted = None
        if batched_query:
            if adapted is None:
                adapted = {k: torch.stack([p[k] for p in per_episode]) for k in params}
            return vmap(predict)(adapted, qx)
        if per_episode is None:
            per_episode = [{k: v[i] for k, v in adapted.items()} for i in range(e)]
        return torch.stack([predict(per_episode[i], _cpu_layout(qx[i])) for i in range(e)])


def _output_size(net: nn.Module, image_shape, device) -> int:
    head = getattr(net, "head", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    with torch.no_grad():
        out = net(torch.zeros(2, *image_shape, device=device))
    return int(out.shape[-1])


def _prepare(model: nn.Module, dataset: ImageDataset, episodes: EpisodeSet, device) -> nn.Module:
    if len(episodes) == 0:
        raise EvaluationError("the episode set is empty; draw episodes with sample_episodes/frozen_episodes first")
    net = batch_stat_copy(model, device)
    ways = episodes.spec.ways
    out = _output_size(net, dataset.image_shape, device)
    if out != ways:
        raise EvaluationError(
            f"the model outputs {out} logits but the episodes are {ways}-way; build the meta-learner with "
            f"num_classes={ways} (its head predicts the episode's positions 0..{ways - 1})"
        )
    return net


def activation_bytes_per_image(net: nn.Module, image_shape, device="cpu") -> int:
    """Bytes of all leaf-module outputs for one image (float32): the unit of the memory estimate."""
    total = 0

    def hook(_m, _inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules() if len(list(m.children())) == 0]
    try:
        with torch.no_grad():
            net(torch.zeros(2, *image_shape, device=device))  # 2 images: BatchNorm needs more than one value
    finally:
        for h in handles:
            h.remove()
    return total // 2


def auto_chunk_size(
    net: nn.Module,
    episodes: EpisodeSet,
    image_shape,
    device="cpu",
    budget_bytes: int | None = None,
    batched_query: bool | None = None,
) -> int:
    """Episodes per ``vmap`` chunk so that the chunk's activations fit ``budget_bytes``.

    Default budget: 256 MiB on CPU (larger chunks only lose cache locality there), half the free memory
    on CUDA. Per episode: the support images' forward+backward activations (about 3x the forward
    outputs, for saved tensors and gradients), the query images' forward (about 2x, inference only) when
    the query prediction is batched too, and a few parameter-sized tensors per step.
    """
    spec = episodes.spec
    dev = torch.device(device)
    if batched_query is None:
        batched_query = dev.type != "cpu"
    if budget_bytes is None:
        if dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
            budget_bytes = free // 2
        else:
            budget_bytes = 256 << 20
    act = activation_bytes_per_image(net, image_shape, dev)
    n_params = sum(p.numel() for p in net.parameters()) * 4
    per_episode = 3 * act * spec.ways * spec.shots + 4 * n_params
    if batched_query:
        per_episode += 2 * act * spec.ways * spec.queries
    return int(max(1, min(len(episodes), budget_bytes // max(per_episode, 1))))


def _accuracies(logits: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
    correct = (logits.argmax(dim=-1) == qy).sum(dim=-1)
    return correct.to("cpu", torch.float64) / qy.shape[-1]


def _check_args(protocol, chunk_size, workers) -> None:
    if not isinstance(protocol, AdaptProtocol):
        raise TypeError(f"protocol must be an AdaptProtocol, got {type(protocol).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")


@contextmanager
def _intra_op_threads(n: int):
    """Torch's intra-op thread count set to ``n`` for the block (process-wide), restored afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _run(model, dataset, episodes, protocol, device, chunk_size, progress, batched: bool, workers: int = 1) -> torch.Tensor:
    device = torch.device(device)
    net = _prepare(model, dataset, episodes, device)
    n = len(episodes)
    if chunk_size is None:
        if batched:
            chunk_size = auto_chunk_size(net, episodes, dataset.image_shape, device)
        else:
            chunk_size = min(n, CPU_CHUNK if workers > 1 else 50)
    starts = list(range(0, n, chunk_size))
    local = threading.local()  # functional_call swaps a module's tensors while it runs: one copy per thread

    def chunk(start: int) -> torch.Tensor:
        stop = min(n, start + chunk_size)
        own = net if workers == 1 else getattr(local, "net", None)
        if own is None:
            own = local.net = copy.deepcopy(net)
        sx, sy, qx, qy = episodes.tensors(dataset, slice(start, stop), device)
        return _accuracies(adapted_query_logits(own, protocol, sx, sy, qx, batched=batched), qy)

    acc = torch.empty(n, dtype=torch.float64)
    if workers == 1:
        results = map(chunk, starts)
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dfml-eval")
        results = pool.map(chunk, starts)  # yields in submission order: progress and results stay ordered
    try:
        for start, a in zip(starts, results):
            stop = min(n, start + chunk_size)
            acc[start:stop] = a
            if progress is not None:
                progress(stop, n)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return acc


def evaluate(
    model: nn.Module,
    dataset: ImageDataset,
    episodes: EpisodeSet,
    protocol: AdaptProtocol,
    *,
    device: str | torch.device = "cpu",
    chunk_size: int | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> torch.Tensor:
    """Per-episode query accuracy (float64 ``[E]`` on CPU) of ``model`` adapted by ``protocol``.

    On CPU, whole episodes are split over ``workers`` threads (default: torch's intra-op thread count
    at the call), each running the per-episode adaptation with ONE intra-op thread: every episode is
    computed by the same single-threaded code whatever the number of workers, the chunking or the
    caller's thread count, so the accuracies are bit-identical across all of them (and equal to
    :func:`evaluate_loop` run with one thread). This is the fastest CPU form measured
    (``benchmarks/bench_evaluation.py``): oneDNN's channels-last convolution of one episode's images
    beats grouped convolutions (``vmap``) and im2col batched matrix products over episodes
    (:mod:`dfml_bench.batched`), which are memory-bound at these sizes. On accelerators, episodes are
    processed in chunks of ``chunk_size`` (default: :func:`auto_chunk_size`) with one ``vmap`` each.
    The model is copied (BatchNorm switched to batch statistics) and never modified.
    ``progress(done, total)`` is called after each chunk, in episode order.
    """
    _check_args(protocol, chunk_size, workers)
    if torch.device(device).type != "cpu":
        return _run(model, dataset, episodes, protocol, device, chunk_size, progress, batched=True)
    workers = max(1, torch.get_num_threads()) if workers is None else workers
    with _intra_op_threads(1):
        return _run(model, dataset, episodes, protocol, device, chunk_size, progress, batched=False, workers=workers)


def evaluate_vmap(
    model: nn.Module,
    dataset: ImageDataset,
    episodes: EpisodeSet,
    protocol: AdaptProtocol,
    *,
    device: str | torch.device = "cpu",
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """:func:`evaluate` with the episodes of a chunk adapted by one ``vmap`` on any device (the accelerator
    path; on CPU kept for comparison in the benchmark). Grouped and plain convolutions round differently,
    so a near-tied query can flip against :func:`evaluate_loop`."""
    _check_args(protocol, chunk_size, None)
    return _run(model, dataset, episodes, protocol, device, chunk_size, progress, batched=True)


def evaluate_loop(
    model: nn.Module,
    dataset: ImageDataset,
    episodes: EpisodeSet,
    protocol: AdaptProtocol,
    *,
    device: str | torch.device = "cpu",
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The plain serial loop over episodes in the caller's thread with the caller's thread count (the test
    oracle of :func:`evaluate`; ``chunk_size`` only sets how many episodes' images are gathered at once)."""
    _check_args(protocol, chunk_size, None)
    return _run(model, dataset, episodes, protocol, device, chunk_size, progress, batched=False)


def summarize(acc: torch.Tensor | list[float]) -> dict[str, float | int]:
    """``mean``, ``std``, ``ci95`` and ``n`` of per-episode accuracies.

    ``std`` is the POPULATION standard deviation (ddof=0) and ``ci95 = 1.96 * std / sqrt(n)``, exactly
    the figure DFML papers report (``1.96 * np.std(acc) / sqrt(600)``), so numbers are comparable.
    """
    a = torch.as_tensor(acc, dtype=torch.float64).flatten()
    n = a.numel()
    if n == 0:
        raise ValueError("summarize needs at least one accuracy")
    std = float(a.std(correction=0))
    return {"mean": float(a.mean()), "std": std, "ci95": 1.96 * std / math.sqrt(n), "n": int(n)}
