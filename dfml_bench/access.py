"""What a method is given of each pre-trained model: a white-box handle or a metered black-box API.

White-box: the model itself (parameters, BatchNorm statistics, gradients), its class ids and its
architecture. Black-box: an object whose only operation is ``query(images) -> outputs`` plus read-only
metadata; every image counts against a budget, and a query that would exceed it is refused whole with
:class:`BudgetExhausted`.

The black-box interface is deliberately narrow (:class:`BlackBoxAPI`) so that the in-process
implementation here and the process-isolated server (``dfml_bench.server``) are interchangeable.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

OUTPUT_KINDS = ("logits", "probs", "topk", "label")


class AccessError(RuntimeError):
    """A method asked for access its scenario does not grant."""


class BudgetExhausted(RuntimeError):
    """A query would exceed a budget. Nothing of the query was answered or charged."""

    def __init__(self, message: str, *, requested: int, used: int, budget: int, scope: str):
        super().__init__(message)
        self.requested = requested
        self.used = used
        self.budget = budget
        self.scope = scope


class QueryError(ValueError):
    """A query was malformed (shape, dtype, range, NaN, size). Nothing was charged."""


class TopK(NamedTuple):
    """Output of a ``topk`` API: the k largest probabilities and their class indices."""

    values: torch.Tensor
    indices: torch.Tensor


@dataclass
class WhiteBoxModel:
    """Full access to one pre-trained model. ``model`` takes [0, 1] images and is in eval mode."""

    model: nn.Module
    classes: list[int]
    arch: str
    index: int
    domain: str = ""
    input_shape: tuple[int, int, int] = (3, 32, 32)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class QueryMeter:
    """Counts query images per API and in total, against optional budgets; thread-safe.

    ``charge`` either charges the whole request or raises :class:`BudgetExhausted` and charges nothing.
    """

    def __init__(self, n_apis: int, *, total_budget: int | None = None, per_api_budget: int | None = None):
        for name, b in (("total_budget", total_budget), ("per_api_budget", per_api_budget)):
            if b is not None and (not isinstance(b, int) or b < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {b!r}")
        self.total_budget = total_budget
        self.per_api_budget = per_api_budget
        self.used = [0] * n_apis
        self._lock = threading.Lock()

    @property
    def total_used(self) -> int:
        return sum(self.used)

    def remaining(self, api: int | None = None) -> float:
        """Images still allowed (for ``api`` if given, taking both budgets into account); ``inf`` if unlimited."""
        left = math.inf if self.total_budget is None else self.total_budget - self.total_used
        if api is not None and self.per_api_budget is not None:
            left = min(left, self.per_api_budget - self.used[api])
        return left

    def charge(self, api: int, n: int) -> None:
        with self._lock:
            if self.per_api_budget is not None and self.used[api] + n > self.per_api_budget:
                raise BudgetExhausted(
                    f"API {api}: a query of {n} images would exceed its budget of {self.per_api_budget} "
                    f"({self.used[api]} used); nothing was answered",
                    requested=n, used=self.used[api], budget=self.per_api_budget, scope=f"api:{api}",
                )
            if self.total_budget is not None and self.total_used + n > self.total_budget:
                raise BudgetExhausted(
                    f"a query of {n} images would exceed the total budget of {self.total_budget} "
                    f"({self.total_used} used); nothing was answered",
                    requested=n, used=self.total_used, budget=self.total_budget, scope="total",
                )
            self.used[api] += n

    def snapshot(self) -> dict:
        return {"per_api": list(self.used), "total": self.total_used,
                "total_budget": self.total_budget, "per_api_budget": self.per_api_budget}


@dataclass(frozen=True)
class APIInfo:
    """Read-only metadata of a black-box API: all a user of a real API would know."""

    index: int
    num_classes: int
    classes: tuple[int, ...]  # opaque class identifiers (a real API names its classes)
    input_shape: tuple[int, int, int]
    value_range: tuple[float, float] = (0.0, 1.0)
    output_kind: str = "logits"
    topk: int = 1
    max_batch: int = 4096  # the server refuses larger batches (split them): its memory stays bounded
    domain: str = ""


def validate_query(images: object, info: APIInfo) -> torch.Tensor:
    """Check a query batch; raise :class:`QueryError` naming the problem. Returns the tensor."""
    if not isinstance(images, torch.Tensor):
        raise QueryError(f"query expects a torch.Tensor of images, got {type(images).__name__}")
    if images.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise QueryError(f"query expects floating-point images in [0, 1], got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(info.input_shape):
        raise QueryError(f"query expects images of shape [B, {', '.join(map(str, info.input_shape))}], got {list(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise QueryError("query got an empty batch (0 images)")
    if n > info.max_batch:
        raise QueryError(f"query batch of {n} images exceeds this API's maximum of {info.max_batch}; split it")
    if not torch.isfinite(images).all():
        raise QueryError("query images contain NaN or infinite values")
    lo, hi = info.value_range
    mn, mx = float(images.min()), float(images.max())
    if mn < lo - 1e-6 or mx > hi + 1e-6:
        raise QueryError(f"query images must lie in [{lo}, {hi}] (unnormalised); got values in [{mn:.4g}, {mx:.4g}]")
    return images


def format_outputs(logits: torch.Tensor, kind: str, k: int = 1):
    """Turn a model's logits into what an API of output ``kind`` answers."""
    if kind == "logits":
        return logits
    if kind == "probs":
        return logits.softmax(dim=1)
    if kind == "topk":
        v, i = logits.softmax(dim=1).topk(k, dim=1)
        return TopK(v, i)
    if kind == "label":
        return logits.argmax(dim=1)
    raise ValueError(f"unknown output kind {kind!r}; choose one of {OUTPUT_KINDS}")


class BlackBoxAPI:
    """The interface of a black-box API, as a method sees it."""

    __slots__ = ()  # handles have no __dict__: nothing can be hung on them or found in them

    info: APIInfo

    def query(self, images: torch.Tensor):  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def remaining_budget(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class InProcessAPI(BlackBoxAPI):
    """A black-box API backed by a model in this process (used before the isolated server, and as the
    reference point for the boundary's overhead). Access control here is by convention only: the model
    is kept in a closure, not an attribute, but a determined caller could reach it; the isolated server
    (``dfml_bench.server``) enforces the boundary with a process."""

    __slots__ = ("info", "_query", "_remaining")

    def __init__(self, model: nn.Module, info: APIInfo, meter: QueryMeter, device: str | torch.device = "cpu"):
        self.info = info
        model = model.to(device).eval()

        @torch.no_grad()
        def _query(images: torch.Tensor):
            validate_query(images, info)
            meter.charge(info.index, images.shape[0])
            out = model(images.to(device, dtype=torch.float32))
            return format_outputs(out, info.output_kind, info.topk)

        self._query = _query
        self._remaining = lambda: meter.remaining(info.index)

    def query(self, images: torch.Tensor):
        """Answer a batch of [0, 1] images; every image is charged against the budget."""
        return self._query(images)

    @property
    def remaining_budget(self) -> float:
        return self._remaining()

    def __reduce__(self):
        raise TypeError("a black-box API handle cannot be pickled")

    def __repr__(self) -> str:
        return f"InProcessAPI(index={self.info.index}, classes={self.info.num_classes}, output={self.info.output_kind})"
