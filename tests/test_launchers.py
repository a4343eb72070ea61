"""Launchers run a suite's jobs in other processes: the local pool (spawned workers) and submitit's
local executor (the real submitit code path). Records must equal a serial run's; a shared zoo is built
once; a worker killed midway loses nothing and a re-run completes the suite.

Worker processes do not see the in-process registrations of conftest.py; the launchers pass the
modules that made them (``local_plugins()``: conftest.py, and this file for the ``sleepy`` method) as
plugins that every worker imports first.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dfml_bench.jobs import JobContext, plan_suite, read_status, run_job_id
from dfml_bench.launchers import LocalLauncher, SlurmConfig, SubmititLauncher
from dfml_bench.methods import Method, MethodContext
from dfml_bench.registry import register, unregister
from dfml_bench.results import iter_records, read_record
from dfml_bench.scenarios import get_suite

METHODS, SEEDS, EPISODES = ["random", "average"], [0], 4


class Sleepy(Method):
    """Waits until the file ``gate`` exists (at most 120 s), then returns a fresh backbone: a job that
    stays in the middle of its work long enough to be killed there."""

    name = "sleepy"
    gate: str = ""

    def fit(self, context: MethodContext) -> nn.Module:
        t0 = time.time()
        while self.gate and not os.path.exists(self.gate) and time.time() - t0 < 120:
            time.sleep(0.1)
        return context.make_backbone()


if os.environ.get("DFML_TEST_SLEEPY") == "1":  # replayed in worker processes that import this file
    register("dfml_bench.methods", "sleepy", Sleepy)


def _ctx(out: Path, **kw) -> JobContext:
    return JobContext(out=str(out), episodes=EPISODES, isolated_apis=False, **kw)


def _records(out: Path) -> dict:
    """(scenario, method, seed) -> what must be identical across launchers."""
    res = {}
    for p in iter_records(out):
        r = read_record(p)
        res[(r.key.scenario, r.key.method, r.key.seed)] = (r.status, r.per_episode, r.hashes, r.error)
    return res


@pytest.fixture(scope="module")
def serial_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial")
    plan = plan_suite(get_suite("toy"), METHODS, SEEDS)
    states = LocalLauncher(1, progress=False).launch(plan, _ctx(out))
    assert all(s == "done" for s, _ in states.values()), states
    return out


def test_serial_launcher_runs_in_process_and_records_host_and_device(serial_out):
    recs = _records(serial_out)
    assert set(recs) == {(s, m, 0) for s in ("wb", "bb") for m in METHODS}
    assert recs[("bb", "average", 0)][0] == "skipped"
    rec = read_record(iter_records(serial_out)[0])
    assert rec.resources["device"] == "cpu" and rec.resources["host"]
    st = read_status(serial_out, run_job_id(rec.key))
    assert st["state"] == "done" and st["pid"] == os.getpid()  # serial = this process


@pytest.mark.slow  # worker processes each import torch
def test_local_pool_of_two_workers_equals_serial(serial_out, tmp_path):
    plan = plan_suite(get_suite("toy"), METHODS, SEEDS)
    states = LocalLauncher(2, progress=False).launch(plan, _ctx(tmp_path))
    assert all(s == "done" for s, _ in states.values()), states
    assert _records(tmp_path) == _records(serial_out)
    pids = {read_status(tmp_path, j.id)["pid"] for j in plan.run_jobs}
    assert os.getpid() not in pids  # the jobs ran in worker processes
    # a re-run recomputes nothing
    before = {p: p.stat().st_mtime_ns for p in iter_records(tmp_path)}
    LocalLauncher(2, progress=False).launch(plan, _ctx(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in iter_records(tmp_path)} == before


@pytest.mark.slow  # worker processes each import torch
def test_submitit_local_executor_equals_serial(serial_out, tmp_path):
    pytest.importorskip("submitit")
    plan = plan_suite(get_suite("toy"), METHODS, SEEDS)
    launcher = SubmititLauncher(SlurmConfig(cpus_per_job=1, time_min=10), cluster="local")
    states = launcher.launch(plan, _ctx(tmp_path))
    assert all(s == "done" for s, _ in states.values()), states
    assert _records(tmp_path) == _records(serial_out)
    assert set(launcher.submitted) == {j.id for j in plan.jobs}  # zoo job + every run job went through submitit
    st = read_status(tmp_path, plan.run_jobs[0].id)
    assert st["pid"] != os.getpid() and st.get("slurm_job_id")


def _build_zoo_counting(home: str, count_file: str, start_at: float) -> None:
    """In a fresh process: build a new toy zoo, counting the models this process trains."""
    import conftest  # registers toy (tests/ is on the spawned child's sys.path)
    from dfml_bench import zoo as zoo_mod

    os.environ["DFML_BENCH_HOME"] = home
    calls = []
    real = zoo_mod.train_one
    zoo_mod.train_one = lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1]
    spec = zoo_mod.ZooSpec(dataset="toy", n_models=2, ways=5, backbones=(conftest.BackboneSpec("conv4", 8),),
                           recipes=(("*", zoo_mod.TrainRecipe(epochs=1, batch_size=32)),), seed=77)
    while time.time() < start_at:
        time.sleep(0.01)
    z = zoo_mod.build_zoo(spec, conftest.make_toy_dataset(), progress=False)
    Path(count_file).write_text(json.dumps({"trained": calls, "hash": z.hash, "sha": [e.sha256 for e in z.entries]}))


@pytest.mark.slow  # worker processes each import torch
def test_two_processes_needing_the_same_zoo_build_it_once(tmp_path):
    ctx = mp.get_context("spawn")
    home = str(tmp_path / "home")
    start_at = time.time() + 8  # both start building at the same moment (after their imports)
    procs = [ctx.Process(target=_build_zoo_counting, args=(home, str(tmp_path / f"p{i}.json"), start_at)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    a, b = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    assert sorted(a["trained"] + b["trained"]) == [0, 1]  # every model trained exactly once overall
    assert a["hash"] == b["hash"] and a["sha"] == b["sha"]  # both runs got the same, complete zoo


@pytest.fixture
def sleepy(monkeypatch):
    monkeypatch.setenv("DFML_TEST_SLEEPY", "1")
    register("dfml_bench.methods", "sleepy", Sleepy)
    yield
    unregister("dfml_bench.methods", "sleepy")


@pytest.mark.slow  # worker processes each import torch
def test_killed_worker_then_rerun_completes_without_loss_or_duplicates(sleepy, tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    plan = plan_suite(get_suite("toy"), ["sleepy"], [0])
    ctx = _ctx(out, method_params={"sleepy": {"gate": str(gate)}})
    victim = plan_suite(get_suite("toy"), ["sleepy"], [0]).run_jobs[0]  # wb/sleepy
    result = {}
    t = threading.Thread(target=lambda: result.update(LocalLauncher(2, progress=False).launch(plan, ctx)))
    t.start()
    deadline = time.time() + 240
    st = None
    while time.time() < deadline:
        st = read_status(out, victim.id)
        if st and st["state"] == "running" and st["pid"] != os.getpid():
            break
        time.sleep(0.05)
    assert st and st["state"] == "running", st
    time.sleep(0.5)  # well inside fit()
    os.kill(st["pid"], signal.SIGKILL)
    gate.touch()  # the other job may finish now
    t.join(300)
    assert not t.is_alive()
    state, reason = result[victim.id]
    assert state == "failed" and "died" in reason, result[victim.id]
    assert not victim.key.path(out).exists()  # no partial record
    assert not list(out.rglob("*.tmp"))
    other = plan.run_jobs[1]
    assert result[other.id][0] == "done"
    other_mtime = other.key.path(out).stat().st_mtime_ns

    states = LocalLauncher(2, progress=False).launch(plan, ctx)  # the re-run
    assert all(s == "done" for s, _ in states.values()), states
    assert other.key.path(out).stat().st_mtime_ns == other_mtime  # not recomputed
    recs = [read_record(p) for p in iter_records(out)]
    assert sorted((r.key.scenario, r.status) for r in recs) == [("bb", "ok"), ("wb", "ok")]  # nothing lost or doubled
    assert read_status(out, victim.id)["attempts"] == 2


def test_slurm_config_from_toml_and_json_with_flag_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('[slurm]\npartition = "gpu"\ngpus_per_job = 1\ntime_min = 90\nsetup = ["module load cuda"]\n')
    cfg = SlurmConfig.from_file(tmp_path / "c.toml", time_min=30, partition=None)
    assert (cfg.partition, cfg.gpus_per_job, cfg.time_min) == ("gpu", 1, 30)
    p = cfg.executor_parameters()
    assert p["slurm_partition"] == "gpu" and p["gpus_per_node"] == 1 and p["timeout_min"] == 30
    assert p["slurm_setup"] == ["module load cuda"]
    (tmp_path / "c.json").write_text(json.dumps({"cpus_per_job": 4, "account": "lab", "zoo_time_min": 200}))
    cfg = SlurmConfig.from_file(tmp_path / "c.json")
    assert cfg.executor_parameters(zoo=True)["timeout_min"] == 200
    assert cfg.executor_parameters()["slurm_additional_parameters"] == {"account": "lab"}
    (tmp_path / "bad.json").write_text(json.dumps({"gpus": 1}))
    with pytest.raises(ValueError, match="unknown keys \\['gpus'\\]"):
        SlurmConfig.from_file(tmp_path / "bad.json")


def test_cli_run_jobs_then_status(tmp_path):
    from click.testing import CliRunner

    from dfml_bench.cli import main

    out = tmp_path / "res"
    args = ["run", "--suite", "toy", "--methods", "random", "--seeds", "0", "--episodes", "3", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["status", str(out)])
    assert r.exit_code == 0 and "all 3 jobs done" in r.output, r.output
    r = CliRunner().invoke(main, ["run", *args[1:], "--plan"])
    assert "3 done" in r.output


def test_slurm_submission_zoo_first_then_arrays_afterok(tmp_path, monkeypatch):
    """The Slurm code path with a fake ``sbatch`` on PATH: one zoo job, then the run jobs as an array
    whose sbatch script carries ``--dependency=afterok:<zoo job id>`` and the configured resources."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    counter = tmp_path / "count"
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\nn=$(cat %s 2>/dev/null || echo 100)\nn=$((n+1))\necho $n > %s\necho \"$@\" >> %s\n"
        "echo \"Submitted batch job $n\"\n" % (counter, counter, tmp_path / "calls"))
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that srun exists
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "out"
    plan = plan_suite(get_suite("toy"), ["random"], [0, 1])
    cfg = SlurmConfig(partition="gpu", gpus_per_job=1, cpus_per_job=4, time_min=30, account="lab")
    launcher = SubmititLauncher(cfg, cluster="slurm", wait=False)
    states = launcher.launch(plan, _ctx(out))
    zoo_id = launcher.submitted[plan.zoo_jobs[0].id].job_id
    assert zoo_id == "101"
    scripts = sorted((out / ".jobs" / "submitit").glob("*submission.sh"))
    run_script = next(s.read_text() for s in scripts if "--array" in s.read_text())
    assert f"--dependency=afterok:{zoo_id}" in run_script
    assert "--array=0-3" in run_script and "--partition=gpu" in run_script and "--gpus-per-node=1" in run_script
    assert "--cpus-per-task=4" in run_script and "--time=30" in run_script and "--account=lab" in run_script
    zoo_script = next(s.read_text() for s in scripts if "--array" not in s.read_text())
    assert "--dependency" not in zoo_script
    # nothing ran: every job is pending, the run jobs say which Slurm job they are
    assert all(s == "pending" for s, _ in states.values())
    assert "submitted as slurm job 102_0" in states[plan.run_jobs[0].id][1]


