"""Launchers: hand the jobs of a plan (:mod:`dfml_bench.jobs`) to an engine that runs them.

* :class:`LocalLauncher` runs them on this machine: ``jobs=1`` in this process, one after another
  (the serial path); ``jobs=N`` in N long-lived worker processes (start method ``spawn``, one GPU
  each when several are visible; every job, whichever launcher runs it, uses the protocol's torch
  thread count, :mod:`dfml_bench.threads`), respecting
  dependencies: a run job starts only once its zoo job is done. A worker that dies midway (killed,
  out of memory) has its job marked failed and is replaced; the suite goes on.
* :class:`SubmititLauncher` submits them to Slurm through submitit: zoo jobs first, then one job
  array per zoo whose tasks depend on it (``afterok``). With ``cluster="local"`` it uses submitit's
  local executor (each job a separate process; tests use it), which has no dependencies, so it waits
  for the zoo jobs and then submits the array.

Every job, wherever it runs, goes through :func:`execute_job`: it imports the plugins, writes its
status file, skips itself if its record is already finished, and runs the zoo build or
:func:`dfml_bench.runner.run_one`. Records and zoo files are written atomically, so a killed worker
leaves nothing partial, and a re-run resumes.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
import traceback
from dataclasses import dataclass, field, fields, replace
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any, Callable

from .jobs import Job, JobClaim, JobContext, Plan, import_plugins, plan_states, read_status, save_plan, write_status
from .results import is_finished
from .threads import fixed_threads

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ one job


def resolve_job_device(device: str) -> str:
    """``auto`` means cuda when this process sees a GPU (Slurm / submitit set CUDA_VISIBLE_DEVICES), else cpu."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def execute_job(job: Job, ctx: JobContext, *, progress: bool = False, log: Log | None = None, bar=None,
                wait: bool = True) -> dict:
    """Run one job (in any process) and return ``{"id", "state", "error"}``. Never raises for a
    job's own failure; the status file under ``ctx.out/.jobs/`` says what happened.

    The job is claimed first (:class:`dfml_bench.jobs.JobClaim`), so two runs into one folder never run
    it twice: if another process holds the claim, ``wait`` waits for it and then uses its record (or runs
    the job if the other one failed); without ``wait`` the state ``claimed`` comes back at once so that a
    launcher can run other jobs first. The job runs with the protocol's thread count (``ctx.threads``),
    whichever launcher called it, so its results do not depend on the launcher."""
    import_plugins(ctx.plugins)
    device = resolve_job_device(ctx.device)
    log = log or (lambda m: None)
    claim = JobClaim(ctx.out, job.id)
    if not claim.acquire(wait=False):
        holder = claim.holder()
        if not wait:
            log(f"{job.id} is being run by another dfml-bench process ({holder}); not running it twice, coming back to it later")
            return {"id": job.id, "state": "claimed", "error": None, "holder": holder}
        log(f"{job.id} is being run by another dfml-bench process ({holder}); waiting for it instead of running it twice")
        claim.acquire(wait=True)
        if job.kind == "run" and is_finished(ctx.out, job.key):
            claim.release()
            log(f"{job.id}: finished by the other process; not run again")
            return {"id": job.id, "state": "done", "error": None}
    try:
        with fixed_threads(ctx.threads):
            return _execute_claimed(job, ctx, device, progress=progress, log=log, bar=bar)
    finally:
        claim.release()


