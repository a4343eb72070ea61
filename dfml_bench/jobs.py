"""A suite run as a plan of independent jobs (issue 8).

A suite run is planned as one ``run`` job per (scenario, method, seed) plus one ``zoo`` job per distinct
zoo (dataset, dataset seed, zoo spec); every run job depends on the zoo job of its scenario. Jobs are
plain picklable dataclasses so that any launcher (a local process pool, Slurm through submitit) can
hand them to another process or machine.

State lives on disk under the run folder (``RUN_DIR``, the ``--out`` of ``dfml-bench run``):

* ``RUN_DIR/.jobs/plan-<suite>-<scale>.json``: the plan (written when a launcher starts);
* ``RUN_DIR/.jobs/<job id>.json``: one small status file per job (``running`` / ``done`` / ``failed``,
  host, pid, device, times, error), written atomically by whoever runs the job;
* the result records themselves (:mod:`dfml_bench.results`), which are the ground truth for run jobs.

:func:`run_status` combines them into done / running / failed / pending with reasons; a re-run skips
every job that is done, so nothing finished is recomputed and failed jobs are retried.

Workers are fresh processes: suites, datasets and methods registered in-process with
:func:`dfml_bench.registry.register` do not exist there. A :class:`JobContext` therefore carries
``plugins``: modules (``pkg.mod``) or ``.py`` files a worker imports before running anything, so their
registrations run again. :func:`local_plugins` lists the modules that made in-process registrations
in this process, and launchers add them automatically; installed entry points need nothing.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import importlib.util
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .results import RunKey
from .validate import check_record
from .scenarios import Scenario, Suite
from .threads import PROTOCOL_THREADS
from .utils import atomic_write_json, sha256_json

JOBS_DIR = ".jobs"
STATES = ("done", "running", "failed", "pending")


@dataclass(frozen=True)
class Job:
    """One unit of work. ``kind`` is ``zoo`` (build the zoo ``scenario`` uses) or ``run`` (one
    (scenario, method, seed)). ``deps`` are the ids of jobs that must be done first."""

    id: str
    kind: str
    suite: str
    scale: str
    scenario: str
    method: str | None = None
    seed: int | None = None
    deps: tuple[str, ...] = ()

    @property
    def key(self) -> RunKey:
        if self.kind != "run":
            raise ValueError(f"job {self.id} is a {self.kind} job and has no result record")
        return RunKey(self.suite, self.scale, self.scenario, self.method, int(self.seed))


@dataclass(frozen=True)
class JobContext:
    """What every job of a run shares, picklable: the run options a worker needs and the plugins to
    import first. ``device`` is the device asked for (``cpu``, ``cuda``, ``cuda:1``); a launcher may
    give each worker its own GPU."""

    out: str
    device: str = "cpu"
    episodes: int | None = None
    data_root: str | None = None
    method_params: dict = field(default_factory=dict)
    isolated_apis: bool = True
    plugins: tuple[str, ...] = ()
    threads: int = PROTOCOL_THREADS  # torch intra-op threads of every job, whatever the launcher (threads.py)
    fit_timeout: float | None = None  # seconds per fit (issue 13); None: the scenario's / scale's default
    fit_memory_gb: float | None = None  # address-space limit of the fit process (CPU)
    zoo_workers: int = 1  # processes that train a zoo's models side by side (same bits as one; zoo.build_zoo)


@dataclass
class Plan:
    suite: str
    scale: str
    jobs: list[Job]

    def job(self, job_id: str) -> Job:
        for j in self.jobs:
            if j.id == job_id:
                return j
        raise KeyError(job_id)

    @property
    def zoo_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.kind == "zoo"]

    @property
    def run_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.kind == "run"]

    def to_dict(self) -> dict:
        return {"suite": self.suite, "scale": self.scale, "jobs": [asdict(j) for j in self.jobs]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(d["suite"], d["scale"], [Job(**{**j, "deps": tuple(j["deps"])}) for j in d["jobs"]])


def zoo_job_id(suite: Suite, scenario: Scenario) -> str:
    """Zoo jobs are identified by what the zoo depends on (dataset, its seed, spec, scale), not by the
    scenario, so scenarios sharing a zoo share its job."""
    h = sha256_json([scenario.dataset, scenario.dataset_seed, scenario.zoo.to_dict(), suite.scale])[:12]
    return f"zoo/{scenario.dataset}-{h}"


def run_job_id(key: RunKey) -> str:
    return f"run/{key.suite}-{key.scale}/{key.scenario}/{key.method}/seed-{key.seed}"


def plan_suite(suite: Suite, methods: list[str] | None = None, seeds: list[int] | None = None) -> Plan:
    """The jobs of a suite run: zoo jobs first (one per distinct zoo), then one run job per
    (seed, scenario, method) in the serial runner's order, each depending on its zoo job."""
    methods = methods or suite.methods
    seeds = seeds if seeds is not None else suite.seeds
    zoo_jobs: dict[str, Job] = {}
    runs: list[Job] = []
    for sc in suite.scenarios:
        zid = zoo_job_id(suite, sc)
        zoo_jobs.setdefault(zid, Job(zid, "zoo", suite.name, suite.scale, sc.name))
    for s in seeds:
        for sc in suite.scenarios:
            for m in methods:
                key = RunKey(suite.name, suite.scale, sc.name, m, int(s))
                runs.append(Job(run_job_id(key), "run", suite.name, suite.scale, sc.name, m, int(s), (zoo_job_id(suite, sc),)))
    return Plan(suite.name, suite.scale, list(zoo_jobs.values()) + runs)


