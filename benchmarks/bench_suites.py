"""Cold cost of every `cpu` suite: `dfml-bench run --suite NAME --seeds 0` with the suite's default methods,
from an EMPTY cache (glyph dataset, zoos, episodes all built), one suite after another, each timed and
printed against its budget (smoke: 5 minutes; every other cpu suite: 30 minutes cold per seed on 2 cores,
issue 12, which replaced DESIGN.md's 15 when the proxy took the papers' structure), then a markdown table
for the README. Runs on the machine as it is: the load average before each suite is printed with it.

    python benchmarks/bench_suites.py [--suites smoke,whitebox-homo] [--jobs 2] [--markdown out.md] [--compare-with results]

A whole pass over the cpu suites takes about an hour; use --suites to time a few.

    python benchmarks/bench_suites.py --from-records results [--jobs 2] [--markdown out.md]

runs nothing: for every (suite, seed) of the committed records it replays their job seconds and the
training seconds of the zoo they used (from the cache's manifest) under the pool's schedule, and prints
that estimate of a cold seed against the budget. The records' seconds were measured with one job per
core beside other work, so read it as an estimate; a cold run above is the measurement.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfml_bench.scenarios import get_suite  # noqa: E402
from dfml_bench.suites import builtin_suites  # noqa: E402
from dfml_bench.utils import atomic_write_bytes  # noqa: E402

BUDGET_S = {"smoke": 300}
DEFAULT_BUDGET_S = 1800  # each cpu suite with its default methods and one seed: under 30 minutes cold (issue 12)


def cpu_suites() -> list[str]:
    """Names of the built-in suites that exist at `cpu` scale (a suite that refuses the scale is skipped)."""
    names = []
    for name in sorted(builtin_suites()):
        try:
            get_suite(name, "cpu")
        except Exception:  # noqa: BLE001 - a paper-only suite
            continue
        names.append(name)
    return names


def load() -> str:
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "n/a"


def time_suite(name: str, home: str, out: str, jobs: int, threads: int) -> tuple[float, int]:
    """Wall seconds and exit status of one cold run of ``name`` (seed 0, default methods)."""
    env = {**os.environ, "DFML_BENCH_HOME": home, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dfml_bench.cli", "run", "--suite", name, "--seeds", "0", "--out", out, "--quiet",
           "--jobs", str(jobs)]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def breakdown(home: str, out: str) -> str:
    """Where the time went: each zoo's summed model-training seconds and each job's record seconds."""
    import json

    parts = []
    for m in sorted(Path(home, "zoos").glob("*/manifest.json")):
        models = json.loads(m.read_text()).get("models", {}).values()
        parts.append(f"zoo {m.parent.name[:28]} {sum(e.get('train_seconds', 0) for e in models):.0f} s over {len(models)} models")
    for r in sorted(Path(out).rglob("seed-*.json")):
        rec = json.loads(r.read_text())
        parts.append(f"{rec.get('method')} {(rec.get('timing') or {}).get('total_seconds', 0):.0f} s")
    return "; ".join(parts)


def pool_wall(durations: list[float], workers: int) -> float:
    """Seconds a pool of ``workers`` takes for jobs of ``durations`` started in the given order, each on
    the first free worker (what `dfml-bench run --jobs N` does once the zoo is built)."""
    free_at = [0.0] * workers
    for d in durations:
        i = min(range(workers), key=free_at.__getitem__)
        free_at[i] += d
    return max(free_at, default=0.0)


def cold_wall(zoo_seconds: float, job_seconds: list[float], workers: int) -> float:
    """Seconds of a cold run under the pool's schedule: the zoo built by all workers, then the jobs
    longest first, each on the first free worker (`dfml-bench run --jobs N`)."""
    return zoo_seconds / workers + pool_wall(sorted(job_seconds, reverse=True), workers)


def zoo_train_seconds(home: str | Path) -> dict[str, float]:
    """Summed model-training seconds of every zoo in the cache, by zoo hash."""
    import json

    out = {}
    for m in Path(home, "zoos").glob("*/manifest.json"):
        d = json.loads(m.read_text())
        out[d.get("hash", "")] = sum(float(e.get("train_seconds", 0)) for e in d.get("models", {}).values())
    return out


def schedule_gain(home: str, out: str, suite: str, workers: int) -> str:
    """This run's zoo and job seconds replayed under the old schedule (the zoo built by one worker, jobs in
    plan order) and the current one (zoo shared by all workers, longest job first): the ratio of two
    replays of the same measured durations, not a second run."""
    import json

    from dfml_bench.scenarios import get_suite as _get

    zoo = sum(zoo_train_seconds(home).values())
    times = {}
    for r in Path(out).rglob("seed-*.json"):
        rec = json.loads(r.read_text())
        times[rec.get("method")] = float((rec.get("timing") or {}).get("total_seconds", 0))
    plan = [times[m] for m in _get(suite, "cpu").methods if m in times]
    old = zoo + pool_wall(plan, workers)
    new = cold_wall(zoo, plan, workers)
    return f"schedule replay: plan order with a one-worker zoo {old / 60:.1f} min, shared zoo + longest first {new / 60:.1f} min"


@dataclass(frozen=True)
class SeedCost:
    """One (suite, seed) of committed records: each default method's job seconds and the zoo's training
    seconds (``None`` when its manifest is not in the cache), and the cold wall time they give."""

    suite: str
    seed: int
    jobs: dict[str, float]
    missing: tuple[str, ...]
    zoo_seconds: float | None
    workers: int

    @property
    def wall(self) -> float | None:
        """:func:`cold_wall` of these jobs and zoo; None when the zoo's training time is unknown."""
        return None if self.zoo_seconds is None else cold_wall(self.zoo_seconds, list(self.jobs.values()), self.workers)

    @property
    def longest(self) -> tuple[str, float]:
        return max(self.jobs.items(), key=lambda kv: kv[1])