def test_pool_order_is_zoos_then_longest_jobs_first_from_records_else_hints(tmp_path):
    """A pool of N workers that starts long jobs first ends near max(longest, total / N); in plan order a
    long method listed last runs alone at the end. Earlier seeds' records beat the suite's hints, and a
    method with neither (a new plugin) starts early."""
    from dfml_bench.jobs import Job
    from dfml_bench.launchers import estimated_seconds, longest_first, zoo_workers_for
    from dfml_bench.results import RunKey

    zoo = Job("zoo/z", "zoo", "s", "cpu", "sc")
    run = {m: Job(f"run/{m}", "run", "s", "cpu", "sc", m, 1, ("zoo/z",)) for m in ("random", "tgr", "free", "mine")}
    hints = {"random": 10.0, "tgr": 100.0, "free": 50.0}
    order = longest_first([run["random"], run["tgr"], zoo, run["free"], run["mine"]], hints, tmp_path)
    assert [j.id for j in order] == ["zoo/z", "run/mine", "run/tgr", "run/free", "run/random"]
    # a scenario-specific hint wins over the method's
    assert estimated_seconds(run["free"], {**hints, "sc/free": 500.0}) == 500.0
    # records of another seed of the same (scenario, method) replace the hint
    p = RunKey("s", "cpu", "sc", "random", 0).path(tmp_path)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"timing": {"total_seconds": 400.0}}))
    (p.parent / "seed-2.json").write_text("{not json")  # a damaged file is only skipped
    assert estimated_seconds(run["random"], hints, tmp_path) == 400.0
    assert [j.id for j in longest_first(list(run.values()), hints, tmp_path)][:3] == ["run/mine", "run/random", "run/tgr"]
    # zoo build processes: the pool's workers when every run waits for the one zoo, else one
    assert zoo_workers_for([zoo, run["tgr"], run["free"]], 2) == 2
    other = Job("run/x", "run", "s", "cpu", "sc2", "random", 0, ("zoo/built",))
    assert zoo_workers_for([zoo, run["tgr"], other], 2) == 1
    assert zoo_workers_for([run["tgr"]], 2) == 1


def test_builtin_suites_hint_every_default_method():
    """Every default method of a built-in cpu suite has a job-time hint, and a budget ladder's largest
    budget is expected to take longest."""
    from dfml_bench.launchers import estimated_seconds
    from dfml_bench.jobs import plan_suite as plan

    for name in ("whitebox-homo", "whitebox-hetero", "blackbox-homo", "blackbox-hetero", "budget-sweep", "blackbox-outputs"):
        suite = get_suite(name, "cpu")
        assert all(m in suite.job_seconds for m in suite.methods), name
    sweep = get_suite("budget-sweep", "cpu")
    est = {j.scenario: estimated_seconds(j, sweep.job_seconds) for j in plan(sweep, ["bidf-mkd"], [0]).run_jobs}
    assert sorted(est, key=est.get) == [sc.name for sc in sweep.scenarios]  # ascending budget = ascending cost