def _execute_claimed(job: Job, ctx: JobContext, device: str, *, progress: bool, log: Log, bar) -> dict:
    """:func:`execute_job` once this process holds the job's claim and the protocol's thread count is set."""
    from .runner import RunOptions, run_one

    if job.kind == "run" and is_finished(ctx.out, job.key):
        write_status(ctx.out, job, "done", device=device, note="already finished; not recomputed")
        return {"id": job.id, "state": "done", "error": None}
    write_status(ctx.out, job, "running", device=device, started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    t0 = time.time()
    try:
        from .scenarios import get_suite

        suite = get_suite(job.suite, job.scale)
        scenario = suite.scenario(job.scenario)
        if job.kind == "zoo":
            from .datasets import load_dataset
            from .runner import resolve_device
            from .zoo import build_zoo

            ds = load_dataset(scenario.dataset, seed=scenario.dataset_seed, data_root=ctx.data_root, scale=job.scale)
            zoo = build_zoo(scenario.zoo, ds, device=resolve_device(device), progress=progress, log=log, workers=ctx.zoo_workers)
            state, error, extra = "done", None, {"zoo": str(zoo.path)}
        elif job.kind == "run":
            opts = RunOptions(out=Path(ctx.out), device=device, episodes=ctx.episodes, data_root=ctx.data_root,
                              progress=progress, log=log, method_params=dict(ctx.method_params), isolated_apis=ctx.isolated_apis,
                              threads=ctx.threads, fit_timeout=ctx.fit_timeout, fit_memory_gb=ctx.fit_memory_gb)
            rec = run_one(suite, scenario, job.method, int(job.seed), opts, bar)
            state = "failed" if rec.status == "failed" else "done"
            error, extra = rec.error, {"record_status": rec.status}
        else:
            raise ValueError(f"unknown job kind {job.kind!r}")
    except KeyboardInterrupt:
        write_status(ctx.out, job, "failed", device=device, error="interrupted")
        raise
    except Exception as exc:
        state, error, extra = "failed", f"{type(exc).__name__}: {exc}", {"traceback": traceback.format_exc(limit=10)}
    write_status(ctx.out, job, state, device=device, error=error, seconds=round(time.time() - t0, 3), **extra)
    return {"id": job.id, "state": state, "error": error}


def _with_plugins(ctx: JobContext, plugins: tuple[str, ...] | None) -> JobContext:
    from .jobs import local_plugins

    extra = tuple(plugins or ()) + local_plugins()
    merged = tuple(dict.fromkeys(tuple(ctx.plugins) + extra))
    return replace(ctx, plugins=merged)


def _todo(plan: Plan, ctx: JobContext, check_zoo: bool = False) -> tuple[list[Job], dict[str, tuple[str, str]]]:
    """Jobs still to run (run jobs without a finished record, and the zoo jobs they need; with
    ``check_zoo``, zoos already built and verified in the cache are not jobs)."""
    states = plan_states(ctx.out, plan, check_zoo=check_zoo, data_root=ctx.data_root, threads=ctx.threads)
    runs = [j for j in plan.run_jobs if states[j.id][0] != "done"]
    needed = {d for j in runs for d in j.deps}
    zoos = [j for j in plan.zoo_jobs if j.id in needed and states[j.id][0] != "done"]
    for j in plan.zoo_jobs:
        if j.id in needed and states[j.id][0] == "done" and (read_status(ctx.out, j.id) or {}).get("state") != "done":
            write_status(ctx.out, j, "done", note=states[j.id][1])  # found built in the cache
    return zoos + runs, states


# ---------------------------------------------------------------------------------------- scheduling


def observed_seconds(out: str | Path, job: Job) -> float | None:
    """Mean ``timing.total_seconds`` of the finished records of ``job``'s (scenario, method) under ``out``,
    any seed; None when there are none. A hint for ordering jobs, so a damaged file is just skipped."""
    import json

    times = []
    for p in job.key.path(out).parent.glob("seed-*.json"):
        try:
            t = (json.loads(p.read_text()).get("timing") or {}).get("total_seconds")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(t, (int, float)) and t > 0:
            times.append(float(t))
    return sum(times) / len(times) if times else None


def estimated_seconds(job: Job, hints: dict[str, float], out: str | Path | None = None) -> float:
    """How long ``job`` is expected to take: its own earlier seeds' records, else the suite's hint
    (``scenario/method``, then ``method``), else infinity (an unknown method may be the longest, so it
    starts early). Zoo jobs come first whatever their cost: every run job waits for one."""
    if job.kind == "zoo":
        return float("inf")
    seen = observed_seconds(out, job) if out is not None else None
    if seen is not None:
        return seen
    return float(hints.get(f"{job.scenario}/{job.method}", hints.get(job.method, float("inf"))))


def longest_first(jobs: list[Job], hints: dict[str, float], out: str | Path | None = None) -> list[Job]:
    """``jobs`` with zoo jobs first, then run jobs by decreasing estimated cost (ties keep plan order).

    A pool of N workers that starts the longest jobs first finishes within max(longest job, total / N)
    plus a fraction of a job; in the plan's order a long method listed last (tgr, 1/3 of a white-box
    seed) starts when the others are done and runs alone. Results do not depend on the order: a job's
    seeds come from its key."""
    est = {j.id: estimated_seconds(j, hints, out) for j in jobs}
    return sorted(jobs, key=lambda j: (j.kind != "zoo", -est[j.id]))  # sorted() is stable


def suite_hints(plan: Plan) -> dict[str, float]:
    """The suite's ``job_seconds`` hints, or none when the suite cannot be loaded here."""
    try:
        from .scenarios import get_suite

        return dict(get_suite(plan.suite, plan.scale).job_seconds)
    except Exception:  # noqa: BLE001 - a hint only; the jobs themselves report a missing suite
        return {}


def zoo_workers_for(todo: list[Job], jobs: int) -> int:
    """Processes per zoo build: the pool's workers shared among the zoos to build, when no run job can
    start before a zoo is built (a cold run: the other workers would only wait); otherwise 1."""
    zoos = {j.id for j in todo if j.kind == "zoo"}
    if not zoos or any(j.kind == "run" and not zoos.intersection(j.deps) for j in todo):
        return 1
    return max(1, jobs // len(zoos))


# ---------------------------------------------------------------------------------------- local pool


def _worker_main(conn, index: int, ctx: JobContext) -> None:
    """A worker process: import plugins, then run the jobs it is sent (``(job, wait)`` pairs); each job
    sets the protocol's thread count itself."""
    import_plugins(ctx.plugins)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        job, wait = msg
        try:
            result = execute_job(job, ctx, wait=wait)
        except BaseException as exc:  # execute_job only raises on interrupts; report and stop
            result = {"id": job.id, "state": "failed", "error": f"{type(exc).__name__}: {exc}"}
            conn.send(result)
            return
        conn.send(result)


@dataclass
class _Worker:
    index: int
    proc: Any
    conn: Any
    job: Job | None = None


class LocalLauncher:
    """Run a plan on this machine with ``jobs`` worker processes (1 = in this process)."""

    def __init__(self, jobs: int = 1, *, threads: int | None = None, progress: bool = True, log: Log | None = None,
                 plugins: tuple[str, ...] | list[str] = ()):
        if jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.threads = threads  # None: the JobContext's (the protocol's); set: overrides it for every job
        self.progress = progress
        self.log = log or (lambda m: None)
        self.plugins = tuple(plugins)

    def launch(self, plan: Plan, ctx: JobContext) -> dict[str, tuple[str, str]]:
        """Run every job of ``plan`` that is not done; return the final state of every job."""
        ctx = _with_plugins(ctx, self.plugins)
        if self.threads is not None:
            ctx = replace(ctx, threads=self.threads)
        import_plugins(ctx.plugins)
        save_plan(ctx.out, plan)
        todo, states = _todo(plan, ctx, check_zoo=self.jobs > 1)  # a worker started for a built zoo is wasted
        if self.jobs == 1:
            self._serial(plan, todo, ctx)
        else:
            ctx = replace(ctx, zoo_workers=zoo_workers_for(todo, self.jobs))
            self._pool(longest_first(todo, suite_hints(plan), ctx.out), ctx, {j for j, s in states.items() if s[0] == "done"})
        return plan_states(ctx.out, plan)

    # serial: today's in-process path, with status files
    def _serial(self, plan: Plan, todo: list[Job], ctx: JobContext) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan.run_jobs), initial=len(plan.run_jobs) - sum(j.kind == "run" for j in todo),
                   desc=f"suite {plan.suite} ({plan.scale})", disable=not self.progress)
        failed: set[str] = set()
        queue = [(job, False) for job in todo]
        while queue:
            job, wait = queue.pop(0)
            if any(d in failed for d in job.deps):
                failed.add(job.id)
                self.log(f"not running {job.id}: dependency {','.join(d for d in job.deps if d in failed)} failed")
                continue
            res = execute_job(job, ctx, progress=self.progress, log=self.log, bar=bar, wait=wait)
            if res["state"] == "claimed":  # another run is on it: do the others first, then wait for it
                queue.append((job, True))
                continue
            if res["state"] == "failed":
                failed.add(job.id)
                self.log(f"FAILED {job.id}: {res['error']}")
            if job.kind == "run":
                bar.update(1)
        bar.close()

    def _spawn(self, index: int, ctx: JobContext) -> _Worker:
        mpc = mp.get_context("spawn")
        parent, child = mpc.Pipe()
        wctx = ctx
        if ctx.device.startswith("cuda") and ctx.device == "cuda":
            try:
                import torch

                n = torch.cuda.device_count()
            except Exception:
                n = 0
            if n > 1:
                wctx = replace(ctx, device=f"cuda:{index % n}")  # one GPU per worker, round robin
        proc = mpc.Process(target=_worker_main, args=(child, index, wctx), name=f"dfml-worker-{index}", daemon=False)
        proc.start()
        child.close()
        return _Worker(index, proc, parent)

    def _pool(self, todo: list[Job], ctx: JobContext, done: set[str]) -> None:
        from tqdm.auto import tqdm

        n_runs = sum(j.kind == "run" for j in todo)
        bar = tqdm(total=n_runs, desc=f"{n_runs} jobs on {self.jobs} workers", disable=not self.progress)
        pending = list(todo)
        waits: set[str] = set()  # jobs found claimed by another run once: next time, wait for them
        failed: set[str] = set()
        workers = [self._spawn(i, ctx) for i in range(min(self.jobs, len(todo)))]

        def finish(w: _Worker, state: str, error: str | None) -> None:
            job = w.job
            w.job = None
            (done if state == "done" else failed).add(job.id)
            if state != "done":
                self.log(f"FAILED {job.id}: {error}")
            if job.kind == "run":
                bar.update(1)

        try:
            while True:
                # drop jobs whose dependencies failed (they stay pending, `status` says why)
                for job in [j for j in pending if any(d in failed for d in j.deps)]:
                    pending.remove(job)
                    failed.add(job.id)
                    self.log(f"not running {job.id}: dependency failed")
                for w in workers:
                    if w.job is None and pending:
                        ready = next((j for j in pending if all(d in done for d in j.deps)), None)
                        if ready is None:
                            break
                        if not w.proc.is_alive():
                            workers[workers.index(w)] = w = self._spawn(w.index, ctx)
                        pending.remove(ready)
                        w.job = ready
                        w.conn.send((ready, ready.id in waits))
                busy = [w for w in workers if w.job is not None]
                if not busy:
                    break  # nothing running and nothing can start
                mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
                for w in busy:
                    if w.conn.poll():
                        try:
                            res = w.conn.recv()
                            if res["state"] == "claimed":  # another run holds it: come back to it last, then wait
                                waits.add(w.job.id)
                                pending.append(w.job)
                                w.job = None
                                continue
                            finish(w, res["state"], res.get("error"))
                            continue
                        except (EOFError, OSError):
                            pass
                    if not w.proc.is_alive():
                        code = w.proc.exitcode
                        why = f"worker {w.index} (pid {w.proc.pid}) died with exit code {code} while running it"
                        write_status(ctx.out, w.job, "failed", error=why, pid=w.proc.pid)
                        finish(w, "failed", why)
                        workers[workers.index(w)] = self._spawn(w.index, ctx) if pending else w
        finally:
            bar.close()
            for w in workers:
                try:
                    if w.proc.is_alive():
                        w.conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            for w in workers:
                w.proc.join(timeout=30)
                if w.proc.is_alive():
                    w.proc.terminate()
                    w.proc.join(5)


