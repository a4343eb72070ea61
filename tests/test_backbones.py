"""Backbones: shapes, the fixed Normalize layer, BatchNorm modes, functional use, seeding, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dfml_bench.backbones import ARCHS, BackboneSpec, Normalize, build_backbone, param_count

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _spec(arch: str) -> BackboneSpec:
    return BackboneSpec(arch, 8 if arch == "conv4" else 4)  # small widths keep the tests fast


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [32, 84])
def test_shapes(arch: str, size: int) -> None:
    model = build_backbone(_spec(arch), 5, (3, size, size), MEAN, STD, seed=0)
    x = torch.rand(4, 3, size, size)
    out = model(x)
    assert out.shape == (4, 5)
    emb = model.embed(x)
    assert emb.shape == (4, model.head.in_features)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
    assert torch.allclose(model.head(emb), out)
    assert model.spec == _spec(arch)


def test_conv4_flatten_size_follows_image_size() -> None:
    spec = BackboneSpec("conv4", 32)
    assert build_backbone(spec, 5, (3, 32, 32)).head.in_features == 32 * 2 * 2
    assert build_backbone(spec, 5, (3, 84, 84)).head.in_features == 32 * 5 * 5


def test_resnet_stage_widths() -> None:
    model = build_backbone(BackboneSpec("resnet18", 16), 5)
    assert model.head.in_features == 16 * 8
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)  # few-shot stem, no 7x7
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    n_blocks = sum(type(m).__name__ == "SimpleBlock" for m in model.modules())
    assert n_blocks == 8
    assert sum(type(m).__name__ == "SimpleBlock" for m in build_backbone(BackboneSpec("resnet10", 16), 5).modules()) == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_normalize_is_fixed_and_applied(arch: str) -> None:
    model = build_backbone(_spec(arch), 5, (3, 32, 32), MEAN, STD, seed=0)
    norm = model.normalize
    assert isinstance(norm, Normalize)
    assert list(norm.parameters()) == []
    param_ids = {id(p) for p in model.parameters()}
    assert id(norm.mean) not in param_ids and id(norm.std) not in param_ids
    assert "normalize.mean" in model.state_dict() and "normalize.std" in model.state_dict()
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)


def test_normalize_rejects_bad_std() -> None:
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,), (0.0,))


@pytest.mark.parametrize("arch", ARCHS)
def test_functional_call_matches_forward(arch: str) -> None:
    model = build_backbone(_spec(arch), 5, seed=1)
    x = torch.rand(6, 3, 32, 32)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    assert torch.equal(functional_call(model, (params, buffers), (x,)), model(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_learner_bn_uses_batch_statistics(arch: str) -> None:
    model = build_backbone(_spec(arch), 5, seed=0)  # track_running_stats=False
    names = [n for n, _ in model.named_buffers()]
    assert names == ["normalize.mean", "normalize.std"]  # no running statistics to mutate
    x = torch.rand(4, 3, 32, 32)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    assert torch.equal(train_out, eval_out)


def test_zoo_model_tracks_running_stats() -> None:
    model = build_backbone(BackboneSpec("conv4", 8), 5, track_running_stats=True, seed=0)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.running_mean is not None for m in bns)
    before = bns[0].running_mean.clone()
    model.train()(torch.rand(4, 3, 32, 32))
    assert not torch.equal(before, bns[0].running_mean)
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    assert not torch.equal(model(x), model.train()(x))  # eval mode uses the running statistics


def test_seed_makes_initialisation_deterministic_without_touching_global_rng() -> None:
    spec = BackboneSpec("resnet10", 4)
    state = torch.random.get_rng_state()
    a = build_backbone(spec, 5, seed=3).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    b = build_backbone(spec, 5, seed=3).state_dict()
    c = build_backbone(spec, 5, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_param_count() -> None:
    model = build_backbone(BackboneSpec("conv4", 32), 5)
    # 4 convs (with bias) + 4 BN (weight, bias) + head 128 -> 5
    expected = (3 * 9 * 32 + 32) + 3 * (32 * 9 * 32 + 32) + 4 * 64 + 128 * 5 + 5
    assert param_count(model) == expected
    model.head.weight.requires_grad_(False)
    assert param_count(model, trainable_only=True) == expected - 128 * 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "vgg"}, "arch"),
        ({"width": 0}, "width"),
        ({"width": 2.5}, "width"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BackboneSpec(**kwargs)


def test_build_validation() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone(BackboneSpec(), 0)
    with pytest.raises(ValueError, match="mean/std"):
        build_backbone(BackboneSpec(), 5, (1, 32, 32))  # default mean/std are RGB
    with pytest.raises(ValueError, match="16x16"):
        build_backbone(BackboneSpec(), 5, (3, 8, 8))
    with pytest.raises(TypeError, match="BackboneSpec"):
        build_backbone("conv4", 5)  # type: ignore[arg-type]
