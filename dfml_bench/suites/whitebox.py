"""The white-box suites: FREE's three scenarios (free-tgr.md 2.1) at ``cpu`` and ``paper`` scale.

- ``whitebox-homo``: a homogeneous Conv4 zoo on one dataset (FREE ``mr.sh``).
- ``whitebox-hetero``: a zoo mixing Conv4, ResNet-10 and ResNet-18 (FREE ``ma.sh``); ``average`` is not
  run (it needs one architecture).
- ``whitebox-multidomain``: a Conv4 zoo over the multi-domain dataset (FREE ``md.sh``): ``glyphs-fs-multidomain-natural-shuffled``
  at cpu scale, ``multidomain`` (CIFAR-FS + miniImageNet + CUB) at paper scale; results per domain.

``cpu``: the proxy of the papers' setting (issue 12, ``docs/proxy-validation.md``): ``glyphs-fs-natural-shuffled``
(CIFAR-FS's shape: 64 / 16 / 20 classes, 600 images each, 32x32, classes with their own colour and
texture, held-out classes split between meta-val and meta-test at random) or its two-domain counterpart
``glyphs-fs-multidomain-natural-shuffled``, zoos of 5-way
teachers whose classes recur across teachers as in the papers' pools (100 Conv4; 60 mixed-architecture),
5-way 1-shot, 600 frozen test episodes, the ``placebo`` control in every default method list.
``paper``: the literature's sizes (100 models per architecture / domain, 5-way 1-shot, Conv4-32
meta-learner, 600 test episodes, 10 test-time SGD steps at lr 0.01).
"""

from __future__ import annotations

from ..backbones import BackboneSpec
from ..episodes import EpisodeSpec
from ..scenarios import Scenario, Suite, SuiteError
from ..zoo import TrainRecipe, ZooSpec
from . import common

CONV4 = common.CONV4
EPISODES_1SHOT = EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=600)
# the field's white-box methods (FREE, PURER, TGR) beside the controls, on every white-box suite
CPU_METHODS = ["random", "average", "placebo", "oracle", "free", "purer", "tgr"]
# CPU zoo recipe for every architecture: a few Adam epochs on the model's 5 glyph classes.
CPU_RECIPE = getattr(common, "CPU_CONV4", TrainRecipe(epochs=12, optimizer="adam", lr=0.005, batch_size=50))
# CPU-scale ResNets are narrow (width 16: stages 16-32-64-128) so that a zoo trains in minutes on 2 cores.
CPU_RESNET10, CPU_RESNET18 = common.CPU_RESNET10, common.CPU_RESNET18


def _homo(scale: str) -> Suite:
    common.check_scale("whitebox-homo", scale)
    if scale == "cpu":
        zoo = common.cpu_proxy_zoo()
        scenarios = [Scenario(name=f"{zoo.dataset}-conv4-5w1s", dataset=zoo.dataset, zoo=zoo, access="whitebox", episodes=EPISODES_1SHOT,
                              method_params=common.CPU_ORACLE,
                              description=f"white-box, 100 Conv4 {zoo.dataset} models (5 of 64 classes each), 5-way 1-shot")]
    else:
        scenarios = []
        for ds in ("cifar-fs", "mini-imagenet", "cub"):
            zoo = common.paper_zoo(ds, ("conv4",))
            for shots in (1, 5):
                scenarios.append(Scenario(
                    name=f"{ds}-conv4-5w{shots}s", dataset=ds, zoo=zoo, access="whitebox",
                    episodes=EpisodeSpec(ways=5, shots=shots, queries=15, n_episodes=600),
                    description=f"white-box, 100 Conv4 {ds} models, 5-way {shots}-shot (FREE mr.sh)"))
    return Suite(name="whitebox-homo", scale=scale, scenarios=scenarios, methods=list(CPU_METHODS), seeds=[0],
                 leaderboard_seeds=[0, 1, 2], job_seconds=dict(common.JOB_SECONDS),
                 description="White-box DFML with a homogeneous Conv4 zoo (FREE's main results setting).")


def _hetero(scale: str) -> Suite:
    common.check_scale("whitebox-hetero", scale)
    if scale == "cpu":
        zoo = common.cpu_proxy_zoo((CONV4, CPU_RESNET10, CPU_RESNET18), n_models=common.CPU_PROXY_MIXED_MODELS)
        name, ds = f"{zoo.dataset}-mixarch-5w1s", zoo.dataset
        desc = f"white-box, {zoo.n_models} {zoo.dataset} models: Conv4, ResNet-10, ResNet-18 (width 16) in turn"
    else:
        zoo = common.paper_zoo("cifar-fs", ("conv4", "resnet10", "resnet18"))
        name, ds, desc = "cifar-fs-mixarch-5w1s", "cifar-fs", "white-box, 300 CIFAR-FS models: 100 each of Conv4, ResNet-10, ResNet-18 (FREE ma.sh)"
    return Suite(name="whitebox-hetero", scale=scale,
                 scenarios=[Scenario(name=name, dataset=ds, zoo=zoo, access="whitebox", episodes=EPISODES_1SHOT, description=desc,
                                     method_params=common.CPU_ORACLE if scale == "cpu" else {})],
                 methods=[m for m in CPU_METHODS if m != "average"], seeds=[0], leaderboard_seeds=[0, 1, 2], job_seconds=dict(common.JOB_SECONDS),
                 description="White-box DFML with a multi-architecture zoo (average is not defined across architectures).")


def _multidomain(scale: str) -> Suite:
    common.check_scale("whitebox-multidomain", scale)
    ds = common.CPU_PROXY_MULTIDOMAIN if scale == "cpu" else "multidomain"
    common.require_dataset("whitebox-multidomain", ds, scale)
    if scale == "cpu":
        zoo = common.cpu_proxy_zoo(dataset=ds)
        desc = f"white-box, {zoo.n_models} Conv4 models over the two glyphs-fs domains, 5-way 1-shot, reported per domain"
    else:
        zoo = common.paper_zoo(ds, ("conv4",))
        desc = "white-box, 300 Conv4 models over CIFAR-FS + miniImageNet + CUB (FREE md.sh), reported per domain"
    return Suite(name="whitebox-multidomain", scale=scale,
                 scenarios=[Scenario(name=f"{ds}-conv4-5w1s", dataset=ds, zoo=zoo, access="whitebox", episodes=EPISODES_1SHOT,
                                     description=desc, method_params=common.CPU_ORACLE if scale == "cpu" else {})],
                 methods=list(CPU_METHODS), seeds=[0], leaderboard_seeds=[0, 1, 2], job_seconds=dict(common.JOB_SECONDS),
                 description="White-box DFML with a multi-domain zoo, accuracy per domain.")


SUITES = {"whitebox-homo": _homo, "whitebox-hetero": _hetero, "whitebox-multidomain": _multidomain}
