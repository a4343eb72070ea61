"""BiDf-MKD: its loss pieces, budget planning, ZO recovery, and end-to-end runs on the toy suite."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.bidf_mkd import BiDfMKD, kd_loss, per_sample_loss, plan_recovery, recover, recovery_cost, target_margin
from dfml_bench.access import APIInfo, InProcessAPI, QueryMeter
from dfml_bench.methods import MethodError, get_method
from dfml_bench.runner import RunOptions, run_one
from dfml_bench.scenarios import get_suite

SMALL = dict(meta_iterations=6, max_visits=2, val_every=3, val_episodes=4, gen_iterations=3, q=3, per_class=3, ngf=8,
             kd_inner_steps=2, inner_steps=1, meta_batch=2)


def test_target_margin_is_the_log_odds_gap_to_the_strongest_other_class():
    z = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 0, 2])
    assert target_margin(z, y).tolist() == pytest.approx([0.5, -4.0, 0.0])
    # logits and log-probabilities give the same margins; a sample deeper inside its class has a larger one
    assert torch.allclose(target_margin(F.log_softmax(z, 1), y), target_margin(z, y), atol=1e-6)
    assert float(target_margin(torch.tensor([[9.0, 1.0, 2.5]]), y[:1])) > float(target_margin(z[:1], y[:1]))


def test_kd_loss_is_a_true_kl_and_the_faithful_switch_reproduces_the_reference():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    p_t = t.softmax(1)
    kl = (p_t * (p_t.log() - F.log_softmax(s, 1))).sum(1).mean()
    assert float(kd_loss(s, t)) == pytest.approx(float(kl), rel=1e-5)
    T = 3.0
    pt3 = (t / T).softmax(1)
    kl3 = (pt3 * (pt3.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert float(kd_loss(s, t, T)) == pytest.approx(float(kl3), rel=1e-5)
    bug = (p_t * (p_t.log() - s.softmax(1))).mean()  # probabilities where log-probabilities belong, mean over B*C
    assert float(kd_loss(s, t, faithful_bug=True)) == pytest.approx(float(bug), rel=1e-5)


def test_boundary_loss_rewards_disagreement_only_where_labels_agree():
    y = torch.tensor([0, 0])
    student = torch.tensor([[3.0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0]])
    api_out = torch.tensor([[5.0, 0, 0, 0, 0], [5.0, 0, 0, 0, 0]])
    idx = torch.tensor([0, 1])
    plain = per_sample_loss(y)(api_out, idx)
    bnd = per_sample_loss(y, student, adv=1.0)(api_out, idx)
    assert float(bnd[0]) == pytest.approx(float(plain[0]) - 2.0)  # same argmax: minus the L1 gap (5 - 3)
    assert float(bnd[1]) == pytest.approx(float(plain[1]))  # argmaxes differ: masked out


def test_plan_fits_the_budget_shrinking_iterations_then_q_then_visits():
    B = 25
    assert plan_recovery(math.inf, B, 8, 20, 9) == (9, 8, 20)
    v, q, it = plan_recovery(100_000, B, 8, 20, 9)
    assert (v, q) == (9, 8) and v * recovery_cost(B, q, it) <= 100_000
    v, q, it = plan_recovery(60_000, B, 8, 20, 9, min_iterations=5)
    assert (v, q) == (9, 8) and 5 <= it < 20 and v * recovery_cost(B, q, it) <= 60_000
    v, q, it = plan_recovery(20_000, B, 8, 20, 9, min_iterations=5)
    assert v == 9 and it == 5 and q < 8 and v * recovery_cost(B, q, it) <= 20_000
    v, q, it = plan_recovery(5_000, B, 8, 20, 9, min_iterations=5, min_q=2)
    assert (q, it) == (2, 5) and 1 <= v < 9 and v * recovery_cost(B, q, it) <= 5_000
    v, q, it = plan_recovery(700, B, 8, 20, 9, min_iterations=5, min_q=2)
    assert v == 1 and 1 <= it < 5 and recovery_cost(B, q, it) <= 700
    v, q, it = plan_recovery(1e9, B, 8, 20, 9, per_visit_cap=10_000)
    assert recovery_cost(B, q, it) <= 10_000


def _linear_api(budget=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    meter = QueryMeter(1, total_budget=budget)
    return InProcessAPI(model, APIInfo(0, 5, (10, 11, 12, 13, 14), (3, 8, 8)), meter), meter


def test_recovery_lowers_the_black_box_loss_and_spends_exactly_its_queries():
    api, meter = _linear_api()
    # without the pad-4 crops (they shift an 8-pixel image by half its size) the ZO descent is easy to see
    r = recover(api, ways=5, per_class=4, iterations=25, q=10, mu=0.005, lr=0.05, rng=torch.Generator().manual_seed(0),
                device="cpu", image_shape=(3, 8, 8), ngf=8, augment_images=False)
    assert r.images.shape == (20, 3, 8, 8) and 0 <= float(r.images.min()) and float(r.images.max()) <= 1
    assert min(r.losses) < r.losses[0] - 0.2 and sum(r.losses[-5:]) < sum(r.losses[:5])
    assert meter.snapshot()["total"] == 25 * 20 * 11


def test_recovery_stops_cleanly_when_the_budget_runs_out():
    api, meter = _linear_api(budget=20 * 11 * 3 + 5)
    r = recover(api, ways=5, per_class=4, iterations=25, q=10, mu=0.005, lr=0.05, rng=torch.Generator().manual_seed(0),
                device="cpu", image_shape=(3, 8, 8), ngf=8)
    assert r.exhausted and r.iterations == 3 and meter.snapshot()["total"] <= 20 * 11 * 3 + 5


def test_label_apis_are_refused_with_a_reason():
    m = get_method("bidf-mkd")
    with pytest.raises(MethodError, match="label"):
        m.check_scenario("blackbox", "label")
    m.check_scenario("blackbox", "probs")


def _run(tmp_path: Path, params: dict, budget: int | None = None):
    suite = get_suite("toy")
    sc = suite.scenario("bb")
    if budget is not None:
        from dataclasses import replace

        sc = replace(sc, budget_total=budget)
    return run_one(suite, sc, "bidf-mkd", 0, RunOptions(out=tmp_path, progress=False, isolated_apis=False,
                                                        method_params={"bidf-mkd": params}))


def test_end_to_end_on_toy_within_budget_with_report_and_grid(tmp_path):
    rec = _run(tmp_path, SMALL)
    assert rec.status == "ok", rec.error
    ex = rec.extra
    assert ex["n_visits"] == 2 and ex["queries_total"] == rec.queries["total"] <= 10_000
    assert ex["queries"]["support"] > 0 and ex["queries"]["query"] > 0 and ex["queries"]["kd"] == 2 * 2 * 15
    assert ex["val_curve"] and 0 <= ex["best_val_acc"] <= 1
    # the initialisation is evaluated first and is a selection candidate
    assert ex["val_curve"][0][0] == 0 and ex["best_val_acc"] == pytest.approx(max(a for _, a in ex["val_curve"]), abs=1e-5)
    assert ex["best_iteration"] in [i for i, _ in ex["val_curve"]]
    assert all(v["boundary"] for v in ex["visits"])
    assert (tmp_path / "toy-cpu" / "bb" / "bidf-mkd" / "seed-0-recovered.png").exists() or "recovered" in rec.artifacts


@pytest.mark.slow
def test_tiny_budget_still_gives_a_valid_meta_learner(tmp_path):
    rec = _run(tmp_path, {**SMALL, "max_visits": 3}, budget=300)
    assert rec.status == "ok", rec.error
    assert rec.queries["total"] <= 300 and len(rec.per_episode) > 0


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["use_zo_recovery", "use_boundary", "use_kd", "use_memory_replay"])
def test_every_component_can_be_switched_off(tmp_path, flag):
    rec = _run(tmp_path, {**SMALL, flag: False})
    assert rec.status == "ok", rec.error
    if flag == "use_zo_recovery":
        assert rec.extra["queries"]["support"] == 0 and rec.extra["queries"]["query"] == 0
    if flag == "use_boundary":
        assert not any(v["boundary"] for v in rec.extra["visits"])


@pytest.mark.parametrize("mode", ["mixed", "per-model"])
def test_replay_tasks_switch_draws_tasks_from_one_api_only_when_per_model(tmp_path, monkeypatch, mode):
    from baselines.memory import TaskMemory

    calls, original = [], TaskMemory.sample_task

    def spy(self, ways, shots, queries, generator, device="cpu", *, per_source=False):
        calls.append(per_source)  # what per_source guarantees is tested in test_free.py
        return original(self, ways, shots, queries, generator, device, per_source=per_source)

    monkeypatch.setattr(TaskMemory, "sample_task", spy)
    suite = get_suite("toy")
    rec = run_one(suite, suite.scenario("bb"), "bidf-mkd", 0,
                  RunOptions(out=tmp_path, progress=False, isolated_apis=False, isolate=False,  # the spy lives in this process
                             method_params={"bidf-mkd": {**SMALL, "replay_tasks": mode}}))
    assert rec.status == "ok", rec.error
    assert calls and all(c == (mode == "per-model") for c in calls)


def test_replay_tasks_rejects_unknown_values():
    with pytest.raises(MethodError, match="replay_tasks"):
        BiDfMKD(replay_tasks="per-class")._hp("cpu")