# ---------------------------------------------------------------------------------------------- state


def jobs_dir(out: str | Path) -> Path:
    return Path(out) / JOBS_DIR


def _safe(job_id: str) -> str:
    return job_id.replace("/", "__")


def status_path(out: str | Path, job_id: str) -> Path:
    return jobs_dir(out) / f"{_safe(job_id)}.json"


def plan_path(out: str | Path, suite: str, scale: str) -> Path:
    return jobs_dir(out) / f"plan-{suite}-{scale}.json"


def save_plan(out: str | Path, plan: Plan) -> Path:
    path = plan_path(out, plan.suite, plan.scale)
    atomic_write_json(path, plan.to_dict())
    return path


class PlanFileError(ValueError):
    """A file under ``.jobs/`` that is not a job plan (edited, truncated, or not written by dfml-bench)."""


def read_plan(path: str | Path) -> Plan:
    """One saved plan; :class:`PlanFileError` naming the file and the fix if it is not one."""
    path = Path(path)
    fix = "delete it and re-run the `dfml-bench run` command that made this folder (it rewrites the plan)"
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanFileError(f"{path} is not a readable job plan ({exc}); {fix}") from exc
    try:
        if not isinstance(d, dict) or not isinstance(d.get("jobs"), list):
            raise TypeError("expected an object with 'suite', 'scale' and a list of 'jobs'")
        plan = Plan.from_dict(d)
        for j in plan.jobs:
            if j.kind not in ("zoo", "run") or not all(isinstance(v, str) for v in (j.id, j.suite, j.scale, j.scenario)):
                raise TypeError(f"job {j.id!r} has an unknown kind or non-text fields")
            if j.kind == "run" and (not isinstance(j.method, str) or not isinstance(j.seed, int) or isinstance(j.seed, bool)):
                raise TypeError(f"run job {j.id!r} needs a method name and an integer seed")
    except (TypeError, KeyError, AttributeError) as exc:
        raise PlanFileError(f"{path} is not a job plan: {exc}; {fix}") from exc
    return plan


def load_plans(out: str | Path, problems: list[str] | None = None) -> list[Plan]:
    """The plans saved under ``out``. A file that is not a plan raises :class:`PlanFileError`, or, with
    ``problems``, is described there and left out (so the good plans can still be shown)."""
    plans = []
    for p in sorted(jobs_dir(out).glob("plan-*.json")):
        try:
            plans.append(read_plan(p))
        except PlanFileError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return plans


