"""``oracle``: MAML meta-trained on the real meta-train images. Not data-free (flagged
``not_data_free``); an upper reference, never a competitor (``method/maml.py`` in Trustworthy-DFML)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dfml_bench.episodes import EpisodeSpec, sample_episodes
from dfml_bench.methods import Method, MethodContext

from .maml import maml_step


class Oracle(Method):
    """Second-order MAML (literature: 5 inner steps at lr 0.01, meta-batch 4, Adam 1e-3) on episodes
    drawn from the real meta-train split, with the checkpoint chosen on meta-val episodes.

    Deviation from the reference: checkpoints are selected on meta-val, never on meta-test; at ``cpu``
    scale the number of meta-iterations is reduced (``iterations``).
    """

    name = "oracle"
    not_data_free = True
    description = "MAML on the real meta-train data (upper reference, not data-free)"

    iterations: int | None = None  # None: 300 at cpu scale, 60000 at paper scale
    meta_batch: int = 4
    inner_steps: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 1e-3
    first_order: bool = False
    val_every: int | None = None  # None: iterations // 4
    val_episodes: int = 100

    def fit(self, context: MethodContext) -> nn.Module:
        iterations = self.iterations or (300 if context.scale == "cpu" else 60000)
        val_every = self.val_every or max(1, iterations // 4)
        data = context.real_meta_train()
        spec = context.episode_spec
        g = context.generator
        model = context.make_backbone()
        opt = torch.optim.Adam(model.parameters(), lr=self.outer_lr)
        best_acc, best_state = -1.0, copy.deepcopy(model.state_dict())
        bar = context.progress.bar(iterations, "oracle MAML")
        train_spec = EpisodeSpec(spec.ways, spec.shots, spec.queries, self.meta_batch)
        for it in range(1, iterations + 1):
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            tasks = sample_episodes(data, "train", train_spec, seed)
            sx, sy, qx, qy = tasks.tensors(data, device=context.device)
            batch = [(sx[t], sy[t], qx[t], qy[t]) for t in range(self.meta_batch)]
            maml_step(model, opt, batch, steps=self.inner_steps, lr=self.inner_lr, first_order=self.first_order)
            bar.update(1)
            if it % val_every == 0 or it == iterations:
                acc = context.evaluate_val(model, self.val_episodes)
                bar.set_postfix_str(f"val {acc:.3f}")
                if acc > best_acc:
                    best_acc, best_state = acc, copy.deepcopy(model.state_dict())
        bar.close()
        model.load_state_dict(best_state)
        self.report_ = {"best_val_acc": best_acc, "iterations": iterations}
        return model
