"""The zero-order gradient estimator: unbiased in the limit, and one batched query per estimate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.zo import UnsupportedOutput, outputs_to_logits, query_logits, sphere_directions, surrogate, zo_gradient
from dfml_bench.access import APIInfo, InProcessAPI, QueryMeter, TopK, format_outputs

SHAPE = (3, 4, 4)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 5))


class _Spy:
    """Records the batch size of every query it forwards."""

    def __init__(self, api):
        self.api, self.info, self.calls = api, api.info, []

    def query(self, images):
        self.calls.append(int(images.shape[0]))
        return self.api.query(images)


def _api(model, kind="logits", max_batch=20000, budget=None):
    meter = QueryMeter(1, total_budget=budget)
    info = APIInfo(index=0, num_classes=5, classes=tuple(range(5)), input_shape=SHAPE, output_kind=kind, topk=5, max_batch=max_batch)
    return InProcessAPI(model, info, meter), meter


def _ce(y):
    return lambda logits, idx: F.cross_entropy(logits, y[idx], reduction="none")


def test_mean_of_estimates_converges_to_true_gradient():
    model = _model()
    api, _ = _api(model)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, *SHAPE, generator=g) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 3])
    mu = 1e-3
    xt = x.clone().requires_grad_(True)
    F.cross_entropy(model(xt), y, reduction="sum").backward()
    true = xt.grad
    est = torch.stack([zo_gradient(api, x, _ce(y), q=25, mu=mu, generator=g)[0] for _ in range(200)]).mean(0)
    cos = F.cosine_similarity(est.flatten(1), true.flatten(1), dim=1)
    assert (cos > 0.9).all(), cos
    # a single estimate is far noisier: averaging is what made it converge
    one = zo_gradient(api, x, _ce(y), q=25, mu=mu, generator=g)[0]
    assert F.cosine_similarity(one.flatten(1), true.flatten(1), dim=1).mean() < cos.mean()


def test_one_estimate_is_one_batched_query_of_q_plus_one_times_batch():
    api, meter = _api(_model())
    spy = _Spy(api)
    x = torch.rand(6, *SHAPE)
    q = 7
    g, clean, logits = zo_gradient(spy, x, _ce(torch.zeros(6, dtype=torch.long)), q=q, mu=0.005, generator=torch.Generator().manual_seed(0))
    assert spy.calls == [(q + 1) * 6]
    assert meter.snapshot()["total"] == (q + 1) * 6
    assert g.shape == x.shape and clean.shape == (6,) and logits.shape == (6, 5)


def test_query_is_chunked_only_beyond_max_batch():
    api, meter = _api(_model(), max_batch=10)
    spy = _Spy(api)
    zo_gradient(spy, torch.rand(3, *SHAPE), _ce(torch.zeros(3, dtype=torch.long)), q=7, mu=0.005,
                generator=torch.Generator().manual_seed(0))
    assert spy.calls == [10, 10, 4] and meter.snapshot()["total"] == 24


def test_perturbed_queries_stay_valid_at_the_pixel_range_edges():
    api, _ = _api(_model())
    x = torch.zeros(2, *SHAPE)
    x[1] = 1.0  # a QueryError would be raised if any perturbed pixel left [0, 1]
    g, _, _ = zo_gradient(api, x, _ce(torch.tensor([0, 1])), q=5, mu=0.01, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()


def test_directions_are_unit_vectors_per_sample():
    u = sphere_directions(9, (4, *SHAPE), torch.Generator().manual_seed(0), "cpu")
    assert u.shape == (9, 4, *SHAPE)
    assert torch.allclose(u.flatten(2).norm(dim=2), torch.ones(9, 4), atol=1e-5)


def test_output_kinds_map_to_logits_up_to_a_constant():
    logits = torch.randn(5, 5)
    ref = F.log_softmax(logits, 1)
    assert torch.allclose(outputs_to_logits(format_outputs(logits, "probs"), "probs", 5), ref, atol=1e-5)
    assert torch.allclose(outputs_to_logits(format_outputs(logits, "topk", 5), "topk", 5), ref, atol=1e-5)
    partial = outputs_to_logits(format_outputs(logits, "topk", 2), "topk", 5)
    assert (partial.argmax(1) == logits.argmax(1)).all()
    with pytest.raises(UnsupportedOutput):
        outputs_to_logits(format_outputs(logits, "label"), "label", 5)


def test_surrogate_carries_the_estimate_into_the_input():
    x = torch.rand(3, *SHAPE, requires_grad=True)
    est = torch.randn(3, *SHAPE)
    surrogate(est, x).backward()
    assert torch.allclose(x.grad, est / 3)


def test_probs_api_gives_the_same_estimate_as_logits_api():
    model = _model(3)
    x = torch.rand(2, *SHAPE) * 0.8 + 0.1
    y = torch.tensor([1, 2])
    a, _ = _api(model, "logits")
    b, _ = _api(model, "probs")
    ga = zo_gradient(a, x, _ce(y), q=5, mu=0.005, generator=torch.Generator().manual_seed(0))[0]
    gb = zo_gradient(b, x, _ce(y), q=5, mu=0.005, generator=torch.Generator().manual_seed(0))[0]
    assert F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.95
    assert math.isfinite(float(query_logits(b, x).sum()))
