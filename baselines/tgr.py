"""TGR: Task Groupings Regularization, Data-Free Meta-Learning with Heterogeneous Pre-trained Models
(Wei et al., ICML 2024), white-box. Spec: ``shared/reference/free-tgr.md`` sections 1, 3, 6.3 and 7.5.

1. **Task embedding and grouping** (once, before training): every zoo model is inverted from scratch
   (fresh generator, CE + BN-statistics matching) into a probe set; the probe set is embedded in task
   space by the diagonal Fisher information of a probe network (:func:`task_embedding`); two models'
   similarity is TGR's measure (:func:`fim_similarity`: per parameter tensor the cosine of the
   element-wise normalised Fishers ``F_j / (F_j + F_k)`` and ``F_k / (F_j + F_k)``, averaged over
   tensors); spectral clustering with the *dissimilarity* ``1 - S`` as affinity puts mutually dissimilar
   (heterogeneous) models in the same group (:func:`group_models`).
2. **One epoch**: draw a group uniformly, draw ``teachers_per_epoch`` of its models; invert each from
   scratch (all recovered batches go to the task memory); distil the group's tasks into the meta-learner
   with **implicit gradient regularisation** (:func:`igr_gradient`): with ``g_m = grad L_m(theta)`` and
   ``g_bar`` their mean, the update is ``mean_m grad_theta L_m(theta - eta (g_bar - g_m))`` (second
   order), which to first order in ``eta`` descends ``mean_m L_m + eta * mean_m ||g_m - g_bar||^2``: the
   group's loss plus the spread of its task gradients, i.e. conflicting tasks are aligned. The task loss
   is ``L_m = KD(teacher_m) + gt_weight * CE(y)`` on the recovered images. Then MAML replay on tasks from
   the memory until its meta-loss stalls (FREE's :func:`baselines.free.replay`).
3. **Model selection** on meta-val (:class:`ValSelector`), the initialisation being a candidate.

The multi-architecture and multi-domain settings are the same code: the zoo the method is given is
grouped and sampled as a whole.

Deliberate deviations from the reference code:

- **T1 fixed**: every model of a multi-architecture / multi-domain zoo is embedded, grouped and drawn
  (the reference truncates its 300 x 300 similarity matrix to the first 100 models, so its md / ma runs
  only see CIFAR-FS / Conv4 teachers);
- **T2**: no ImageNet ResNet-34 can be loaded offline, so the probe network is the scenario's
  meta-learner architecture at a seeded initialisation (a second draw of ``context.make_backbone``) whose
  head is first fitted to the probe task (as Task2Vec does; the reference reads ImageNet logits 0..4);
  the Fisher is the mean of squared gradients of mini-batches of ``fim_batch`` images (the reference:
  batches of 600); parameter tensors are weighted equally, as the reference;
- **T5**: within a group, models are drawn without replacement while the group has enough of them (the
  reference draws with replacement, and a repeated model makes its ``g_bar - g_m`` vanish); groups are
  still drawn uniformly, as the reference;
- distillation is the true temperature KL (``kd_mode="reference"`` restores the probability-space
  surrogate, P3); model selection on meta-val, never test (P2);
- spectral clustering is implemented here (normalised-Laplacian embedding, k-means with ``n_init``
  seeded restarts) because scikit-learn is not a dependency;
- ``cpu`` scale: a narrow generator, fewer inversion iterations (``scratch_iterations``,
  ``probe_iterations``, one probe round), ``per_class`` = shots + queries, capped replay; ``paper`` keeps
  the reference's values (200 iterations, 30 images per class, 20 probe rounds, 5 groups). The cpu
  probe runs 10 inversion iterations, not 40: ``benchmarks/tgr_probe_schedule.py`` (24 whitebox-homo
  teachers) found the similarity matrix of two 40-iteration probes with different seeds rank-correlated
  at only 0.05 (their groupings agree no more than a random partition does), and 10 iterations agree
  with a 40-iteration probe as well (0.16) at a quarter of the cost (4.8 against 17.3 s per model). At
  cpu scale the grouping is not reproducible at either setting, so the cheaper one loses nothing;
  meta-val selection is unchanged (every tgr record's ``extra.val_curve``).
- ``cpu`` scale replays per-model tasks (``replay_tasks="per-model"``: a replay task uses one model's
  recovered sets), as FREE's cpu setting; ``paper`` keeps the reference's mixed tasks. Chosen on meta-val
  (``benchmarks/search_metaval.py --suite whitebox-homo --candidates tgr:per-model``, seed 0, 100 val
  episodes): with mixed tasks meta-val fell from 0.263 to 0.230 over 15 epochs in every seed, so selection
  returned the initialisation; with per-model tasks it rose to 0.284 by epoch 5 and 0.286 at epoch 15.

Ablation switches: ``grouping`` (False: a random partition into the same number of groups), ``igr``
(False: the plain mean gradient of the group's tasks), ``distill`` (no distillation step, replay only),
``replay``. ``igr_mode="explicit"`` uses the explicit regulariser instead of the displacement (one
Hessian-vector product per task; spec 7.5).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dfml_bench.methods import Method, MethodContext, MethodError

from .free import replay
from .generator import augment
from .inversion import LossWeights, distill_loss, invert_from_scratch
from .memory import TaskMemory, save_image_grid
from .selection import ValSelector

# paper: the reference's values (free-tgr.md 3.4); epochs 1200 for the main setting (1000 for md / ma)
PAPER_DEFAULTS: dict[str, Any] = dict(
    epochs=1200, per_class=30, nz=256, ngf=64, gen_lr=1e-3, scratch_iterations=200, probe_rounds=20, probe_iterations=200,
    n_groups=5, episode_batch=16, patience=4, max_replay_batches=None, val_every=20, val_episodes=None, fim_batch=600,
    replay_tasks="mixed",
)
# cpu: a few minutes per seed on 2 cores
CPU_DEFAULTS: dict[str, Any] = dict(
    epochs=15, per_class=None, nz=64, ngf=16, gen_lr=1e-2, scratch_iterations=40, probe_rounds=1, probe_iterations=10,
    n_groups=5, episode_batch=4, patience=2, max_replay_batches=4, val_every=5, val_episodes=100, fim_batch=8,
    replay_tasks="per-model",
)

ParamLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# task embedding (Fisher information) and similarity


def fit_head(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 50, lr: float = 0.05) -> None:
    """Fit the probe's linear head to the task on frozen features (Task2Vec's first step)."""
    head = getattr(probe, "head", None)
    if not isinstance(head, nn.Linear) or steps <= 0:
        return
    with torch.no_grad():
        feats = probe.embed(x) if hasattr(probe, "embed") else None
    if feats is None:
        return
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(head(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fisher_diagonal(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Diagonal empirical Fisher of ``probe`` on the task ``(x, y)``: the mean over mini-batches of
    ``batch`` images of the squared gradient of the cross-entropy, one tensor per parameter tensor."""
    params = [p for p in probe.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    chunks = list(range(0, len(x), max(1, batch)))
    for i in chunks:
        loss = F.cross_entropy(probe(x[i : i + batch]), y[i : i + batch])
        for a, gr in zip(acc, torch.autograd.grad(loss, params)):
            a += gr.detach() ** 2
    return [a / len(chunks) for a in acc]


def task_embedding(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int, head_steps: int = 50) -> list[torch.Tensor]:
    """The task-space embedding of one model's probe set: a copy of ``probe`` with its head fitted to
    the task, then its diagonal Fisher. ``probe`` itself is not changed."""
    net = copy.deepcopy(probe)
    for p in net.parameters():
        p.requires_grad_(True)
    fit_head(net, x, y, steps=head_steps)
    return fisher_diagonal(net, x, y, batch)


def fim_similarity(fa: list[torch.Tensor], fb: list[torch.Tensor], eps: float = 1e-6) -> float:
    """TGR's similarity of two Fisher embeddings: per parameter tensor, the cosine of
    ``fa / (fa + fb + eps)`` and ``fb / (fa + fb + eps)`` (flattened); the unweighted mean over tensors."""
    if len(fa) != len(fb):
        raise ValueError(f"embeddings have {len(fa)} and {len(fb)} parameter tensors")
    sims = []
    for a, b in zip(fa, fb):
        s = a + b + eps
        sims.append(F.cosine_similarity((a / s).flatten(), (b / s).flatten(), dim=0))
    return float(torch.stack(sims).mean())


def similarity_matrix(embeddings: list[list[torch.Tensor]]) -> torch.Tensor:
    """Symmetric matrix of :func:`fim_similarity` with a unit diagonal."""
    n = len(embeddings)
    S = torch.eye(n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            S[i, j] = S[j, i] = fim_similarity(embeddings[i], embeddings[j])
    return S


# ----------------------------------------------------------------------------------------------
# grouping


def kmeans(X: torch.Tensor, k: int, g: torch.Generator, *, n_init: int = 10, iters: int = 100) -> torch.Tensor:
    """Lloyd's k-means with ``n_init`` seeded restarts (initial centres: distinct random rows); the
    labels of the restart with the lowest inertia."""
    best_inertia, best = float("inf"), None
    for _ in range(n_init):
        C = X[torch.randperm(len(X), generator=g)[:k]].clone()
        for _ in range(iters):
            lab = torch.cdist(X, C).argmin(1)
            new = torch.stack([X[lab == j].mean(0) if (lab == j).any() else C[j] for j in range(k)])
            if torch.allclose(new, C):
                break
            C = new
        lab = torch.cdist(X, C).argmin(1)
        inertia = float(((X - C[lab]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best_inertia, best = inertia, lab
    return best


def spectral_clustering(W: torch.Tensor, k: int, g: torch.Generator, *, n_init: int = 30) -> torch.Tensor:
    """Spectral clustering of a precomputed affinity ``W``: the first ``k`` eigenvectors of the
    normalised Laplacian (scaled by ``D^-1/2``, as scikit-learn's embedding), then k-means."""
    W = W.double().clamp_min(0)
    W = (W + W.T) / 2
    d = W.sum(1).clamp_min(1e-12).rsqrt()
    L = torch.eye(len(W), dtype=W.dtype) - d[:, None] * W * d[None, :]
    _, vecs = torch.linalg.eigh(L)
    emb = vecs[:, :k] * d[:, None]
    return kmeans(emb, k, g, n_init=n_init)


def group_models(S: torch.Tensor, k: int, g: torch.Generator, *, how: str = "dissimilar", n_init: int = 30) -> list[list[int]]:
    """Partition the models of similarity matrix ``S`` into at most ``k`` non-empty groups. ``dissimilar``
    (TGR): spectral clustering with affinity ``1 - S``, so a group gathers mutually dissimilar models;
    ``similar``: affinity ``S`` (the opposite, for comparison); ``random``: a random balanced partition."""
    n = len(S)
    k = max(1, min(k, n))
    if how == "random":
        perm = torch.randperm(n, generator=g).tolist()
        return [sorted(perm[j::k]) for j in range(k)]
    if how not in ("dissimilar", "similar"):
        raise ValueError(f"grouping must be 'dissimilar', 'similar' or 'random', got {how!r}")
    W = (1 - S) if how == "dissimilar" else S.clone()
    W.fill_diagonal_(0 if how == "dissimilar" else 1)
    labels = spectral_clustering(W, k, g, n_init=n_init).tolist()
    groups = [sorted(i for i in range(n) if labels[i] == j) for j in range(k)]
    return [grp for grp in groups if grp]


def within_group_dissimilarity(S: torch.Tensor, groups: list[list[int]]) -> float:
    """Mean ``1 - S`` over the pairs of models that share a group (NaN if no group has two models)."""
    vals = [1 - float(S[i, j]) for grp in groups for a, i in enumerate(grp) for j in grp[a + 1 :]]
    return sum(vals) / len(vals) if vals else float("nan")


def draw_from_group(groups: list[list[int]], m: int, g: torch.Generator) -> list[int]:
    """A uniformly drawn group, then ``m`` of its models: without replacement while the group has
    models left, then with replacement (the reference draws with replacement throughout, T5)."""
    grp = groups[int(torch.randint(len(groups), (1,), generator=g))]
    perm = [grp[i] for i in torch.randperm(len(grp), generator=g).tolist()]
    extra = [grp[int(i)] for i in torch.randint(len(grp), (max(0, m - len(grp)),), generator=g)]
    return (perm + extra)[:m]


# ----------------------------------------------------------------------------------------------
# implicit gradient regularisation


def igr_gradient(model: nn.Module, losses: list[ParamLoss], eta: float, mode: str = "implicit") -> list[torch.Tensor]:
    """The group update direction for ``model``'s parameters, given per-task losses ``L_m(params)``.

    ``implicit`` (TGR): ``grad_theta mean_m L_m(theta - eta (g_bar - g_m))`` with ``g_m = grad L_m(theta)``
    kept differentiable (second order). ``explicit``: ``grad[mean_m L_m + eta * mean_m ||g_m - g_bar||^2]``.
    ``none``: ``grad mean_m L_m`` (no regularisation)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    P = dict(zip(names, params))
    values = [loss(P) for loss in losses]
    if mode == "none":
        return list(torch.autograd.grad(torch.stack(values).mean(), params))
    if mode not in ("implicit", "explicit"):
        raise ValueError(f"igr mode must be 'implicit', 'explicit' or 'none', got {mode!r}")
    gs = [torch.autograd.grad(v, params, create_graph=True) for v in values]
    g_bar = [torch.stack(t).mean(0) for t in zip(*gs)]
    if mode == "explicit":
        spread = torch.stack([sum(((a - b) ** 2).sum() for a, b in zip(gm, g_bar)) for gm in gs]).mean()
        total = torch.stack(values).mean() + eta * spread
    else:
        total = torch.stack([loss({n: p - eta * (gb - gmj) for n, p, gb, gmj in zip(names, params, g_bar, gm)})
                             for loss, gm in zip(losses, gs)]).mean()
    return list(torch.autograd.grad(total, params))


def distill_task_loss(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: dict) -> ParamLoss:
    """``L_m(params) = KD(teacher) + gt_weight * CE(y)`` of ``model`` run with ``params`` on ``x``
    (the teacher's logits are computed once)."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        t_logits = teacher(x)

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(model, (params, buffers), (x,))
        return distill_loss(out, t_logits, cfg["kd_temperature"], cfg["kd_mode"]) + cfg["gt_weight"] * F.cross_entropy(out, y)

    return loss


# ----------------------------------------------------------------------------------------------
# the method


class TGR(Method):
    """TGR (ICML 2024): dissimilarity grouping of the zoo in Fisher task space, implicit gradient
    regularisation within a group, memory replay."""

    name = "tgr"
    access = frozenset({"whitebox"})
    description = "TGR: Fisher task-space grouping of dissimilar models, implicit gradient regularisation, memory replay"

    # schedule (None: by scale)
    epochs: int | None = None
    teachers_per_epoch: int = 4
    n_groups: int | None = None
    # recovery (from scratch per teacher, as the reference)
    per_class: int | None = None  # None: shots + queries
    nz: int | None = None
    ngf: int | None = None
    gen_lr: float | None = None
    scratch_iterations: int | None = None
    w_bn: float = 1.0
    # task embedding
    probe_rounds: int | None = None
    probe_iterations: int | None = None
    fim_batch: int | None = None
    head_steps: int = 50
    cluster_restarts: int = 30
    # IGR
    eta: float = 1e-3  # displacement lr (reference --displace_lr)
    igr_mode: str = "implicit"
    gt_weight: float = 1.0
    kd_mode: str = "kl"
    kd_temperature: float = 1.0
    outer_lr: float = 1e-3
    # replay
    ring: int = 20
    replay_tasks: str | None = None  # mixed: classes across models (reference, paper) | per-model (cpu default)
    episode_batch: int | None = None
    patience: int | None = None
    max_replay_batches: int | None = None
    inner_steps: int = 5
    inner_lr: float = 0.01
    first_order: bool = False
    # model selection
    val_every: int | None = None
    val_episodes: int | None = None
    select_init: bool = True
    # switches
    grouping: bool = True
    igr: bool = True
    distill: bool = True
    replay: bool = True

    ablation_switches = ("grouping", "igr", "distill", "replay")

    _CHOICES = {"igr_mode": ("implicit", "explicit"), "kd_mode": ("kl", "reference"), "replay_tasks": (None, "mixed", "per-model")}  # None: the scale's default

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for k, allowed in self._CHOICES.items():
            if getattr(self, k) not in allowed:
                raise MethodError(f"TGR.{k} must be one of {allowed}, got {getattr(self, k)!r}")
        if self.teachers_per_epoch < 1 or self.eta < 0:
            raise MethodError("TGR needs teachers_per_epoch >= 1 and eta >= 0")

    def config(self, scale: str) -> dict[str, Any]:
        """Effective hyper-parameters: the instance's values, with None filled from the scale's defaults."""
        if scale not in ("cpu", "paper"):
            raise MethodError(f"tgr has defaults for scales 'cpu' and 'paper', got {scale!r}")
        cfg = self.get_params()
        for k, v in (PAPER_DEFAULTS if scale == "paper" else CPU_DEFAULTS).items():
            if cfg.get(k) is None:
                cfg[k] = v
        return cfg

    def _recover(self, teacher, ways: int, per_class: int, context: MethodContext, cfg: dict, g: torch.Generator, iterations: int):
        return invert_from_scratch(teacher, ways, per_class, image_shape=tuple(context.image_shape), generator=g,
                                   device=context.device, iterations=iterations, lr=cfg["gen_lr"], z_lr=cfg["gen_lr"],
                                   nz=cfg["nz"], ngf=cfg["ngf"], weights=LossWeights(ce=1.0, bn=cfg["w_bn"]))

    def embed_zoo(self, teachers: list, probe: nn.Module, context: MethodContext, cfg: dict, g: torch.Generator) -> list[list[torch.Tensor]]:
        """Invert every zoo model into a probe set and embed it (section 3.2 steps 1-2)."""
        ways = context.episode_spec.ways
        per_class = cfg["per_class"] or context.episode_spec.shots + context.episode_spec.queries
        out = []
        for t in teachers:
            xs, ys = [], []
            for _ in range(cfg["probe_rounds"]):
                r = self._recover(t.model, ways, per_class, context, cfg, g, cfg["probe_iterations"])
                xs.append(r.images); ys.append(r.labels)
            out.append(task_embedding(probe, torch.cat(xs), torch.cat(ys), batch=cfg["fim_batch"], head_steps=cfg["head_steps"]))
        return out

    def fit(self, context: MethodContext) -> nn.Module:
        cfg = self.config(context.scale)
        teachers = context.whitebox()
        spec = context.episode_spec
        ways = spec.ways
        bad = [t.index for t in teachers if t.num_classes != ways]
        if bad or not teachers:
            raise MethodError(f"TGR distils {ways}-way zoo models into a {ways}-way meta-learner; models {bad[:5]} differ "
                              "(or the zoo is empty)")
        per_class = cfg["per_class"] or spec.shots + spec.queries
        g = context.generator if context.generator is not None else torch.Generator().manual_seed(context.seed)
        model = context.make_backbone()
        probe = context.make_backbone()  # a second seeded draw of the scenario backbone: the probe network
        selector = ValSelector(lambda m: context.evaluate_val(m, cfg["val_episodes"]))
        if cfg["select_init"]:
            selector.consider(model, 0)
        t0 = time.perf_counter()
        if cfg["grouping"]:
            S = similarity_matrix(self.embed_zoo(teachers, probe, context, cfg, g))
            groups = group_models(S, cfg["n_groups"], g, how="dissimilar", n_init=cfg["cluster_restarts"])
        else:
            S = None
            groups = group_models(torch.eye(len(teachers)), cfg["n_groups"], g, how="random")
        grouping_seconds = time.perf_counter() - t0
        context.progress.log(f"tgr groups: {groups}")
        opt = torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"])
        memory = TaskMemory(max_batches_per_class=cfg["ring"])
        rep: dict[str, Any] = {"drawn": [], "recovery_seconds": [], "igr_seconds": [], "replay_batches": [], "teacher_acc": []}
        bar = context.progress.bar(cfg["epochs"], "tgr")
        for epoch in range(1, cfg["epochs"] + 1):
            idx = draw_from_group(groups, self.teachers_per_epoch, g)
            rep["drawn"].append([teachers[i].index for i in idx])
            tasks = []
            for i in idx:
                r = self._recover(teachers[i].model, ways, per_class, context, cfg, g, cfg["scratch_iterations"])
                rep["recovery_seconds"].append(r.seconds)
                rep["teacher_acc"].append(r.teacher_acc)
                memory.add(r.images, r.labels, teachers[i].classes, source=teachers[i].index)
                tasks.append((teachers[i].model, r.images, r.labels))
            if cfg["distill"]:
                t1 = time.perf_counter()
                losses = []
                for teacher, x, y in tasks:
                    losses.append(distill_task_loss(model, teacher, augment(x, g), y, cfg))
                direction = igr_gradient(model, losses, cfg["eta"], cfg["igr_mode"] if cfg["igr"] else "none")
                opt.zero_grad(set_to_none=True)
                for p, d in zip(model.parameters(), direction):
                    p.grad = d.detach()
                opt.step()
                opt.zero_grad(set_to_none=True)
                rep["igr_seconds"].append(time.perf_counter() - t1)
            if cfg["replay"] and len(memory.classes) >= ways:
                rep["replay_batches"].append(replay(model, opt, memory, context, cfg, g))
            if epoch % cfg["val_every"] == 0 or epoch == cfg["epochs"]:
                acc = selector.consider(model, epoch)
                context.progress.log(f"tgr epoch {epoch}: val {acc:.4f}")
            bar.update(1)
        bar.close()
        selector.restore(model)
        self.report_ = {
            "config": dict(cfg),  # the effective hyper-parameters (scale defaults filled in)
            "groups": [[teachers[i].index for i in grp] for grp in groups],
            "similarity": None if S is None else [[round(float(v), 4) for v in row] for row in S],
            "within_group_dissimilarity": None if S is None else within_group_dissimilarity(S, groups),
            "mean_dissimilarity": None if S is None else float((1 - S).sum() / max(1, len(S) * (len(S) - 1))),
            "grouping_seconds": grouping_seconds,
            "teachers_drawn": rep["drawn"],
            "recovery_seconds_per_task": sum(rep["recovery_seconds"]) / max(1, len(rep["recovery_seconds"])),
            "teacher_acc_on_recovered": sum(rep["teacher_acc"]) / max(1, len(rep["teacher_acc"])),
            "igr_seconds_total": sum(rep["igr_seconds"]),
            "replay_batches_per_epoch": sum(rep["replay_batches"]) / max(1, len(rep["replay_batches"])),
            "val_curve": selector.curve,
            "best_val_acc": selector.best_acc,
            "best_epoch": selector.best_step,
            "memory_images": memory.n_images(),
            "memory_classes": len(memory.classes),
        }
        title = f"tgr: recovered images ({memory.n_images()} in memory, {len(memory.classes)} classes)"
        self.artifacts_ = {"recovered": lambda path: save_image_grid(memory.grid(), path, title=title)}
        self.memory_ = memory
        return model
