"""benchmarks/diag_val_split.py: the extra meta-val sets and the choose-on-one, score-on-another analysis."""

from __future__ import annotations

import pytest

from conftest import load_benchmark, make_toy_dataset
from dfml_bench.episodes import EpisodeSpec


@pytest.fixture(scope="module")
def split():
    return load_benchmark("diag_val_split")


def test_halves_are_disjoint_seeded_and_cover_the_classes(split):
    classes = list(range(40, 56))
    a, b = split.split_classes(classes, 3)
    assert len(a) == len(b) == 8 and not set(a) & set(b) and sorted(a + b) == classes
    assert split.split_classes(classes, 3) == (a, b) and split.split_classes(classes, 4) != (a, b)


def test_extra_sets_stay_inside_meta_val_and_inside_their_half(split):
    toy_dataset = make_toy_dataset(n_classes=40, per_class=8)  # 10 meta-val classes: two 5-class halves
    spec = EpisodeSpec(ways=5, shots=1, queries=3, n_episodes=10)
    sets = split.extra_episodes(toy_dataset, spec, 12, seed=0)
    val = set(toy_dataset.splits["val"])
    a = {int(c) for c in sets["A"].classes.flatten()}
    b = {int(c) for c in sets["B"].classes.flatten()}
    assert {int(c) for c in sets["fresh"].classes.flatten()} <= val and a <= val and b <= val and not a & b
    assert all(len(s) == 12 and s.spec.ways == 5 for s in sets.values())
    assert all(int(toy_dataset.labels[i]) in a for i in sets["A"].query.flatten())  # images of the half's classes only
    with pytest.raises(ValueError, match="fewer than 5 ways"):
        split.extra_episodes(make_toy_dataset(n_classes=32, per_class=8), spec, 12, seed=0)  # halves of 4 classes


def test_analysis_separates_episode_noise_from_class_drift(split):
    # checkpoint 2 looks best on val and on half A, but the gain on A does not reach B: class drift;
    # fresh episodes of the same classes keep most of the val gain: little episode noise
    trace = [{"val": 0.30, "fresh": 0.31, "A": 0.30, "B": 0.32},
             {"val": 0.32, "fresh": 0.33, "A": 0.31, "B": 0.34},
             {"val": 0.36, "fresh": 0.36, "A": 0.38, "B": 0.31}]
    r = split.analyse(trace)
    assert r["own_choice"] == 2 and r["val_gain"] == pytest.approx(6.0) and r["fresh_gain"] == pytest.approx(5.0)
    assert r["episode_optimism"] == pytest.approx(1.0)
    # chosen on A: checkpoint 2 (A +8, B -1); chosen on B: checkpoint 1 (B +2, A +1)
    assert r["half_chosen_gain"] == pytest.approx(5.0) and r["half_other_gain"] == pytest.approx(0.0)
    assert r["class_optimism"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="initialisation"):
        split.analyse(trace[:1])
    # a flat trace chooses the initialisation (first on ties) and has no optimism
    flat = split.analyse([dict(trace[0]), dict(trace[0])])
    assert flat["own_choice"] == 0 and flat["class_optimism"] == 0.0
