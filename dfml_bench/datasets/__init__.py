"""Dataset registry. Built-ins and third-party datasets register under the entry-point group
``dfml_bench.datasets``; :func:`load_dataset` is the one way to get an :class:`ImageDataset`."""

from __future__ import annotations

from functools import lru_cache

from .base import SPLITS, DatasetError, ImageDataset, validate_split

__all__ = ["SPLITS", "DatasetError", "ImageDataset", "validate_split", "load_dataset", "dataset_names"]


def _registry() -> dict:
    from ..registry import load_group

    return load_group("dfml_bench.datasets")


def dataset_names() -> list[str]:
    return sorted(_registry())


@lru_cache(maxsize=8)
def _load_cached(name: str, seed: int, data_root: str | None, scale: str) -> ImageDataset:
    from ..registry import resolve

    entry = resolve("dfml_bench.datasets", name, DatasetError, "dataset")
    builder = entry.obj() if isinstance(entry.obj, type) else entry.obj
    return builder.load(seed=seed, data_root=data_root, scale=scale)


def load_dataset(name: str, *, seed: int = 0, data_root: str | None = None, scale: str = "cpu") -> ImageDataset:
    """Load (building and caching if needed) the dataset registered as ``name``."""
    return _load_cached(name, int(seed), None if data_root is None else str(data_root), scale)
