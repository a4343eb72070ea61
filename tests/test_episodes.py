import pytest
import torch

from dfml_bench.datasets import DatasetError, validate_split
from dfml_bench.episodes import EpisodeSpec, frozen_episodes, load_episodes, sample_episodes, save_episodes


def test_split_disjointness_is_enforced():
    with pytest.raises(DatasetError, match="both meta-train and meta-test"):
        validate_split({"train": [0, 1, 2], "val": [3], "test": [2, 4]})
    with pytest.raises(DatasetError, match="lacks"):
        validate_split({"train": [0], "test": [1]})


def test_toy_dataset_splits_disjoint(toy_dataset):
    s = {k: set(v) for k, v in toy_dataset.splits.items()}
    assert not (s["train"] & s["val"]) and not (s["train"] & s["test"]) and not (s["val"] & s["test"])


def test_episodes_use_only_their_split_and_are_well_formed(toy_dataset):
    spec = EpisodeSpec(ways=5, shots=2, queries=3, n_episodes=25)
    eps = sample_episodes(toy_dataset, "test", spec, seed=7)
    test_classes = set(toy_dataset.splits["test"])
    assert set(eps.classes.flatten().tolist()) <= test_classes
    for e in range(len(eps)):
        assert len(set(eps.classes[e].tolist())) == 5  # distinct classes per episode
        for n in range(5):
            idx = torch.cat([eps.support[e, n], eps.query[e, n]])
            assert len(set(idx.tolist())) == 5  # support and query images are distinct
            assert (toy_dataset.labels[idx] == eps.classes[e, n]).all()
    sx, sy, qx, qy = eps.tensors(toy_dataset, slice(0, 4))
    assert sx.shape == (4, 10, 3, 16, 16) and qx.shape == (4, 15, 3, 16, 16)
    assert sy[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert 0.0 <= float(sx.min()) and float(sx.max()) <= 1.0


def test_episode_hash_is_deterministic_and_seed_sensitive(toy_dataset):
    spec = EpisodeSpec(5, 1, 5, 30)
    a, b = sample_episodes(toy_dataset, "val", spec, 1), sample_episodes(toy_dataset, "val", spec, 1)
    c = sample_episodes(toy_dataset, "val", spec, 2)
    assert a.hash == b.hash and torch.equal(a.support, b.support)
    assert a.hash != c.hash


def test_frozen_episodes_are_stored_once_and_reused(toy_dataset, tmp_path):
    spec = EpisodeSpec(5, 1, 5, 12)
    first = frozen_episodes(toy_dataset, "test", spec, 3, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = frozen_episodes(toy_dataset, "test", spec, 3, tmp_path)
    assert again.hash == first.hash and files[0].stat().st_mtime_ns == mtime  # read, not rewritten


def test_tampered_episode_file_is_refused(toy_dataset, tmp_path):
    eps = sample_episodes(toy_dataset, "test", EpisodeSpec(5, 1, 5, 5), 0)
    path = tmp_path / "e.pt"
    save_episodes(path, eps)
    blob = torch.load(path, weights_only=True)
    blob["support"][0, 0, 0] += 1
    torch.save(blob, path)
    with pytest.raises(DatasetError, match="hash"):
        load_episodes(path)


def test_too_few_classes_is_a_clear_error(toy_dataset):
    with pytest.raises(DatasetError, match="needs at least 20"):
        sample_episodes(toy_dataset, "test", EpisodeSpec(20, 1, 1, 1), 0)


def test_episode_spec_validation():
    with pytest.raises(ValueError, match="shots"):
        EpisodeSpec(5, 0, 15, 10)


def test_multidomain_episodes_stay_within_one_domain_and_rotate(toy_dataset):
    from dataclasses import replace

    half = {c: ("a" if c % 2 == 0 else "b") for c in range(30)}
    ds = replace(toy_dataset, domains=half, splits={"train": list(range(10)), "val": list(range(10, 20)), "test": list(range(20, 30))})
    eps = sample_episodes(ds, "test", EpisodeSpec(5, 1, 2, 6), 0)
    doms = [{half[c] for c in eps.classes[e].tolist()} for e in range(6)]
    assert all(len(d) == 1 for d in doms)
    assert [d.pop() for d in doms] == ["a", "b", "a", "b", "a", "b"]


def test_multidomain_zoo_models_draw_classes_inside_one_domain(toy_dataset):
    from dataclasses import replace

    from dfml_bench.zoo import ZooSpec, model_classes

    half = {c: ("a" if c % 2 == 0 else "b") for c in range(30)}
    ds = replace(toy_dataset, domains=half, splits={"train": list(range(12)), "val": list(range(12, 20)), "test": list(range(20, 30))})
    spec = ZooSpec(dataset="toy", n_models=4, ways=5)
    for i in range(4):
        cls = model_classes(spec, ds, i)
        assert {half[c] for c in cls} == {"ab"[i % 2]}
