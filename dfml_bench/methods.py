"""The method interface: what a DFML method receives (:class:`MethodContext`) and what it returns.

A method is a class registered under the entry-point group ``dfml_bench.methods``; the built-ins in
``baselines/`` register the same way, so the plugin path is the only path. Like a scikit-learn
estimator, a method is constructed from keyword hyper-parameters (validated in ``__init__``, listed by
``get_params``) and has one verb, ``fit(context) -> meta-learner``: an ``nn.Module`` of the scenario's
backbone whose weights are the initialisation used by the fixed test-time adaptation protocol.

A method never sees test episodes. It may use ``context.val_episodes`` / ``context.evaluate_val`` for
model selection.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .access import AccessError, BlackBoxAPI, WhiteBoxModel
from .datasets.base import ImageDataset
from .episodes import EpisodeSet, EpisodeSpec
from .evaluation import AdaptProtocol


class MethodError(RuntimeError):
    """A method cannot run in a scenario (access kind, output kind, architectures): says why."""


class Progress:
    """The progress / logging hook a method reports through (a no-op by default)."""

    def __init__(self, log: Callable[[str], None] | None = None, bar_factory: Callable[..., Any] | None = None):
        self._log = log
        self._bar_factory = bar_factory

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def bar(self, total: int, desc: str):
        """A progress bar (tqdm-like object with ``update``/``set_postfix_str``/``close``)."""
        if self._bar_factory is None:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=False, disable=True)
        return self._bar_factory(total=total, desc=desc)


@dataclass
class MethodContext:
    """Everything a method is given for one (scenario, seed)."""

    scenario_name: str
    access: str  # "whitebox" | "blackbox"
    episode_spec: EpisodeSpec  # ways / shots / queries of the scenario's tasks
    protocol: AdaptProtocol  # the test-time adaptation protocol (fixed by the scenario)
    make_backbone: Callable[[], nn.Module]  # a fresh meta-learner (scenario backbone, ``ways`` outputs), initialised from the seeded RNG
    val_episodes: EpisodeSet  # meta-val episodes for model selection
    val_dataset: ImageDataset = field(repr=False)  # to materialise val episodes (meta-val classes only)
    device: torch.device = torch.device("cpu")
    seed: int = 0
    generator: torch.Generator | None = None
    progress: Progress = field(default_factory=Progress)
    scale: str = "cpu"
    image_shape: tuple[int, int, int] = (3, 32, 32)
    budget: dict = field(default_factory=dict)  # {"total": int|None, "per_api": int|None}
    output_kind: str = "logits"
    domains: list[str] = field(default_factory=list)
    _whitebox: list[WhiteBoxModel] | None = field(default=None, repr=False)
    _apis: list[BlackBoxAPI] | None = field(default=None, repr=False)
    _real_train: Callable[[], ImageDataset] | None = field(default=None, repr=False)
    _evaluate_val: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    def whitebox(self) -> list[WhiteBoxModel]:
        """The pre-trained models with full access. Raises :class:`AccessError` in black-box scenarios."""
        if self.access != "whitebox" or self._whitebox is None:
            raise AccessError(
                f"scenario {self.scenario_name!r} is black-box: white-box models are not available; use context.apis()"
            )
        return self._whitebox

    def apis(self) -> list[BlackBoxAPI]:
        """Black-box APIs (in white-box scenarios too: querying is a subset of white-box access)."""
        if self._apis is None:
            raise AccessError(f"scenario {self.scenario_name!r} provides no APIs")
        return self._apis

    @property
    def n_models(self) -> int:
        return len(self._whitebox if self.access == "whitebox" and self._whitebox is not None else self._apis or [])

    def real_meta_train(self) -> ImageDataset:
        """The real meta-train images. Only for methods flagged ``not_data_free`` (the oracle)."""
        if self._real_train is None:
            raise AccessError("real meta-train data is only given to methods flagged not_data_free (the oracle)")
        return self._real_train()

    def evaluate_val(self, model: nn.Module, n_episodes: int | None = None) -> float:
        """Mean accuracy of ``model`` on (the first ``n_episodes`` of) the meta-val episodes, under the
        scenario's adaptation protocol. This is the only model-selection signal a method has."""
        acc = self._evaluate_val(model, n_episodes)
        return float(acc.mean())


class Method:
    """Base class of DFML methods. Subclasses set the class variables and implement :meth:`fit`."""

    name: ClassVar[str] = ""
    access: ClassVar[frozenset[str]] = frozenset({"whitebox", "blackbox"})  # access kinds it can run under
    output_kinds: ClassVar[frozenset[str]] = frozenset({"logits", "probs", "topk", "label"})  # black-box outputs it accepts
    not_data_free: ClassVar[bool] = False  # True only for references that train on real data (oracle)
    description: ClassVar[str] = ""
    ablation_switches: ClassVar[tuple[str, ...]] = ()  # boolean parameters `dfml-bench ablate` flips one at a time

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.get_params())
        if unknown:
            raise MethodError(f"{type(self).__name__} got unknown parameters {sorted(unknown)}; valid: {sorted(self.get_params())}")
        for k, v in params.items():
            setattr(self, k, v)

    @classmethod
    def _param_names(cls) -> list[str]:
        return [n for n, v in vars(cls).items() if not n.startswith("_") and n.isidentifier() and not callable(v)
                and not isinstance(v, (classmethod, staticmethod, property)) and n not in Method.__dict__]

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters (class-level defaults, overridden per instance), as in scikit-learn."""
        out: dict[str, Any] = {}
        for klass in reversed(type(self).__mro__):
            if klass in (Method, object):
                continue
            for n, v in vars(klass).items():
                if n.startswith("_") or callable(v) or isinstance(v, (classmethod, staticmethod, property)):
                    continue
                if n in Method.__dict__:  # name, access, output_kinds, not_data_free, description, ablation_switches
                    continue
                out[n] = getattr(self, n, v)
        return out

    def check_scenario(self, access: str, output_kind: str) -> None:
        """Raise :class:`MethodError` if this method cannot run under the scenario's access / output kind."""
        if access not in self.access:
            raise MethodError(f"method {self.name!r} needs {'/'.join(sorted(self.access))} access; this scenario is {access}")
        if access == "blackbox" and output_kind not in self.output_kinds:
            raise MethodError(
                f"method {self.name!r} supports black-box outputs {sorted(self.output_kinds)}; this scenario's APIs answer {output_kind!r}"
            )

    def fit(self, context: MethodContext) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError


def method_registry() -> dict:
    from .registry import load_group

    return load_group("dfml_bench.methods")


def get_method(name: str, params: dict | None = None) -> Method:
    """Instantiate the registered method ``name`` with ``params``; unknown names list the valid ones."""
    from .registry import resolve

    entry = resolve("dfml_bench.methods", name, MethodError, "method")
    cls = entry.obj
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise MethodError(f"entry point {name!r} -> {entry.value} is not a dfml_bench.methods.Method subclass")
    inst = cls(**(params or {}))
    if not cls.name:
        inst.name = name
    return inst
