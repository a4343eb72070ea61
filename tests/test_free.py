"""FREE: the alignment update's analytic form, the meta-generator's faster adaptation, the memory fix,
BN-statistics matching, and the method end to end on the toy zoo."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.free import FREE, ScratchInversion, _draw_teachers, _teacher_groups, alignment_direction, meta_generator_update, recover_meta
from baselines.generator import Generator, augment, reset_generator
from baselines.inversion import (LossWeights, adversarial_loss, bn_hooks, bn_matching_loss, distill_loss, inversion_loss,
                                 invert_from_scratch, target_labels)
from dfml_bench.access import WhiteBoxModel
from dfml_bench.evaluation import evaluate
from dfml_bench.methods import MethodContext, MethodError
from dfml_bench.runner import make_backbone_factory, scenario_episodes
from dfml_bench.scenarios import get_suite
from dfml_bench.utils import make_generator
from dfml_bench.zoo import build_zoo


# ---------------------------------------------------------------------------------------------
# alignment update on a quadratic problem


class Vec(nn.Module):
    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


def _quadratic_tasks(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        a = torch.randn(d, d, generator=g, dtype=torch.float64)
        A = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
        c = torch.randn(d, generator=g, dtype=torch.float64)
        tasks.append((A, c))
    return tasks


def _loss_fn(A, c):
    return lambda net: 0.5 * (net.theta - c) @ A @ (net.theta - c)


def test_alignment_update_equals_its_analytic_form_on_quadratics():
    d, beta = 4, 0.05
    tasks = _quadratic_tasks(3, d, 0)
    theta = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = Vec(theta)
    # exact closed form of sequential SGD: theta_m = theta_{m-1} - beta A_m (theta_{m-1} - c_m)
    t = theta.clone()
    for A, c in tasks:
        t = t - beta * A @ (t - c)
    (got,) = alignment_direction(model, [_loss_fn(A, c) for A, c in tasks], lr=beta, inner="sgd")
    assert torch.allclose(got, (theta - t) / (beta * len(tasks)), atol=1e-12)

    # two tasks: exactly beta(g1 + g2 - beta H2 g1); averaged over both orders it is the gradient of
    # L1 + L2 - (beta/2) <g1, g2> (the implicit gradient-alignment objective), times 1/M.
    (A1, c1), (A2, c2) = tasks[:2]
    g1, g2 = A1 @ (theta - c1), A2 @ (theta - c2)
    (d12,) = alignment_direction(model, [_loss_fn(A1, c1), _loss_fn(A2, c2)], lr=beta)
    assert torch.allclose(d12 * 2, g1 + g2 - beta * A2 @ g1, atol=1e-12)
    (d21,) = alignment_direction(model, [_loss_fn(A2, c2), _loss_fn(A1, c1)], lr=beta)
    th = theta.clone().requires_grad_(True)
    G1, G2 = A1 @ (th - c1), A2 @ (th - c2)
    objective = 0.5 * (th - c1) @ A1 @ (th - c1) + 0.5 * (th - c2) @ A2 @ (th - c2) - 0.5 * beta * (G1 @ G2)
    (analytic,) = torch.autograd.grad(objective, th)
    assert torch.allclose((d12 + d21) / 2 * 2, analytic, atol=1e-12)
    # and the alignment term really matters: the plain summed gradient differs
    assert not torch.allclose(g1 + g2, analytic, atol=1e-6)
    # the model itself is untouched (the direction is computed on a fast copy)
    assert torch.equal(model.theta.detach(), theta)


def test_alignment_direction_with_adam_uses_the_given_scale():
    model = Vec(torch.zeros(3, dtype=torch.float64))
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    (dirn,) = alignment_direction(model, [lambda net: ((net.theta - c) ** 2).sum()], lr=1e-3, inner="adam", scale=67.0)
    # first Adam step moves each coordinate by lr * sign(gradient) (up to eps)
    assert torch.allclose(dirn, 67.0 * 1e-3 * torch.sign(-c), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# loss terms


def test_adversarial_loss_modes_and_mask():
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    s_agree = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    s_disagree = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert adversarial_loss(t, s_disagree, "kl").item() == 0.0  # masked out
    kl = adversarial_loss(t, s_agree, "kl")
    assert kl.item() < 0  # minus a positive KL
    assert adversarial_loss(t, s_disagree, "reference").item() == 0.0
    with pytest.raises(ValueError):
        adversarial_loss(t, s_agree, "bogus")


def test_distill_loss_is_a_true_kl():
    s = torch.randn(6, 5)
    t = torch.randn(6, 5)
    ref = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="batchmean")
    assert torch.allclose(distill_loss(s, t), ref, atol=1e-6)
    assert distill_loss(t, t).abs().item() < 1e-6
    assert torch.allclose(distill_loss(s, t, temperature=2.0),
                          4 * F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean"), atol=1e-6)


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5))
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_bn_matching_decreases_when_optimised_and_hooks_are_removed():
    teacher = _teacher()
    x = torch.rand(16, 3, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05)
    first = None
    for _ in range(60):
        loss = bn_matching_loss(teacher, x)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(bn_matching_loss(teacher, x))
    assert last < 0.5 * first
    assert not teacher[1]._forward_hooks  # hooks never outlive their block
    # zero exactly when the batch statistics equal the running statistics
    bn = teacher[1]
    with bn_hooks(teacher) as hooks:
        feats = torch.randn(64, 8, 4, 4)
        feats = (feats - feats.mean((0, 2, 3), keepdim=True)) / feats.std((0, 2, 3), unbiased=False, keepdim=True)
        feats = feats * bn.running_var.sqrt().view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
        bn(feats)
        assert hooks.pop().item() < 1e-4


def test_inversion_loss_uses_the_bn_term_only_when_weighted():
    teacher = _teacher()
    x = torch.rand(10, 3, 8, 8)
    y = target_labels(5, 2)
    with bn_hooks(teacher) as hooks:
        l0, p0 = inversion_loss(teacher, x, y, LossWeights(bn=0.0), hooks=hooks)
        l1, p1 = inversion_loss(teacher, x, y, LossWeights(bn=1.0), hooks=hooks)
    assert p0["bn"] > 0 and torch.allclose(l1, l0 + p1["bn"], atol=1e-5)
    assert torch.equal(y[:6], torch.tensor([0, 1, 2, 3, 4, 0]))


def test_teacher_sampling_covers_groups_without_repeats():
    class T:
        def __init__(self, arch, domain):
            self.arch, self.domain = arch, domain
    teachers = [T(a, "") for a in ("conv4", "resnet10", "resnet18") for _ in range(3)]
    groups = _teacher_groups(teachers)
    assert len(groups) == 3
    g = torch.Generator().manual_seed(0)
    seen_arch = set()
    for _ in range(30):
        idx = _draw_teachers(groups, 4, "stratified", g)
        assert len(set(idx)) == 4  # each draw really is a different model (reference bug F5)
        seen_arch |= {teachers[i].arch for i in idx}
    assert seen_arch == {"conv4", "resnet10", "resnet18"}


# ---------------------------------------------------------------------------------------------
# on the toy zoo


@pytest.fixture(scope="module")
def toy_world():
    from tests.conftest import make_toy_dataset  # noqa: F401  (registration happens in conftest)

    suite = get_suite("toy", "cpu")
    sc = suite.scenario("wb")
    from dfml_bench.datasets import load_dataset

    ds = load_dataset("toy")
    spec = type(sc.zoo)(**{**sc.zoo.to_dict(), "n_models": 5, "backbones": sc.zoo.backbones, "recipes": sc.zoo.recipes})
    zoo = build_zoo(spec, ds, progress=False)
    wb = [WhiteBoxModel(zoo.load_model(i), list(e.classes), e.arch, i, e.domain, ds.image_shape) for i, e in enumerate(zoo.entries)]
    test_eps, val_eps = scenario_episodes(sc, ds, 0, None)

    def make_ctx(method: str = "free", seed: int = 0) -> MethodContext:
        return MethodContext(
            scenario_name="wb", access="whitebox", episode_spec=test_eps.spec, protocol=sc.protocol,
            make_backbone=make_backbone_factory(sc, ds, seed, torch.device("cpu")), val_episodes=val_eps, val_dataset=ds,
            seed=seed, generator=make_generator(seed), scale="cpu", image_shape=ds.image_shape, _whitebox=wb,
            _evaluate_val=lambda m, n=None: evaluate(m, ds, val_eps if n is None else val_eps.subset(slice(0, n)), sc.protocol))

    return ds, wb, make_ctx


def _cfg(**kw):
    cfg = FREE(**kw).config("cpu")
    cfg.update(nz=32, ngf=8, per_class=2)
    return cfg


def _mean_loss_after_k(gen: Generator, teacher, cfg, k_seeds, weights) -> float:
    """The inversion loss (CE + weighted BN-statistics term) of ``teacher`` on the images of ``gen``
    adapted for cfg['gen_steps'] steps, averaged over latent draws."""
    y = target_labels(5, cfg["per_class"])
    losses = []
    for s in k_seeds:
        g = torch.Generator().manual_seed(s)
        x, _secs, _fast = recover_meta(gen, None, teacher, y, weights, cfg, g)
        with torch.no_grad(), bn_hooks(teacher, enabled=weights.bn > 0) as hooks:
            loss, _ = inversion_loss(teacher, x, y, weights, hooks=hooks)
        losses.append(float(loss))
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_meta_generator_adapts_faster_than_a_fresh_generator(toy_world):
    """FREE's premise: after meta-training on some zoo models, k = 5 adaptation steps reach a lower
    inversion loss on an UNSEEN model than the same 5 steps from a fresh generator (same initialisation).
    The loss includes BN-statistics matching: the statistics the zoo's models share are what a
    meta-generator can learn once and reuse (with CE alone the toy teachers' classes share nothing)."""
    _ds, wb, _ = toy_world
    train, unseen = wb[:4], wb[4]
    cfg = _cfg(meta_gen_lr=2e-2)
    w = LossWeights(ce=1.0, adv=0.0, bn=1.0)
    g = torch.Generator().manual_seed(0)
    meta = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=16, channels=3)
    reset_generator(meta, g)
    fresh = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=16, channels=3)
    reset_generator(fresh, torch.Generator().manual_seed(0))  # same initialisation as the meta-generator before training
    opt = torch.optim.Adam(meta.parameters(), lr=cfg["meta_gen_lr"], betas=(0.5, 0.999))
    y = target_labels(5, cfg["per_class"])
    for it in range(24):
        states = []
        for t in train[it % 2 * 2: it % 2 * 2 + 2]:
            _x, _s, fast = recover_meta(meta, None, t.model, y, w, cfg, g)
            states.append(fast)
        meta_generator_update(meta, None, opt, states, "reptile")
    seeds = range(100, 104)
    loss_meta = _mean_loss_after_k(meta, unseen.model, cfg, seeds, w)
    loss_fresh = _mean_loss_after_k(fresh, unseen.model, cfg, seeds, w)
    # measured: 8.99 vs 12.32 (ratio 0.73; 0.74 after 60 meta-updates instead of 24)
    assert loss_meta < 0.8 * loss_fresh, (loss_meta, loss_fresh)


