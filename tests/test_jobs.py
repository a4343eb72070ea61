"""Planning a suite as jobs, job state on disk, plugins for worker processes, write-once episodes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfml_bench import episodes as episodes_mod
from dfml_bench.cli import main
from dfml_bench.episodes import EpisodeSpec, frozen_episodes
from dfml_bench.jobs import (Job, JobContext, Plan, format_plan, import_plugins, load_plans, local_plugins, plan_states,
                             plan_suite, read_status, run_status, save_plan, status_path, write_status)
from dfml_bench.registry import _LOCAL
from dfml_bench.results import ResultRecord, write_record
from dfml_bench.scenarios import get_suite


@pytest.fixture
def plan() -> Plan:
    return plan_suite(get_suite("toy"), ["random", "average"], [0, 1])


def test_plan_has_one_zoo_job_per_distinct_zoo_and_one_run_job_per_triple(plan):
    # toy's two scenarios share one zoo spec: one zoo job; 2 scenarios x 2 methods x 2 seeds run jobs
    assert len(plan.zoo_jobs) == 1 and len(plan.run_jobs) == 8
    zid = plan.zoo_jobs[0].id
    assert all(j.deps == (zid,) for j in plan.run_jobs)
    assert len({j.id for j in plan.jobs}) == len(plan.jobs)
    assert plan.jobs[0].kind == "zoo"  # zoo jobs come first
    assert {(j.scenario, j.method, j.seed) for j in plan.run_jobs} == {
        (s, m, seed) for s in ("wb", "bb") for m in ("random", "average") for seed in (0, 1)}
    assert Plan.from_dict(plan.to_dict()) == plan


def test_distinct_zoo_specs_get_distinct_zoo_jobs():
    from dataclasses import replace

    suite = get_suite("toy")
    other = replace(suite.scenarios[1], zoo=replace(suite.scenarios[1].zoo, seed=5))
    suite.scenarios = [suite.scenarios[0], other]
    p = plan_suite(suite, ["random"], [0])
    assert len(p.zoo_jobs) == 2
    assert p.run_jobs[0].deps != p.run_jobs[1].deps


def test_states_follow_records_and_status_files(tmp_path, plan):
    out = tmp_path / "run"
    states = plan_states(out, plan)
    assert all(s == "pending" for s, _ in states.values())
    first = plan.run_jobs[0]
    assert states[first.id][1].startswith("waiting for zoo/")

    zoo = plan.zoo_jobs[0]
    write_status(out, zoo, "done")
    write_record(out, ResultRecord(key=first.key, status="ok", per_episode=[0.4, 0.6], accuracy={"mean": 0.5, "n": 2},
                                   hashes={"dataset": "d", "zoo": "z", "test_episodes": "e"}, config={"scenario": {}},
                                   resources={"host": "h", "device": "cpu"}))
    second, third, fourth = plan.run_jobs[1:4]
    write_record(out, ResultRecord(key=second.key, status="failed", error="ValueError: boom"))
    write_status(out, third, "running", pid=2**22 + 12345)  # a pid that does not exist on this host
    write_status(out, fourth, "running")  # this process: alive
    states = plan_states(out, plan)
    assert states[zoo.id][0] == "done"
    assert states[first.id] == ("done", "mean acc 0.5000 on h (cpu)")
    assert states[second.id] == ("failed", "ValueError: boom")
    assert states[third.id][0] == "failed" and "died" in states[third.id][1]
    assert states[fourth.id][0] == "running" and str(os.getpid()) in states[fourth.id][1]
    assert states[plan.run_jobs[4].id] == ("pending", "not started")

    assert read_status(out, fourth.id)["attempts"] == 1
    write_status(out, fourth, "running")
    assert read_status(out, fourth.id)["attempts"] == 2  # a retry counts
    assert not list(status_path(out, zoo.id).parent.glob("*.tmp"))

    text = format_plan(plan, states)
    assert "1 failed" not in text and "2 failed" in text and "1 running" in text
    assert first.id not in format_plan(plan, states, hide_done=True)


def test_failed_zoo_blocks_its_run_jobs(tmp_path, plan):
    write_status(tmp_path, plan.zoo_jobs[0], "failed", error="RuntimeError: disk full")
    states = plan_states(tmp_path, plan)
    assert states[plan.zoo_jobs[0].id] == ("failed", "RuntimeError: disk full")
    assert states[plan.run_jobs[0].id] == ("pending", f"blocked: dependency failed: {plan.zoo_jobs[0].id}")


def test_run_status_reads_saved_plans(tmp_path, plan):
    with pytest.raises(FileNotFoundError, match="no job plan"):
        run_status(tmp_path)
    save_plan(tmp_path, plan)
    assert load_plans(tmp_path) == [plan]
    [(p, states)] = run_status(tmp_path)
    assert len(states) == len(plan.jobs)


def test_local_plugins_name_the_conftest_that_registered_toy():
    plugins = local_plugins()
    conftest_file = str(Path(__file__).with_name("conftest.py"))
    assert conftest_file in plugins
    import_plugins(plugins)  # already imported here: a no-op, toy stays registered once
    assert "toy" in _LOCAL["dfml_bench.suites"]


def test_import_plugins_replays_registrations_in_a_fresh_process(tmp_path):
    plugin = tmp_path / "myplug.py"
    plugin.write_text("from dfml_bench.registry import register\nregister('dfml_bench.suites', 'plugged', lambda: {})\n")
    code = ("from dfml_bench.jobs import import_plugins; from dfml_bench.registry import _LOCAL; "
            f"import_plugins([{str(plugin)!r}]); print(sorted(_LOCAL['dfml_bench.suites']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "plugged" in out
    with pytest.raises(ImportError, match="plugin 'no_such_module_xyz' failed to import"):
        import_plugins(["no_such_module_xyz"])


def test_frozen_episodes_are_written_once_under_concurrency(tmp_path, toy_dataset, monkeypatch):
    saves = []
    real_write = episodes_mod._write_once
    monkeypatch.setattr(episodes_mod, "_write_once", lambda p, e: real_write(p, e) and not saves.append(p))
    spec = EpisodeSpec(5, 1, 3, 7)
    results, barrier = [], threading.Barrier(4)

    def worker():
        barrier.wait()
        results.append(frozen_episodes(toy_dataset, "test", spec, 123, tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(saves) == 1  # one file published; the others lost the race and read it
    assert len({r.hash for r in results}) == 1
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".pt"]
    mtime = path.stat().st_mtime_ns
    assert frozen_episodes(toy_dataset, "test", spec, 123, tmp_path).hash == results[0].hash
    assert path.stat().st_mtime_ns == mtime and len(saves) == 1  # later calls only read


def test_cli_plan_prints_jobs_and_runs_nothing(tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["run", "--suite", "toy", "--methods", "random", "--seeds", "0,1", "--out", str(out), "--plan"])
    assert r.exit_code == 0, r.output
    assert "5 jobs" in r.output and "run/toy-cpu/bb/random/seed-1" in r.output
    assert sum(1 for line in r.output.splitlines() if line.startswith("run/") and " pending " in line) == 4
    assert "zoo/toy-" in r.output  # the zoo job, done or not depending on the session's cache
    assert not out.exists() or not any(out.rglob("seed-*.json"))


def test_cli_plan_restricted_to_scenarios_keeps_their_jobs_only(tmp_path):
    # the restriction keeps the chosen scenario's jobs (by tail or full name) and leaves the others out
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["run", "--suite", "toy", "--methods", "random", "--seeds", "0", "--scenarios", "bb",
                                  "--out", str(out), "--plan"])
    assert r.exit_code == 0, r.output
    runs = [line.split()[0] for line in r.output.splitlines() if line.startswith("run/")]
    assert runs == ["run/toy-cpu/bb/random/seed-0"]


def test_restrict_names_the_scenarios_when_a_name_matches_none_or_several():
    suite = get_suite("budget-sweep")
    assert [s.name for s in suite.restrict(["q1M", "q30k"]).scenarios] == \
        [s.name for s in suite.scenarios if s.name.endswith(("-q30k", "-q1M"))]  # the suite's order
    assert suite.restrict(None) is suite
    only = suite.restrict(["q300k"]).scenarios[0]
    assert only == suite.scenario(only.name) and only.init_key == suite.scenario(only.name).init_key
    with pytest.raises(ValueError, match="matches none.*q30k"):
        suite.restrict(["q2M"])
    twins = replace(suite, scenarios=[replace(sc, name=f"{p}-q30k") for p, sc in zip("ab", suite.scenarios)])
    with pytest.raises(ValueError, match=r"matches 2 \(a-q30k, b-q30k\)"):
        twins.restrict(["q30k"])
    assert [s.name for s in twins.restrict(["b-q30k"]).scenarios] == ["b-q30k"]  # a full name is never ambiguous
    with pytest.raises(ValueError, match="twice"):
        suite.restrict(["q30k", suite.scenarios[0].name])


def test_cli_status_needs_a_plan(tmp_path):
    r = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert r.exit_code != 0 and "no job plan" in r.output


def test_job_key_only_for_run_jobs():
    with pytest.raises(ValueError, match="zoo job"):
        Job("zoo/x", "zoo", "toy", "cpu", "wb").key
    assert JobContext(out="x").plugins == ()