# ------------------------------------------------------------------------------------------ submitit


@dataclass
class SlurmConfig:
    """Slurm resources of each job (flags of ``dfml-bench run`` or a JSON / TOML file with these keys)."""

    partition: str | None = None
    time_min: int = 60  # time limit of each run job, minutes
    zoo_time_min: int | None = None  # of each zoo job (default: time_min)
    gpus_per_job: int = 0
    cpus_per_job: int = 2
    mem_gb: float | None = None
    array_parallelism: int = 64  # how many tasks of an array run at once
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load, ...)
    extra: dict = field(default_factory=dict)  # more sbatch parameters, passed as is

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "SlurmConfig":
        """Read a JSON (``.json``) or TOML (``.toml``) file; a ``[slurm]`` table is used if present.
        ``overrides`` that are not None win over the file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            import json

            data = json.loads(text)
        else:
            raise ValueError(f"Slurm config {path} must be .json or .toml")
        if not isinstance(data, dict):
            raise ValueError(f"Slurm config {path} must hold an object of settings, not a {type(data).__name__}")
        data = data.get("slurm", data)
        if not isinstance(data, dict):
            raise ValueError(f"Slurm config {path}: 'slurm' must be a table of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Slurm config {path}: unknown keys {unknown}; known keys: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def executor_parameters(self, zoo: bool = False) -> dict:
        p: dict[str, Any] = {"timeout_min": int((self.zoo_time_min or self.time_min) if zoo else self.time_min),
                             "cpus_per_task": int(self.cpus_per_job), "gpus_per_node": int(self.gpus_per_job),
                             "tasks_per_node": 1, "nodes": 1, "slurm_array_parallelism": int(self.array_parallelism)}
        if self.mem_gb is not None:
            p["mem_gb"] = self.mem_gb
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.setup:
            p["slurm_setup"] = list(self.setup)
        extra = dict(self.extra)
        for k in ("account", "qos", "constraint"):
            if getattr(self, k):
                extra[k] = getattr(self, k)
        if extra:
            p["slurm_additional_parameters"] = extra
        return p


def submitit_entry(job: Job, ctx: JobContext) -> dict:
    """What a submitit job runs: the job with the protocol's thread count (``ctx.threads``, not the CPUs
    Slurm gave it, so that a Slurm result equals a local one); it waits if another run holds the job."""
    return execute_job(job, ctx, log=lambda m: print(m, file=sys.stderr, flush=True))


class SubmititLauncher:
    """Submit a plan to Slurm through submitit (``cluster=None``: Slurm if ``sbatch`` exists, else
    local; ``"local"``: submitit's local executor, jobs as separate processes)."""

    def __init__(self, config: SlurmConfig | None = None, *, cluster: str | None = None, wait: bool = True,
                 log: Log | None = None, plugins: tuple[str, ...] | list[str] = ()):
        try:
            import submitit  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("--launcher submitit needs submitit: pip install 'dfml-bench[slurm]'") from exc
        self.config = config or SlurmConfig()
        self.cluster = cluster
        self.wait = wait
        self.log = log or (lambda m: None)
        self.plugins = tuple(plugins)
        self.submitted: dict[str, Any] = {}  # job id -> submitit Job

    def _executor(self, ctx: JobContext, zoo: bool):
        import submitit

        ex = submitit.AutoExecutor(folder=str(Path(ctx.out).resolve() / ".jobs" / "submitit"), cluster=self.cluster)
        ex.update_parameters(name="dfml-zoo" if zoo else "dfml-run", **self.config.executor_parameters(zoo))
        return ex

    def _submit(self, ex, jobs: list[Job], ctx: JobContext) -> list:
        if not jobs:
            return []
        with ex.batch():
            handles = [ex.submit(submitit_entry, j, ctx) for j in jobs]
        for j, h in zip(jobs, handles):
            self.submitted[j.id] = h
            write_status(ctx.out, j, "pending", note=f"submitted as {ex.cluster} job {h.job_id}", slurm_job_id=str(h.job_id))
        self.log(f"submitted {len(jobs)} job(s) to {ex.cluster}: {', '.join(str(h.job_id) for h in handles)}")
        return handles

    def launch(self, plan: Plan, ctx: JobContext) -> dict[str, tuple[str, str]]:
        ctx = _with_plugins(ctx, self.plugins)
        if ctx.device == "cpu" and self.config.gpus_per_job > 0:
            ctx = replace(ctx, device="auto")
        save_plan(ctx.out, plan)
        todo, _ = _todo(plan, ctx)
        zoos = [j for j in todo if j.kind == "zoo"]
        runs = [j for j in todo if j.kind == "run"]
        zex = self._executor(ctx, zoo=True)
        zoo_handles = dict(zip([j.id for j in zoos], self._submit(zex, zoos, ctx)))
        if zex.cluster == "slurm":
            # one array per zoo, each task afterok on its zoo job: Slurm orders them, we need not wait
            groups: dict[tuple[str, ...], list[Job]] = {}
            for j in runs:
                groups.setdefault(tuple(d for d in j.deps if d in zoo_handles), []).append(j)
            for deps, jobs in groups.items():
                ex = self._executor(ctx, zoo=False)
                if deps:
                    params = self.config.executor_parameters(False).get("slurm_additional_parameters", {})
                    dep = "afterok:" + ":".join(str(zoo_handles[d].job_id) for d in deps)
                    ex.update_parameters(slurm_additional_parameters={**params, "dependency": dep})
                self._submit(ex, jobs, ctx)
        else:
            # the local / debug executors know no dependencies: wait for the zoos, then submit the rest
            failed = set()
            for jid, h in zoo_handles.items():
                try:
                    res = h.result()
                    if res["state"] != "done":
                        failed.add(jid)
                except Exception as exc:
                    failed.add(jid)
                    write_status(ctx.out, plan.job(jid), "failed", error=f"submitit job {h.job_id}: {exc}")
            self._submit(self._executor(ctx, zoo=False), [j for j in runs if not set(j.deps) & failed], ctx)
        if self.wait:
            for jid, h in self.submitted.items():
                try:
                    h.result()
                except Exception as exc:  # the job died (timeout, node failure, kill): say so
                    msg = str(exc).strip().splitlines()
                    write_status(ctx.out, plan.job(jid), "failed", error=f"submitit job {h.job_id} failed: {msg[-1] if msg else exc}")
        return plan_states(ctx.out, plan)
