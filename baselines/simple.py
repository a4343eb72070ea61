"""The two reference points that need no learning: ``random`` and ``average``."""

from __future__ import annotations

import torch
from torch import nn

from dfml_bench.methods import Method, MethodContext, MethodError


class RandomInit(Method):
    """The meta-learner freshly initialised (last-layer bias zero), fine-tuned per episode by the
    scenario's protocol. Uses no pre-trained model (Trustworthy-DFML ``method/random.py``)."""

    name = "random"
    description = "fresh initialisation; no model of the zoo is used"

    def fit(self, context: MethodContext) -> nn.Module:
        return context.make_backbone()  # the shared initialisation: head bias 0 (runner.make_backbone_factory)


class Average(Method):
    """Element-wise mean of the zoo models' parameters (FedAvg-style), used as the initialisation.

    Needs white-box access and a zoo whose every model has the scenario backbone's architecture and
    output size; otherwise it refuses with a clear error. Heads are averaged even though each model's
    output units mean different classes, which is why it often scores below ``random`` (as in PURER /
    Trustworthy-DFML ``method/average.py``). BatchNorm running statistics are not averaged: the
    meta-learner's BatchNorm always uses batch statistics.
    """

    name = "average"
    access = frozenset({"whitebox"})
    description = "parameter average of same-architecture white-box models"

    def fit(self, context: MethodContext) -> nn.Module:
        target = context.make_backbone()
        models = context.whitebox()
        want = {k: v.shape for k, v in target.named_parameters()}
        spec = getattr(target, "spec", None)
        for m in models:
            got = {k: v.shape for k, v in m.model.named_parameters()}
            if got != want:
                raise MethodError(
                    f"average needs every zoo model to have the meta-learner's architecture "
                    f"({getattr(spec, 'arch', '?')}, {context.episode_spec.ways} outputs); model {m.index} is {m.arch} "
                    f"with {m.num_classes} classes. Use a same-architecture (homogeneous) scenario."
                )
        with torch.no_grad():
            for name, p in target.named_parameters():
                stacked = torch.stack([dict(m.model.named_parameters())[name].detach().to(p.device) for m in models])
                p.copy_(stacked.mean(0))
        return target
