"""Wall time of `dfml-bench run --suite smoke` on this machine: cold (fresh cache: glyph dataset, zoo
and episodes built) and warm (cache kept, new results folder). Budget: under 5 minutes cold on 2 cores.

    python benchmarks/bench_smoke.py [--cold-only] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def run(home: str, out: str, threads: int) -> float:
    env = {**os.environ, "DFML_BENCH_HOME": home, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dfml_bench.cli", "run", "--suite", "smoke", "--out", out, "--quiet"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold-only", action="store_true", help="skip the warm run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        cold = run(home, os.path.join(home, "out-cold"), args.threads)
        print(f"smoke suite, {args.threads} threads: cold {cold:.1f} s (budget 300 s)", flush=True)
        if not args.cold_only:
            warm = run(home, os.path.join(home, "out-warm"), args.threads)
            print(f"smoke suite, {args.threads} threads: warm {warm:.1f} s; cold/warm {cold / warm:.2f}x")


if __name__ == "__main__":
    main()
