"""The evaluator: functional inner loop (first/second order, custom losses), batched vs looped evaluation,
determinism, sanity on separable and label-free data, error messages, summary statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from dfml_bench.backbones import BackboneSpec, build_backbone
from dfml_bench.datasets.base import ImageDataset
from dfml_bench.episodes import EpisodeSpec, sample_episodes
from dfml_bench.evaluation import (
    AdaptProtocol,
    EvaluationError,
    adapted_query_logits,
    auto_chunk_size,
    batch_stat_copy,
    evaluate,
    evaluate_loop,
    evaluate_vmap,
    inner_adapt,
    split_state,
    summarize,
)

SIZE = 16
SPEC = BackboneSpec("conv4", 8)


def make_dataset(kind: str, n_classes: int = 9, per_class: int = 20, seed: int = 0) -> ImageDataset:
    """``separable``: each class one flat colour plus mild noise; ``noise``: images carry no class signal."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    if kind == "separable":
        colours = torch.randint(0, 256, (n_classes, 3, 1, 1), generator=g).float()
        noise = torch.randint(-20, 21, (len(labels), 3, SIZE, SIZE), generator=g).float()
        images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    elif kind == "noise":
        images = torch.randint(0, 256, (len(labels), 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    else:
        raise ValueError(kind)
    third = n_classes // 3
    splits = {"train": list(range(third)), "val": list(range(third, 2 * third)), "test": list(range(2 * third, n_classes))}
    return ImageDataset(
        name=f"tiny-{kind}",
        images=images,
        labels=labels,
        class_names=[f"c{i}" for i in range(n_classes)],
        splits=splits,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        hash=f"tiny-{kind}-{seed}",
    )


def meta_learner(ways: int = 3, seed: int = 0, arch: BackboneSpec = SPEC, track: bool = False):
    return build_backbone(arch, ways, (3, SIZE, SIZE), (0.5,) * 3, (0.25,) * 3, track_running_stats=track, seed=seed)


@pytest.fixture(scope="module")
def separable():
    ds = make_dataset("separable")
    return ds, sample_episodes(ds, "test", EpisodeSpec(ways=3, shots=1, queries=5, n_episodes=12), seed=1)


@pytest.fixture(scope="module")
def noise():
    ds = make_dataset("noise")
    return ds, sample_episodes(ds, "test", EpisodeSpec(ways=3, shots=1, queries=15, n_episodes=150), seed=2)


# --------------------------------------------------------------------------------------------------
# protocol and inner loop


@pytest.mark.parametrize("kwargs", [{"steps": -1}, {"steps": 1.5}, {"lr": 0}, {"lr": -0.1}, {"lr": float("nan")}])
def test_protocol_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AdaptProtocol(**kwargs)
    assert AdaptProtocol() == AdaptProtocol(steps=10, lr=0.01)


def _support(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 3, SIZE, SIZE, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


def test_inner_adapt_lowers_support_loss_and_keeps_model() -> None:
    model = meta_learner()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params, buffers = split_state(model)
    x, y = _support()
    loss0 = F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)
    adapted = inner_adapt(model, params, buffers, x, y, steps=5, lr=0.1, create_graph=False)
    loss1 = F.cross_entropy(functional_call(model, (adapted, buffers), (x,)), y)
    assert loss1 < loss0 - 0.05
    assert set(adapted) == set(params)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert inner_adapt(model, params, buffers, x, y, steps=0, lr=0.1, create_graph=False) == params


def _meta_grad(model, create_graph: bool) -> dict[str, torch.Tensor]:
    params, buffers = split_state(model)
    x, y = _support(0)
    qx, qy = _support(1)
    adapted = inner_adapt(model, params, buffers, x, y, steps=2, lr=0.1, create_graph=create_graph)
    loss = F.cross_entropy(functional_call(model, (adapted, buffers), (qx,)), qy)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _reference_maml_grad(model) -> dict[str, torch.Tensor]:
    """Second-order MAML written with plain torch.autograd.grad(create_graph=True)."""
    params, buffers = split_state(model)
    x, y = _support(0)
    qx, qy = _support(1)
    fast = dict(params)
    for _ in range(2):
        loss = F.cross_entropy(functional_call(model, (fast, buffers), (x,)), y)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: v - 0.1 * g for (k, v), g in zip(fast.items(), grads)}
    loss = F.cross_entropy(functional_call(model, (fast, buffers), (qx,)), qy)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def test_second_order_gradient_matches_reference_maml_and_differs_from_first_order() -> None:
    model = meta_learner()
    second = _meta_grad(model, create_graph=True)
    first = _meta_grad(model, create_graph=False)
    reference = _reference_maml_grad(model)
    assert all(g.abs().sum() > 0 for g in second.values() if g.numel() > 0)
    for k in second:
        torch.testing.assert_close(second[k], reference[k], rtol=1e-4, atol=1e-6)
    # the second-order terms are real: the conv weights' meta-gradients differ from first-order MAML
    diff = sum((second[k] - first[k]).abs().sum() for k in second)
    assert diff > 1e-4


def test_inner_adapt_with_soft_targets_loss() -> None:
    """Knowledge distillation reuses the loop: KL to a teacher's soft targets."""
    model = meta_learner()
    params, buffers = split_state(model)
    x, _ = _support()
    target = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(5)) * 3, dim=-1)

    def kd(logits, soft):
        return F.kl_div(F.log_softmax(logits, -1), soft, reduction="batchmean")

    loss0 = kd(functional_call(model, (params, buffers), (x,)), target)
    adapted = inner_adapt(model, params, buffers, x, target, steps=5, lr=0.1, create_graph=False, loss_fn=kd)
    assert kd(functional_call(model, (adapted, buffers), (x,)), target) < loss0 - 0.02


