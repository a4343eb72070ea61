"""The dataset concept: images, labels and a class split into meta-train / meta-val / meta-test.

Every dataset, embedded or real, is materialised as one in-memory :class:`ImageDataset`: uint8 images
``[N, C, H, W]`` and int64 labels ``[N]`` over global class ids, plus the split of class ids. Holding
the images as uint8 keeps even MiniImageNet (60k x 84 x 84 x 3 = 1.3 GB) in memory, and makes every
later stage (zoo training, episode gathering, API queries) a tensor index instead of file I/O.

Images handed to models are unnormalised floats in [0, 1]; each network normalises its own input
(a fixed ``Normalize`` layer built from ``mean``/``std``), exactly as a deployed API would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

SPLITS = ("train", "val", "test")


class DatasetError(RuntimeError):
    """A dataset is missing, malformed or asked for in a way it cannot serve. The message says what to do."""


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N], global class ids
    class_names: list[str]
    splits: dict[str, list[int]]  # split name -> sorted global class ids
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hash: str  # content hash: identifies exactly these images, labels and split
    domains: dict[int, str] = field(default_factory=dict)  # class id -> domain (multi-domain pools)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_split(self.splits)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        self._by_class: dict[int, torch.Tensor] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def indices_by_class(self) -> dict[int, torch.Tensor]:
        """Image indices of each class, in dataset order (computed once)."""
        if self._by_class is None:
            order = torch.argsort(self.labels, stable=True)
            sorted_labels = self.labels[order]
            classes, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
            chunks = torch.split(order, counts.tolist())
            self._by_class = {int(c): idx for c, idx in zip(classes.tolist(), chunks)}
        return self._by_class

    def class_indices(self, cls: int) -> torch.Tensor:
        return self.indices_by_class()[int(cls)]

    def as_float(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images (all or ``idx``) as float32 in [0, 1]."""
        x = self.images if idx is None else self.images[idx]
        return x.float().div_(255.0)

    def domain_of(self, cls: int) -> str:
        return self.domains.get(int(cls), self.name)


def validate_split(splits: dict[str, list[int]]) -> None:
    """Meta-train, meta-val and meta-test class sets must exist and be pairwise disjoint."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DatasetError(f"class split lacks {missing}; expected keys {list(SPLITS)}")
    sets = {s: set(splits[s]) for s in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            common = sets[a] & sets[b]
            if common:
                raise DatasetError(f"classes {sorted(common)[:10]} appear in both meta-{a} and meta-{b}")


class DatasetBuilder(Protocol):
    """What the ``dfml_bench.datasets`` entry-point group registers: a class or factory with ``load``."""

    name: str

    def load(self, *, seed: int = 0, data_root: str | None = None, scale: str = "cpu") -> ImageDataset: ...
