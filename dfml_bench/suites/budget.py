"""Query budgets and API output kinds as axes (issue 15): the ``budget-sweep`` and ``blackbox-outputs`` suites.

Both are built from the black-box homo scenario of :mod:`dfml_bench.suites.blackbox` with
``dataclasses.replace`` of its budget or output kind, so they follow whatever dataset, zoo, episodes
and protocol that scenario uses.

- ``budget-sweep``: the same scenario at a ladder of total query budgets. ``cpu``: 30k, 100k, 300k
  and 1M images (1M is about 4 minutes of API forward passes alone on 2 cores); ``paper``: 0.1, 1/3,
  1 and 3 times the reference's spend per API visit (6.06M images, bidf-mkd.md 1.5). Budget-aware
  methods plan their spend from ``context.budget`` (``spend_budget``: a larger budget buys more
  generator iterations per visit) and write the plan into their records. The report and leaderboard
  draw accuracy against queries used with 95% CIs and tabulate accuracy per budget with paired tests
  against ``random`` at the same budget.
- ``blackbox-outputs``: the same scenario at one budget (cpu 100k) with APIs answering logits (the
  reference point), probabilities, the top-2 probabilities with their classes, or hard labels only.
  A method that cannot use an output kind refuses before any query (a ``skipped`` record that says why).

Methods: ``random``, the ``placebo`` control when installed, ``bidf-mkd`` and ``bidf-mkd-qe``.
"""

from __future__ import annotations

from dataclasses import replace

from ..scenarios import Scenario, Suite
from . import blackbox, common

CPU_BUDGETS = (30_000, 100_000, 300_000, 1_000_000)
REFERENCE_VISIT = 6_060_000  # queries of one reference API visit: 2 sets x 200 iterations x 150 x (100 + 1) (+ KD)
PAPER_BUDGETS = (606_000, 2_020_000, REFERENCE_VISIT, 3 * REFERENCE_VISIT)
OUTPUTS_BUDGET = {"cpu": 100_000, "paper": REFERENCE_VISIT}
OUTPUT_KINDS = (("logits", 1), ("probs", 1), ("topk", 2), ("label", 1))  # (kind, k)
BUDGET_AWARE = ("bidf-mkd", "bidf-mkd-qe")


def budget_label(n: int) -> str:
    """A short, exact-enough label of a budget for scenario names: 30k, 1M, 6.06M."""
    if n >= 1_000_000:
        return f"{n / 1e6:.3g}M"
    if n >= 1_000:
        return f"{n / 1e3:.3g}k"
    return str(n)


def _methods() -> list[str]:
    from ..methods import method_registry

    reg = method_registry()
    return ["random", *(["placebo"] if "placebo" in reg and reg["placebo"].error is None else []), *BUDGET_AWARE]


def _base(scale: str) -> Scenario:
    """The black-box homo scenario (at paper scale its first one: CIFAR-FS, 5-way 1-shot)."""
    return blackbox.SUITES["blackbox-homo"](scale).scenarios[0]


def _spend(params: dict) -> dict:
    out = {k: dict(v) for k, v in params.items()}
    for m in BUDGET_AWARE:
        out[m] = {**out.get(m, {}), "spend_budget": True}
    return out


def sweep_scenarios(base: Scenario, budgets: tuple[int, ...]) -> list[Scenario]:
    """``base`` at each total budget (per-API budget dropped), named ``<base>-q<budget>``."""
    if len(set(budgets)) != len(budgets) or any(b <= 0 for b in budgets):
        raise ValueError(f"budgets must be distinct positive integers, got {budgets}")
    return [replace(base, name=f"{base.name}-q{budget_label(b)}", budget_total=int(b), budget_per_api=None, init_key=base.init_key or base.name,
                    method_params=_spend(base.method_params),
                    description=f"{base.description.split(',')[0]}; total budget {b:,} query images (budget sweep)")
            for b in sorted(budgets)]


def output_scenarios(base: Scenario, budget: int) -> list[Scenario]:
    """``base`` at ``budget`` with each API output kind, named ``<base>-<kind>``."""
    out = []
    for kind, k in OUTPUT_KINDS:
        tag = f"top{k}" if kind == "topk" else kind
        what = {"logits": "logits", "probs": "probabilities", "topk": f"the top-{k} probabilities and their classes",
                "label": "hard labels only"}[kind]
        out.append(replace(base, name=f"{base.name}-{tag}", output_kind=kind, topk=k, budget_total=int(budget), budget_per_api=None,
                           init_key=base.init_key or base.name,
                           method_params=_spend(base.method_params),
                           description=f"black-box APIs answering {what}; {budget:,} query images"))
    return out


def sweep_job_seconds(scenarios: list[Scenario], smallest: int) -> dict[str, float]:
    """Scheduling hints of a budget ladder: a query-spending method's job grows about as budget^0.6 on
    the cpu records (bidf-mkd: 150 s at 30k, 240 s at 100k, 950 s at 1M), so the largest budgets start first."""
    hints = dict(common.JOB_SECONDS)
    for sc in scenarios:
        for m in ("bidf-mkd", "bidf-mkd-qe"):
            hints[f"{sc.name}/{m}"] = common.JOB_SECONDS[m] * (sc.budget_total / smallest) ** 0.6 / 3.0
    return hints


def _sweep(scale: str) -> Suite:
    common.check_scale("budget-sweep", scale)
    budgets = CPU_BUDGETS if scale == "cpu" else PAPER_BUDGETS
    scenarios = sweep_scenarios(_base(scale), budgets)
    return Suite(name="budget-sweep", scale=scale, scenarios=scenarios, methods=_methods(),
                 seeds=[0], leaderboard_seeds=[0, 1, 2], job_seconds=sweep_job_seconds(scenarios, min(budgets)),
                 description="Accuracy against the query budget: the black-box homo scenario at "
                             f"{', '.join(budget_label(b) for b in budgets)} query images.")


def _outputs(scale: str) -> Suite:
    common.check_scale("blackbox-outputs", scale)
    return Suite(name="blackbox-outputs", scale=scale, scenarios=output_scenarios(_base(scale), OUTPUTS_BUDGET[scale]),
                 methods=_methods(), seeds=[0], leaderboard_seeds=[0, 1, 2], job_seconds=dict(common.JOB_SECONDS),
                 description="What APIs answer: logits, probabilities, top-k or hard labels, at one budget.")


SUITES = {"budget-sweep": _sweep, "blackbox-outputs": _outputs}