def test_free_fit_stores_every_models_batch_and_selects_on_val(toy_world):
    _ds, wb, make_ctx = toy_world
    kw = dict(epochs=2, warmup=1, per_class=4, nz=32, ngf=8, val_every=1, val_episodes=5, max_replay_batches=2,
              episode_batch=2, teachers_per_epoch=3)
    m = FREE(**kw)
    ctx = make_ctx()
    model = m.fit(ctx)
    mem = m.memory_
    # the record says what ran: the instance's values and the scale's defaults for the rest
    cfg = m.report_["config"]
    assert cfg == m.config(ctx.scale) and (cfg["warmup"], cfg["epochs"]) == (1, 2) and cfg["gen_steps"] is not None
    # 2 post-warm-up epochs x 3 models: every model's batch is stored (the reference stores only the last)
    assert [e for e, _ in m.report_["val_curve"]] == [0, 1, 2]  # the initialisation is evaluated too
    assert m.report_["tasks_recovered"] == 6
    drawn = m.report_["teachers_drawn"]
    assert [len(set(d)) for d in drawn] == [3, 3]  # 3 distinct models per epoch
    assert mem.sources() == {i for d in drawn for i in d}  # every drawn model reached the memory
    assert mem.n_images() == 6 * 5 * 4
    assert isinstance(model, nn.Module) and m.report_["best_epoch"] in (0, 1, 2)
    assert 0.0 <= m.report_["teacher_acc_on_recovered"] <= 1.0 and m.report_["recovery_seconds_per_task"] > 0
    # the teachers' agreement with their targets is recorded every epoch, warm-up first (issue 12)
    agree = m.report_["teacher_agreement_per_epoch"]
    assert len(agree) == 3 and all(0.0 <= a <= 1.0 for a in agree) and m.report_["meta_generator_updates"] == 3
    ref = FREE(**kw, store_all=False)
    ref.fit(make_ctx())
    assert ref.memory_.n_images() == 2 * 5 * 4  # reference mode: only the last model of each epoch


