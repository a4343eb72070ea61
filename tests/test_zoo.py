import json
import shutil

import pytest
import torch

from dfml_bench.backbones import BackboneSpec
from dfml_bench.zoo import TrainRecipe, ZooCorrupted, ZooSpec, build_zoo, load_zoo, zoo_dir

SPEC = ZooSpec(dataset="toy", n_models=2, ways=5, backbones=(BackboneSpec("conv4", 8),),
               recipes=(("*", TrainRecipe(epochs=3, batch_size=32)),), seed=0)


def test_zoo_is_deterministic_and_manifest_complete(toy_dataset, tmp_path):
    a = build_zoo(SPEC, toy_dataset, root=tmp_path / "a", progress=False)
    b = build_zoo(SPEC, toy_dataset, root=tmp_path / "b", progress=False)
    assert [e.sha256 for e in a.entries] == [e.sha256 for e in b.entries]
    m = json.loads((a.path / "manifest.json").read_text())
    e0 = m["models"]["0"]
    for field in ("classes", "arch", "seed", "heldout_acc", "sha256"):
        assert field in e0
    assert set(e0["classes"]) <= set(toy_dataset.splits["train"])  # zoo models only see meta-train classes
    assert 0.0 <= e0["heldout_acc"] <= 1.0


def test_kept_checkpoint_is_the_best_heldout_not_the_last(toy_dataset, built_zoo_root):
    from dfml_bench.zoo import train_one

    state, classes, acc, best_epoch = train_one(SPEC, toy_dataset, 0)
    zoo = build_zoo(SPEC, toy_dataset, root=built_zoo_root, progress=False)
    model = zoo.load_model(0)
    # re-measure the stored model's held-out accuracy: it must equal the recorded best
    g_state = {k: v for k, v in state.items()}
    assert all(torch.equal(g_state[k], v) for k, v in model.state_dict().items())
    assert zoo.entries[0].heldout_acc == pytest.approx(acc)


@pytest.fixture(scope="module")
def built_zoo_root(tmp_path_factory):
    from conftest import make_toy_dataset

    root = tmp_path_factory.mktemp("zoo")
    build_zoo(SPEC, make_toy_dataset(), root=root, progress=False)
    return root


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_corrupted_checkpoint_is_detected_and_rebuilt(toy_dataset, tmp_path, damage, built_zoo_root):
    shutil.copytree(built_zoo_root, tmp_path, dirs_exist_ok=True)
    zoo = build_zoo(SPEC, toy_dataset, root=tmp_path, progress=False)
    good = zoo.entries[1].sha256
    f = zoo.path / zoo.entries[1].file
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "tamper":
        data = bytearray(f.read_bytes()); data[-50] ^= 0xFF; f.write_bytes(bytes(data))
    else:
        f.unlink()
    if damage != "delete":
        with pytest.raises(ZooCorrupted, match="sha256"):
            zoo.load_model(1)
    assert load_zoo(SPEC, toy_dataset, root=tmp_path) is None  # never loaded as-is
    logs = []
    rebuilt = build_zoo(SPEC, toy_dataset, root=tmp_path, progress=False, log=logs.append)
    assert rebuilt.entries[1].sha256 == good  # deterministic: the lost model comes back bit for bit
    assert any("rebuilding" in m for m in logs)
    rebuilt.load_model(1)


def test_zoo_folder_is_named_by_spec_hash(toy_dataset, tmp_path):
    other = ZooSpec(**{**SPEC.__dict__, "seed": 1})
    assert zoo_dir(SPEC, toy_dataset, tmp_path) != zoo_dir(other, toy_dataset, tmp_path)


