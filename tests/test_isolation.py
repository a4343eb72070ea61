"""Untrusted methods (issue 13): fit runs in its own process with only what its track allows, only a
checked state_dict comes back, and every attack of a hostile plugin author is refused or harmless.

The hostile methods are in ``hostile_plugins.py``, installed through an entry point (``hostile_site``).
When the tests run as root (as CI and this machine do) the fit process runs as a dedicated
unprivileged uid, and the privilege-separation assertions are made for real."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

import pytest
import torch

from conftest import make_toy_dataset, toy_suite
from dfml_bench.isolation import UID_BASE, _pids_of, is_root
from dfml_bench.results import RunKey
from dfml_bench.runner import RunOptions, run_one, run_suite
from dfml_bench.scenarios import Suite
from dfml_bench.zoo import build_zoo

ROOT = is_root()


def _suite(name: str, methods: list[str]) -> Suite:
    base = toy_suite()
    return dataclasses.replace(base, name=name, methods=methods)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """The toy suite's honest methods, isolated (the default) and in process (isolate=False, the
    pre-isolation path): both sets of records."""
    out = tmp_path_factory.mktemp("honest")
    iso = run_suite(toy_suite(), opts=RunOptions(out=out / "iso", progress=False))
    inproc = run_suite(toy_suite(), opts=RunOptions(out=out / "inproc", progress=False, isolate=False))
    return {(r.key.scenario, r.key.method): r for r in iso}, {(r.key.scenario, r.key.method): r for r in inproc}


@pytest.fixture(scope="module")
def hostile(hostile_site, tmp_path_factory, honest):
    out = tmp_path_factory.mktemp("hostile")
    marker = tempfile.mkdtemp(prefix="dfml-markers-")
    os.chmod(marker, 0o777)  # the fit user may leave its markers here: the test wants to see them
    zoo = build_zoo(toy_suite().scenarios[1].zoo, make_toy_dataset(), progress=False)
    params = {"h_frames": {"marker_dir": marker}, "h_patch": {"out": str(out)}, "h_snoop": {"home": os.environ["DFML_BENCH_HOME"]},
              "h_thief": {"zoo_dir": str(zoo.path)}}
    t0 = time.perf_counter()
    recs = run_suite(_suite("toy-hostile", ["h_frames", "h_patch", "h_snoop", "h_nan", "h_arch", "h_thief", "random"]),
                     opts=RunOptions(out=out, progress=False, method_params=params, fit_timeout=300))
    wall = time.perf_counter() - t0
    return {(r.key.scenario, r.key.method): r for r in recs}, out, marker, wall


def test_honest_records_identical_isolated_and_in_process(honest):
    iso, inproc = honest
    assert set(iso) == set(inproc)
    for k, r in iso.items():
        assert r.status == inproc[k].status, (k, r.error, inproc[k].error)
        if r.status == "ok":
            assert r.per_episode == inproc[k].per_episode, k  # same per-episode accuracies as before the split
            assert r.flags["isolated"] is True and inproc[k].flags["isolated"] is False
            assert r.resources["isolation"]["process"] == "separate"
            assert r.resources["isolation"]["privilege_separation"] is ROOT
    assert iso[("bb", "average")].status == "skipped"


def test_methods_own_forward_never_runs_in_the_harness(hostile, honest):
    recs, out, marker, _ = hostile
    r = recs[("wb", "h_frames")]
    assert r.status == "ok", r.error
    assert r.config["method"]["class"] == "hostile_plugins.FrameReader"
    assert r.per_episode == honest[0][("wb", "random")].per_episode  # its weights are the initialisation: random's score
    assert not os.listdir(marker)  # its forward never ran anywhere the harness evaluates


def test_patching_the_harness_from_fit_changes_nothing(hostile, honest):
    recs, out, _, _ = hostile
    r = recs[("wb", "h_patch")]
    assert r.status == "ok", r.error
    assert r.extra["patched"] is True  # it did patch... its own process
    assert r.per_episode == honest[0][("wb", "random")].per_episode
    assert not RunKey("toy-hostile", "cpu", "wb", "ghost", 0).path(out).exists()
    assert not (out / "toy-cpu").exists()  # no record for a method that never ran
    if ROOT:
        assert r.extra["write_ghost"][0] == "PermissionError" and r.extra["list_out"][0] == "PermissionError"


def test_fit_is_given_meta_val_only_and_no_cache(hostile):
    recs, _, _, _ = hostile
    r = recs[("wb", "h_snoop")]
    assert r.status == "ok", r.error
    ds = make_toy_dataset()
    val = set(ds.splits["val"])
    rep = r.extra
    assert set(rep["labels"]) == val and rep["splits"]["test"] == [] and rep["splits"]["train"] == []
    assert rep["n_images"] == sum(int((ds.labels == c).sum()) for c in val)
    assert set(rep["val_episode_classes"]) <= val and set(rep["named_classes"]) == val
    assert rep["real_meta_train"][0] == "AccessError"  # only a not_data_free method gets meta-train
    assert rep["whitebox_models"] == 3
    assert rep["own_home"] != os.environ["DFML_BENCH_HOME"]
    if ROOT:
        assert rep["uid"] >= UID_BASE
        assert rep["home_listing"][0] == "PermissionError" and rep["home_episodes"][0] == "PermissionError"


def test_blackbox_thief_gets_nothing_and_the_count_holds(hostile):
    recs, _, _, _ = hostile
    r = recs[("bb", "h_thief")]
    assert r.status == "ok", r.error
    rep = r.extra
    assert rep["zoo_objects"] == 0 and rep["test_datasets"] == 0
    assert rep["huge_query"][0] == "QueryError" and "maximum of 4096" in rep["huge_query"][1]
    assert rep["raw_flood"][0] == "QueryError" and "exceeds the limit" in rep["raw_flood"][1]
    assert rep["after_flood"] == ["ok", "(3, 5)"]  # the server survived both
    # it zeroed every counter it could reach: the record holds the server's exact counts anyway
    assert r.queries["per_api"] == [37, 3, 0] and r.queries["total"] == 40
    if ROOT:
        assert rep["zoo_files"][0] == "PermissionError" and rep["zoo_load"][0] in ("PermissionError", "FileNotFoundError")
        assert rep["proc_mem_readable"] == []


def test_bad_weights_and_wrong_architecture_fail_with_the_reason(hostile):
    recs, _, _, wall = hostile
    nan = recs[("wb", "h_nan")]
    assert nan.status == "failed" and "non-finite weights" in nan.error and nan.per_episode == []
    arch = recs[("wb", "h_arch")]
    assert arch.status == "failed" and "not the scenario's backbone" in arch.error
    assert recs[("bb", "random")].status == "ok"
    assert wall < 300


def test_hanging_fit_is_killed_at_the_time_limit_with_its_daemons(hostile_site, tmp_path):
    suite = _suite("toy-sleep", ["h_sleep"])
    t0 = time.perf_counter()
    r = run_one(suite, suite.scenario("wb"), "h_sleep", 0, RunOptions(out=tmp_path, progress=False, fit_timeout=6))
    assert r.status == "failed" and "time limit of 6 s" in r.error, r.error
    assert time.perf_counter() - t0 < 90
    if ROOT:
        uid = r.resources["isolation"]["user"].removeprefix("dfml-fit-")
        assert _pids_of(int(uid)) == []  # the detached grandchild was killed too


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="needs RLIMIT_AS")
def test_memory_limit_fails_the_run_not_the_machine(hostile_site, tmp_path):
    suite = _suite("toy-hog", ["h_hog"])
    r = run_one(suite, suite.scenario("wb"), "h_hog", 0, RunOptions(out=tmp_path, progress=False, fit_memory_gb=2.5))
    assert r.status == "failed", r.error
    assert any(s in r.error for s in ("MemoryError", "allocate", "memory")), r.error
    assert r.resources["isolation"]["memory_limit_bytes"] == int(2.5 * 2**30)


@pytest.mark.skipif(not ROOT, reason="only root can drop privileges")
def test_same_user_mode_is_said_in_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("DFML_BENCH_FIT_USER", "same")
    suite = toy_suite()
    r = run_one(suite, suite.scenario("wb"), "random", 0, RunOptions(out=tmp_path, progress=False))
    assert r.status == "ok" and r.resources["isolation"]["privilege_separation"] is False
    assert r.resources["isolation"]["user"] == "same as harness"


def test_weights_file_is_checked_before_loading(tmp_path):
    from dfml_bench.backbones import BackboneSpec, build_backbone
    from dfml_bench.isolation import FitFailed, load_state

    ref = build_backbone(BackboneSpec("conv4", 8), 5, (3, 16, 16))
    good = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.save(good, tmp_path / "ok.pt")
    assert set(load_state(tmp_path / "ok.pt", ref, "m")) == set(good)
    bad = dict(good)
    k = next(iter(bad))
    bad[k] = bad[k].double()
    torch.save(bad, tmp_path / "dtype.pt")
    with pytest.raises(FitFailed, match="not the scenario's backbone"):
        load_state(tmp_path / "dtype.pt", ref, "m")
    (tmp_path / "code.pt").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a pickle that runs code
    with pytest.raises(FitFailed, match="cannot be read as tensors"):
        load_state(tmp_path / "code.pt", ref, "m")
    os.symlink("/etc/passwd", tmp_path / "link.pt")
    with pytest.raises(FitFailed, match="links are refused"):
        load_state(tmp_path / "link.pt", ref, "m")
    (tmp_path / "big.pt").write_bytes(b"\0" * (10 << 20))
    with pytest.raises(FitFailed, match="over the limit"):
        load_state(tmp_path / "big.pt", ref, "m")


# ------------------------------------------------------------------------ records the harness can vouch for


def _record_dict(honest, scenario="wb", method="random") -> dict:
    return json.loads(json.dumps(honest[0][(scenario, method)].to_dict()))


def test_recomputation_checks_reject_forged_records(honest):
    from dfml_bench.validate import episode_problems, record_problems

    assert record_problems(_record_dict(honest, "bb", "random")) == []
    assert record_problems(_record_dict(honest, "wb", "oracle")) == []

    d = _record_dict(honest, "bb", "random")
    d["queries"]["per_api"] = [5, 0, 0]  # total says 0
    assert any("sums to 5" in p for p in record_problems(d))
    d = _record_dict(honest, "bb", "random")
    d["queries"].update(total_budget=10**9)  # a larger budget than the scenario's
    assert any("scenario's budget_total" in p for p in record_problems(d))
    d = _record_dict(honest, "wb", "random")
    d["per_episode"][0] = 0.37  # 5-way, 5 queries: accuracies are multiples of 1/25
    d["accuracy"]["mean"] = sum(d["per_episode"]) / len(d["per_episode"])
    assert any("impossible for episodes of 25 query images" in p for p in record_problems(d))
    d = _record_dict(honest, "wb", "random")
    d["per_episode"] = d["per_episode"][:-1]
    d["accuracy"].update(n=len(d["per_episode"]), mean=sum(d["per_episode"]) / len(d["per_episode"]))
    assert any("asks for 20 test episodes" in p for p in record_problems(d))
    d = _record_dict(honest, "wb", "oracle")
    d["flags"]["not_data_free"] = False  # the oracle passing as data-free
    assert any("registered method 'oracle' says True" in p for p in record_problems(d))

    assert episode_problems(_record_dict(honest, "wb", "random")) == []
    d = _record_dict(honest, "wb", "random")
    d["hashes"]["test_episodes"] = "0" * 64
    assert any("not the canonical" in p for p in episode_problems(d))


def test_verify_reproduces_a_record_and_the_leaderboard_marks_it(honest, tmp_path):
    from click.testing import CliRunner

    from dfml_bench.cli import main
    from dfml_bench.results import write_record
    from dfml_bench.verify import LEDGER, is_verified

    root = tmp_path / "results"
    rec = honest[0][("wb", "random")]
    path = write_record(root, rec)
    write_record(root, honest[0][("wb", "oracle")])
    res = CliRunner().invoke(main, ["verify", str(path)])
    assert res.exit_code == 0, res.output
    assert "REPRODUCED toy-cpu/wb/random/seed-0: all 20 per-episode accuracies equal" in res.output
    assert is_verified(root, rec.key) and (root / LEDGER).exists()
    lb = tmp_path / "lb.md"
    res = CliRunner().invoke(main, ["leaderboard", "--results", str(root), "--out", str(lb), "--bootstrap", "200"])
    assert res.exit_code == 0, res.output
    section = lb.read_text().split("## Re-run verification")[1]
    rows = {ln.split("|")[3].strip(): ln for ln in section.splitlines() if ln.startswith("| toy")}
    assert "re-run verified" in rows["random"] and "submitted" in rows["oracle"]

    # a forged record (one episode better, summary made consistent) is not reproduced, and the edit un-verifies it
    d = json.loads(path.read_text())
    i = d["per_episode"].index(min(d["per_episode"]))
    d["per_episode"][i] = round(d["per_episode"][i] + 0.04, 6)
    d["accuracy"]["mean"] = sum(d["per_episode"]) / len(d["per_episode"])
    path.write_text(json.dumps(d))
    assert not is_verified(root, rec.key)
    res = CliRunner().invoke(main, ["verify", str(path)])
    assert res.exit_code == 1 and "NOT REPRODUCED" in res.output and "19/20 episodes equal" in res.output

    # a record whose zoo weights are not the ones a re-run gets is not reproduced either, with the reason
    d = json.loads(path.read_text())
    d["per_episode"][i] = round(d["per_episode"][i] - 0.04, 6)
    d["accuracy"]["mean"] = sum(d["per_episode"]) / len(d["per_episode"])
    assert d["hashes"]["zoo_weights"] != "0" * 64
    d["hashes"]["zoo_weights"] = "0" * 64
    path.write_text(json.dumps(d))
    res = CliRunner().invoke(main, ["verify", str(path)])
    assert res.exit_code == 1 and "NOT REPRODUCED" in res.output and "other weights" in res.output, res.output


def test_artifacts_are_copied_only_as_png_files_never_through_links(tmp_path):
    from dfml_bench.isolation import copy_artifacts, make_scratch, remove_scratch

    scratch = make_scratch(None)
    try:
        (scratch / "artifacts" / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 10)
        (scratch / "artifacts" / "fake.png").write_bytes(b"not an image")
        os.symlink("/etc/passwd", scratch / "artifacts" / "link.png")
        dest = tmp_path / "rec"
        dest.mkdir()
        got = copy_artifacts(scratch, {"grid": True, "fake": True, "link": True, "../../x": True}, dest, "seed-0")
        assert got["grid"] == "seed-0-grid.png" and (dest / "seed-0-grid.png").read_bytes().startswith(b"\x89PNG")
        assert got["fake"].startswith("error: not a PNG") and "links are refused" in got["link"]
        assert sorted(p.name for p in dest.iterdir()) == ["seed-0-grid.png"]  # "../../x" reduced to "x": absent
        # the whole artifacts folder replaced by a link: nothing is read through it
        os.rename(scratch / "artifacts", scratch / "moved")
        os.symlink(scratch / "moved", scratch / "artifacts")
        assert all("replaced" in v for v in copy_artifacts(scratch, {"grid": True}, dest, "seed-1").values())
    finally:
        remove_scratch(scratch)
    assert not scratch.parent.exists()
