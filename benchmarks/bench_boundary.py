"""Overhead of the black-box process boundary (issue 4): the query workload of the black-box smoke
scenario answered by the isolated API server vs by in-process APIs, timed in one run, as a ratio.

The workload is a realistic stream of batches, as BiDf-MKD issues them (reference/bidf-mkd.md): per
task, ``--syn-iters`` synthesis iterations of ``(q + 1) * batch`` images each (one clean query per image
plus q perturbed ones for the zeroth-order gradient), then two KD batches of ``batch`` images (support
and query set); tasks visit the zoo's APIs in turn. Both sides run the same stream, interleaved over
``--repeats`` rounds after a warm-up; the ratio of the medians is reported. Server start-up (a spawned
Python that imports torch and loads the zoo) is a one-off per run and is reported separately.

    python benchmarks/bench_boundary.py            # cpu, 2 torch threads in each process
    python benchmarks/bench_boundary.py --device cuda --threads 4
"""

from __future__ import annotations

import os
import statistics
import time

import click
import torch

from dfml_bench.access import QueryMeter
from dfml_bench.datasets import load_dataset
from dfml_bench.runner import make_apis
from dfml_bench.scenarios import get_suite
from dfml_bench.zoo import build_zoo


def workload(n_apis: int, tasks: int, syn_iters: int, q: int, batch: int) -> list[tuple[int, int]]:
    """The (api, images) stream of one pass."""
    out = []
    for t in range(tasks):
        api = t % n_apis
        out += [(api, (q + 1) * batch)] * syn_iters
        out += [(api, batch), (api, batch)]
    return out


def run_stream(apis, stream, pool: dict[int, torch.Tensor], device: torch.device) -> float:
    """Wall seconds to answer the stream (outputs consumed, as a method would)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for api, n in stream:
        out = apis[api].query(pool[n])
        out = out[0] if isinstance(out, tuple) else out
        out.sum().item()  # a method uses the answer: forces completion on either side
    sync()
    return time.perf_counter() - t0


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch threads of this process and of the server")
@click.option("--tasks", default=6, show_default=True, help="tasks per pass (one API visit each, in turn)")
@click.option("--syn-iters", default=2, show_default=True, help="synthesis iterations per task")
@click.option("--q", default=10, show_default=True, help="zeroth-order directions per image")
@click.option("--batch", default=25, show_default=True, help="synthetic images per set (5 classes x 5)")
@click.option("--repeats", default=5, show_default=True)
@click.option("--scenario", default="bb-glyphs-conv4-5w1s", show_default=True)
def main(device: str, threads: int, tasks: int, syn_iters: int, q: int, batch: int, repeats: int, scenario: str) -> None:
    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    dev = torch.device(device)
    suite = get_suite("smoke", "cpu")
    sc = suite.scenario(scenario)
    ds = load_dataset(sc.dataset, seed=sc.dataset_seed, scale="cpu")
    zoo = build_zoo(sc.zoo, ds, device=dev, progress=True)
    stream = workload(len(zoo.entries), tasks, syn_iters, q, batch)
    g = torch.Generator().manual_seed(0)
    pool = {n: torch.rand(n, *ds.image_shape, generator=g).to(dev) for n in sorted({n for _, n in stream})}
    images = sum(n for _, n in stream)

    in_apis, _ = make_apis(zoo, sc, QueryMeter(len(zoo.entries)), dev, isolated=False)
    t0 = time.perf_counter()
    meter = QueryMeter(len(zoo.entries))
    srv_apis, closer = make_apis(zoo, sc, meter, dev, isolated=True)
    startup = time.perf_counter() - t0
    assert type(srv_apis[0]).__name__ == "ServedAPI", "dfml_bench.server is not importable"
    try:
        run_stream(in_apis, stream, pool, dev)  # warm-up both sides
        run_stream(srv_apis, stream, pool, dev)
        t_in, t_srv = [], []
        for r in range(repeats):  # interleaved, alternating order, so drifts in machine load hit both
            pair = [(in_apis, t_in), (srv_apis, t_srv)]
            for apis, acc in (pair if r % 2 == 0 else pair[::-1]):
                acc.append(run_stream(apis, stream, pool, dev))
        # per-query latency of a 1-image query (the boundary's fixed cost)
        one = {1: pool[min(pool)][:1]}
        tiny = [(0, 1)] * 50
        lat_in = run_stream(in_apis, tiny, one, dev) / len(tiny)
        lat_srv = run_stream(srv_apis, tiny, one, dev) / len(tiny)
    finally:
        closer()
    assert meter.snapshot()["total"] == (repeats + 1) * images + len(tiny), meter.snapshot()
    med_in, med_srv = statistics.median(t_in), statistics.median(t_srv)
    print(f"scenario {scenario}: {len(zoo.entries)} x {zoo.entries[0].arch}, images {list(ds.image_shape)}, device {dev}, "
          f"torch threads {threads} (client) + {threads} (server)")
    print(f"stream: {len(stream)} queries, {images} images per pass (tasks={tasks}, syn_iters={syn_iters}, q={q}, batch={batch})")
    print(f"in-process APIs : median {med_in:.3f} s  ({', '.join(f'{t:.3f}' for t in t_in)})")
    print(f"isolated server : median {med_srv:.3f} s  ({', '.join(f'{t:.3f}' for t in t_srv)})")
    print(f"RATIO isolated / in-process = {med_srv / med_in:.3f}x  (target <= 1.15x)")
    print(f"1-image query latency: in-process {lat_in * 1e6:.0f} us, isolated {lat_srv * 1e6:.0f} us "
          f"(+{(lat_srv - lat_in) * 1e6:.0f} us per query)")
    print(f"load average (1 min) at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(other processes competing for the cores make every process hand-off wait for a time slice)")
    print(f"server start-up (spawn + import + load {len(zoo.entries)} models, once per run): {startup:.2f} s")


if __name__ == "__main__":
    main()
