"""Model selection on meta-val episodes, shared by PURER and TGR.

A method meta-trains, and at fixed points asks the context for the meta-val accuracy of its current
meta-learner; the best checkpoint is returned. The initialisation (step 0) is a candidate when asked
(``select_init``), so a run whose meta-training never improves meta-val returns its initialisation and
then scores exactly as ``random`` (as FREE and BiDf-MKD do). Test episodes are never involved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass
class ValSelector:
    """Keeps the best meta-val checkpoint seen so far (a deep copy of its state_dict)."""

    evaluate: Callable[[nn.Module], float]
    best_acc: float = -1.0
    best_step: int | None = None
    best_state: dict | None = field(default=None, repr=False)
    curve: list[tuple[int, float]] = field(default_factory=list)

    def consider(self, model: nn.Module, step: int) -> float:
        """Evaluate ``model`` on meta-val, record it at ``step``, keep it if it is the best so far."""
        acc = float(self.evaluate(model))
        self.curve.append((step, round(acc, 5)))
        if acc > self.best_acc:
            self.best_acc, self.best_step, self.best_state = acc, step, copy.deepcopy(model.state_dict())
        return acc

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the best checkpoint into ``model`` (unchanged if nothing was evaluated)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model
