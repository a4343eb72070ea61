"""Scenarios and suites.

A :class:`Scenario` fixes everything a result depends on apart from the method and the seed: dataset,
zoo spec, access kind and output kind, query budget, episode spec, the meta-learner's backbone and the
test-time adaptation protocol. The protocol belongs to the scenario, not the method, so that results
are comparable. A :class:`Suite` is a named list of scenarios at a scale (``cpu``: the embedded glyph
dataset, minutes on a laptop; ``paper``: the literature's datasets and sizes, for a GPU), with the
methods it runs by default and the seeds the leaderboard requires.

Suites are registered under the entry-point group ``dfml_bench.suites``: each entry point is a callable
returning ``{suite name: factory(scale) -> Suite}``. The built-ins are in :mod:`dfml_bench.suites`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from .backbones import BackboneSpec
from .access import OUTPUT_KINDS
from .episodes import EpisodeSpec
from .evaluation import AdaptProtocol
from .zoo import ZooSpec

SCALES = ("cpu", "paper")


class SuiteError(ValueError):
    """Unknown suite / scale, or an invalid scenario definition."""


@dataclass(frozen=True)
class Scenario:
    name: str
    dataset: str
    zoo: ZooSpec
    access: str = "whitebox"  # whitebox | blackbox
    output_kind: str = "logits"  # logits | probs | topk | label (black-box only)
    topk: int = 1
    budget_total: int | None = None  # images, over all APIs
    budget_per_api: int | None = None
    episodes: EpisodeSpec = EpisodeSpec()  # the test episodes (600 by default)
    val_episodes: int = 100  # meta-val episodes offered to methods for model selection
    backbone: BackboneSpec = BackboneSpec("conv4", 32)
    protocol: AdaptProtocol = AdaptProtocol()
    dataset_seed: int = 0
    method_params: dict = field(default_factory=dict, hash=False, compare=False)  # method -> params at this scale
    fit_timeout: float | None = None  # seconds a method's fit may take (None: the scale's default; --fit-timeout overrides)
    description: str = ""
    # the scenario whose meta-learner initialisation this one shares (None: its own name). Variants of one
    # scenario (the budget ladder, the output kinds) share it, so their differences are the variant's alone
    init_key: str | None = None

    def __post_init__(self) -> None:
        if self.access not in ("whitebox", "blackbox"):
            raise SuiteError(f"scenario {self.name!r}: access must be 'whitebox' or 'blackbox', got {self.access!r}")
        if self.output_kind not in OUTPUT_KINDS:
            raise SuiteError(f"scenario {self.name!r}: output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if self.zoo.dataset != self.dataset:
            raise SuiteError(f"scenario {self.name!r}: zoo is built on {self.zoo.dataset!r} but the scenario uses {self.dataset!r}")
        if self.zoo.ways != self.episodes.ways:
            pass  # allowed: zoo models may have a different number of classes than the test tasks

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


@dataclass
class Suite:
    name: str
    scale: str
    scenarios: list[Scenario]
    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    leaderboard_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    description: str = ""
    # typical seconds of one job, by ``method`` or ``scenario/method`` (the latter wins): a scheduling hint
    # only (a local pool starts the longest jobs first; records of earlier seeds, when there are any,
    # replace it). Never part of a record.
    job_seconds: dict[str, float] = field(default_factory=dict)

    def scenario(self, name: str) -> Scenario:
        for s in self.scenarios:
            if s.name == name:
                return s
        raise SuiteError(f"suite {self.name!r} has no scenario {name!r}; it has {[s.name for s in self.scenarios]}")

    def restrict(self, names: list[str] | None) -> "Suite":
        """This suite with only the named scenarios, in the suite's order (all of them for None).

        A name is a scenario's full name or a unique ``-``-separated tail of it (``q300k`` for
        ``glyphs-fs-conv4-5w1s-q300k``). Nothing else changes: a scenario's episodes, zoo and
        initialisation depend on the scenario alone, so a restricted run's records are the full run's."""
        if names is None:
            return self
        chosen: list[str] = []
        for n in names:
            hits = [s.name for s in self.scenarios if s.name == n] or \
                   [s.name for s in self.scenarios if s.name.endswith("-" + n)]
            if len(hits) != 1:
                why = "matches none" if not hits else f"matches {len(hits)} ({', '.join(hits)})"
                raise SuiteError(f"--scenarios {n!r} {why} of suite {self.name!r}'s scenarios; name one of "
                                 f"{', '.join(s.name for s in self.scenarios)} (or a unique tail such as "
                                 f"{self.scenarios[-1].name.rsplit('-', 1)[-1]!r})")
            if hits[0] in chosen:
                raise SuiteError(f"--scenarios names scenario {hits[0]!r} twice; each scenario runs once")
            chosen.append(hits[0])
        return replace(self, scenarios=[s for s in self.scenarios if s.name in chosen])


SuiteFactory = Callable[[str], Suite]


def suite_registry() -> dict[str, SuiteFactory]:
    """All registered suites, from every ``dfml_bench.suites`` entry point."""
    from .registry import load_group

    out: dict[str, SuiteFactory] = {}
    for entry in load_group("dfml_bench.suites").values():
        if entry.error is not None:
            continue
        out.update(entry.obj())
    return out


def get_suite(name: str, scale: str = "cpu") -> Suite:
    """The suite ``name`` at ``scale``; unknown names list the valid ones."""
    if scale not in SCALES:
        raise SuiteError(f"unknown scale {scale!r}; choose one of {SCALES}")
    reg = suite_registry()
    if name not in reg:
        raise SuiteError(f"unknown suite {name!r}; known suites: {', '.join(sorted(reg))}")
    return reg[name](scale)
