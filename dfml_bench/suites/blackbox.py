"""The black-box suites: BiDf-MKD's three scenarios (bidf-mkd.md 1.4) at ``cpu`` and ``paper`` scale.

- ``blackbox-homo`` (API-SS): one dataset, Conv4 APIs.
- ``blackbox-hetero`` (API-SH): one dataset, Conv4 / ResNet-10 / ResNet-18 APIs.
- ``blackbox-multidomain`` (API-MH): several domains and architectures, reported per domain.

APIs answer logits (the reference's assumption) and are metered: every image counts against the
scenario's query budget. ``cpu``: the proxy ``glyphs-fs-natural`` (CIFAR-FS's shape; ``docs/proxy-validation.md``), zoos
shared with the white-box suites (same specs, so one build serves both), a budget of 100k images (about 9 API visits of BiDf-MKD at its
cpu settings), 600 frozen 5-way 1-shot test episodes; each suite finishes in minutes on 2 cores with
its default methods. ``paper``: 100 models per (dataset, architecture), 5-way 1- and 5-shot, no budget
(the reference has none; see the budget-sweep suite for accuracy against queries).
"""

from __future__ import annotations

from ..backbones import BackboneSpec
from ..episodes import EpisodeSpec
from ..scenarios import Scenario, Suite, SuiteError
from ..zoo import TrainRecipe, ZooSpec
from . import common

CONV4 = common.CONV4
EPISODES_1SHOT = EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=600)
CPU_RECIPE = getattr(common, "CPU_CONV4", TrainRecipe(epochs=12, optimizer="adam", lr=0.005, batch_size=50))
# narrow ResNets at cpu scale (stages 16-32-64-128), as in the white-box suites (same zoo specs -> shared cache)
CPU_RESNET10, CPU_RESNET18 = common.CPU_RESNET10, common.CPU_RESNET18
CPU_BUDGET = 100_000
CPU_METHODS = ["random", "placebo", "bidf-mkd", "bidf-mkd-qe", "oracle"]  # bidf-mkd-qe: the query-efficient estimator (issue 15)
CPU_PARAMS = common.CPU_ORACLE
PAPER_METHODS = ["random", "bidf-mkd", "oracle"]


def _bb(name: str, dataset: str, zoo: ZooSpec, budget: int | None, episodes: EpisodeSpec, desc: str, params: dict) -> Scenario:
    return Scenario(name=name, dataset=dataset, zoo=zoo, access="blackbox", output_kind="logits", budget_total=budget,
                    episodes=episodes, method_params=params, description=desc)


def _paper_scenarios(datasets: tuple[str, ...], archs: tuple[str, ...], tag: str, what: str) -> list[Scenario]:
    out = []
    for ds in datasets:
        zoo = common.paper_zoo(ds, archs)
        for shots in (1, 5):
            out.append(_bb(f"{ds}-{tag}-5w{shots}s", ds, zoo, None, EpisodeSpec(ways=5, shots=shots, queries=15, n_episodes=600),
                           f"black-box logits APIs, {zoo.n_models} {what} {ds} models, 5-way {shots}-shot, no budget", {}))
    return out


def _homo(scale: str) -> Suite:
    common.check_scale("blackbox-homo", scale)
    if scale == "cpu":
        zoo = common.cpu_proxy_zoo()
        scenarios = [_bb(f"{zoo.dataset}-conv4-5w1s", zoo.dataset, zoo, CPU_BUDGET, EPISODES_1SHOT,
                         f"black-box logits APIs, 100 Conv4 {zoo.dataset} models, {CPU_BUDGET} query images, 5-way 1-shot (API-SS)",
                         CPU_PARAMS)]
    else:
        scenarios = _paper_scenarios(("cifar-fs", "mini-imagenet", "cub"), ("conv4",), "conv4", "Conv4")
    return Suite(name="blackbox-homo", scale=scale, scenarios=scenarios,
                 methods=list(CPU_METHODS if scale == "cpu" else PAPER_METHODS), seeds=[0], leaderboard_seeds=[0, 1, 2], job_seconds=dict(common.JOB_SECONDS),
                 description="Black-box DFML from same-architecture APIs on one dataset (BiDf-MKD API-SS).")


def _hetero(scale: str) -> Suite:
    common.check_scale("blackbox-hetero", scale)
    if scale == "cpu":
        zoo = common.cpu_proxy_zoo((CONV4, CPU_RESNET10, CPU_RESNET18), n_models=common.CPU_PROXY_MIXED_MODELS)
        scenarios = [_bb(f"{zoo.dataset}-mixarch-5w1s", zoo.dataset, zoo, CPU_BUDGET, EPISODES_1SHOT,
                         f"black-box logits APIs, {zoo.n_models} {zoo.dataset} models (Conv4, ResNet-10, ResNet-18 width 16 in turn), "
                         f"{CPU_BUDGET} query images, 5-way 1-shot (API-SH)", CPU_PARAMS)]
    else:
        scenarios = _paper_scenarios(("cifar-fs", "mini-imagenet", "cub"), ("conv4", "resnet10", "resnet18"), "mixarch",
                                     "Conv4/ResNet-10/ResNet-18")
    return Suite(name="blackbox-hetero", scale=scale, scenarios=scenarios,
                 methods=list(CPU_METHODS if scale == "cpu" else PAPER_METHODS), seeds=[0], leaderboard_seeds=[0, 1, 2], job_seconds=dict(common.JOB_SECONDS),
                 description="Black-box DFML from APIs of mixed architectures on one dataset (BiDf-MKD API-SH).")


def _multidomain(scale: str) -> Suite:
    common.check_scale("blackbox-multidomain", scale)
    ds = common.CPU_PROXY_MULTIDOMAIN if scale == "cpu" else "multidomain"
    common.require_dataset("blackbox-multidomain", ds, scale)
    if scale == "cpu":
        zoo = common.cpu_proxy_zoo((CONV4, CPU_RESNET10, CPU_RESNET18), n_models=common.CPU_PROXY_MIXED_MODELS, dataset=ds)
        scenarios = [_bb(f"{ds}-mixarch-5w1s", ds, zoo, CPU_BUDGET, EPISODES_1SHOT,
                         f"black-box logits APIs, {zoo.n_models} models over the two glyphs-fs domains (Conv4, ResNet-10, ResNet-18), "
                         f"{CPU_BUDGET} query images, 5-way 1-shot, reported per domain (API-MH)", CPU_PARAMS)]
    else:
        zoo = common.paper_zoo(ds, ("conv4", "resnet10", "resnet18"))
        scenarios = [_bb(f"{ds}-mixarch-5w{s}s", ds, zoo, None, EpisodeSpec(ways=5, shots=s, queries=15, n_episodes=600),
                         f"black-box logits APIs, {zoo.n_models} models over CIFAR-FS + miniImageNet + CUB, 3 architectures, "
                         f"5-way {s}-shot, reported per domain (API-MH)", {}) for s in (1, 5)]
    return Suite(name="blackbox-multidomain", scale=scale, scenarios=scenarios,
                 methods=list(CPU_METHODS if scale == "cpu" else PAPER_METHODS), seeds=[0], leaderboard_seeds=[0, 1, 2], job_seconds=dict(common.JOB_SECONDS),
                 description="Black-box DFML from APIs over several domains and architectures (BiDf-MKD API-MH), per domain.")


SUITES = {"blackbox-homo": _homo, "blackbox-hetero": _hetero, "blackbox-multidomain": _multidomain}
