"""The intra-op thread count of a job: part of the protocol, so results do not depend on the launcher.

torch's CPU kernels (convolutions, matrix products) split their reductions across threads, and a
different split sums in a different order: a model trained or evaluated with 2 threads differs from
one with 1 thread in the last bits, which flips the prediction of a few borderline queries, i.e. a few
per-episode accuracies. The local pool used ``cores // jobs`` threads per worker and submitit the CPUs
Slurm gave it, so serial, ``--jobs 2`` and Slurm runs of the same (scenario, method, seed) disagreed.

Every job (zoo build or run, whichever launcher) therefore runs under :func:`fixed_threads` with one
count, :data:`PROTOCOL_THREADS` unless the user asks for another with ``--threads``, and the record
stores it (``resources.torch_threads``). Parallelism comes from running jobs side by side (``--jobs``,
Slurm arrays), not from threads inside a job. Child processes (the black-box API server, an isolated
method) inherit it through ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

PROTOCOL_THREADS = 1
_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def check_threads(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the thread count of a job must be an integer >= 1, got {n!r}")
    return n


@contextmanager
def fixed_threads(n: int = PROTOCOL_THREADS) -> Iterator[int]:
    """Run the body with exactly ``n`` torch intra-op threads (and ``n`` for child processes), then
    restore what was set before."""
    import torch

    check_threads(n)
    old_threads = torch.get_num_threads()
    old_env = {k: os.environ.get(k) for k in _ENV}
    torch.set_num_threads(n)
    for k in _ENV:
        os.environ[k] = str(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old_threads)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
