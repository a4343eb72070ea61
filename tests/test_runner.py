"""End-to-end behaviour of a suite run on the toy suite: records, skips, determinism, resume, CLI errors."""

import json

import pytest
from click.testing import CliRunner

from conftest import toy_suite
from dfml_bench.cli import main
from dfml_bench.results import RunKey, iter_records, read_record
from dfml_bench.runner import RunOptions, run_one, run_suite


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    recs = run_suite(toy_suite(), opts=RunOptions(out=out, progress=False))
    return out, recs


def test_records_are_complete(first_run):
    out, recs = first_run
    assert len(recs) == 6
    by = {(r.key.scenario, r.key.method): r for r in recs}
    assert by[("bb", "average")].status == "skipped" and "whitebox" in by[("bb", "average")].error
    ok = [r for r in recs if r.status == "ok"]
    assert len(ok) == 5, [(r.key, r.error) for r in recs if r.status != "ok"]
    for r in ok:
        assert len(r.per_episode) == 20
        assert r.accuracy["mean"] == pytest.approx(sum(r.per_episode) / 20, abs=1e-6)
        assert set(r.hashes) >= {"dataset", "zoo", "zoo_weights", "test_episodes", "val_episodes"}
        assert r.versions["torch"] and r.resources["device"] == "cpu" and r.timing["fit_seconds"] >= 0
        assert r.seeds["run"] == 0
    assert by[("wb", "oracle")].flags["not_data_free"] is True
    assert by[("wb", "random")].flags["not_data_free"] is False
    # every method of a scenario is scored on the very same episodes
    assert len({r.hashes["test_episodes"] for r in ok if r.key.scenario == "wb"}) == 1
    # and with the very same zoo weights (the files' hash, besides the spec's), recorded for every method
    assert len({(r.hashes["zoo"], r.hashes["zoo_weights"]) for r in ok if r.key.scenario == "wb"}) == 1
    assert len(list(iter_records(out))) == 6


def test_same_seed_gives_identical_per_episode_accuracies(first_run, tmp_path):
    out, recs = first_run
    again = run_suite(toy_suite(), methods=["random", "oracle"], opts=RunOptions(out=tmp_path, progress=False))
    before = {(r.key.scenario, r.key.method): r.per_episode for r in recs}
    for r in again:
        assert r.per_episode == before[(r.key.scenario, r.key.method)]


def test_rerun_resumes_and_retries_failed(first_run, tmp_path):
    out, _ = first_run
    # a finished record is skipped (nothing recomputed)
    assert run_suite(toy_suite(), opts=RunOptions(out=out, progress=False)) == []
    # a failed record is retried
    path = RunKey("toy", "cpu", "wb", "random", 0).path(out)
    blob = json.loads(path.read_text()); blob["status"] = "failed"; path.write_text(json.dumps(blob))
    redone = run_suite(toy_suite(), opts=RunOptions(out=out, progress=False))
    assert [(r.key.scenario, r.key.method, r.status) for r in redone] == [("wb", "random", "ok")]


def test_interrupted_run_leaves_no_partial_record(tmp_path, monkeypatch):
    """Ctrl-C while the fit process runs: no record, and the fit process is gone."""
    import dfml_bench.isolation as iso

    started = []
    real_wait = iso.FitProcess.wait

    def interrupted(self, timeout, quiet=False):
        started.append(self.proc)
        raise KeyboardInterrupt

    monkeypatch.setattr(iso.FitProcess, "wait", interrupted)
    suite = toy_suite()
    with pytest.raises(KeyboardInterrupt):
        run_one(suite, suite.scenarios[0], "random", 0, RunOptions(out=tmp_path, progress=False))
    monkeypatch.setattr(iso.FitProcess, "wait", real_wait)
    assert list(tmp_path.rglob("*.json")) == [] and list(tmp_path.rglob("*.tmp")) == []
    assert started and started[0].poll() is not None  # the fit process was killed and reaped


def test_failing_method_is_recorded_and_suite_goes_on(tmp_path, hostile_site):
    recs = run_suite(toy_suite(), methods=["h_raise", "average"], opts=RunOptions(out=tmp_path, progress=False))
    status = {(r.key.scenario, r.key.method): r.status for r in recs}
    assert status[("wb", "h_raise")] == "failed" and status[("wb", "average")] == "ok"
    failed = read_record(RunKey("toy", "cpu", "wb", "h_raise", 0).path(tmp_path))
    assert "deliberate failure" in failed.error and "RuntimeError" in failed.error
    assert "deliberate failure" in failed.extra["traceback"]  # the fit process's own traceback


def test_cli_unknown_suite_lists_valid_names():
    res = CliRunner().invoke(main, ["run", "--suite", "nope"])
    assert res.exit_code != 0 and "unknown suite 'nope'" in res.output and "smoke" in res.output and "toy" in res.output


def test_cli_unknown_method_lists_valid_names(tmp_path):
    res = CliRunner().invoke(main, ["run", "--suite", "toy", "--methods", "random,nosuch", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "nosuch" in res.output and "oracle" in res.output
    assert list(tmp_path.rglob("*.json")) == []  # refused before any work


def test_cli_bad_scale_and_episodes():
    res = CliRunner().invoke(main, ["run", "--suite", "toy", "--scale", "huge"])
    assert res.exit_code != 0 and "huge" in res.output
    res = CliRunner().invoke(main, ["run", "--suite", "toy", "--episodes", "0"])
    assert res.exit_code != 0


def test_cli_run_and_leaderboard(tmp_path):
    out = tmp_path / "res"
    res = CliRunner().invoke(main, ["run", "--suite", "toy", "--methods", "random", "--episodes", "8", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "random" in res.output
    lb = tmp_path / "lb.md"
    res = CliRunner().invoke(main, ["leaderboard", "--results", str(out), "--out", str(lb)])
    assert res.exit_code == 0 and "random" in lb.read_text()


def test_cli_list():
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0
    for name in ("smoke", "random", "average", "oracle", "glyphs"):
        assert name in res.output


def test_every_method_starts_from_the_same_initialisation(first_run, tmp_path):
    """Common random numbers: FREE with no training epoch returns its initialisation (selection keeps
    epoch 0), which must be random's meta-learner exactly: identical per-episode accuracies."""
    out, recs = first_run
    rnd = next(r for r in recs if r.key.scenario == "wb" and r.key.method == "random")
    suite = toy_suite()
    rec = run_one(suite, suite.scenario("wb"), "free", 0,
                  RunOptions(out=tmp_path, progress=False, method_params={"free": {"epochs": 0, "warmup": 0, "val_episodes": 5}}))
    assert rec.status == "ok", rec.error
    assert rec.extra["best_epoch"] == 0
    assert rec.per_episode == rnd.per_episode
