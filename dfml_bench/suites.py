"""The built-in suites. Each factory takes a scale (``cpu`` or ``paper``) and returns a Suite.

``cpu`` scale runs on the embedded ``glyphs`` dataset in minutes on two cores; ``paper`` scale uses the
literature's datasets, zoo sizes and recipes and is meant for a GPU.
"""

from __future__ import annotations

from .backbones import BackboneSpec
from .episodes import EpisodeSpec
from .scenarios import Scenario, Suite, SuiteError
from .zoo import TrainRecipe, ZooSpec

CONV4 = BackboneSpec("conv4", 32)

# Literature recipes (field-survey section 2.2): Conv4 Adam 0.01 x 60 epochs; ResNets SGD.
PAPER_CONV4 = TrainRecipe(epochs=60, optimizer="adam", lr=0.01, batch_size=128, augment="flip_crop")
PAPER_RESNET = TrainRecipe(epochs=100, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                           milestones=(30, 50, 80), gamma=0.2, batch_size=128, augment="flip_crop")
# CPU scale: glyph instances are already jittered, so no augmentation; few epochs suffice on 5-way tasks.
CPU_CONV4 = TrainRecipe(epochs=12, optimizer="adam", lr=0.005, batch_size=50)


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


def builtin_suites() -> dict:
    """Entry point of the ``dfml_bench.suites`` group for the built-in suites."""
    return {"smoke": _smoke}
