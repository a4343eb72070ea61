"""Shared fixtures: a tiny learnable dataset and a tiny suite, registered in-process, and an isolated
``$DFML_BENCH_HOME`` per test session so no test touches the user's cache."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings

import pytest
import torch

from dfml_bench.backbones import BackboneSpec
from dfml_bench.datasets import ImageDataset
from dfml_bench.episodes import EpisodeSpec
from dfml_bench.evaluation import AdaptProtocol
from dfml_bench.registry import register
from dfml_bench.scenarios import Scenario, Suite
from dfml_bench.utils import make_generator, sha256_tensor, sha256_json
from dfml_bench.zoo import TrainRecipe, ZooSpec


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks are scripts, not a package);
    registered in ``sys.modules`` because dataclasses look their module up there."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# One intra-op thread: several test processes (API servers, workers) share two cores, and
# oversubscribed OpenMP threads make small-tensor work many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_intra_op_thread(request):
    """Every test starts with one intra-op thread, and a test that leaves another count behind is named:
    the count is part of a zoo's identity, so a leak would send later tests to another zoo folder."""
    yield
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
        warnings.warn(f"{request.node.nodeid} left torch with {n} intra-op threads (reset to 1)")


def make_toy_dataset(n_classes: int = 30, per_class: int = 30, size: int = 16, seed: int = 0, name: str = "toy") -> ImageDataset:
    """Classes are distinct random colour templates plus noise: learnable in a few steps, tiny."""
    g = make_generator(seed)
    templates = torch.rand(n_classes, 3, size, size, generator=g)
    templates = torch.nn.functional.avg_pool2d(templates, 3, 1, 1)  # smooth, so small shifts keep class identity
    noise = 0.25 * torch.randn(n_classes, per_class, 3, size, size, generator=g)
    x = (templates[:, None] + noise).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8).reshape(-1, 3, size, size)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    n_tr, n_va = n_classes // 2, n_classes // 4
    splits = {"train": list(range(n_tr)), "val": list(range(n_tr, n_tr + n_va)), "test": list(range(n_tr + n_va, n_classes))}
    h = sha256_json([name, sha256_tensor(images), sha256_tensor(labels), splits])
    return ImageDataset(name, images, labels, [f"c{i}" for i in range(n_classes)], splits, (0.5,) * 3, (0.25,) * 3, h)


class ToyBuilder:
    name = "toy"

    def load(self, *, seed: int = 0, data_root=None, scale: str = "cpu") -> ImageDataset:
        return make_toy_dataset(seed=seed)


def toy_suite(scale: str = "cpu") -> Suite:
    bb = BackboneSpec("conv4", 8)
    zoo = ZooSpec(dataset="toy", n_models=3, ways=5, backbones=(bb,), recipes=(("*", TrainRecipe(epochs=3, batch_size=32)),), seed=0)
    eps = EpisodeSpec(ways=5, shots=1, queries=5, n_episodes=20)
    proto = AdaptProtocol(steps=3, lr=0.05)
    common = dict(dataset="toy", zoo=zoo, episodes=eps, val_episodes=10, backbone=bb, protocol=proto,
                  method_params={"oracle": {"iterations": 6, "val_every": 3, "val_episodes": 5}})
    return Suite(
        name="toy", scale=scale,
        scenarios=[Scenario(name="wb", access="whitebox", **common),
                   Scenario(name="bb", access="blackbox", budget_total=10_000, **common)],
        methods=["random", "average", "oracle"], seeds=[0],
    )


register("dfml_bench.datasets", "toy", ToyBuilder)
register("dfml_bench.suites", "toy", lambda: {"toy": toy_suite})


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("dfml_home")
    old = os.environ.get("DFML_BENCH_HOME")
    os.environ["DFML_BENCH_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DFML_BENCH_HOME", None)
    else:
        os.environ["DFML_BENCH_HOME"] = old


@pytest.fixture
def toy_dataset() -> ImageDataset:
    return make_toy_dataset()


@pytest.fixture(scope="session")
def hostile_site():
    """A world-readable 'site-packages' declaring the methods of ``hostile_plugins`` under the
    ``dfml_bench.methods`` entry-point group (as an installed third-party package would). World-readable
    because the fit process runs as an unprivileged user when the tests run as root."""
    from hostile_plugins import ENTRY_POINTS

    site = tempfile.mkdtemp(prefix="dfml-hostile-site-")
    os.chmod(site, 0o755)
    info = os.path.join(site, "hostile_plugins-6.6.6.dist-info")
    os.mkdir(info)
    with open(os.path.join(info, "METADATA"), "w") as fh:
        fh.write("Metadata-Version: 2.1\nName: hostile-plugins\nVersion: 6.6.6\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as fh:
        fh.write("[dfml_bench.methods]\n" + "".join(f"{k} = {v}\n" for k, v in ENTRY_POINTS.items()))
    for root, dirs, files in os.walk(site):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), 0o755)
    sys.path.insert(0, site)
    importlib.invalidate_caches()
    yield site
    sys.path.remove(site)
    importlib.invalidate_caches()
    shutil.rmtree(site, ignore_errors=True)
