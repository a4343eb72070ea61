"""benchmarks/validate_proxy.py reports meta-val per domain on a multi-domain pool (so a pooled figure
cannot hide a domain that fails) and renders those curves in its table; its zoo-size override is checked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("validate_proxy")


def _ctx(acc: list[float], first_classes: list[int]):
    classes = torch.tensor([[c, c + 1] for c in first_classes])
    return SimpleNamespace(_evaluate_val=lambda model, n: torch.tensor(acc[:n], dtype=torch.float64),
                           val_episodes=SimpleNamespace(classes=classes))


def test_val_point_splits_meta_val_by_each_episodes_domain(study):
    ds = SimpleNamespace(domains=["a", "b"], domain_of=lambda c: "a" if c < 10 else "b")
    ctx = _ctx([0.2, 0.8, 0.4, 0.6], [1, 11, 2, 12])  # domains a, b, a, b
    mean, per = study.val_point(ctx, ds, None, 4)
    assert mean == pytest.approx(0.5)
    assert per == {"a": pytest.approx(0.3), "b": pytest.approx(0.7)}
    # only the first n episodes count
    mean, per = study.val_point(ctx, ds, None, 2)
    assert mean == pytest.approx(0.5) and per == {"a": pytest.approx(0.2), "b": pytest.approx(0.8)}


def test_val_point_has_no_domains_on_a_single_domain_dataset(study):
    ds = SimpleNamespace(domains=[], domain_of=lambda c: pytest.fail("no domain lookup on one domain"))
    mean, per = study.val_point(_ctx([0.25, 0.75], [1, 2]), ds, None, 2)
    assert mean == pytest.approx(0.5) and per == {}


def test_markdown_lists_each_domains_curve_under_its_source(study):
    out = {"proxy": "p", "teachers": 4, "classes_covered": 8, "meta_train_classes": 8, "teachers_per_class": 2.5,
           "args": {"tasks": "mixed", "per_class": 16, "val_episodes": 100}, "levels": {"random": 0.3},
           "sources": {"inversion": {"teacher_agreement": 0.97, "curve": [(0, 0.30), (50, 0.36)], "best": 0.36,
                                     "per_domain": {"a": [(0, 0.32), (50, 0.42)], "b": [(0, 0.28), (50, 0.30)]}}}}
    md = study.markdown(out)
    assert "| inversion | 0.97 | 30.0 | 36.0 | 36.0 |" in md
    assert "| inversion, domain a | | 32.0 | 42.0 | 42.0 |" in md
    assert "| inversion, domain b | | 28.0 | 30.0 | 30.0 |" in md


def test_zoo_models_must_be_positive(study):
    before = torch.get_num_threads()
    with pytest.raises(SystemExit):
        study.main(["--proxy", "glyphs-fs", "--zoo-models", "0", "--sources", "", "--threads", "3"])
    assert torch.get_num_threads() == before  # refused before it set anything


def test_benchmark_contexts_build_the_zoo_with_the_protocols_thread_count(monkeypatch):
    """A benchmark script running with 2 torch threads must use the suites' zoo, the one trained with the
    protocol's count (a zoo trained with another count has other teachers, and its own folder)."""
    ctx_mod = load_benchmark("_context")
    seen = []

    class Stop(Exception):
        pass

    def fake_build(*a, **k):
        seen.append(torch.get_num_threads())
        raise Stop

    monkeypatch.setattr(ctx_mod, "build_zoo", fake_build)
    monkeypatch.setattr(ctx_mod, "load_dataset", lambda *a, **k: None)
    sc = SimpleNamespace(dataset="x", dataset_seed=0, zoo=None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Stop):
            ctx_mod.make_scenario_context(sc, "cpu", 0)
        assert seen == [1] and torch.get_num_threads() == 2  # built with 1, the caller's count restored
    finally:
        torch.set_num_threads(before)
