"""``placebo``: the DFML training machinery fed images that carry no knowledge of the zoo.

A DFML method's claim is its gain over this control, not only over ``random`` (DESIGN.md, Controls;
issue 12). Every epoch, ``teachers_per_epoch`` *slots* (one per zoo model a method like FREE would
draw) each get a freshly initialised, never trained generator (the architecture and initialisation of
:mod:`baselines.generator`), and its images go into the same :class:`~baselines.memory.TaskMemory` and
through the same BELL-replay (:func:`baselines.free.replay`, second-order MAML on memory tasks),
with the same schedule sizes as FREE at the scale, and the same model selection on meta-val (the
initialisation is a candidate).

Labels are teacher-free: each slot's ``ways`` pseudo-classes are clusters of latent codes
(``z = mu_k + latent_spread * N(0, I)`` with ``mu_k ~ N(0, I)``), so its tasks are separable (a
placebo whose labels were pure noise would control for less: recovered tasks are separable by
construction) but nothing in them comes from a zoo model. Pseudo-class ids are the placebo's own,
never the zoo's class ids, and no model or API is touched: the placebo runs in either track and
spends no query.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dfml_bench.methods import Method, MethodContext, MethodError

from .free import CPU_DEFAULTS, PAPER_DEFAULTS, replay
from .generator import Generator, reset_generator
from .memory import TaskMemory, save_image_grid


@torch.no_grad()
def placebo_images(ways: int, per_class: int, *, image_shape: tuple[int, int, int], nz: int, ngf: int,
                   latent_spread: float, generator: torch.Generator, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``ways * per_class`` images of a freshly initialised (untrained) generator and their pseudo-labels:
    class k's latent codes are ``mu_k + latent_spread * N(0, I)``. Class-interleaved labels, images in [0, 1]."""
    c, h, _ = image_shape
    gen = Generator(nz=nz, ngf=ngf, img_size=h, channels=c)
    reset_generator(gen, generator)
    gen = gen.to(device).train()  # as every generator here: BN on batch statistics
    y = torch.arange(ways).repeat(per_class)
    mu = torch.randn(ways, nz, generator=generator)
    z = mu[y] + latent_spread * torch.randn(len(y), nz, generator=generator)
    return gen(z.to(device)).detach(), y.to(device)


class Placebo(Method):
    """Placebo control: FREE's memory + replay machinery on untrained-generator images, no zoo knowledge."""

    name = "placebo"
    access = frozenset({"whitebox", "blackbox"})
    description = "control: the replay machinery on images of untrained generators (no zoo knowledge)"

    epochs: int | None = None
    teachers_per_epoch: int = 4  # slots per epoch, as the models FREE draws per epoch
    per_class: int | None = None
    nz: int | None = None
    ngf: int | None = None
    latent_spread: float = 0.5
    ring: int = 20
    replay_tasks: str | None = None
    episode_batch: int | None = None
    patience: int | None = None
    max_replay_batches: int | None = None
    inner_steps: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    first_order: bool = False
    val_every: int | None = None
    val_episodes: int | None = None
    select_init: bool = True

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.replay_tasks not in (None, "mixed", "per-model"):
            raise MethodError(f"placebo.replay_tasks must be 'mixed' or 'per-model', got {self.replay_tasks!r}")
        if self.latent_spread < 0 or self.teachers_per_epoch < 1:
            raise MethodError("placebo needs latent_spread >= 0 and teachers_per_epoch >= 1")

    def config(self, scale: str) -> dict[str, Any]:
        """The instance's values, None filled from FREE's defaults at the scale (same replay machinery)."""
        table = PAPER_DEFAULTS if scale == "paper" else CPU_DEFAULTS
        cfg = self.get_params()
        for k, v in table.items():
            if k in cfg and cfg[k] is None:
                cfg[k] = v
        return cfg

    def fit(self, context: MethodContext) -> nn.Module:
        cfg = self.config(context.scale)
        ways, g, dev = context.episode_spec.ways, context.generator, context.device
        model = context.make_backbone()
        opt = torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"])
        memory = TaskMemory(max_batches_per_class=cfg["ring"])
        best_acc, best_state, best_epoch, curve = -1.0, None, None, []
        if cfg["select_init"]:
            best_acc, best_state, best_epoch = context.evaluate_val(model, cfg["val_episodes"]), copy.deepcopy(model.state_dict()), 0
            curve.append((0, best_acc))
        bar = context.progress.bar(cfg["epochs"], "placebo")
        replay_batches = []
        for epoch in range(1, cfg["epochs"] + 1):
            for j in range(cfg["teachers_per_epoch"]):
                slot = (epoch - 1) * cfg["teachers_per_epoch"] + j
                x, y = placebo_images(ways, cfg["per_class"], image_shape=context.image_shape, nz=cfg["nz"], ngf=cfg["ngf"],
                                      latent_spread=cfg["latent_spread"], generator=g, device=dev)
                memory.add(x, y, [slot * ways + k for k in range(ways)], source=slot)  # the placebo's own class ids
            replay_batches.append(replay(model, opt, memory, context, cfg, g))
            if epoch % cfg["val_every"] == 0 or epoch == cfg["epochs"]:
                acc = context.evaluate_val(model, cfg["val_episodes"])
                curve.append((epoch, acc))
                context.progress.log(f"placebo epoch {epoch}: val {acc:.4f}")
                if acc > best_acc:
                    best_acc, best_state, best_epoch = acc, copy.deepcopy(model.state_dict()), epoch
            bar.update(1)
        bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        self.report_ = {"config": dict(cfg), "val_curve": curve, "best_val_acc": best_acc, "best_epoch": best_epoch,
                        "replay_batches_per_epoch": sum(replay_batches) / max(1, len(replay_batches)),
                        "memory_images": memory.n_images(), "queries": 0}
        title = f"placebo: untrained-generator images ({memory.n_images()} in memory)"
        self.artifacts_ = {"recovered": lambda path: save_image_grid(memory.grid(), path, title=title)}
        return model