def test_thread_count_is_part_of_the_zoo_identity(toy_dataset, tmp_path, built_zoo_root):
    """A zoo trained with another thread count has other weights, so it must not be taken for the
    protocol's: it gets its own hash and folder, its manifest records the count, and an entry recorded
    with another count is rebuilt, not loaded. The protocol's count keeps the hash zoos always had."""
    from dfml_bench.threads import PROTOCOL_THREADS, fixed_threads
    from dfml_bench.utils import sha256_json
    from dfml_bench.zoo import ZOO_FORMAT, zoo_hash

    legacy = sha256_json({"format": ZOO_FORMAT, "spec": SPEC.to_dict(), "dataset": toy_dataset.hash})
    assert zoo_hash(SPEC, toy_dataset, PROTOCOL_THREADS) == legacy  # existing caches stay valid
    assert zoo_hash(SPEC, toy_dataset, 2) != legacy
    assert zoo_dir(SPEC, toy_dataset, tmp_path, 2) != zoo_dir(SPEC, toy_dataset, tmp_path, PROTOCOL_THREADS)
    shutil.copytree(built_zoo_root, tmp_path, dirs_exist_ok=True)
    with fixed_threads(1):
        one = build_zoo(SPEC, toy_dataset, root=tmp_path, progress=False)
    assert {e.torch_threads for e in one.entries} == {1}
    assert one.summary()["torch_threads"] == [1] and one.summary()["weights_hash"] == one.weights_hash
    with fixed_threads(2):
        assert load_zoo(SPEC, toy_dataset, root=tmp_path) is None  # the 1-thread zoo is not the 2-thread one
        two = build_zoo(SPEC, toy_dataset, root=tmp_path, progress=False)
    assert load_zoo(SPEC, toy_dataset, root=tmp_path, threads=1).weights_hash == one.weights_hash
    assert two.path != one.path and {e.torch_threads for e in two.entries} == {2}
    assert load_zoo(SPEC, toy_dataset, root=tmp_path, threads=2).weights_hash == two.weights_hash
    # a 2-thread entry copied into the 1-thread zoo's manifest (a hand-made or legacy mix) is rebuilt
    m = json.loads((one.path / "manifest.json").read_text())
    m["models"]["1"]["torch_threads"] = 2
    (one.path / "manifest.json").write_text(json.dumps(m))
    assert load_zoo(SPEC, toy_dataset, root=tmp_path, threads=1) is None
    logs = []
    with fixed_threads(1):
        again = build_zoo(SPEC, toy_dataset, root=tmp_path, progress=False, log=logs.append)
    assert any("trained with 2 torch threads" in x for x in logs)
    assert again.weights_hash == one.weights_hash and {e.torch_threads for e in again.entries} == {1}
    # entries made before the count was recorded load as they are (0: unrecorded)
    for e in m["models"].values():
        e.pop("torch_threads")
    (one.path / "manifest.json").write_text(json.dumps(m))
    legacy_zoo = load_zoo(SPEC, toy_dataset, root=tmp_path, threads=1)
    assert legacy_zoo is not None and {e.torch_threads for e in legacy_zoo.entries} == {0}


def test_spec_validation():
    with pytest.raises(ValueError, match="optimizer"):
        TrainRecipe(optimizer="rmsprop")
    with pytest.raises(ValueError, match="assignment"):
        ZooSpec(assignment="zigzag")


def test_checkpoint_is_stored_in_the_standard_layout(toy_dataset):
    """Training runs channels-last on CPU; the kept state dict is plain contiguous (loads anywhere)."""
    from dfml_bench.zoo import train_one

    state, *_ = train_one(SPEC, toy_dataset, 0)
    conv = [k for k, v in state.items() if v.dim() == 4]
    assert conv and all(state[k].is_contiguous() for k in state)


def test_parallel_build_gives_the_serial_files_in_index_order(toy_dataset, tmp_path, built_zoo_root):
    """Models trained side by side in worker processes (a cold `run --jobs 2` shares the zoo build) are
    bit for bit the serial build's, and the manifest lists them by index whatever order they finished in."""
    spec = ZooSpec(dataset="toy", n_models=3, ways=5, backbones=(BackboneSpec("conv4", 8),),
                   recipes=(("*", TrainRecipe(epochs=3, batch_size=32)),), seed=0)
    serial = build_zoo(spec, toy_dataset, root=tmp_path / "serial", progress=False)
    par = build_zoo(spec, toy_dataset, root=tmp_path / "par", progress=False, workers=2)
    assert [e.sha256 for e in par.entries] == [e.sha256 for e in serial.entries]
    # model i does not depend on the zoo's size: the 2-model zoo's files are the first two here
    assert [e.sha256 for e in load_zoo(SPEC, toy_dataset, root=built_zoo_root).entries] == [e.sha256 for e in par.entries[:2]]
    listed = list(json.loads((par.path / "manifest.json").read_text())["models"])
    assert listed == ["0", "1", "2"]
    with pytest.raises(ValueError, match="workers"):
        build_zoo(spec, toy_dataset, root=tmp_path / "bad", progress=False, workers=0)
