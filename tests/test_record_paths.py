"""One validation path for every reader of result records (issue 14): a record the leaderboard would
reject is rejected by ``status``, ``compare``, ``report`` and resume with the same reason, and resume
re-runs it (keeping the rejected file beside the new one, never deleting it)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dfml_bench.cli import main
from dfml_bench.jobs import JobContext, job_state, plan_suite, plan_states
from dfml_bench.launchers import LocalLauncher
from dfml_bench.results import RunKey, is_finished, iter_records, read_record
from dfml_bench.scenarios import get_suite
from dfml_bench.validate import InvalidRecord, check_record, load_records

METHODS, SEEDS = ["random"], [0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished toy run (random, seed 0, 4 episodes) to tamper with."""
    out = tmp_path_factory.mktemp("finished")
    plan = plan_suite(get_suite("toy"), METHODS, SEEDS)
    states = LocalLauncher(1, progress=False).launch(plan, JobContext(out=str(out), episodes=4, isolated_apis=False))
    assert all(s == "done" for s, _ in states.values()), states
    return out


def _copy(src, dst):
    for p in src.rglob("*"):
        if p.is_file():
            q = dst / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            q.write_bytes(p.read_bytes())
    return dst


def _edit(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if "." in k:
            a, b = k.split(".")
            d[a][b] = v
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def test_a_record_with_an_edited_mean_is_rejected_everywhere_and_rerun(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    key = RunKey("toy", "cpu", "wb", "random", 0)
    path = key.path(out)
    honest = read_record(path)
    _edit(path, **{"accuracy.mean": 0.99})  # better than it was

    rs = load_records(out)
    [rejected] = rs.invalid
    reason = rejected.reason
    assert "summary mean" in reason
    chk = check_record(out, key)
    assert chk.state == "invalid" and chk.reason == reason  # the same words for every reader
    with pytest.raises(InvalidRecord, match="summary mean"):
        read_record(path)
    assert not is_finished(out, key)  # resume does not skip it

    plan = plan_suite(get_suite("toy"), METHODS, SEEDS)
    job = next(j for j in plan.run_jobs if j.scenario == "wb")
    state, why = job_state(out, job)
    assert state == "failed" and reason in why and "re-run" in why  # status: not done
    res = CliRunner().invoke(main, ["status", str(out)])
    assert res.exit_code == 0 and "failed" in res.output and "summary mean" in res.output, res.output

    states = LocalLauncher(1, progress=False).launch(plan, JobContext(out=str(out), episodes=4, isolated_apis=False))
    assert states[job.id][0] == "done"  # resume re-ran it
    rerun = read_record(path)
    assert rerun.per_episode == honest.per_episode and rerun.accuracy["mean"] == honest.accuracy["mean"]
    kept = list(path.parent.glob("seed-0.json.rejected-*"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["accuracy"]["mean"] == 0.99  # nothing lost
    assert [p.name for p in iter_records(path.parent)] == ["seed-0.json"]  # and it is not read as a record
    assert not load_records(out).invalid


@pytest.mark.parametrize("edit, needle", [
    ({"per_episode": [1.5, 1.5, 1.5, 1.5], "accuracy.mean": 1.5}, "[0, 1]"),
    ({"hashes": {}}, "missing hashes"),
    ({"seed": 7}, "belongs at"),
])
def test_status_and_resume_follow_the_leaderboard(finished, tmp_path, edit, needle):
    out = _copy(finished, tmp_path / "run")
    key = RunKey("toy", "cpu", "wb", "random", 0)
    _edit(key.path(out), **edit)
    [rejected] = load_records(out).invalid
    assert needle in rejected.reason
    assert check_record(out, key).reason == rejected.reason
    plan = plan_suite(get_suite("toy"), METHODS, SEEDS)
    states = plan_states(out, plan)
    job = next(j for j in plan.run_jobs if j.scenario == "wb")
    assert states[job.id][0] == "failed" and needle in states[job.id][1]
    assert not is_finished(out, key)


def test_report_lists_the_rejected_record_with_its_reason(finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    _edit(RunKey("toy", "cpu", "wb", "random", 0).path(out), **{"accuracy.mean": 0.99})
    res = CliRunner().invoke(main, ["report", str(out), "--no-plots", "--bootstrap", "100", "--format", "markdown"])
    assert res.exit_code == 0, res.output
    assert "summary mean" in res.output
