"""Time the ``glyphs`` dataset: cold build (fresh process, empty cache) by stage, then a cached load.

    python benchmarks/bench_glyphs.py [--threads 2] [--images-per-class 60] [--style default]

Each measurement runs in a fresh subprocess with its own empty ``$DFML_BENCH_HOME`` so no in-process
memo or earlier cache file helps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads({threads})
T = time.perf_counter
t0 = T()
from dfml_bench.datasets import glyphs as G
out = {{"import": T() - t0}}
builder = G.GlyphsDataset(images_per_class={ipc}, style={style!r})
if {stages}:
    t = T(); fonts = G.discover_fonts(); out["fonts (cmaps + sha256)"] = T() - t
    t = T(); G.build_catalogue(fonts); out["catalogue (canonical masks + dedup)"] = T() - t
    t = T(); G._class_variants(fonts, G.RENDER_SCALE * builder.size); out["glyph masks + stroke variants"] = T() - t
t = T(); ds = builder.load(seed=0); out["load"] = T() - t
out["total"] = T() - t0
r = resource.getrusage(resource.RUSAGE_SELF)
out["cpu"] = r.ru_utime + r.ru_stime
out["images"] = list(ds.images.shape)
out["classes_per_split"] = ds.meta["classes_per_split"]
print(json.dumps(out))
"""


def run(threads: int, ipc: int, style: str, home: str, stages: bool) -> dict:
    code = CHILD.format(threads=threads, ipc=ipc, style=style, stages=stages)
    env = dict(os.environ, DFML_BENCH_HOME=home)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images-per-class", type=int, default=60)
    ap.add_argument("--style", default="default")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        t = time.perf_counter()
        cold = run(args.threads, args.images_per_class, args.style, home, stages=True)
        cold_wall = time.perf_counter() - t
        t = time.perf_counter()
        warm = run(args.threads, args.images_per_class, args.style, home, stages=False)
        warm_wall = time.perf_counter() - t
        size = sum(os.path.getsize(os.path.join(home, "datasets", f)) for f in os.listdir(os.path.join(home, "datasets")))
    print(f"glyphs style={args.style} images_per_class={args.images_per_class} threads={args.threads} "
          f"load avg={os.getloadavg()[0]:.1f}")
    print(f"images {cold['images']}  classes {cold['classes_per_split']}  cache file {size / 2**20:.0f} MiB")
    print("cold build, by stage (s):")
    for k, v in cold.items():
        if isinstance(v, float) and k != "cpu":
            print(f"  {k:40s} {v:7.2f}")
    print(f"  {'cpu (user+sys)':40s} {cold['cpu']:7.2f}")
    print(f"  {'process wall (with torch import)':40s} {cold_wall:7.2f}")
    print(f"cached load (s): load {warm['load']:.2f}  total with import {warm['total']:.2f}  process wall {warm_wall:.2f}  "
          f"cpu {warm['cpu']:.2f}")
    print("(cpu = user+sys seconds of the process; on a shared machine it is steadier than wall time)")


if __name__ == "__main__":
    main()
