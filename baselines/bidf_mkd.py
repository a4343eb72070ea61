"""``bidf-mkd``: Black-box Data-free Meta Knowledge Distillation (Hu et al., ICML 2023), from
the project spec ``shared/reference/bidf-mkd.md`` (sections 2, 6 and 7), with the reference code's bugs fixed.

One run: visit APIs in turn; at each visit recover a support set by training a freshly reset generator
through the zero-order (ZO) gradient estimator, distil the API into the meta-learner with the bi-level
KD (inner steps on the support set, outer loss on a student-aware "boundary" query set), and store
all recovered images in a task memory that is replayed as CE-MAML tasks mixing classes of different
APIs ("interpolated tasks"). The checkpoint is selected on meta-val episodes.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dfml_bench.access import BlackBoxAPI, BudgetExhausted
from dfml_bench.evaluation import inner_adapt
from dfml_bench.methods import Method, MethodContext, MethodError

from .generator import augment, make_generator_module
from .memory import TaskMemory, save_image_grid
from .zo import DIRECTIONS, query_logits, surrogate, zo_gradient

# --------------------------------------------------------------------------------------------------
# pieces (pure functions)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, faithful_bug: bool = False) -> torch.Tensor:
    """Distillation loss between student logits and teacher logits (API outputs as logits).

    Default: the true ``KL(softmax(t/T) || softmax(s/T)) * T^2``, batch mean. ``faithful_bug=True``
    reproduces the reference (bug B1): probabilities fed where log-probabilities belong, element-wise
    mean, i.e. ``mean_{b,c} p_t (log p_t - p_s)``.
    """
    if faithful_bug:
        p_t = teacher.softmax(1)  # = F.kl_div(p_s, p_t, reduction="mean"), without its deprecation warning
        return (torch.xlogy(p_t, p_t) - p_t * student.softmax(1)).mean()
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def per_sample_loss(targets: torch.Tensor, student: torch.Tensor | None = None, adv: float = 0.0):
    """The black-box loss of a synthesis call, per row of a batched query (``idx`` = sample of each row).

    ``CE(A(x), y_b)``; with a ``student`` (its logits at the clean points, held fixed, spec 2.5) also
    ``- adv * m_b(x) * ||A(x) - s_b||_1`` where ``m_b(x) = [argmax A(x) == argmax s_b]`` at each
    (perturbed) point: pushes samples the student already agrees on towards larger disagreement.
    """

    def fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets[idx], reduction="none")
        if student is not None and adv > 0:
            s = student[idx]
            mask = (logits.argmax(1) == s.argmax(1)).float()
            loss = loss - adv * mask * (logits - s).abs().sum(1)
        return loss

    return fn


def recovery_cost(batch: int, q: int, iterations: int) -> int:
    """Queries of one API visit: two synthesis calls of ``iterations`` x ``batch * (q + 1)`` plus the
    KD queries (support and query sets, once each: cached)."""
    return 2 * batch * (q + 1) * iterations + 2 * batch


def plan_recovery(budget: float, batch: int, q: int, iterations: int, visits: int, *, per_visit_cap: float = math.inf,
                  min_iterations: int = 5, min_q: int = 2) -> tuple[int, int, int]:
    """Fit ``visits`` API visits of ``iterations`` ZO steps with ``q`` directions into ``budget`` queries.

    Shrinks, in this order, the generator iterations (down to ``min_iterations``), q (down to
    ``min_q``), then the number of visits; a budget too small for one visit at the minimum gets one
    visit with as many iterations as fit (possibly 0: KD-free of ZO, see the method). Returns
    ``(visits, q, iterations)``.
    """
    if visits < 1:
        return 0, q, iterations
    per_visit = min(budget / visits, per_visit_cap)

    def fit_iters(qq: int, per: float) -> int:
        return int((per - 2 * batch) // (2 * batch * (qq + 1)))

    if recovery_cost(batch, q, iterations) <= per_visit:
        return visits, q, iterations
    it = fit_iters(q, per_visit)
    if it >= min_iterations:
        return visits, q, it
    for qq in range(q, min_q - 1, -1):
        if fit_iters(qq, per_visit) >= min_iterations:
            return visits, qq, min_iterations
    one = recovery_cost(batch, min_q, min_iterations)
    v = int(min(budget, visits * per_visit) // one) if per_visit_cap >= one else 0
    if v >= 1:
        return min(v, visits), min_q, min_iterations
    return 1, min_q, max(0, fit_iters(min_q, min(budget, per_visit_cap)))


def grow_recovery(budget: float, batch: int, q: int, iterations: int, visits: int, *, max_iterations: int,
                  per_visit_cap: float = math.inf) -> int:
    """Generator iterations per visit when the budget allows more than ``iterations``: as many as fit
    ``visits`` visits into ``budget`` (and ``per_visit_cap``), at most ``max_iterations``, never fewer
    than ``iterations``. Used when the method is asked to spend its budget (``spend_budget``): recovery
    quality grows with iterations, so a larger budget buys better sets, not unused queries."""
    if visits < 1 or not math.isfinite(min(budget / max(visits, 1), per_visit_cap)):
        return iterations
    per_visit = min(budget / visits, per_visit_cap)
    fit = int((per_visit - 2 * batch) // (2 * batch * (q + 1)))
    return max(iterations, min(max_iterations, fit))


class _CountingAPI:
    """Forwards queries to an API and adds the number of images to ``counts[key]``."""

    def __init__(self, api: BlackBoxAPI, counts: dict, key: str):
        self.api, self.info, self.counts, self.key = api, api.info, counts, key

    def query(self, images: torch.Tensor):
        out = self.api.query(images)
        self.counts[self.key] = self.counts.get(self.key, 0) + int(images.shape[0])
        return out

    @property
    def remaining_budget(self) -> float:
        return self.api.remaining_budget


@dataclass
class Recovered:
    images: torch.Tensor  # [B, C, H, W] in [0, 1], un-augmented (the best iterate)
    labels: torch.Tensor  # [B] local labels 0..K-1
    losses: list[float] = field(default_factory=list)  # mean clean black-box loss per iteration
    iterations: int = 0
    exhausted: bool = False
    agreement: float | None = None  # fraction of the best iterate the API labelled with its target (clean queries)
    margin: float | None = None  # median API log-odds margin of the target on the best iterate (None: hard labels)


def target_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample log-odds margin of the target class: ``z_y - max_{j != y} z_j`` ([B]).

    Positive where the answer's top class is the target; large where a sample sits deep inside its
    class, far from any decision boundary ("too easy" to teach a student much). The same number for
    logits and log-probabilities (softmax does not change differences of logits).
    """
    target = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return target - others.max(1).values


