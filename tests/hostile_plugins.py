"""Methods written the way a hostile (or careless) plugin author would write them (issue 13).

They are registered through a temporary ``*.dist-info`` (the ``hostile_site`` fixture in conftest), so
they reach dfml-bench exactly as a third-party package does, and run in the isolated fit process. Each
one records what it managed to do in ``report_`` (which comes back as the record's ``extra``), so the
tests can assert that every attack was refused or made harmless. Paths of the harness's folders are
given to them as parameters: a real attacker would guess them (``~/.cache/dfml-bench``, ``results/``).
"""

from __future__ import annotations

import gc
import os
import sys
import time

import torch
from torch import nn

from dfml_bench.methods import Method


def _try(fn):
    try:
        return ["ok", repr(fn())[:200]]
    except BaseException as exc:  # noqa: BLE001 - the attempt's outcome is the report
        return [type(exc).__name__, str(exc)[:200]]


class Raise(Method):
    name = "h_raise"
    description = "raises in fit (a careless method)"

    def fit(self, context):
        raise RuntimeError("deliberate failure")


class FrameReader(Method):
    """Returns a module whose forward is its own code: in the evaluating process it would read the query
    labels from the caller's frames and score 100 %. It leaves a marker file each time it runs."""

    name = "h_frames"
    access = frozenset({"whitebox"})
    marker_dir: str = ""

    def fit(self, context):
        base = context.make_backbone()
        marker_dir = self.marker_dir

        class Cheat(type(base)):
            def forward(self, x):
                with open(os.path.join(marker_dir, f"forward-{os.getpid()}"), "w") as fh:
                    fh.write("ran")
                f = sys._getframe(1)
                while f is not None:
                    for k in ("qy", "query_labels"):
                        y = f.f_locals.get(k)
                        if isinstance(y, torch.Tensor) and y.shape[-1] == x.shape[0]:
                            return 100.0 * nn.functional.one_hot(y.reshape(-1)[: x.shape[0]], 5).float()
                    f = f.f_back
                return super().forward(x)

        cheat = Cheat.__new__(Cheat)
        cheat.__dict__.update(base.__dict__)
        return cheat


class Patcher(Method):
    """Patches the harness's evaluator and record writer, and writes a record of a method that never ran."""

    name = "h_patch"
    access = frozenset({"whitebox"})
    out: str = ""

    def fit(self, context):
        import dfml_bench.results as results
        import dfml_bench.runner as runner

        rep = {}
        runner.evaluate = lambda *a, **k: torch.ones(10_000, dtype=torch.float64)
        results.write_record = lambda *a, **k: None
        rep["patched"] = True
        ghost = os.path.join(self.out, "toy-cpu", "wb", "ghost", "seed-0.json")

        def write():
            os.makedirs(os.path.dirname(ghost), exist_ok=True)
            with open(ghost, "w") as fh:
                fh.write('{"schema": 1, "suite": "toy", "scale": "cpu", "scenario": "wb", "method": "ghost", "seed": 0,'
                         ' "status": "ok", "per_episode": [1.0], "accuracy": {"mean": 1.0, "n": 1}}')

        rep["write_ghost"] = _try(write)
        rep["list_out"] = _try(lambda: os.listdir(self.out))
        self.report_ = rep
        return context.make_backbone()


class Snooper(Method):
    """Looks at everything of the dataset it is given, and for the harness's cache."""

    name = "h_snoop"
    access = frozenset({"whitebox"})
    home: str = ""

    def fit(self, context):
        ds = context.val_dataset
        rep = {"labels": sorted(set(ds.labels.tolist())), "splits": {k: list(v) for k, v in ds.splits.items()},
               "n_images": int(ds.images.shape[0]), "val_episode_classes": sorted(set(context.val_episodes.classes.reshape(-1).tolist())),
               "named_classes": [i for i, n in enumerate(ds.class_names) if n]}
        rep["real_meta_train"] = _try(lambda: context.real_meta_train())
        rep["home_listing"] = _try(lambda: os.listdir(self.home))
        rep["home_episodes"] = _try(lambda: os.listdir(os.path.join(self.home, "episodes")))
        rep["own_home"] = os.environ.get("DFML_BENCH_HOME")
        rep["uid"] = os.getuid()
        rep["whitebox_models"] = len(context.whitebox())
        self.report_ = rep
        return context.make_backbone()


class Thief(Method):
    """Black-box: loads the zoo's weights from the cache, reads other processes' memory, looks for the zoo
    object in its frames and heap, zeroes the query counter, and floods the server."""

    name = "h_thief"
    access = frozenset({"blackbox"})
    output_kinds = frozenset({"logits", "probs", "topk", "label"})
    zoo_dir: str = ""
    n_queries: int = 37

    def fit(self, context):
        rep = {}
        apis = context.apis()
        apis[0].query(torch.rand(self.n_queries, *context.image_shape))
        rep["zoo_files"] = _try(lambda: os.listdir(self.zoo_dir))
        rep["zoo_load"] = _try(lambda: torch.load(os.path.join(self.zoo_dir, sorted(os.listdir(self.zoo_dir))[0]), weights_only=True))
        readable = []
        for pid in os.listdir("/proc"):
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    with open(f"/proc/{pid}/maps") as fh:
                        start = int(fh.readline().split("-")[0], 16)
                    with open(f"/proc/{pid}/mem", "rb") as fh:
                        fh.seek(start)
                        fh.read(16)
                    readable.append(int(pid))
                except (OSError, ValueError):
                    pass
        rep["proc_mem_readable"] = readable
        rep["zoo_objects"] = sum(type(o).__name__ in ("Zoo", "ServerSpec", "ModelFile", "ZooServer") for o in gc.get_objects())
        rep["test_datasets"] = sum(type(o).__name__ == "ImageDataset" and bool(o.splits.get("test")) for o in gc.get_objects())
        rep["modules_in_heap"] = sum(isinstance(o, nn.Module) for o in gc.get_objects())
        # zero every counter it can reach
        ch = apis[0]._channel
        ch._meter.used[:] = [0] * len(ch._meter.used)
        rep["huge_query"] = _try(lambda: apis[0].query(torch.rand(20_000, *context.image_shape)))
        with ch._lock:
            rep["raw_flood"] = _try(lambda: ch._call(b"{" + b" " * 100_000))
        rep["after_flood"] = _try(lambda: tuple(apis[1].query(torch.rand(3, *context.image_shape)).shape))
        self.report_ = rep
        return context.make_backbone()


class NaNs(Method):
    name = "h_nan"

    def fit(self, context):
        model = context.make_backbone()
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model


class Sleeper(Method):
    """Hangs in fit forever, after leaving a daemon behind (a detached grandchild)."""

    name = "h_sleep"
    access = frozenset({"whitebox"})

    def fit(self, context):
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(10_000)
            os._exit(0)
        while True:
            time.sleep(1)


class Hog(Method):
    """Allocates far more memory than its limit."""

    name = "h_hog"
    access = frozenset({"whitebox"})

    def fit(self, context):
        blocks = [torch.ones(256, 2**20, dtype=torch.uint8) for _ in range(64)]  # 16 GiB
        return blocks


class WrongArch(Method):
    name = "h_arch"
    access = frozenset({"whitebox"})

    def fit(self, context):
        return nn.Linear(3, 5)


ENTRY_POINTS = {cls.name: f"hostile_plugins:{cls.__name__}" for cls in (Raise, FrameReader, Patcher, Snooper, Thief, NaNs, Sleeper, Hog, WrongArch)}
