"""Two runs into one folder and the same run through different launchers (issue 14).

* A job is claimed once (an exclusive lock per job under ``.jobs/``): a second run that meets a job
  another run is working on leaves it to that run, does the others, then waits for it and uses its
  record; it never runs it a second time.
* The torch thread count of a job is part of the protocol, fixed whatever the launcher: serial runs,
  ``--jobs N`` workers and submitit jobs give identical per-episode accuracies and record the same count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfml_bench.cli import main
from dfml_bench.jobs import JobClaim, JobContext, claimed_elsewhere, job_state, plan_suite
from dfml_bench.launchers import LocalLauncher, SlurmConfig, SubmititLauncher
from dfml_bench.results import iter_records, read_record
from dfml_bench.scenarios import get_suite
from dfml_bench.threads import PROTOCOL_THREADS, fixed_threads

TESTS = Path(__file__).resolve().parent

HOLDER = """
import os, sys, time
from dfml_bench.jobs import JobClaim
out, job_id, ready, gate, src, dst = sys.argv[1:]
claim = JobClaim(out, job_id)
assert claim.acquire(wait=False)
open(ready, "w").close()
while not os.path.exists(gate):
    time.sleep(0.05)
if src != "-":
    tmp = dst + ".tmp"
    with open(src, "rb") as f, open(tmp, "wb") as g:
        g.write(f.read())
    os.replace(tmp, dst)
claim.release()
"""


def _hold(out, job_id, tmp_path, src="-", dst="-"):
    """Another process that holds ``job_id``'s claim until ``gate`` exists, then (optionally) writes a record."""
    ready, gate = tmp_path / "ready", tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), job_id, str(ready), str(gate), str(src), str(dst)])
    t0 = time.time()
    while not ready.exists():
        assert proc.poll() is None and time.time() - t0 < 120, "the holder process did not start"
        time.sleep(0.05)
    return proc, gate


def _ctx(out, **kw):
    return JobContext(out=str(out), episodes=4, isolated_apis=False, **kw)


def test_a_job_claimed_by_another_run_is_waited_for_not_run_twice(tmp_path):
    plan = plan_suite(get_suite("toy"), ["random"], [0])
    victim = next(j for j in plan.run_jobs if j.scenario == "wb")
    # the other run's record of the victim, with a mark that this run cannot produce
    other_out = tmp_path / "other"
    LocalLauncher(1, progress=False).launch(plan, _ctx(other_out))
    src = victim.key.path(other_out)
    marked = src.read_text().replace('"extra": {}', '"extra": {"written_by": "the other run"}')
    assert "the other run" in marked
    src.write_text(marked)

    out = tmp_path / "out"
    dst = victim.key.path(out)
    dst.parent.mkdir(parents=True)
    proc, gate = _hold(out, victim.id, tmp_path, src, dst)
    try:
        assert claimed_elsewhere(out, victim.id) and f"pid {proc.pid}" in claimed_elsewhere(out, victim.id)
        logs: list[str] = []

        def log(m: str) -> None:
            logs.append(m)
            if "waiting for it" in m:
                gate.touch()  # the other run finishes while this one waits

        states = LocalLauncher(1, progress=False, log=log).launch(plan, _ctx(out))
    finally:
        gate.touch()
        proc.wait(60)
    assert any("being run by another dfml-bench process" in m and victim.id in m for m in logs), logs
    assert any("not run again" in m for m in logs), logs
    assert all(s == "done" for s, _ in states.values()), states
    assert read_record(dst).extra == {"written_by": "the other run"}  # its record, not a second run's
    others = [j for j in plan.run_jobs if j.id != victim.id]
    assert all(j.key.path(out).exists() for j in others)  # the rest ran here


def test_a_claim_left_by_a_dead_run_is_free_and_status_says_so(tmp_path):
    plan = plan_suite(get_suite("toy"), ["random"], [0])
    job = plan.run_jobs[0]
    proc, gate = _hold(tmp_path, job.id, tmp_path)
    from dfml_bench.jobs import write_status

    write_status(tmp_path, job, "running", pid=proc.pid)
    assert job_state(tmp_path, job)[0] == "running"
    proc.kill()  # killed mid-job: the kernel drops its lock
    proc.wait(30)
    assert claimed_elsewhere(tmp_path, job.id) is None
    state, why = job_state(tmp_path, job)
    assert state == "failed" and "re-run" in why
    with JobClaim(tmp_path, job.id):  # and it can be taken at once
        assert claimed_elsewhere(tmp_path, job.id)


