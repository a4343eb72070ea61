"""The zero-order gradient estimator: unbiased in the limit, and one batched query per estimate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.zo import (UnsupportedOutput, _orthonormal, outputs_to_logits, query_logits, sphere_directions, surrogate,
                         zo_gradient)
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
    lab = outputs_to_logits(format_outputs(logits, "label"), "label", 5)
    assert (lab.argmax(1) == logits.argmax(1)).all()
    # CE on a hard label: 0 when the label is the target, -log(1e-8) otherwise
    ce = F.cross_entropy(lab, logits.argmax(1), reduction="none")
    assert torch.allclose(ce, torch.zeros(5), atol=1e-5)
    assert torch.allclose(F.cross_entropy(lab, (logits.argmax(1) + 1) % 5, reduction="none"), torch.full((5,), 18.42), atol=0.01)
    with pytest.raises(UnsupportedOutput):
        outputs_to_logits(torch.tensor([0, 7]), "label", 5)


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


IMG = (3, 8, 8)


def _img_api(seed: int = 0, kind: str = "logits"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Tanh(), nn.Linear(16, 5))
    info = APIInfo(index=0, num_classes=5, classes=tuple(range(5)), input_shape=IMG, output_kind=kind, topk=5)
    return model, InProcessAPI(model, info, QueryMeter(1))


def _lowres_projection(g: torch.Tensor, r: int) -> torch.Tensor:
    k = g.shape[-1] // r
    return F.interpolate(F.avg_pool2d(g, k), scale_factor=k, mode="nearest")


@pytest.mark.parametrize("orthogonal", [False, True])
def test_subspace_estimates_converge_to_the_projected_gradient(orthogonal):
    model, api = _img_api()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, *IMG, generator=g) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2])
    xt = x.clone().requires_grad_(True)
    F.cross_entropy(model(xt), y, reduction="sum").backward()
    proj = _lowres_projection(xt.grad, 2)  # r = 2: d' = 12 of d = 192
    est = torch.stack([zo_gradient(api, x, _ce(y), q=6, mu=1e-3, generator=g, directions="subspace", resolution=2,
                                   orthogonal=orthogonal)[0] for _ in range(150)]).mean(0)
    # unbiased for the projection (scale included), and constant on each 4x4 cell
    assert torch.allclose(est, proj, atol=0.15 * float(proj.abs().max())), (est - proj).abs().max()
    assert torch.allclose(est, _lowres_projection(est, 2), atol=1e-6)


def test_subspace_estimate_is_one_query_and_its_noise_is_far_lower_than_the_sphere_one():
    model, api = _img_api(1)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, *IMG, generator=g) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 3])
    spy = _Spy(api)
    zo_gradient(spy, x, _ce(y), q=5, mu=1e-3, generator=g, directions="subspace", resolution=2)
    assert spy.calls == [6 * 4]
    xt = x.clone().requires_grad_(True)
    F.cross_entropy(model(xt), y, reduction="sum").backward()
    proj = _lowres_projection(xt.grad, 2)

    def err(**kw):  # mean squared error of single estimates against their own target
        tgt = proj if kw.get("directions") == "subspace" else xt.grad
        return float(torch.stack([(zo_gradient(api, x, _ce(y), q=5, mu=1e-3, generator=g, **kw)[0] - tgt).pow(2).sum()
                                  for _ in range(40)]).mean())

    assert err(directions="subspace", resolution=2) < 0.2 * err(directions="sphere")


def test_orthonormal_frames_per_sample_even_beyond_the_dimension():
    v = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(0))
    o = _orthonormal(v)
    assert o.shape == v.shape
    for b in range(3):
        blk = o[:4, b]  # the first block of 4 directions is an orthonormal basis of R^4
        assert torch.allclose(blk @ blk.T, torch.eye(4), atol=1e-5)
    assert torch.allclose(o.norm(dim=2), torch.ones(10, 3), atol=1e-5)


def test_subspace_resolution_must_divide_the_image():
    _, api = _img_api()
    with pytest.raises(ValueError, match="must divide"):
        zo_gradient(api, torch.rand(1, *IMG), _ce(torch.tensor([0])), q=2, mu=1e-3, generator=torch.Generator(),
                    directions="subspace", resolution=3)
    with pytest.raises(ValueError, match="directions"):
        zo_gradient(api, torch.rand(1, *IMG), _ce(torch.tensor([0])), q=2, mu=1e-3, generator=torch.Generator(), directions="x")


def test_hard_label_estimate_uses_a_large_radius_and_stays_a_valid_query():
    model, api = _img_api(4, "label")
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, *IMG, generator=g)
    x[0] = 0.0
    x[1] = 1.0  # perturbed images are clamped into [0, 1]: otherwise the API would raise QueryError
    y = torch.tensor([0, 1, 2, 3])
    est, clean, logits = zo_gradient(api, x, _ce(y), q=20, mu=2.0, generator=g, directions="subspace", resolution=2)
    assert torch.isfinite(est).all() and est.abs().sum() > 0  # some perturbations crossed a decision boundary
    assert set(clean.round().tolist()) <= {0.0, 18.0}


def test_sphere_estimate_matches_the_explicit_reference_formula():
    model, api = _img_api(6)
    x = torch.rand(2, *IMG) * 0.8 + 0.1
    y = torch.tensor([3, 4])
    q, mu = 4, 0.005
    got = zo_gradient(api, x, _ce(y), q=q, mu=mu, generator=torch.Generator().manual_seed(9))[0]
    u = sphere_directions(q, tuple(x.shape), torch.Generator().manual_seed(9), "cpu")
    with torch.no_grad():
        l0 = F.cross_entropy(model(x), y, reduction="none")
        lq = torch.stack([F.cross_entropy(model(x + mu * u[j]), y, reduction="none") for j in range(q)])
    ref = (192 / q) * (((lq - l0) / mu).view(q, 2, 1, 1, 1) * u).sum(0)
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_sphere_estimate_is_bit_identical_to_the_batched_reference_formula():
    """bidf-mkd's records were made with this arithmetic: any change would make them irreproducible."""
    model, api = _img_api(7)
    x = torch.rand(3, *IMG, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([0, 2, 4])
    q, mu = 6, 0.005
    got, clean, logits = zo_gradient(api, x, _ce(y), q=q, mu=mu, generator=torch.Generator().manual_seed(9))
    xc = x.clamp(mu, 1 - mu)
    u = sphere_directions(q, tuple(xc.shape), torch.Generator().manual_seed(9), "cpu")
    out = query_logits(api, torch.cat([xc, (xc.unsqueeze(0) + mu * u).flatten(0, 1)]))
    losses = F.cross_entropy(out, y.repeat(q + 1), reduction="none").view(q + 1, 3)
    ref = (192 / q) * (((losses[1:] - losses[:1]) / mu).view(q, 3, 1, 1, 1) * u).sum(0)
    assert torch.equal(got, ref) and torch.equal(clean, losses[0]) and torch.equal(logits, out[:3])
