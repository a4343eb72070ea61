"""Wall time of a suite run serial (``--jobs 1``, in this process) against the local pool (``--jobs N``).

    python benchmarks/bench_parallel.py [--suite smoke] [--jobs 2] [--episodes 600] [--methods random,average,oracle] [--threads 1]

The zoos and the frozen episodes are built once beforehand (shared cache), so the comparison is of the
runs themselves. Each run writes to its own fresh temporary results folder; the two runs' records are
then compared (per-episode accuracies and hashes must be equal; the number of episodes that differ is
printed). Every job of both runs uses the protocol's thread count (``--threads``, default
:data:`dfml_bench.threads.PROTOCOL_THREADS`), whichever launcher runs it: that is what makes the two
runs identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="smoke")
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=None, help="test episodes per run (default: the suite's)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the suite's)")
    ap.add_argument("--seeds", default=None, help="comma-separated (default: the suite's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every job (default: the protocol's)")
    args = ap.parse_args()

    import torch

    from dfml_bench.datasets import load_dataset
    from dfml_bench.jobs import JobContext, plan_suite
    from dfml_bench.launchers import LocalLauncher
    from dfml_bench.results import iter_records, read_record
    from dfml_bench.runner import scenario_episodes
    from dfml_bench.scenarios import get_suite
    from dfml_bench.threads import PROTOCOL_THREADS, fixed_threads
    from dfml_bench.zoo import build_zoo

    cores = len(os.sched_getaffinity(0))
    threads = args.threads or PROTOCOL_THREADS
    torch.set_num_threads(cores)  # what a user's shell has; the jobs set their own count
    suite = get_suite(args.suite, args.scale)
    methods = args.methods.split(",") if args.methods else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    plan = plan_suite(suite, methods, seeds)

    t0 = time.perf_counter()
    with fixed_threads(threads):  # warm the shared cache: zoos and episodes exist before either run
        for sc in suite.scenarios:
            ds = load_dataset(sc.dataset, seed=sc.dataset_seed, scale=args.scale)
            build_zoo(sc.zoo, ds, progress=False)
            for seed in seeds or suite.seeds:
                scenario_episodes(sc, ds, seed, args.episodes)
    print(f"cache warm-up (dataset, zoo, episodes): {time.perf_counter() - t0:.1f} s")
    print(f"{len(plan.run_jobs)} run jobs ({suite.name}, {args.scale}), {cores} cores, {threads} torch thread(s) per job, "
          f"episodes {args.episodes or 'suite default'}")

    def one(n: int) -> tuple[float, dict]:
        with tempfile.TemporaryDirectory(prefix=f"bench-parallel-j{n}-") as out:
            t = time.perf_counter()
            states = LocalLauncher(n, progress=False).launch(plan, JobContext(out=out, episodes=args.episodes, threads=threads))
            wall = time.perf_counter() - t
            bad = {k: v for k, v in states.items() if v[0] != "done"}
            if bad:
                raise SystemExit(f"--jobs {n}: jobs not done: {bad}")
            recs = {}
            for p in iter_records(Path(out)):
                r = read_record(p)
                recs[(r.key.scenario, r.key.method, r.key.seed)] = (r.status, r.per_episode, r.hashes, r.resources.get("torch_threads"))
        return wall, recs

    t_serial, r_serial = one(1)
    print(f"serial (--jobs 1):        {t_serial:8.1f} s")
    t_par, r_par = one(args.jobs)
    print(f"pool   (--jobs {args.jobs}):        {t_par:8.1f} s")
    print(f"speed-up serial / --jobs {args.jobs}: {t_serial / t_par:.2f}x")
    differ = sum(a != b for k in r_serial if k in r_par for a, b in zip(r_serial[k][1], r_par[k][1]))
    total = sum(len(v[1]) for v in r_serial.values())
    print(f"records identical (per-episode accuracies, hashes, thread count): {r_serial == r_par}; "
          f"episodes that differ: {differ} of {total}")


if __name__ == "__main__":
    main()