def record_costs(results: str | Path, home: str | Path, workers: int, suites: list[str] | None = None) -> list[SeedCost]:
    """Every (cpu suite, seed) with records of the suite's current scenarios in ``results``: the seconds
    of each default method's job summed over the scenarios (records of scenarios the suite no longer
    defines are left out), the zoo seconds of the zoos those records used, and the default methods
    without a record."""
    import json

    from dfml_bench.results import iter_records

    zoos = zoo_train_seconds(home)
    by_key: dict[tuple[str, int], list[dict]] = {}
    for p in iter_records(results):
        rec = json.loads(p.read_text())
        if rec.get("scale") == "cpu" and rec.get("status") == "ok":
            by_key.setdefault((rec["suite"], int(rec["seed"])), []).append(rec)
    rows = []
    for name in suites or cpu_suites():
        suite = get_suite(name, "cpu")
        current = {sc.name for sc in suite.scenarios}
        for (sname, seed), recs in sorted(by_key.items()):
            recs = [r for r in recs if sname == name and r["scenario"] in current and r["method"] in suite.methods]
            if not recs:
                continue
            jobs: dict[str, float] = {}
            for r in recs:
                jobs[r["method"]] = jobs.get(r["method"], 0.0) + float((r.get("timing") or {}).get("total_seconds", 0))
            hashes = {(r.get("hashes") or {}).get("zoo") for r in recs} - {None}
            zoo = sum(zoos[h] for h in hashes) if hashes <= zoos.keys() else None
            missing = tuple(m for m in suite.methods if m not in jobs)
            rows.append(SeedCost(name, seed, jobs, missing, zoo, workers))
    return rows


