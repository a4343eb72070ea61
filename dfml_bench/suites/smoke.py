"""The ``smoke`` suite: checks an installation end to end in a few minutes on CPU."""

from __future__ import annotations

from ..episodes import EpisodeSpec
from ..scenarios import Scenario, Suite, SuiteError
from ..zoo import ZooSpec
from .common import CONV4, CPU_CONV4


def _smoke(scale: str) -> Suite:
    if scale != "cpu":
        raise SuiteError("the smoke suite exists at cpu scale only (it checks an installation end to end)")
    zoo = ZooSpec(dataset="glyphs", n_models=6, ways=5, backbones=(CONV4,), recipes=(("*", CPU_CONV4),), seed=0)
    episodes = EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=600)
    return Suite(
        name="smoke",
        scale=scale,
        description="One white-box and one black-box scenario on glyphs with a small Conv4 zoo: checks an install end to end.",
        scenarios=[
            Scenario(name="wb-glyphs-conv4-5w1s", dataset="glyphs", zoo=zoo, access="whitebox", episodes=episodes,
                     description="white-box, 6 Conv4 models, 5-way 1-shot"),
            Scenario(name="bb-glyphs-conv4-5w1s", dataset="glyphs", zoo=zoo, access="blackbox", output_kind="logits",
                     budget_total=200_000, episodes=episodes,
                     description="black-box logits APIs, 6 Conv4 models, 200k-image budget, 5-way 1-shot"),
        ],
        methods=["random", "average", "oracle"],
        seeds=[0],
        leaderboard_seeds=[0],
    )


SUITES = {"smoke": _smoke}
