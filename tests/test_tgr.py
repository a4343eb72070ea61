"""TGR: the similarity measure, the grouping of dissimilar models, implicit gradient regularisation's
analytic form, each switch, and the method end to end on the toy zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.tgr import (TGR, draw_from_group, fim_similarity, group_models, igr_gradient, similarity_matrix,
                           task_embedding, within_group_dissimilarity)
from dfml_bench.methods import MethodError
from tests.test_free import Vec, toy_world  # noqa: F401  (toy_world: the shared toy zoo fixture)
from tests.test_free import _quadratic_tasks as _quadratics

# ---------------------------------------------------------------------------------------------
# similarity and grouping


def test_fim_similarity_is_tgrs_normalised_cosine():
    g = torch.Generator().manual_seed(0)
    a = [torch.rand(4, 3, generator=g), torch.rand(7, generator=g)]
    b = [torch.rand(4, 3, generator=g), torch.rand(7, generator=g)]
    assert fim_similarity(a, a) == pytest.approx(1.0, abs=1e-6)
    assert fim_similarity(a, [3 * t for t in a]) == pytest.approx(1.0, abs=1e-5)  # blind to a global scale
    assert fim_similarity(a, b) == pytest.approx(fim_similarity(b, a), abs=1e-7) and fim_similarity(a, b) < 1
    # Fisher mass on disjoint parameters: nothing in common
    u = [torch.tensor([1.0, 1.0, 0.0, 0.0])]
    v = [torch.tensor([0.0, 0.0, 1.0, 1.0])]
    assert fim_similarity(u, v) == pytest.approx(0.0, abs=1e-6)
    S = similarity_matrix([a, b, [2 * t for t in a]])
    assert torch.equal(S, S.T) and torch.all(S.diagonal() == 1) and S[0, 2] == pytest.approx(1.0, abs=1e-5) and S[0, 1] < 1


def _families(seed: int, sizes=(4, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """A similarity matrix of models from families: similar within a family (0.9), dissimilar across (0.2)."""
    fam = torch.tensor([f for f, n in enumerate(sizes) for _ in range(n)])
    n = len(fam)
    noise = 0.05 * torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    S = torch.where(fam[:, None] == fam[None, :], 0.9, 0.2).double() - (noise + noise.T) / 2
    S.fill_diagonal_(1.0)
    return S, fam


@pytest.mark.parametrize("seed", range(5))
def test_grouping_puts_dissimilar_models_together(seed):
    """TGR's grouping (spectral clustering on the dissimilarity 1 - S): no group of two or more models is
    made of one family, and a group's members are more dissimilar than two models drawn at random;
    the same clustering on S itself (the opposite rule) gives one-family groups."""
    S, fam = _families(seed)
    groups = group_models(S, 4, torch.Generator().manual_seed(seed))
    assert sorted(i for grp in groups for i in grp) == list(range(len(S)))  # every model, once (no truncation, T1)
    assert all(len({int(fam[i]) for i in grp}) >= 2 for grp in groups if len(grp) >= 2)
    mean_d = float((1 - S).sum() / (len(S) * (len(S) - 1)))
    assert within_group_dissimilarity(S, groups) > mean_d
    similar = group_models(S, 4, torch.Generator().manual_seed(seed), how="similar")
    assert all(len({int(fam[i]) for i in grp}) == 1 for grp in similar)
    assert within_group_dissimilarity(S, similar) < 0.2 < within_group_dissimilarity(S, groups)


def test_random_grouping_and_drawing():
    g = torch.Generator().manual_seed(0)
    groups = group_models(torch.eye(10), 3, g, how="random")
    assert sorted(len(x) for x in groups) == [3, 3, 4] and sorted(i for x in groups for i in x) == list(range(10))
    with pytest.raises(ValueError, match="grouping"):
        group_models(torch.eye(3), 2, g, how="bogus")
    for _ in range(20):
        idx = draw_from_group([[0, 1, 2, 3, 4], [5, 6]], 4, g)
        grp = [0, 1, 2, 3, 4] if idx[0] < 5 else [5, 6]
        assert set(idx) <= set(grp)
        assert len(set(idx)) == min(4, len(grp))  # no repeat while the group has unused models (T5)


def test_task_embedding_separates_different_tasks(toy_world):  # noqa: F811
    """Two probe sets of the same task embed closer to each other than to a task with other labels."""
    _ds, _wb, make_ctx = toy_world
    probe = make_ctx().make_backbone()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 16, 16, generator=g)
    y = torch.arange(5).repeat(8)
    ea = task_embedding(probe, x, y, batch=8)
    eb = task_embedding(probe, x + 0.02 * torch.randn(x.shape, generator=g), y, batch=8)
    ec = task_embedding(probe, torch.rand(40, 3, 16, 16, generator=g).clamp(0.4, 0.6), y.flip(0), batch=8)
    assert fim_similarity(ea, eb) > fim_similarity(ea, ec)
    assert all(p.grad is None for p in probe.parameters())  # the probe itself is untouched


# ---------------------------------------------------------------------------------------------
# implicit gradient regularisation on quadratic tasks


def test_igr_descends_the_loss_plus_the_spread_of_task_gradients():
    """To first order in eta, TGR's update is grad[mean L_m + eta * mean ||g_m - g_bar||^2]: the difference
    to the explicit regulariser shrinks like eta^2, and (IGR - plain gradient) / eta is the gradient of
    the spread of the task gradients."""
    tasks = _quadratics(4, 5, 0)
    theta = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = Vec(theta)
    losses = [lambda P, A=A, c=c: 0.5 * (P["theta"] - c) @ A @ (P["theta"] - c) for A, c in tasks]
    (plain,) = igr_gradient(model, losses, 0.1, "none")
    assert torch.allclose(plain, torch.stack([A @ (theta - c) for A, c in tasks]).mean(0))
    errs = []
    for eta in (1e-2, 1e-3):
        (imp,) = igr_gradient(model, losses, eta, "implicit")
        (exp,) = igr_gradient(model, losses, eta, "explicit")
        errs.append(float((imp - exp).norm()))
    assert errs[1] < 2e-2 * errs[0]  # O(eta^2)
    th = theta.clone().requires_grad_(True)
    gs = torch.stack([A @ (th - c) for A, c in tasks])
    spread = ((gs - gs.mean(0)) ** 2).sum(1).mean()
    (d_spread,) = torch.autograd.grad(spread, th)
    eta = 1e-5
    (imp,) = igr_gradient(model, losses, eta, "implicit")
    assert torch.allclose((imp - plain) / eta, d_spread, rtol=1e-3, atol=1e-6)
    assert d_spread.norm() > 0.1  # the regulariser really acts
    with pytest.raises(ValueError, match="igr mode"):
        igr_gradient(model, losses, eta, "bogus")


def test_igr_with_one_task_or_identical_tasks_is_the_plain_gradient():
    (A, c), = _quadratics(1, 3, 2)
    model = Vec(torch.ones(3, dtype=torch.float64))
    loss = lambda P: 0.5 * (P["theta"] - c) @ A @ (P["theta"] - c)  # noqa: E731
    (imp,) = igr_gradient(model, [loss, loss], 0.5, "implicit")
    (plain,) = igr_gradient(model, [loss], 0.5, "none")
    assert torch.allclose(imp, plain)


# ---------------------------------------------------------------------------------------------
# the method on the toy zoo

FAST = dict(epochs=3, val_every=3, val_episodes=5, n_groups=2, scratch_iterations=5, probe_iterations=5, head_steps=5,
            max_replay_batches=1, episode_batch=2, cluster_restarts=3)


def test_tgr_fit_groups_every_model_and_selects_on_val(toy_world, tmp_path):  # noqa: F811
    _ds, wb, make_ctx = toy_world
    m = TGR(**FAST)
    ctx = make_ctx()
    model = m.fit(ctx)
    r = m.report_
    assert r["config"] == m.config(ctx.scale) and set(r["config"]) >= set(m.get_params())  # what ran, defaults filled
    assert sorted(i for grp in r["groups"] for i in grp) == [t.index for t in wb]
    assert len(r["similarity"]) == len(wb) and r["within_group_dissimilarity"] is not None
    assert [e for e, _ in r["val_curve"]] == [0, 3] and r["best_epoch"] in (0, 3)
    groups = [set(grp) for grp in r["groups"]]
    assert all(any(set(d) <= grp for grp in groups) for d in r["teachers_drawn"])  # an epoch's models share a group
    assert r["memory_images"] == 3 * 4 * 5 * 6 and r["igr_seconds_total"] > 0 and r["replay_batches_per_epoch"] == 1
    m.artifacts_["recovered"](tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0 and isinstance(model, nn.Module)


def test_switches_change_only_their_component(toy_world):  # noqa: F811
    """igr off: the same models are drawn and the same images recovered (recovery does not depend on the
    meta-learner), only the meta-learner differs; distill / replay off remove exactly their step;
    grouping off: a random partition, no embedding."""
    _ds, _wb, make_ctx = toy_world
    runs = {}
    for name, kw in {"full": {}, "no-igr": {"igr": False}, "no-distill": {"distill": False}, "no-replay": {"replay": False},
                     "no-grouping": {"grouping": False}}.items():
        m = TGR(**FAST, select_init=False, **kw)
        runs[name] = (m.fit(make_ctx()), m.report_, m.memory_)
    full, no_igr = runs["full"], runs["no-igr"]
    assert full[1]["groups"] == no_igr[1]["groups"] and full[1]["teachers_drawn"] == no_igr[1]["teachers_drawn"]
    assert all(torch.equal(a, b) for c in full[2].classes for a, b in zip(full[2]._store[c], no_igr[2]._store[c]))
    assert not all(torch.equal(a, b) for a, b in zip(full[0].state_dict().values(), no_igr[0].state_dict().values()))
    assert runs["no-distill"][1]["igr_seconds_total"] == 0 and runs["no-distill"][1]["replay_batches_per_epoch"] == 1
    assert runs["no-replay"][1]["replay_batches_per_epoch"] == 0 and runs["no-replay"][1]["igr_seconds_total"] > 0
    assert runs["no-grouping"][1]["similarity"] is None and len(runs["no-grouping"][1]["groups"]) == 2


def test_bad_parameters_are_refused():
    with pytest.raises(MethodError, match="igr_mode"):
        TGR(igr_mode="bogus")
    with pytest.raises(MethodError, match="teachers_per_epoch"):
        TGR(teachers_per_epoch=0)
    with pytest.raises(MethodError, match="scale"):
        TGR().config("gpu")


def test_registered_through_the_entry_point_with_its_ablation_switches():
    from dfml_bench.ablation import variants_of
    from dfml_bench.methods import get_method

    assert isinstance(get_method("tgr"), TGR)
    assert [v.name for v in variants_of("tgr")] == ["full", "no-grouping", "no-igr", "no-distill", "no-replay"]


def test_replay_tasks_are_per_model_at_cpu_scale_and_the_references_mixed_tasks_at_paper_scale():
    assert TGR().config("cpu")["replay_tasks"] == "per-model"
    assert TGR().config("paper")["replay_tasks"] == "mixed"
    assert TGR(replay_tasks="mixed").config("cpu")["replay_tasks"] == "mixed"
    with pytest.raises(MethodError, match="replay_tasks"):
        TGR(replay_tasks="per-class")
