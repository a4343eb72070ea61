"""A zoo's manifest is validated against its schema, against the spec (each model's deterministic class
draw and architecture) and against the checkpoint it describes (issue 14): a manifest of the wrong shape
or an edited entry is corruption, so the model is rebuilt and never used; no reader raises a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dfml_bench.cli import main
from dfml_bench.scenarios import get_suite
from dfml_bench.utils import sha256_file
from dfml_bench.zoo import ZooCorrupted, build_zoo, entry_problem, load_zoo, zoo_dir


@pytest.fixture
def built(tmp_path, toy_dataset):
    spec = get_suite("toy").scenarios[0].zoo
    zoo = build_zoo(spec, toy_dataset, root=tmp_path, progress=False)
    return spec, zoo


def _manifest(zoo):
    return json.loads((zoo.path / "manifest.json").read_text())


def _write(zoo, manifest):
    (zoo.path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("shape", ["list", "no models", "models a list", "entry without sha256", "entry a string",
                                   "file outside the zoo"])
def test_a_manifest_of_the_wrong_shape_is_rebuilt_not_a_traceback(built, tmp_path, toy_dataset, shape):
    spec, zoo = built
    m = _manifest(zoo)
    if shape == "list":
        m = [m]
    elif shape == "no models":
        del m["models"]
    elif shape == "models a list":
        m["models"] = list(m["models"].values())
    elif shape == "entry without sha256":
        del m["models"]["1"]["sha256"]
    elif shape == "entry a string":
        m["models"]["1"] = "model_001.pt"
    elif shape == "file outside the zoo":
        m["models"]["1"]["file"] = "../model_001.pt"
    _write(zoo, m)
    assert load_zoo(spec, toy_dataset, root=tmp_path) is None  # never used as it is
    logs = []
    again = build_zoo(spec, toy_dataset, root=tmp_path, progress=False, log=logs.append)
    assert [e.sha256 for e in again.entries] == [e.sha256 for e in zoo.entries]  # deterministic rebuild: the same zoo
    assert load_zoo(spec, toy_dataset, root=tmp_path) is not None
    assert logs  # the repair is said, not silent


def test_an_edited_classes_list_is_corruption_and_the_model_is_rebuilt(built, tmp_path, toy_dataset):
    spec, zoo = built
    m = _manifest(zoo)
    true_classes = m["models"]["0"]["classes"]
    m["models"]["0"]["classes"] = list(reversed(true_classes))  # same file, same sha256: only the label map differs
    _write(zoo, m)
    assert "trained on classes" in entry_problem(spec, toy_dataset, zoo.path, 0, m["models"]["0"])
    assert load_zoo(spec, toy_dataset, root=tmp_path) is None
    logs = []
    again = build_zoo(spec, toy_dataset, root=tmp_path, progress=False, log=logs.append)
    assert again.entries[0].classes == true_classes
    assert any("zoo model 0" in line and "classes" in line for line in logs)


def test_a_swapped_checkpoint_with_a_matching_sha256_is_caught_by_its_stored_classes(built, tmp_path, toy_dataset):
    spec, zoo = built
    f = zoo.path / zoo.entries[0].file
    state = torch.load(f, weights_only=True)
    state["classes"] = list(reversed(state["classes"]))  # a checkpoint trained on other classes
    torch.save(state, f)
    m = _manifest(zoo)
    m["models"]["0"]["sha256"] = sha256_file(f)  # someone "fixed" the hash too
    _write(zoo, m)
    assert "was trained as classes" in entry_problem(spec, toy_dataset, zoo.path, 0, m["models"]["0"])
    assert load_zoo(spec, toy_dataset, root=tmp_path) is None
    zoo.entries[0].sha256 = m["models"]["0"]["sha256"]
    with pytest.raises(ZooCorrupted, match="trained as classes"):
        zoo.load_model(0)  # a Zoo object made before the edit refuses it too
    again = build_zoo(spec, toy_dataset, root=tmp_path, progress=False)
    assert torch.load(again.path / again.entries[0].file, weights_only=True)["classes"] == again.entries[0].classes


def test_zoo_show_and_build_on_a_broken_manifest_are_not_tracebacks(toy_dataset):
    from dfml_bench.threads import PROTOCOL_THREADS, fixed_threads

    spec = get_suite("toy").scenarios[0].zoo
    with fixed_threads(PROTOCOL_THREADS):  # the zoo the CLI shows and builds: the protocol's thread count
        build_zoo(spec, toy_dataset, progress=False)  # in the session's DFML_BENCH_HOME, where the CLI looks
    path = zoo_dir(spec, toy_dataset, threads=PROTOCOL_THREADS)
    good = (path / "manifest.json").read_text()
    try:
        (path / "manifest.json").write_text(json.dumps({"hash": json.loads(good)["hash"]}))  # no "models"
        res = CliRunner().invoke(main, ["zoo", "show", "--suite", "toy"])
        assert res.exit_code == 0 and res.exception is None, res.output
        assert "not built (or incomplete)" in res.output
        res = CliRunner().invoke(main, ["zoo", "build", "--suite", "toy"])
        assert res.exit_code == 0 and res.exception is None, res.output
        res = CliRunner().invoke(main, ["zoo", "show", "--suite", "toy"])
        assert "held-out acc" in res.output
    finally:
        if not load_zoo(spec, toy_dataset):
            (path / "manifest.json").write_text(good)