COUNTING = '''
import os, time
from dfml_bench.methods import Method
from dfml_bench.registry import register

class Counting(Method):
    """Appends one line per fit to COUNT_FILE, then takes a while: shows a job run twice."""
    name = "counting"
    access = frozenset({"whitebox"})

    def fit(self, context):
        with open(COUNT_FILE, "a") as f:
            f.write(f"{context.scenario_name} {context.seed} {os.getpid()}\\n")
        time.sleep(1.0)
        return context.make_backbone()

register("dfml_bench.methods", "counting", Counting)
'''


def test_two_concurrent_runs_into_one_folder_run_each_job_once(tmp_path):
    # the fit runs isolated (a clean environment; as root, another user who cannot read tmp_path): the
    # count goes to a world-writable folder named in the plugin's own text
    shared = Path(tempfile.mkdtemp(prefix="dfml-count-"))
    shared.chmod(0o777)
    count = shared / "count.txt"
    count.touch()
    count.chmod(0o666)  # the two runs' fit users may differ
    plugin = tmp_path / "counting.py"
    plugin.write_text(f"COUNT_FILE = {str(count)!r}\n" + COUNTING)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dfml_bench.cli", "run", "--suite", "toy", "--methods", "counting", "--seeds", "0,1,2,3",
           "--episodes", "3", "--out", str(out), "--quiet", "--plugin", str(TESTS / "conftest.py"), "--plugin", str(plugin)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        fit_lines = count.read_text().splitlines()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert [p.returncode for p in procs] == [0, 0], outputs
    fits = [tuple(line.split()[:2]) for line in fit_lines]
    assert sorted(fits) == [("wb", str(s)) for s in range(4)], fits  # each (scenario, seed) fitted exactly once
    recs = [read_record(p) for p in iter_records(out)]
    assert sorted((r.key.scenario, r.key.seed, r.status) for r in recs) == sorted(
        [("wb", s, "ok") for s in range(4)] + [("bb", s, "skipped") for s in range(4)])


def test_fixed_threads_sets_torch_and_children_then_restores():
    before = torch.get_num_threads()
    env_before = os.environ.get("OMP_NUM_THREADS")
    with fixed_threads(3):
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    assert torch.get_num_threads() == before and os.environ.get("OMP_NUM_THREADS") == env_before
    with pytest.raises(ValueError):
        with fixed_threads(0):
            pass


def _per_episode(out: Path) -> dict:
    return {(r.key.scenario, r.key.method, r.key.seed): (r.status, r.per_episode, r.resources.get("torch_threads"),
                                                         r.config.get("options", {}).get("threads"))
            for r in map(read_record, iter_records(out))}


@pytest.fixture(scope="module")
def serial_two_threads(tmp_path_factory):
    """A serial run started from a process whose torch uses 2 threads (as a user's shell would)."""
    out = tmp_path_factory.mktemp("serial")
    plan = plan_suite(get_suite("toy"), ["random", "oracle"], [0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = LocalLauncher(1, progress=False).launch(plan, _ctx(out))
    finally:
        torch.set_num_threads(before)
    assert all(s == "done" for s, _ in states.values()), states
    return out


def test_serial_and_a_pool_of_two_workers_give_identical_episodes_and_record_the_threads(serial_two_threads, tmp_path):
    serial = _per_episode(serial_two_threads)
    assert {v[2] for v in serial.values() if v[0] == "ok"} == {PROTOCOL_THREADS}  # the protocol's, not the shell's
    assert {v[3] for v in serial.values() if v[0] == "ok"} == {PROTOCOL_THREADS}
    plan = plan_suite(get_suite("toy"), ["random", "oracle"], [0])
    states = LocalLauncher(2, progress=False).launch(plan, _ctx(tmp_path))
    assert all(s == "done" for s, _ in states.values()), states
    assert _per_episode(tmp_path) == serial


@pytest.mark.slow  # submitit's local executor starts a process per job
def test_submitit_gives_identical_episodes(serial_two_threads, tmp_path):
    pytest.importorskip("submitit")
    plan = plan_suite(get_suite("toy"), ["random", "oracle"], [0])
    launcher = SubmititLauncher(SlurmConfig(cpus_per_job=2, time_min=10), cluster="local")
    states = launcher.launch(plan, _ctx(tmp_path))
    assert all(s == "done" for s, _ in states.values()), states
    assert _per_episode(tmp_path) == _per_episode(serial_two_threads)


def test_cli_threads_option_is_recorded(tmp_path):
    out = tmp_path / "res"
    res = CliRunner().invoke(main, ["run", "--suite", "toy", "--methods", "random", "--seeds", "0", "--episodes", "3",
                                    "--threads", "2", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    rec = read_record(next(p for p in iter_records(out) if "/wb/" in str(p)))
    assert rec.resources["torch_threads"] == 2 and rec.config["options"]["threads"] == 2
