"""PURER: the learnable dataset's inversion, ECI's gradient switch and its harder episodes, the average
initialisation, each switch, and the method end to end on the toy zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.purer import (PURER, CurriculumSwitch, LearnableData, average_parameters, data_step, image_priors,
                             model_inversion_loss)
from dfml_bench.methods import MethodError
from tests.test_free import toy_world  # noqa: F401  (the shared toy zoo fixture)


def test_switch_fires_at_start_then_on_each_plateau():
    sw = CurriculumSwitch(start=3, patience=2)
    fired = []
    losses = [5.0, 4.0, 3.0, 2.0, 1.0, 1.5, 1.4, 0.5, 0.6, 0.7, 0.8]
    for step, loss in enumerate(losses, start=1):
        if sw.fire():
            fired.append(step)
        sw.update(step, loss)
    # fires right after `start`; afterwards only when the loss has not reached a new minimum for
    # `patience` meta-batches (the counter and the minimum restart after each firing)
    assert fired == [4, 8, 11]  # stalls at meta-batches 6-7 and 9-10 -> adversarial data step in the next one
    assert not CurriculumSwitch(start=100, patience=1).fire()


def test_learnable_data_tasks_pool_models_by_global_class_and_never_repeat_an_image():
    g = torch.Generator().manual_seed(0)
    # models 0 and 1 share global classes 3 and 4
    data = LearnableData.create([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]], per_class=3, image_shape=(1, 4, 4), g=g)
    assert data.global_classes == list(range(8))
    assert len(data._by_class[3]) == 6 and len(data._by_class[0]) == 3
    seen = set()
    for _ in range(40):
        sx, sy, qx, qy = data.sample_task(5, 1, 2, g)
        allx = torch.cat([sx, qx]).flatten(1)
        assert len(torch.unique(allx, dim=0)) == len(allx)  # no image twice in a task
        assert sy.tolist() == [0, 1, 2, 3, 4] and qy.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        seen.add(tuple(allx[0].tolist()))
    assert len(seen) > 1
    # a class of one model with 3 images cannot serve a task that needs 4 distinct images
    with pytest.raises(MethodError, match="per_class"):
        for _ in range(20):
            data.sample_task(5, 1, 3, g)
    x = data.images()
    assert x.min() >= 0 and x.max() <= 1
    # per-model tasks: every image of a task comes from one model's pixels
    for _ in range(20):
        sx, _sy, qx, _qy = data.sample_task(5, 1, 2, g, per_model=True)
        rows = {tuple(r.tolist()) for r in torch.cat([sx, qx]).flatten(1)}
        owners = {m for m in range(2) for r in data.images(m).detach().flatten(1) if tuple(r.tolist()) in rows}
        assert len(owners) == 1


def test_image_priors_prefer_smooth_images():
    smooth = torch.full((2, 3, 8, 8), 0.5)
    noisy = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    tv_s, l2_s = image_priors(smooth)
    tv_n, l2_n = image_priors(noisy)
    assert tv_s.item() == 0.0 and l2_s.item() == 0.0 and tv_n > 0 and l2_n > 0


def test_inversion_steps_make_the_teacher_recognise_the_data(toy_world):  # noqa: F811
    _ds, wb, make_ctx = toy_world
    cfg = PURER().config("cpu")
    g = torch.Generator().manual_seed(0)
    data = LearnableData.create([t.classes for t in wb], 6, (3, 16, 16), g)
    opt = torch.optim.Adam([data.z], lr=cfg["data_lr"])
    first = model_inversion_loss(wb[0].model, data.images(0), data.local, cfg, g)[1]["ce"]
    for _ in range(30):
        data_step(data, opt, wb, list(range(len(wb))), cfg, g)
    last = model_inversion_loss(wb[0].model, data.images(0), data.local, cfg, g)[1]["ce"]
    assert last < 0.5 * first
    with torch.no_grad():
        acc = (wb[0].model(data.images(0)).argmax(1) == data.local).float().mean().item()
    assert acc >= 0.8
    # switching the BN prior off removes exactly that term
    parts_on = model_inversion_loss(wb[0].model, data.images(0), data.local, cfg, torch.Generator().manual_seed(1))[1]
    parts_off = model_inversion_loss(wb[0].model, data.images(0), data.local, {**cfg, "bn_prior": False},
                                     torch.Generator().manual_seed(1))[1]
    assert "bn" in parts_on and "bn" not in parts_off and parts_on["ce"] == parts_off["ce"]


def test_adversarial_data_step_raises_the_meta_learners_loss_on_its_episode(toy_world):  # noqa: F811
    """ECI's data step moves the episode it draws towards a larger outer loss of the CURRENT meta-learner
    (inversion terms off, so only the curriculum term acts), and leaves the meta-learner untouched."""
    _ds, wb, make_ctx = toy_world
    ctx = make_ctx()
    model = ctx.make_backbone()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = PURER().config("cpu")
    data = LearnableData.create([t.classes for t in wb], 6, (3, 16, 16), torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([data.z], lr=0.05)
    from baselines.purer import adversarial_task_loss

    l0 = adversarial_task_loss(model, data, ctx.episode_spec, cfg, torch.Generator().manual_seed(5)).item()
    data_step(data, opt, wb, [], cfg, torch.Generator().manual_seed(5), meta_learner=model, spec=ctx.episode_spec)
    l1 = adversarial_task_loss(model, data, ctx.episode_spec, cfg, torch.Generator().manual_seed(5)).item()
    assert l1 > l0
    assert all(torch.equal(a, p.detach()) and p.grad is None for a, p in zip(before, model.parameters()))


def test_curriculum_makes_episodes_harder_as_training_goes_on(toy_world):  # noqa: F811
    """Same seed, curriculum on vs off: after the switch starts firing, the meta-learner's loss on the
    pseudo episodes it trains on is higher with ECI (measured: 1.61 vs 1.57 on seeds 1-3)."""
    _ds, _wb, make_ctx = toy_world
    runs = {}
    for cur in (False, True):
        m = PURER(meta_batches=40, warmup=5, val_every=40, val_episodes=5, adv_start=5, patience=2, curriculum=cur)
        m.fit(make_ctx(seed=1))
        runs[cur] = m.report_
    assert runs[False]["adv_steps"] == [] and len(runs[True]["adv_steps"]) >= 4
    after = lambda r: sum(r["meta_loss"][5:]) / len(r["meta_loss"][5:])  # noqa: E731
    assert after(runs[True]) > after(runs[False]) + 0.01
    # before the first curriculum step both runs are the same run
    assert runs[True]["meta_loss"][:5] == runs[False]["meta_loss"][:5]


def test_curriculum_switch_changes_nothing_when_it_never_fires(toy_world):  # noqa: F811
    _ds, _wb, make_ctx = toy_world
    kw = dict(meta_batches=6, warmup=2, val_every=6, val_episodes=5, adv_start=50, select_init=False)
    a, b = PURER(**kw, curriculum=True), PURER(**kw, curriculum=False)
    ma, mb = a.fit(make_ctx()), b.fit(make_ctx())
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert a.report_["meta_loss"] == b.report_["meta_loss"]


def test_average_init_is_the_zoo_mean_and_is_skipped_across_architectures(toy_world):  # noqa: F811
    _ds, wb, make_ctx = toy_world
    model = make_ctx().make_backbone()
    assert average_parameters(model, wb)
    name, p = next(iter(model.named_parameters()))
    assert torch.allclose(p, torch.stack([dict(t.model.named_parameters())[name] for t in wb]).mean(0))

    class Other:
        model = nn.Linear(3, 5)

    untouched = make_ctx().make_backbone()
    ref = [q.detach().clone() for q in untouched.parameters()]
    assert not average_parameters(untouched, [wb[0], Other()])
    assert all(torch.equal(a, q) for a, q in zip(ref, untouched.parameters()))


def test_purer_fit_selects_on_val_and_saves_its_images(toy_world, tmp_path):  # noqa: F811
    _ds, wb, make_ctx = toy_world
    m = PURER(meta_batches=8, warmup=3, val_every=4, val_episodes=5, adv_start=2, patience=1)
    ctx = make_ctx()
    model = m.fit(ctx)
    r = m.report_
    assert r["config"] == m.config(ctx.scale) and r["config"]["meta_batches"] == 8  # what ran, defaults filled
    assert [s for s, _ in r["val_curve"]] == [0, 4, 8] and r["best_iteration"] in (0, 4, 8)
    assert r["average_init"] is True and r["adv_steps"][0] == 3 and r["per_class"] == 1 + 5
    assert r["n_images"] == len(wb) * 5 * 6 and 0 <= r["teacher_acc_on_recovered"] <= 1
    assert isinstance(model, nn.Module)
    m.artifacts_["recovered"](tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
    # deterministic: same seed, same meta-learner
    again = PURER(meta_batches=8, warmup=3, val_every=4, val_episodes=5, adv_start=2, patience=1).fit(make_ctx())
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))


def test_bad_parameters_are_refused():
    with pytest.raises(MethodError, match="unknown parameters"):
        PURER(bogus=1)
    with pytest.raises(MethodError, match="meta_batches"):
        PURER(meta_batches=0).config("cpu")
    with pytest.raises(MethodError, match="scale"):
        PURER().config("gpu")
    with pytest.raises(MethodError, match="task_source"):
        PURER(task_source="bogus").config("cpu")


def test_registered_through_the_entry_point_with_its_ablation_switches():
    from dfml_bench.ablation import variants_of
    from dfml_bench.methods import get_method

    assert isinstance(get_method("purer"), PURER)
    assert [v.name for v in variants_of("purer")] == ["full", "no-curriculum", "no-average_init", "no-bn_prior", "no-image_priors"]
