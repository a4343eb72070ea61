"""Overhead of running fit in an isolated process (issue 13): a suite run with ``isolate=False`` (fit in
the harness's process, the pre-isolation path) and with isolation (the default), in one process, one
after the other, on a warm cache (the zoo is built first and not timed). Prints the wall time of each,
the ratio, the per-job overhead, and whether the per-episode accuracies are identical.

    python benchmarks/bench_isolation.py --suite smoke            # the smoke suite (target ratio <= 1.05)
    python benchmarks/bench_isolation.py --suite smoke --episodes 100 --methods random,average
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from dfml_bench.runner import RunOptions, run_suite
from dfml_bench.scenarios import get_suite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="smoke")
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--methods", help="comma-separated (default: the suite's)")
    ap.add_argument("--episodes", type=int, help="test episodes per job (default: the scenario's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-to", type=Path, help="a results folder with records of the same suite made before the "
                    "change (e.g. the committed results/): are the per-episode accuracies the same?")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suite = get_suite(args.suite, args.scale)
    methods = args.methods.split(",") if args.methods else suite.methods
    tmp = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    # warm-up: zoos, datasets and episodes cached, the first evaluation's one-off costs paid
    run_suite(suite, methods=["random"], opts=RunOptions(out=tmp / "warm", progress=False, episodes=args.episodes, isolate=False))
    times, recs = {}, {}
    for mode, isolate in (("in-process", False), ("isolated", True)):
        t0 = time.perf_counter()
        out = run_suite(suite, methods=methods, opts=RunOptions(out=tmp / mode, progress=False, episodes=args.episodes, isolate=isolate))
        times[mode] = time.perf_counter() - t0
        recs[mode] = {(r.key.scenario, r.key.method): r for r in out}
    n_jobs = len(recs["isolated"])
    same = all(recs["isolated"][k].per_episode == r.per_episode for k, r in recs["in-process"].items())
    ratio = times["isolated"] / times["in-process"]
    print(f"suite {args.suite} ({args.scale}), methods {methods}, {n_jobs} jobs, episodes {args.episodes or 'scenario default'}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"in-process fit : {times['in-process']:.1f} s")
    print(f"isolated fit   : {times['isolated']:.1f} s")
    print(f"ratio          : {ratio:.3f}x  ({(times['isolated'] - times['in-process']) / n_jobs:+.2f} s per job)")
    print(f"per-episode accuracies identical: {same}")
    if args.compare_to:
        from dfml_bench.results import read_record

        for k, r in sorted(recs["isolated"].items()):
            p = r.key.path(args.compare_to)
            if r.status == "ok" and p.exists():
                old = read_record(p)
                print(f"  vs {p}: per-episode accuracies {'identical' if old.per_episode == r.per_episode else 'DIFFERENT'}")
    for k, r in sorted(recs["isolated"].items()):
        print(f"  {k[0]}/{k[1]}: {r.status} fit {r.timing.get('fit_seconds', 0):.1f} s, total {r.timing.get('total_seconds', 0):.1f} s "
              f"(in-process {recs['in-process'][k].timing.get('total_seconds', 0):.1f} s)")


if __name__ == "__main__":
    main()