def test_alignment_and_recovery_steps_per_scale():
    """Issue 12: paper scale keeps the reference's alignment (fresh Adam inner steps, displacement x 67
    through the shared Adam) and 5 adaptation steps; cpu scale uses the SGD form (scale 1/(lr*M)) and 20
    steps, chosen on meta-val; either form can be asked for at either scale."""
    cfg = FREE().config("paper")
    assert (cfg["align_inner"], cfg["reptile_scale"], cfg["align_lr"], cfg["gen_steps"]) == ("adam", 67.0, 1e-3, 5)
    cfg = FREE().config("cpu")
    assert (cfg["align_inner"], cfg["reptile_scale"], cfg["gen_steps"]) == ("sgd", None, 20)
    assert FREE(align_inner="adam").config("cpu")["reptile_scale"] == 67.0
    assert FREE(align_inner="sgd").config("paper")["reptile_scale"] is None
    assert FREE(gen_steps=5).config("cpu")["gen_steps"] == 5
    with pytest.raises(MethodError):
        FREE(gen_steps=0)
    assert FREE().config("cpu")["per_class"] >= 16  # 1-shot tasks of one model's batch get 15 distinct queries


def test_free_components_can_be_switched_off(toy_world, tmp_path):
    _ds, _wb, make_ctx = toy_world
    m = FREE(epochs=1, warmup=1, per_class=4, nz=32, ngf=8, val_every=1, val_episodes=5, align=False, replay=False,
             w_adv=0.0, meta_gen_update="fomaml", w_bn=1.0)
    m.fit(make_ctx())
    assert m.report_["replay_batches_per_epoch"] == 0 and m.report_["align_seconds_total"] == 0
    m.artifacts_["recovered"](tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    with pytest.raises(MethodError):
        FREE(recovery="bogus")


def test_scratch_inversion_recovers_what_the_teacher_recognises(toy_world):
    _ds, wb, make_ctx = toy_world
    r = invert_from_scratch(wb[0].model, 5, 4, image_shape=(3, 16, 16), generator=torch.Generator().manual_seed(0),
                            iterations=60, lr=1e-2, z_lr=1e-2, nz=32, ngf=8)
    assert r.images.shape == (20, 3, 16, 16) and r.images.min() >= 0 and r.images.max() <= 1
    # the toy teachers are weak (3 epochs on noisy templates): ask for twice chance and a clear loss decrease
    assert r.teacher_acc >= 0.4 and r.final_loss <= min(r.history) + 1e-9 and r.final_loss < 0.9 * r.history[0]
    m = ScratchInversion(epochs=1, per_class=4, nz=32, ngf=8, scratch_iterations=5, val_every=1, val_episodes=5,
                         teachers_per_epoch=2)
    m.fit(make_ctx("inversion"))
    assert m.report_["recovery"] == "scratch" and m.report_["tasks_recovered"] == 2


def test_selection_returns_the_initialisation_when_training_never_improves_val(toy_world):
    """Meta-val falls after epoch 0 -> the selected meta-learner is exactly the initialisation."""
    _ds, _wb, make_ctx = toy_world
    ctx = make_ctx()
    calls = []

    def falling_val(model, n=None):  # 0.9 for the first evaluation (epoch 0), 0.1 after
        calls.append(n)
        return torch.tensor([0.9 if len(calls) == 1 else 0.1])

    ctx._evaluate_val = falling_val
    m = FREE(epochs=2, warmup=0, per_class=2, nz=32, ngf=8, val_every=1, val_episodes=5, max_replay_batches=1, episode_batch=2)
    model = m.fit(ctx)
    init = make_ctx().make_backbone()
    assert m.report_["best_epoch"] == 0 and len(calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values()))
    # without the initialisation as a candidate, a trained epoch is returned
    calls.clear()
    m2 = FREE(epochs=2, warmup=0, per_class=2, nz=32, ngf=8, val_every=1, val_episodes=5, max_replay_batches=1, episode_batch=2,
              select_init=False)
    m2.fit(ctx)
    assert m2.report_["best_epoch"] == 1


def test_per_model_replay_tasks_use_one_models_images():
    from baselines.memory import TaskMemory

    mem = TaskMemory()
    # model 0 knows classes 0-4 (images of value 0), model 1 classes 3-7 (value 255): classes 3, 4 are shared
    y = torch.arange(5).repeat(4)
    mem.add(torch.zeros(20, 1, 2, 2), y, [0, 1, 2, 3, 4], source=0)
    mem.add(torch.ones(20, 1, 2, 2), y, [3, 4, 5, 6, 7], source=1)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        sx, _sy, qx, _qy = mem.sample_task(5, 1, 3, g, per_source=True)
        vals = torch.cat([sx, qx]).unique()
        assert len(vals) == 1  # every image of the task comes from one model
        seen.add(float(vals))
    assert seen == {0.0, 1.0}
    mixed = {len(torch.cat(mem.sample_task(5, 1, 3, g)[::2]).unique()) for _ in range(30)}
    assert 2 in mixed  # the reference's interpolated tasks do mix models
    with pytest.raises(ValueError, match="per-source"):
        TaskMemory().sample_task(5, 1, 1, g, per_source=True)
