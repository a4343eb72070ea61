"""The ``smoke`` suite: one white-box and one black-box scenario with a small Conv4 zoo, run with
``random``, ``average`` and ``oracle``. It checks an installation end to end in a few minutes: at
``cpu`` scale on the embedded glyphs, at ``paper`` scale on CIFAR-FS from the data root (the paper's
Conv4-32 zoo recipe with fewer models and epochs: a check, not a result)."""

from __future__ import annotations

from dataclasses import replace

from ..episodes import EpisodeSpec
from ..scenarios import Scenario, Suite, SuiteError
from ..zoo import ZooSpec
from .common import CONV4, CPU_CONV4, paper_recipe


def _smoke(scale: str) -> Suite:
    if scale == "cpu":
        dataset, tag, recipe = "glyphs", "glyphs", CPU_CONV4
        # the oracle is shortened so the whole suite stays within its 5-minute budget on 2 cores
        oracle, val_episodes = {"oracle": {"iterations": 100, "val_every": 50, "val_episodes": 50}}, 50
    elif scale == "paper":
        dataset, tag, recipe = "cifar-fs", "cifarfs", replace(paper_recipe("conv4", "cifar-fs"), epochs=10)
        oracle, val_episodes = {"oracle": {"iterations": 40, "val_every": 20, "val_episodes": 20}}, 20
    else:
        raise SuiteError(f"unknown scale {scale!r} for the smoke suite; choose 'cpu' or 'paper'")
    zoo = ZooSpec(dataset=dataset, n_models=6, ways=5, backbones=(CONV4,), recipes=(("*", recipe),), seed=0)
    common = dict(dataset=dataset, zoo=zoo, episodes=EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=600),
                  val_episodes=val_episodes, method_params=oracle)
    return Suite(
        name="smoke",
        scale=scale,
        description=f"One white-box and one black-box scenario on {dataset} with a small Conv4 zoo: checks an install end to end.",
        scenarios=[
            Scenario(name=f"wb-{tag}-conv4-5w1s", access="whitebox", description="white-box, 6 Conv4 models, 5-way 1-shot",
                     **common),
            Scenario(name=f"bb-{tag}-conv4-5w1s", access="blackbox", output_kind="logits", budget_total=200_000,
                     description="black-box logits APIs, 6 Conv4 models, 200k-image budget, 5-way 1-shot", **common),
        ],
        methods=["random", "average", "oracle"],
        seeds=[0],
        leaderboard_seeds=[0],
    )


SUITES = {"smoke": _smoke}