def records_markdown(rows: list[SeedCost]) -> str:
    lines = ["| suite (cpu, default methods) | seed | estimated cold wall time | budget | within | zoo (training s) | longest job |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        budget = BUDGET_S.get(r.suite, DEFAULT_BUDGET_S)
        wall = r.wall
        if r.missing:  # a partial seed says nothing about the budget
            ok = f"incomplete (no record: {', '.join(r.missing)})"
        else:
            ok = "n/a (zoo not in cache)" if wall is None else ("yes" if wall <= budget else "**no**")
        name, secs = r.longest
        zoo = "n/a" if r.zoo_seconds is None else f"{r.zoo_seconds:.0f}"
        lines.append(f"| {r.suite} | {r.seed} | {'n/a' if wall is None else f'{wall / 60:.1f} min'} | {budget / 60:.0f} min "
                     f"| {ok} | {zoo} | {name} {secs:.0f} s |")
    return "\n".join(lines) + "\n"


def compare_records(out: str, committed: str) -> str:
    """How many of the cold run's records have exactly the per-episode accuracies of the committed record
    at the same key (a different schedule, zoo build and cache must not change a single episode)."""
    import json

    same, total, missing = 0, 0, 0
    for r in Path(out).rglob("seed-*.json"):
        ref = Path(committed) / r.relative_to(out)
        if not ref.exists():
            missing += 1
            continue
        total += 1
        same += json.loads(r.read_text()).get("per_episode") == json.loads(ref.read_text()).get("per_episode")
    return f"{same}/{total} records equal the committed ones episode by episode ({missing} without a committed record)"


def markdown(rows: list[tuple[str, float, int, str, int]]) -> str:
    lines = ["| suite (cpu, seed 0, default methods) | cold wall time | budget | within | load avg |",
             "|---|---:|---:|---|---:|"]
    for name, wall, budget, ld, rc in rows:
        ok = "failed" if rc else ("yes" if wall <= budget else "**no**")
        lines.append(f"| {name} | {wall / 60:.1f} min | {budget / 60:.0f} min | {ok} | {ld} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default=None, help="comma-separated suites (default: every cpu suite)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes (default: one per core)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (the protocol's: 1)")
    ap.add_argument("--markdown", default=None, help="write the table to this file too")
    ap.add_argument("--compare-with", default=None, help="a results folder: check the cold records against it, episode by episode")
    ap.add_argument("--from-records", default=None, metavar="RESULTS",
                    help="run nothing: estimate each suite and seed's cold cost from these records' timings and the "
                         "cached zoos' training seconds ($DFML_BENCH_HOME)")
    args = ap.parse_args()
    names = args.suites.split(",") if args.suites else cpu_suites()
    if args.from_records:
        from dfml_bench.paths import home as cache_home

        table = records_markdown(record_costs(args.from_records, cache_home(), args.jobs, names))
        print(table)
        if args.markdown:
            atomic_write_bytes(args.markdown, table.encode())
        return
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as home:  # each suite from an empty cache
            ld = load()
            wall, rc = time_suite(name, home, os.path.join(home, "results"), args.jobs, args.threads)
            print(f"{name}: {breakdown(home, os.path.join(home, 'results'))}", flush=True)
            print(f"{name}: {schedule_gain(home, os.path.join(home, 'results'), name, args.jobs)}", flush=True)
            if args.compare_with:
                print(f"{name}: {compare_records(os.path.join(home, 'results'), args.compare_with)}", flush=True)
        budget = BUDGET_S.get(name, DEFAULT_BUDGET_S)
        rows.append((name, wall, budget, ld, rc))
        verdict = "FAILED" if rc else ("within" if wall <= budget else "OVER")
        print(f"{name:24s} cold {wall:7.1f} s  budget {budget:5d} s  {verdict}  (load {ld}, jobs {args.jobs}, "
              f"threads {args.threads})", flush=True)
    table = markdown(rows)
    print(table)
    if args.markdown:
        atomic_write_bytes(args.markdown, table.encode())


if __name__ == "__main__":
    main()