def recover(api, *, ways: int, per_class: int, iterations: int, q: int, mu: float, lr: float, rng: torch.Generator,
            device, image_shape, student=None, adv: float = 0.0, zo: bool = True, nz: int = 256, ngf: int = 64,
            augment_images: bool = True, directions: str = "sphere", resolution: int | None = None,
            orthogonal: bool = False, on_step: Callable[[int, torch.Tensor], None] | None = None) -> Recovered:
    """One synthesis call (spec 2.4/2.5): a freshly reset generator and fresh latents, optimised jointly
    with Adam through the ZO estimate of the per-sample black-box loss on augmented images.

    ``student(x) -> logits`` enables the boundary term. ``zo=False`` (ablation) returns the untrained
    generator's images. ``augment_images``: the reference's batch-level pad-4 crop and flip before each
    query (on by default). Keeps the iterate with the lowest mean clean loss (the reference keeps the
    lowest *surrogate*, which is not a loss, D4). A :class:`BudgetExhausted` ends the call early with
    the best iterate so far (re-raised if there is none). ``directions`` / ``resolution`` /
    ``orthogonal`` choose the ZO estimator (:func:`baselines.zo.zo_gradient`); ``on_step(i, best)`` is
    called after every iteration with the best images so far (benchmarks trace recovery with it).
    ``Recovered.agreement`` is the fraction of the best iterate's (augmented) images the API labelled
    with their target, ``Recovered.margin`` the median :func:`target_margin` of the API's answers on them
    (None for hard labels, whose answers carry no margin): both free, from the clean queries already made.
    """
    c, h, w = image_shape
    gen = make_generator_module(h, c, rng if rng.device.type == "cpu" else _cpu_gen(rng), device, nz=nz, ngf=ngf)
    batch = ways * per_class
    z = torch.randn(batch, nz, generator=rng, device=device).requires_grad_(True)
    y = torch.arange(batch, device=device) % ways
    if not zo or iterations <= 0:
        with torch.no_grad():
            return Recovered(gen(z).detach(), y)
    opt = torch.optim.Adam([*gen.parameters(), z], lr=lr, betas=(0.5, 0.999))
    best, best_loss, losses, exhausted, agreement, margin = None, math.inf, [], False, None, None
    kind = api.info.output_kind
    for _ in range(iterations):
        X = gen(z)
        x = augment(X, rng) if augment_images else X
        s = None
        if student is not None and adv > 0:
            with torch.no_grad():
                s = student(x.detach().clamp(mu, 1 - mu))
                if kind != "logits":
                    s = F.log_softmax(s, 1)  # the API answers (log-)probabilities: compare like with like
        try:
            g, clean, logits = zo_gradient(api, x, per_sample_loss(y, s, adv), q=q, mu=mu, generator=rng, directions=directions,
                                           resolution=resolution, orthogonal=orthogonal)
        except BudgetExhausted:
            exhausted = True
            break
        cur = float(clean.mean())
        losses.append(cur)
        if cur < best_loss:
            best_loss, best = cur, X.detach().clone()
            agreement = float((logits.argmax(1) == y).float().mean())
            margin = None if kind == "label" else float(target_margin(logits, y).median())
        opt.zero_grad(set_to_none=True)
        surrogate(g, x).backward()
        opt.step()
        if on_step is not None:
            on_step(len(losses), best)
    if best is None:
        raise BudgetExhausted("no synthesis iteration fitted the remaining budget", requested=batch * (q + 1), used=0,
                              budget=0, scope="recovery")
    return Recovered(best, y, losses, len(losses), exhausted, agreement, margin)


