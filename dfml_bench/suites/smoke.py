"""The ``smoke`` suite: checks an installation end to end in a few minutes on CPU."""

from __future__ import annotations

from ..episodes import EpisodeSpec
from ..scenarios import Scenario, Suite, SuiteError
from ..zoo import ZooSpec
from dataclasses import replace

from .common import CONV4, CPU_CONV4, paper_recipe


def _smoke(scale: str) -> Suite:
    if scale == "paper":
        return _smoke_paper()
    if scale != "cpu":
        raise SuiteError(f"unknown scale {scale!r} for the smoke suite; choose 'cpu' or 'paper'")
    zoo = ZooSpec(dataset="glyphs", n_models=6, ways=5, backbones=(CONV4,), recipes=(("*", CPU_CONV4),), seed=0)
    episodes = EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=600)
    # the oracle is shortened so the whole suite stays within its 5-minute budget on 2 cores
    oracle = {"oracle": {"iterations": 100, "val_every": 50, "val_episodes": 50}}
    return Suite(
        name="smoke",
        scale=scale,
        description="One white-box and one black-box scenario on glyphs with a small Conv4 zoo: checks an install end to end.",
        scenarios=[
            Scenario(name="wb-glyphs-conv4-5w1s", dataset="glyphs", zoo=zoo, access="whitebox", episodes=episodes,
                     val_episodes=50, method_params=oracle, description="white-box, 6 Conv4 models, 5-way 1-shot"),
            Scenario(name="bb-glyphs-conv4-5w1s", dataset="glyphs", zoo=zoo, access="blackbox", output_kind="logits",
                     budget_total=200_000, episodes=episodes, val_episodes=50, method_params=oracle,
                     description="black-box logits APIs, 6 Conv4 models, 200k-image budget, 5-way 1-shot"),
        ],
        methods=["random", "average", "oracle"],
        seeds=[0],
        leaderboard_seeds=[0],
    )


def _smoke_paper() -> Suite:
    """The same two scenarios on CIFAR-FS from the data root: checks that a real dataset, the paper's
    Conv4-32 zoo recipe (fewer models and epochs: this is a check, not a result) and the GPU path work."""
    zoo = ZooSpec(dataset="cifar-fs", n_models=6, ways=5, backbones=(CONV4,),
                  recipes=(("*", replace(paper_recipe("conv4", "cifar-fs"), epochs=10)),), seed=0)
    episodes = EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=600)
    oracle = {"oracle": {"iterations": 40, "val_every": 20, "val_episodes": 20}}
    return Suite(
        name="smoke",
        scale="paper",
        description="One white-box and one black-box scenario on CIFAR-FS with a small Conv4 zoo: checks real data end to end.",
        scenarios=[
            Scenario(name="wb-cifarfs-conv4-5w1s", dataset="cifar-fs", zoo=zoo, access="whitebox", episodes=episodes,
                     val_episodes=20, method_params=oracle, description="white-box, 6 Conv4 models, 5-way 1-shot"),
            Scenario(name="bb-cifarfs-conv4-5w1s", dataset="cifar-fs", zoo=zoo, access="blackbox", output_kind="logits",
                     budget_total=200_000, episodes=episodes, val_episodes=20, method_params=oracle,
                     description="black-box logits APIs, 6 Conv4 models, 200k-image budget, 5-way 1-shot"),
        ],
        methods=["random", "average", "oracle"],
        seeds=[0],
        leaderboard_seeds=[0],
    )


SUITES = {"smoke": _smoke}