def write_status(out: str | Path, job: Job, state: str, **info) -> None:
    """Record a job's state atomically (``running``, ``done``, ``failed``), with host, pid and time."""
    path = status_path(out, job.id)
    prev = read_status(out, job.id) or {}
    doc = {"id": job.id, "kind": job.kind, "state": state, "host": socket.gethostname(), "pid": os.getpid(),
           "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "attempts": _int(prev.get("attempts")) + (1 if state == "running" else 0)}
    for k in ("slurm_job_id",):
        if k in prev:
            doc[k] = prev[k]
    if "SLURM_JOB_ID" in os.environ:
        doc["slurm_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"]) + (
            f"_{os.environ['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in os.environ else "")
    doc.update(info)
    atomic_write_json(path, doc)


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def read_status(out: str | Path, job_id: str) -> dict | None:
    """A job's status file, or None if there is none or it is not one (garbage is ignored: records and
    claims, not status files, decide what is done)."""
    try:
        d = json.loads(status_path(out, job_id).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(d, dict) or not isinstance(d.get("state"), str):
        return None
    return d


# ---------------------------------------------------------------------------------------------- claims


def claim_path(out: str | Path, job_id: str) -> Path:
    return jobs_dir(out) / f"{_safe(job_id)}.claim"


class JobClaim:
    """The right to run one job of a run folder, held by one process at a time: an exclusive
    ``flock`` on ``.jobs/<job>.claim``. Two runs into one ``--out`` (two terminals, a local run and a
    Slurm array, two pool workers) therefore never run a job twice: the second sees it claimed and
    waits or moves on. The kernel drops the lock when its holder exits, however it exits, so a killed
    run leaves no stale claim. The file records who holds it (host, pid, time), for messages."""

    def __init__(self, out: str | Path, job_id: str):
        self.path = claim_path(out, job_id)
        self.job_id = job_id
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> bool:
        """Take the claim; without ``wait`` return False at once if another process holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self._fd = fd
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        return True

    def holder(self) -> str:
        """Who holds the claim, as far as its file says ('another process' if it cannot be read)."""
        try:
            d = json.loads(self.path.read_text())
            return f"pid {d['pid']} on {d['host']} since {d['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JobClaim":
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claimed_elsewhere(out: str | Path, job_id: str) -> str | None:
    """Who is running ``job_id`` right now if another process holds its claim, else None."""
    c = JobClaim(out, job_id)
    if not c.path.exists():
        return None
    if c.acquire(wait=False):
        c.release()
        return None
    return c.holder()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def zoo_done(job: Job, data_root: str | None = None, threads: int = PROTOCOL_THREADS) -> bool:
    """A zoo job is done when its zoo (the one trained with ``threads`` torch threads, as the run's jobs
    will use) is completely built and verified (loads the dataset)."""
    from .datasets import load_dataset
    from .scenarios import get_suite
    from .zoo import load_zoo

    sc = get_suite(job.suite, job.scale).scenario(job.scenario)
    ds = load_dataset(sc.dataset, seed=sc.dataset_seed, data_root=data_root, scale=job.scale)
    return load_zoo(sc.zoo, ds, threads=threads) is not None


def job_state(out: str | Path, job: Job, *, check_zoo: bool = False, data_root: str | None = None,
              threads: int = PROTOCOL_THREADS) -> tuple[str, str]:
    """(state, reason) of one job. Run jobs: the record is the truth (ok/skipped = done, failed =
    failed); without a record, the status file says running (a live or remote worker), or failed
    (the worker died or was cancelled). Zoo jobs: the status file, or, with ``check_zoo``, the zoo
    cache itself."""
    if job.kind == "run":
        chk = check_record(out, job.key)  # the leaderboard's checks: a record it would reject is not done
        rec = chk.record
        if chk.state == "ok":
            return "done", f"mean acc {rec.accuracy.get('mean', float('nan')):.4f} on {rec.resources.get('host', '?')} ({rec.resources.get('device', '?')})"
        if chk.state == "skipped":
            return "done", f"skipped: {rec.error}"
        if chk.state == "failed":
            return "failed", rec.error or "failed"
        if chk.state == "invalid":
            return "failed", f"record rejected ({chk.reason}); a re-run redoes it"
    st = read_status(out, job.id)
    if job.kind == "zoo":
        if check_zoo:
            try:
                if zoo_done(job, data_root, threads):
                    return "done", "zoo built and verified"
            except Exception as exc:
                return "pending", f"cannot check zoo: {exc}"
        if st and st["state"] == "done":
            return "done", st.get("note") or f"built on {st.get('host')}"
    if st is None:
        return "pending", "not started"
    if st["state"] == "running" and claim_path(out, job.id).exists():
        holder = claimed_elsewhere(out, job.id)
        if holder is None:
            return "failed", "its worker stopped without writing a record (killed?); a re-run redoes it"
        return "running", holder + (f" (slurm {st['slurm_job_id']})" if st.get("slurm_job_id") else "")
    if st["state"] == "running":
        pid = st.get("pid")
        if st.get("host") == socket.gethostname() and (not isinstance(pid, int) or pid <= 0 or not _pid_alive(pid)):
            return "failed", f"worker pid {st.get('pid')} died (no record was written); a re-run redoes it"
        return "running", f"on {st.get('host')} pid {st.get('pid')} since {st.get('updated_at')}" + (
            f" (slurm {st['slurm_job_id']})" if st.get("slurm_job_id") else "")
    if st["state"] == "failed":
        return "failed", st.get("error") or "failed"
    if st["state"] == "done" and job.kind == "run":
        return "pending", "status says done but its record is missing; a re-run redoes it"
    return (st["state"] if st["state"] in STATES else "pending"), st.get("error") or st.get("note") or ""


def plan_states(out: str | Path, plan: Plan, *, check_zoo: bool = False, data_root: str | None = None,
                threads: int = PROTOCOL_THREADS) -> dict[str, tuple[str, str]]:
    """State and reason of every job of ``plan``; pending jobs whose dependencies are not done say so."""
    states = {j.id: job_state(out, j, check_zoo=check_zoo, data_root=data_root) for j in plan.run_jobs}
    for j in plan.zoo_jobs:
        users = [r for r in plan.run_jobs if j.id in r.deps]
        states[j.id] = job_state(out, j, check_zoo=False)
        if states[j.id][0] != "done":
            if users and all(states[r.id][0] == "done" for r in users):
                states[j.id] = ("done", "not needed: every job that uses this zoo is done")
            elif check_zoo:
                states[j.id] = job_state(out, j, check_zoo=True, data_root=data_root, threads=threads)
    states = {j.id: states[j.id] for j in plan.jobs}
    for j in plan.jobs:
        if states[j.id][0] == "pending":
            waiting = [d for d in j.deps if states.get(d, ("pending",))[0] != "done"]
            if waiting:
                failed = [d for d in waiting if states.get(d, ("",))[0] == "failed"]
                why = ("blocked: dependency failed: " if failed else "waiting for ") + ", ".join(failed or waiting)
                before = states[j.id][1]
                states[j.id] = ("pending", why if before in ("", "not started") else f"{before}; {why}")
    return states


def run_status(out: str | Path, problems: list[str] | None = None) -> list[tuple[Plan, dict[str, tuple[str, str]]]]:
    """For every plan saved under ``out``: the state and reason of each of its jobs (``problems``: as
    :func:`load_plans`)."""
    plans = load_plans(out, problems)
    if not plans and not problems:
        raise FileNotFoundError(f"{out} has no job plan ({JOBS_DIR}/plan-*.json); it was not run by a launcher")
    return [(p, plan_states(out, p)) for p in plans]


def format_plan(plan: Plan, states: dict[str, tuple[str, str]], hide_done: bool = False) -> str:
    """A table of jobs: id, kind, dependencies, state, reason; with counts per state."""
    from tabulate import tabulate

    rows = [[j.id, j.kind, ",".join(j.deps) or "-", states[j.id][0], states[j.id][1]] for j in plan.jobs
            if not (hide_done and states[j.id][0] == "done")]
    if not rows:
        return f"{plan.suite} ({plan.scale}): all {len(plan.jobs)} jobs done"
    counts = {s: sum(1 for v in states.values() if v[0] == s) for s in STATES}
    head = f"{plan.suite} ({plan.scale}): {len(plan.jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    return head + "\n" + tabulate(rows, headers=["job", "kind", "depends on", "state", "reason"])


# -------------------------------------------------------------------------------------------- plugins


def local_plugins() -> tuple[str, ...]:
    """Modules that made in-process registrations in this process, as importable names or ``.py`` paths,
    so that worker processes can import them and see the same registry. Registrations made in
    ``__main__`` (a notebook, ``python -c``) cannot be replayed and are left out."""
    from .registry import _LOCAL

    found: list[str] = []
    for group in _LOCAL.values():
        for entry in group.values():
            mod = getattr(entry.obj, "__module__", None)
            if mod is None and callable(entry.obj):
                mod = getattr(getattr(entry.obj, "__wrapped__", None), "__module__", None)
            if not mod or mod == "__main__" or mod.startswith("dfml_bench"):
                continue
            m = sys.modules.get(mod)
            name = getattr(m, "__file__", None) or mod
            if name not in found:
                found.append(name)
    return tuple(found)


FILE_PLUGINS: dict[str, str] = {}  # module name given to a ``.py`` plugin -> its file (see isolation.make_scratch)


def import_plugins(plugins: tuple[str, ...] | list[str]) -> None:
    """Import each plugin (``pkg.mod`` or a ``.py`` path) once per process, so that its
    ``register()`` calls run here too. An import error says which plugin failed."""
    for p in plugins:
        try:
            if p.endswith(".py"):
                path = str(Path(p).resolve())
                if any(getattr(m, "__file__", None) == path for m in list(sys.modules.values())):
                    continue
                name = f"dfml_plugin_{Path(p).stem}_{sha256_json(path)[:8]}"
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"not a Python file: {path}")
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                FILE_PLUGINS[name] = path  # fit processes import it under this name from a copy
                sys.path.insert(0, str(Path(path).parent))  # so the plugin's own sibling imports work
                spec.loader.exec_module(mod)
            elif p not in sys.modules:
                importlib.import_module(p)
        except Exception as exc:
            raise ImportError(f"plugin {p!r} failed to import in worker process {os.getpid()}: {type(exc).__name__}: {exc}") from exc