def _save_grid(memory: TaskMemory, path, title: str) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(memory.grid(), path, title=title)


def _cpu_gen(g: torch.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))


def device_generator(g: torch.Generator | None, device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` (directions are drawn where the images are), seeded from ``g``."""
    base = g if g is not None else torch.Generator().manual_seed(seed)
    if torch.device(device).type == "cpu":
        return base
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=base)))


# --------------------------------------------------------------------------------------------------
# the method


_SCALE_DEFAULTS = {
    # reference values (bidf-mkd.md 2.9), except model selection (meta-val) and the documented fixes
    "paper": dict(per_class=30, q=100, mu=0.005, gen_iterations=200, gen_lr=1e-3, max_visits=300, meta_iterations=60000,
                  meta_batch=4, inner_steps=5, kd_inner_steps=10, inner_lr=0.01, outer_lr=1e-3, visit_trigger="plateau",
                  generate_interval=200, visit_every=200, boundary_start=4000, val_every=500, val_episodes=100,
                  min_gen_iterations=20, min_q=10, ngf=64, estimator="sphere", orthogonal=False, label_mu=10.0,
                  spend_budget=False, max_gen_iterations=200, replay_tasks="mixed"),
    # 2 CPU cores, a suite in minutes: small sets, few directions and iterations, visits on a schedule
    "cpu": dict(per_class=5, q=8, mu=0.005, gen_iterations=20, gen_lr=0.01, max_visits=9, meta_iterations=120,
                meta_batch=4, inner_steps=5, kd_inner_steps=10, inner_lr=0.01, outer_lr=1e-3, visit_trigger="schedule",
                generate_interval=200, visit_every=None, boundary_start=0, val_every=30, val_episodes=100,
                min_gen_iterations=5, min_q=2, ngf=32, estimator="sphere", orthogonal=False, label_mu=10.0,
                  spend_budget=False, max_gen_iterations=200, replay_tasks="per-model"),
}


class BiDfMKD(Method):
    """BiDf-MKD: ZO data recovery per API, boundary query sets, bi-level meta KD and task memory replay.

    Hyper-parameters left ``None`` take the ``scale`` default (``paper``: the reference's values;
    ``cpu``: sized for 2 cores). Switches for the ablation table: ``use_zo_recovery`` (False: images of
    an untrained generator, no ZO query), ``use_boundary`` (False: query sets recovered like support
    sets), ``use_kd`` (False: no bi-level KD task; the recovered images still feed the memory),
    ``use_memory_replay`` (False: every meta-batch re-uses the latest API's cached KD task instead of
    replayed tasks), ``faithful_kd_bug`` (True: the reference's probabilities-as-log-probabilities loss).

    Ratio of distillation to replay tasks (deliberate): the number of API visits is set by the query
    budget, not by the reference's accuracy-plateau trigger (at most 1 KD task in ~800). At ``cpu``
    scale visits are spread evenly over training (``visit_trigger="schedule"``): one KD task per
    ``visit_every`` meta-iterations (default meta_iterations / visits, 120 / 9 -> 1 KD task per ~53
    tasks with meta_batch 4), so every recovered set is distilled while the memory, which grows with
    each visit, supplies the remaining tasks. ``paper`` keeps the reference's plateau trigger
    (patience ``generate_interval`` = 200 meta-updates).

    Deviations from the reference (all deliberate):
    - KD is the true KL at temperature ``kd_temperature`` (bug B1 fixed; ``faithful_kd_bug`` restores it).
    - Model selection on meta-val episodes (``context.evaluate_val``), never on test (B2); the
      initialisation (iteration 0) is a candidate (``select_init``), so when meta-training on recovered
      tasks does not improve meta-val, the selected meta-learner is the initialisation (best_iteration 0).
    - The API is queried once per KD set and cached (the reference re-queries identical images at each
      of the 10 inner steps, D8); the KD sets get one batch-level crop/flip as in the reference.
    - The q perturbations of a batch are ONE batched query; directions are drawn on the device (D9).
    - Perturbations live in [0, 1] pixel space (APIs take unnormalised images), at ``x.clamp(mu, 1-mu)``.
    - The synthesis result is the iterate with the lowest clean black-box loss, not the lowest surrogate (D4).
    - Query budget: recovery is planned to fit (fewer iterations, then smaller q, then fewer visits);
      APIs are visited in shuffled cycles (without replacement until all are visited) so a small budget
      covers as many distinct APIs as possible; BudgetExhausted ends recovery and training continues
      on the memory.
    - Outputs: ``logits``, ``probs`` (log-probabilities stand in for logits, equal up to a per-row
      constant, so CE, KL and the argmax mask are unchanged; the L1 boundary distance then compares
      log-probabilities) and ``topk`` (missing mass spread evenly, an approximation). ``label`` is
      refused before any query (``output_kinds``): the reference's estimator (q full-image directions
      at mu = 0.005) sees a piecewise-constant loss, so its finite differences vanish almost everywhere.
      ``bidf-mkd-qe`` runs on labels (a smoothed 0-1 loss with a large radius ``label_mu``).
    - Estimator (``estimator``, ``zo_resolution``, ``orthogonal``): the reference's full-sphere
      directions by default; ``"subspace"`` estimates in a low-resolution grid (``baselines.zo``), the
      setting of the registered query-efficient variant ``bidf-mkd-qe``.
    - ``replay_tasks``: ``"mixed"`` (the reference's interpolated tasks; ``paper``) or ``"per-model"`` (a
      replay task uses the recovered sets of one API only; ``cpu``, as FREE's cpu setting). Chosen on
      meta-val (``benchmarks/search_metaval.py``, blackbox-homo seed 0, 60 val episodes): with mixed
      tasks meta-val fell from 0.260 (initialisation) to 0.205 over 120 iterations, with per-model tasks
      it stayed at 0.255-0.266 (best 0.266 at iteration 30). On the glyphs-fs proxy a mixed task can be
      solved by telling apart which API's recovery produced an image (docs/proxy-validation.md).
    - ``spend_budget`` (on in the budget-sweep suite): when the budget allows more than the default
      plan, generator iterations per visit grow to use it (up to ``max_gen_iterations``, reference 200);
      off by default, so the other suites keep the plan their records were made with.
    - ``cpu`` scale scores each checkpoint on 100 meta-val episodes, as the other methods' cpu settings (60
      before issue 12: on meta-val alone, fresh episodes of the meta-val classes put its chosen
      checkpoint about 3 points below the score it was chosen on, in blackbox-homo seed 0, where the
      methods scored on 100 episodes lost less; ``benchmarks/diag_val_split.py``, docs/model-selection.md).
    - ``cpu`` scale uses a half-width generator (ngf 32): at 32 px with few directions its forward and
      backward cost more than the (q + 1) API queries.
    - The head bias of the meta-learner starts at 0 (as the authors' TDRM code); the harness's
      initialisation does this for every method.

    What the ``cpu`` budget buys (measured on one Conv4 glyph API, recorded in the issue-5 note): at the
    plan's q = 8 and 20 iterations (4,500 queries per set) the API labels the recovered set at chance
    (0.20); 200 iterations (45,000 queries) reach 0.36. Recovery of the quality the paper relies on
    needs several 100k queries per set, i.e. millions per run, beyond a 2-core budget of minutes.
    """

    name = "bidf-mkd"
    access = frozenset({"blackbox", "whitebox"})
    output_kinds = frozenset({"logits", "probs", "topk"})
    description = "black-box DFML: ZO generator inversion, boundary queries, bi-level meta KD, task memory replay"

    # recovery
    per_class: int | None = None  # synthetic images per class per set (reference 30)
    q: int | None = None  # random directions per sample (reference 100)
    mu: float | None = None  # smoothing radius, [0, 1] pixel units
    gen_iterations: int | None = None  # generator steps per synthesis call (reference 200)
    gen_lr: float | None = None  # Adam lr for generator and latents (reference 1e-3)
    ngf: int | None = None  # generator width (reference 64; cpu 32: the generator, not the API, dominates a cpu ZO step)
    min_gen_iterations: int | None = None  # budget planning floors
    min_q: int | None = None
    max_visits: int | None = None  # API visits wanted (the budget may allow fewer)
    adv: float = 1.0  # weight of the boundary term
    estimator: str | None = None  # ZO directions: "sphere" (reference) | "subspace" (low-resolution grid, bidf-mkd-qe)
    zo_resolution: int | None = None  # subspace grid side (None: image side // 4, the generator's base resolution)
    orthogonal: bool | None = None  # orthonormal directions per sample
    label_mu: float | None = None  # smoothing radius (L2, [0, 1] pixel units) when the API answers hard labels
    spend_budget: bool | None = None  # grow generator iterations (up to max_gen_iterations) to use a larger budget
    max_gen_iterations: int | None = None  # cap of that growth (reference 200)
    boundary_start: int | None = None  # meta-iteration from which query sets are boundary sets (reference 4000)
    # meta-learning
    meta_iterations: int | None = None  # outer Adam steps (reference 60000)
    meta_batch: int | None = None  # tasks per outer step, losses summed (reference 4)
    inner_steps: int | None = None  # replay CE-MAML inner steps (reference 5)
    kd_inner_steps: int | None = None  # KD inner steps (reference 10)
    inner_lr: float | None = None
    outer_lr: float | None = None
    kd_temperature: float = 1.0
    first_order: bool = False
    visit_trigger: str | None = None  # "schedule" | "plateau"
    visit_every: int | None = None  # schedule: meta-iterations between visits (None: spread evenly)
    generate_interval: int | None = None  # plateau patience (reference 200)
    memory_batches_per_class: int = 20
    replay_tasks: str | None = None  # "mixed": classes across APIs (reference) | "per-model": one API's sets per task
    # model selection
    val_every: int | None = None
    val_episodes: int | None = None
    # switches (ablation)
    use_zo_recovery: bool = True
    use_boundary: bool = True
    use_kd: bool = True
    use_memory_replay: bool = True
    faithful_kd_bug: bool = False
    select_init: bool = True  # the initialisation (iteration 0) is a model-selection candidate

    ablation_switches = ("use_zo_recovery", "use_boundary", "use_kd", "use_memory_replay", "faithful_kd_bug")

    def _scale_defaults(self, scale: str) -> dict:
        """The ``scale``'s default hyper-parameters (a variant overrides some)."""
        if scale not in _SCALE_DEFAULTS:
            raise MethodError(f"{self.name} has defaults for scales {sorted(_SCALE_DEFAULTS)}, got {scale!r}")
        return dict(_SCALE_DEFAULTS[scale], zo_resolution=None)

    def _hp(self, scale: str) -> dict:
        hp = self._scale_defaults(scale)
        for k in hp:
            v = getattr(self, k, None)
            if v is not None:
                hp[k] = v
        if hp["visit_trigger"] not in ("schedule", "plateau"):
            raise MethodError(f"visit_trigger must be 'schedule' or 'plateau', got {hp['visit_trigger']!r}")
        if hp["replay_tasks"] not in ("mixed", "per-model"):
            raise MethodError(f"replay_tasks must be 'mixed' or 'per-model', got {hp['replay_tasks']!r}")
        if hp["estimator"] not in DIRECTIONS:
            raise MethodError(f"estimator must be one of {DIRECTIONS}, got {hp['estimator']!r}")
        for k in ("q", "per_class", "gen_iterations", "meta_iterations", "max_visits"):
            if not isinstance(hp[k], int) or hp[k] < 1:
                raise MethodError(f"{k} must be a positive integer, got {hp[k]!r}")
        for k in ("mu", "label_mu", "gen_lr"):
            if not (isinstance(hp[k], (int, float)) and hp[k] > 0):
                raise MethodError(f"{k} must be a positive number, got {hp[k]!r}")
        return hp

    # ---------------------------------------------------------------------------------------------
    def fit(self, context: MethodContext) -> nn.Module:
        hp = self._hp(context.scale)
        apis = context.apis()
        if not apis:
            raise MethodError("bidf-mkd needs at least one API")
        kinds = {a.info.output_kind for a in apis}
        if not kinds <= self.output_kinds:
            raise MethodError(f"bidf-mkd supports API outputs {sorted(self.output_kinds)}, got {sorted(kinds)}")
        device = context.device
        g = context.generator if context.generator is not None else torch.Generator().manual_seed(context.seed)
        rng = device_generator(g, device, context.seed)
        spec = context.episode_spec
        ways = spec.ways
        image_shape = tuple(context.image_shape)

        model = context.make_backbone()  # head bias 0, as every method's initialisation (runner)
        opt = torch.optim.Adam(model.parameters(), lr=hp["outer_lr"])
        memory = TaskMemory(max_batches_per_class=self.memory_batches_per_class)
        counts: dict[str, int] = {"support": 0, "query": 0, "kd": 0}

        # ---- plan the recovery to fit the budget
        api_ways = max(a.info.num_classes for a in apis)
        batch = api_ways * hp["per_class"]
        total = context.budget.get("total") if context.budget else None
        per_api = context.budget.get("per_api") if context.budget else None
        budget = math.inf if total is None else float(total)
        if per_api is not None:
            budget = min(budget, float(per_api) * len(apis) * max(1, math.ceil(hp["max_visits"] / len(apis))))
        if self.use_zo_recovery:
            visits, q, gen_iters = plan_recovery(budget, batch, hp["q"], hp["gen_iterations"], hp["max_visits"],
                                                 per_visit_cap=math.inf if per_api is None else float(per_api),
                                                 min_iterations=hp["min_gen_iterations"], min_q=hp["min_q"])
            if hp["spend_budget"]:
                gen_iters = grow_recovery(budget, batch, q, gen_iters, visits, max_iterations=hp["max_gen_iterations"],
                                          per_visit_cap=math.inf if per_api is None else float(per_api))
        else:
            visits, q, gen_iters = (min(hp["max_visits"], int(budget // (2 * batch))) if budget < math.inf else hp["max_visits"]), hp["q"], 0
        M = hp["meta_iterations"]
        visit_every = hp["visit_every"] or max(1, M // max(visits, 1))
        kind = apis[0].info.output_kind
        plan = {"visits": visits, "q": q, "gen_iterations": gen_iters, "batch": batch, "budget": None if budget == math.inf else budget,
                "cost_per_visit": recovery_cost(batch, q, gen_iters), "planned_queries": visits * recovery_cost(batch, q, gen_iters),
                "visit_every": visit_every, "meta_iterations": M, "estimator": hp["estimator"], "orthogonal": bool(hp["orthogonal"]),
                "zo_resolution": (hp["zo_resolution"] or image_shape[1] // 4) if hp["estimator"] == "subspace" else None,
                "output_kind": kind, "mu": hp["label_mu"] if kind == "label" else hp["mu"], "boundary": kind != "label",
                "spend_budget": bool(hp["spend_budget"])}
        context.progress.log(f"bidf-mkd plan: {plan}")

        order: list[int] = []
        report = {"plan": plan, "visits": [], "val_curve": [], "meta_loss": [], "queries": counts, "stopped_by_budget": False}
        best_acc, best_state, best_it = -1.0, copy.deepcopy(model.state_dict()), 0
        if self.select_init:  # the initialisation is a candidate too: selection never ends below it
            best_acc = context.evaluate_val(model, hp["val_episodes"])
            report["val_curve"].append((0, round(best_acc, 5)))
        params_fn = lambda: (dict(model.named_parameters()), dict(model.named_buffers()))  # noqa: E731
        kd = lambda s, t: kd_loss(s, t, self.kd_temperature, self.faithful_kd_bug)  # noqa: E731
        budget_done = False
        n_visits = 0
        last_kd: tuple | None = None
        plateau_max, plateau_count, want_visit = None, 0, True
        bar = context.progress.bar(M, "bidf-mkd")

        for it in range(M):
            if hp["visit_trigger"] == "schedule":
                want_visit = it % visit_every == 0
            tasks_loss: list[torch.Tensor] = []
            accs: list[float] = []
            visited = False
            if want_visit and not budget_done and n_visits < visits:
                if not order:
                    order = torch.randperm(len(apis), generator=g).tolist()
                api_idx = order.pop(0)
                try:
                    kd_task, info = self._visit(apis[api_idx], api_idx, model, memory, counts, hp, q, gen_iters, it, rng,
                                                device, image_shape, kd)
                except BudgetExhausted:
                    kd_task, info = None, {"api": api_idx, "exhausted": True}
                report["visits"].append(info)
                n_visits += 1
                visited = True
                if info.get("exhausted"):
                    budget_done = True
                    report["stopped_by_budget"] = True
                if kd_task is not None:
                    last_kd = kd_task
                    if self.use_kd:
                        loss, acc = self._kd_task_loss(model, params_fn, kd_task, hp, kd)
                        tasks_loss.append(loss)
                        accs.append(acc)
                want_visit = False
            # fill the meta-batch
            n_fill = hp["meta_batch"] - len(tasks_loss)
            if self.use_memory_replay:
                if len(memory.classes) >= ways:
                    for _ in range(n_fill):
                        loss, acc = self._replay_task_loss(model, params_fn, memory, spec, hp, g, device)
                        tasks_loss.append(loss)
                        accs.append(acc)
            elif self.use_kd and last_kd is not None and not visited:
                loss, acc = self._kd_task_loss(model, params_fn, last_kd, hp, kd)
                tasks_loss.append(loss)
                accs.append(acc)
            if tasks_loss:
                total_loss = torch.stack(tasks_loss).sum()
                opt.zero_grad(set_to_none=True)
                total_loss.backward()
                opt.step()
                report["meta_loss"].append(round(float(total_loss.detach()) / len(tasks_loss), 5))
                # the reference's generation trigger: no new maximum of the batch training accuracy for
                # `generate_interval` meta-updates -> visit a new API
                acc = sum(accs) / len(accs)
                if plateau_max is None or acc > plateau_max:
                    plateau_max, plateau_count = acc, 0
                else:
                    plateau_count += 1
                    if plateau_count >= hp["generate_interval"]:
                        want_visit, plateau_max, plateau_count = True, None, 0
            bar.update(1)
            if (it + 1) % hp["val_every"] == 0 or it + 1 == M:
                if tasks_loss or it + 1 == M:
                    acc = context.evaluate_val(model, hp["val_episodes"])
                    report["val_curve"].append((it + 1, round(acc, 5)))
                    bar.set_postfix_str(f"val {acc:.3f}")
                    if acc > best_acc:
                        best_acc, best_state, best_it = acc, copy.deepcopy(model.state_dict()), it + 1
        bar.close()
        model.load_state_dict(best_state)
        report["best_val_acc"] = best_acc
        report["best_iteration"] = best_it  # 0: no meta-iteration improved meta-val over the initialisation
        report["n_visits"] = n_visits
        report["memory_classes"] = len(memory.classes)
        report["memory_images"] = memory.n_images()
        report["queries_total"] = sum(counts.values())
        agree = [v[k] for v in report["visits"] for k in ("support_agreement", "query_agreement") if v.get(k) is not None]
        report["recovery_agreement_mean"] = round(sum(agree) / len(agree), 4) if agree else None
        margins = [v[k] for v in report["visits"] for k in ("support_margin", "query_margin") if v.get(k) is not None]
        report["recovery_margin_median"] = round(statistics.median(margins), 4) if margins else None
        self.report_ = report
        title = f"bidf-mkd: recovered samples ({len(memory.classes)} classes, {n_visits} API visits)"
        self.artifacts_ = {"recovered": lambda path: _save_grid(memory, path, title)}
        return model

    # ---------------------------------------------------------------------------------------------
    def _visit(self, api, api_idx, model, memory, counts, hp, q, gen_iters, it, rng, device, image_shape, kd):
        """Recover support and query sets from one API, store them, and build its cached KD task."""
        k = api.info.num_classes
        per_class = hp["per_class"]
        batch = k * per_class
        # shrink this visit to what the API still allows (per-API and total budgets)
        left = api.remaining_budget
        iters = gen_iters
        if left < math.inf and self.use_zo_recovery:
            iters = min(iters, int((left - 2 * batch) // (2 * batch * (q + 1))))
            if iters < 1:
                raise BudgetExhausted(f"API {api_idx}: {left} queries left, too few for a visit", requested=recovery_cost(batch, q, 1),
                                      used=0, budget=int(left), scope=f"api:{api_idx}")
        label = api.info.output_kind == "label"
        common = dict(ways=k, per_class=per_class, iterations=iters, q=q, mu=hp["label_mu"] if label else hp["mu"], lr=hp["gen_lr"],
                      rng=rng, device=device, image_shape=image_shape, zo=self.use_zo_recovery, ngf=hp["ngf"],
                      directions=hp["estimator"], resolution=hp["zo_resolution"], orthogonal=bool(hp["orthogonal"]))
        info = {"api": api_idx, "arch_classes": list(api.info.classes), "iteration": it}
        sup = recover(_CountingAPI(api, counts, "support"), **common)
        memory.add(sup.images, sup.labels, api.info.classes, source=api_idx)
        info.update(support_loss_first=sup.losses[0] if sup.losses else None, support_loss_best=min(sup.losses) if sup.losses else None,
                    support_iterations=sup.iterations, support_agreement=sup.agreement, support_margin=sup.margin)
        kd_api = _CountingAPI(api, counts, "kd")
        S = augment(sup.images, rng)
        try:
            tS = query_logits(kd_api, S)
        except BudgetExhausted:
            info["exhausted"] = True
            return None, info
        # task-specific student for the boundary term: theta_i from the inner KD loop (detached)
        student = None
        boundary = self.use_boundary and self.use_zo_recovery and it >= hp["boundary_start"] and not sup.exhausted and not label
        if boundary:
            params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
            with torch.enable_grad():
                fast = inner_adapt(model, {n: p.detach() for n, p in params.items()}, buffers, S, tS,
                                   steps=hp["kd_inner_steps"] if self.use_kd else 0, lr=hp["inner_lr"], create_graph=False,
                                   loss_fn=kd)
            fast = {n: p.detach() for n, p in fast.items()}

            def student(x, fast=fast, buffers=buffers):
                return functional_call(model, (fast, buffers), (x,))

        if sup.exhausted:
            info["exhausted"] = True
            return None, info
        try:
            qry = recover(_CountingAPI(api, counts, "query"), student=student, adv=self.adv if boundary else 0.0, **common)
        except BudgetExhausted:
            info["exhausted"] = True
            return None, info
        memory.add(qry.images, qry.labels, api.info.classes, source=api_idx)
        info.update(query_loss_first=qry.losses[0] if qry.losses else None, query_loss_best=min(qry.losses) if qry.losses else None,
                    query_iterations=qry.iterations, boundary=boundary, query_agreement=qry.agreement, query_margin=qry.margin)
        Q = augment(qry.images, rng)
        try:
            tQ = query_logits(kd_api, Q)
        except BudgetExhausted:
            info["exhausted"] = True
            return None, info
        if qry.exhausted:
            info["exhausted"] = True
        return (S.detach(), tS, Q.detach(), tQ, sup.labels, qry.labels), info

    def _kd_task_loss(self, model, params_fn, task, hp, kd):
        """Bi-level KD (spec 2.6): inner steps on the support set distilling the cached API outputs,
        outer KD loss of the task-specific model on the query set (second order unless first_order)."""
        S, tS, Q, tQ, _ys, yq = task
        params, buffers = params_fn()
        fast = inner_adapt(model, params, buffers, S, tS, steps=hp["kd_inner_steps"], lr=hp["inner_lr"],
                           create_graph=not self.first_order, loss_fn=kd)
        out = functional_call(model, (fast, buffers), (Q,))
        if out.shape[1] != tQ.shape[1]:
            raise MethodError(f"the meta-learner has {out.shape[1]} outputs but the API answers {tQ.shape[1]} classes; "
                              "bi-level KD needs API ways == episode ways")
        acc = float((out.argmax(1) == yq).float().mean())
        return kd(out, tQ), acc

    def _replay_task_loss(self, model, params_fn, memory, spec, hp, g, device):
        """A CE-MAML task over the memory (classes of any APIs: "interpolated" tasks, spec 2.7; or, with
        ``replay_tasks="per-model"``, the classes of one API's recovered sets)."""
        sx, sy, qx, qy = memory.sample_task(spec.ways, spec.shots, spec.queries, g, device,
                                            per_source=hp["replay_tasks"] == "per-model")
        params, buffers = params_fn()
        fast = inner_adapt(model, params, buffers, sx, sy, steps=hp["inner_steps"], lr=hp["inner_lr"],
                           create_graph=not self.first_order)
        out = functional_call(model, (fast, buffers), (qx,))
        return F.cross_entropy(out, qy), float((out.argmax(1) == qy).float().mean())
