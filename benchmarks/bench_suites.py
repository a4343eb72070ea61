"""Cold cost of every `cpu` suite: `dfml-bench run --suite NAME --seeds 0` with the suite's default methods,
from an EMPTY cache (glyph dataset, zoos, episodes all built), one suite after another, each timed and
printed against its budget (smoke: 5 minutes; every other cpu suite: 30 minutes cold per seed on 2 cores,
issue 12, which replaced DESIGN.md's 15 when the proxy took the papers' structure), then a markdown table
for the README. Runs on the machine as it is: the load average before each suite is printed with it.

    python benchmarks/bench_suites.py [--suites smoke,whitebox-homo] [--jobs 2] [--markdown out.md] [--compare-with results]

A whole pass over the cpu suites takes about an hour; use --suites to time a few.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
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


def schedule_gain(home: str, out: str, suite: str, workers: int) -> str:
    """This run's zoo and job seconds replayed under the old schedule (the zoo built by one worker, jobs in
    plan order) and the current one (zoo shared by all workers, longest job first): the ratio of two
    replays of the same measured durations, not a second run."""
    import json

    from dfml_bench.scenarios import get_suite as _get

    zoo = sum(e.get("train_seconds", 0) for m in Path(home, "zoos").glob("*/manifest.json")
              for e in json.loads(m.read_text()).get("models", {}).values())
    times = {}
    for r in Path(out).rglob("seed-*.json"):
        rec = json.loads(r.read_text())
        times[rec.get("method")] = float((rec.get("timing") or {}).get("total_seconds", 0))
    plan = [times[m] for m in _get(suite, "cpu").methods if m in times]
    old = zoo + pool_wall(plan, workers)
    new = zoo / workers + pool_wall(sorted(plan, reverse=True), workers)
    return f"schedule replay: plan order with a one-worker zoo {old / 60:.1f} min, shared zoo + longest first {new / 60:.1f} min"


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
    args = ap.parse_args()
    names = args.suites.split(",") if args.suites else cpu_suites()
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