def test_inner_adapt_partial_params_adapts_only_those() -> None:
    model = meta_learner()
    head = {k: v for k, v in model.named_parameters() if k.startswith("head.")}
    x, y = _support()
    adapted = inner_adapt(model, head, dict(model.named_buffers()), x, y, steps=3, lr=0.1, create_graph=False)
    assert set(adapted) == set(head)
    assert not torch.equal(adapted["head.weight"], head["head.weight"])


def test_inner_adapt_under_vmap_equals_per_task() -> None:
    model = batch_stat_copy(meta_learner())
    params, buffers = split_state(model)
    g = torch.Generator().manual_seed(3)
    xs = torch.rand(4, 6, 3, SIZE, SIZE, generator=g)
    ys = torch.tensor([0, 1, 2, 0, 1, 2]).expand(4, 6)
    with torch.no_grad():
        batched = vmap(lambda a, b: inner_adapt(model, params, buffers, a, b, steps=3, lr=0.1, create_graph=False))(xs, ys)
    for i in range(4):
        single = inner_adapt(model, params, buffers, xs[i], ys[i], steps=3, lr=0.1, create_graph=False)
        for k in params:
            torch.testing.assert_close(batched[k][i], single[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_equals_loop_and_logits_agree(separable) -> None:
    ds, eps = separable
    model = meta_learner()
    protocol = AdaptProtocol(steps=10, lr=0.1)
    acc = evaluate(model, ds, eps, protocol, chunk_size=5)
    acc_loop = evaluate_loop(model, ds, eps, protocol)
    assert acc.dtype == torch.float64 and acc.shape == (len(eps),) and acc.device.type == "cpu"
    assert torch.equal(acc, acc_loop)
    net = batch_stat_copy(model)
    sx, sy, qx, _ = eps.tensors(ds, slice(0, 6))
    torch.testing.assert_close(evaluate_vmap(model, ds, eps, protocol, chunk_size=5), acc, rtol=0, atol=1 / 5 + 1e-9)
    for batched_query in (True, False):
        a = adapted_query_logits(net, protocol, sx, sy, qx, batched=True, batched_query=batched_query)
        b = adapted_query_logits(net, protocol, sx, sy, qx, batched=False)
        assert a.shape == (6, 15, 3)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_evaluate_is_deterministic_and_chunking_invariant(separable) -> None:
    ds, eps = separable
    model = meta_learner(seed=4)
    protocol = AdaptProtocol()
    a = evaluate(model, ds, eps, protocol, chunk_size=4)
    b = evaluate(model, ds, eps, protocol, chunk_size=4)
    assert torch.equal(a, b)
    assert torch.equal(a, evaluate(model, ds, eps, protocol))  # auto chunk size: same accuracies


def test_evaluate_is_identical_across_workers_chunks_and_caller_threads(noise) -> None:
    """Episodes split over worker threads: the accuracies may not depend on how (issue 14's serial /
    --jobs / submitit identity), and equal the plain single-threaded loop exactly."""
    ds, eps = noise
    sub = eps.subset(slice(0, 40))
    model = meta_learner(seed=5)
    protocol = AdaptProtocol(steps=3, lr=0.2)
    oracle = evaluate_loop(model, ds, sub, protocol)  # conftest: one intra-op thread
    runs = [evaluate(model, ds, sub, protocol, workers=w, chunk_size=c) for w, c in ((1, None), (2, None), (3, 7), (2, 1))]
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs.append(evaluate(model, ds, sub, protocol))  # caller with 2 threads -> 2 workers, 1 thread each
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(prev)
    for r in runs:
        assert torch.equal(r, oracle)
    assert len(set(oracle.tolist())) > 3  # real, varied accuracies, not a constant


def test_evaluate_propagates_a_worker_error(separable) -> None:
    ds, eps = separable
    model = meta_learner()
    prev = torch.get_num_threads()
    with pytest.raises(EvaluationError):
        evaluate(meta_learner(ways=5), ds, eps, AdaptProtocol(), workers=2)
    assert torch.get_num_threads() == prev


def test_evaluate_does_not_modify_model(separable) -> None:
    ds, eps = separable
    for track in (False, True):  # zoo-style model with running statistics, in train mode
        model = meta_learner(track=track).train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        evaluate(model, ds, eps.subset(slice(0, 4)), AdaptProtocol(steps=3, lr=0.1))
        evaluate_loop(model, ds, eps.subset(slice(0, 2)), AdaptProtocol(steps=3, lr=0.1))
        assert model.training
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.requires_grad for p in model.parameters())


def test_separable_episodes_reach_high_accuracy(separable) -> None:
    ds, eps = separable
    acc = evaluate(meta_learner(), ds, eps, AdaptProtocol(steps=10, lr=0.5))
    assert acc.mean() > 0.9


def test_label_free_images_give_chance_accuracy(noise) -> None:
    ds, eps = noise
    acc = evaluate(meta_learner(), ds, eps, AdaptProtocol(steps=10, lr=0.5))
    assert abs(acc.mean().item() - 1 / 3) < 0.06
    assert torch.all(((acc * 45) - (acc * 45).round()).abs() < 1e-9)  # multiples of 1/45 (3 ways x 15 queries)


def test_adaptation_matters_on_separable_data(separable) -> None:
    """Zero steps (a random head) is far worse than the adapted model: the inner loop is really applied."""
    ds, eps = separable
    model = meta_learner(seed=7)
    no_adapt = evaluate(model, ds, eps, AdaptProtocol(steps=0))
    adapted = evaluate(model, ds, eps, AdaptProtocol(steps=10, lr=0.5))
    assert adapted.mean() > no_adapt.mean() + 0.2


@pytest.mark.parametrize("arch", ["resnet10", "resnet18"])
def test_evaluate_resnets(separable, arch: str) -> None:
    ds, eps = separable
    sub = eps.subset(slice(0, 3))
    model = meta_learner(arch=BackboneSpec(arch, 4))
    acc = evaluate(model, ds, sub, AdaptProtocol(steps=2, lr=0.1))
    assert torch.equal(acc, evaluate_loop(model, ds, sub, AdaptProtocol(steps=2, lr=0.1)))


def test_ways_mismatch_is_a_clear_error(separable) -> None:
    ds, eps = separable
    with pytest.raises(EvaluationError, match=r"outputs 5 logits but the episodes are 3-way.*num_classes=3"):
        evaluate(meta_learner(ways=5), ds, eps, AdaptProtocol())
    with pytest.raises(EvaluationError, match="3-way"):
        evaluate_loop(meta_learner(ways=5), ds, eps, AdaptProtocol())


def test_bad_arguments(separable) -> None:
    ds, eps = separable
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate(meta_learner(), ds, eps, AdaptProtocol(), chunk_size=0)
    with pytest.raises(ValueError, match="workers"):
        evaluate(meta_learner(), ds, eps, AdaptProtocol(), workers=0)
    with pytest.raises(TypeError, match="AdaptProtocol"):
        evaluate(meta_learner(), ds, eps, {"steps": 10})  # type: ignore[arg-type]


def test_progress_reports_every_chunk(separable) -> None:
    ds, eps = separable
    calls: list[tuple[int, int]] = []
    for workers in (1, 3):
        calls.clear()
        evaluate(meta_learner(), ds, eps, AdaptProtocol(steps=1), chunk_size=5, workers=workers,
                 progress=lambda d, t: calls.append((d, t)))
        assert calls == [(5, 12), (10, 12), (12, 12)]


def test_auto_chunk_size_follows_budget(separable) -> None:
    ds, eps = separable
    net = batch_stat_copy(meta_learner())
    small = auto_chunk_size(net, eps, ds.image_shape, budget_bytes=1)
    big = auto_chunk_size(net, eps, ds.image_shape, budget_bytes=1 << 40)
    mid = auto_chunk_size(net, eps, ds.image_shape, budget_bytes=1 << 20)
    assert small == 1 and big == len(eps) and 1 <= mid <= len(eps)
    with_query = auto_chunk_size(net, eps, ds.image_shape, budget_bytes=1 << 20, batched_query=True)
    assert with_query <= mid


# --------------------------------------------------------------------------------------------------
# summary


def test_summarize_matches_literature_formula() -> None:
    acc = np.random.default_rng(0).uniform(0.2, 0.9, 600)
    s = summarize(torch.tensor(acc))
    assert s["n"] == 600
    assert math.isclose(s["mean"], acc.mean())
    assert math.isclose(s["std"], np.std(acc))  # population std, ddof=0
    assert math.isclose(s["ci95"], 1.96 * np.std(acc) / math.sqrt(600))
    assert summarize([0.5, 0.5])["ci95"] == 0.0
    with pytest.raises(ValueError):
        summarize([])
