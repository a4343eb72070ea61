"""Multi-domain pools: the union of several datasets with one label space, reported per domain.

``multidomain`` is the reference "mix" / MD scenario (free-tgr.md 1.1, field-survey.md 2.1): CIFAR-FS +
MiniImageNet + CUB, 64 + 64 + 100 = 228 meta-train classes, every image resized to 84x84. Class ids
follow the reference: the meta-train classes of the first domain are 0-63, of the second 64-127, of the
third 128-227; then the meta-val classes of each domain in the same order, then the meta-test classes.
``ImageDataset.domains`` maps every class id to its domain, so results can be reported per domain and
averaged (the runner's per-domain summary reads it).

``glyphs-multidomain`` runs the same machinery offline at cpu scale: two disjoint groups of writing
systems (:data:`~dfml_bench.datasets.glyphs.SCRIPT_GROUPS`), each a glyph dataset rendered in its own
style ("default" filled glyphs vs "outline" hollow glyphs on gradients), 32x32.

Normalisation: a pooled network has one input normalisation. If every domain uses the same mean/std
(the glyph domains) the pool keeps it; otherwise (CIFAR-100 vs ImageNet statistics) the pool uses the
per-channel mean/std of its meta-train images, computed once from the pooled uint8 images.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..utils import sha256_json
from .base import SPLITS, DatasetError, ImageDataset

POOL_VERSION = "pool-1"


def _resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, size, size]`` (antialiased bilinear; chunked for memory)."""
    from torchvision.transforms.v2 import functional as TF

    if tuple(images.shape[2:]) == (size, size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for s in range(0, images.shape[0], chunk):
        out[s : s + chunk] = TF.resize(images[s : s + chunk], [size, size], antialias=True)
    return out


def _channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 sums, chunked)."""
    c = images.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    n = 0
    for s in range(0, images.shape[0], chunk):
        x = images[s : s + chunk].to(torch.float64).div_(255.0)
        s1 += x.sum(dim=(0, 2, 3))
        s2 += x.pow(2).sum(dim=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s1 / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def pool_datasets(name: str, parts: Sequence[tuple[str, ImageDataset]], size: int) -> ImageDataset:
    """The union of ``parts`` ((domain name, dataset) pairs) with one label space, images resized to
    ``size``. Class ids: per split (train, val, test), the classes of each domain in order, each
    domain's classes in its own id order; labels are remapped accordingly."""
    if len(parts) < 2:
        raise DatasetError(f"{name}: a multi-domain pool needs at least two domains, got {len(parts)}")
    dom_names = [d for d, _ in parts]
    if len(set(dom_names)) != len(dom_names):
        raise DatasetError(f"{name}: domain names must be distinct, got {dom_names}")
    channels = {ds.image_shape[0] for _, ds in parts}
    if len(channels) != 1:
        raise DatasetError(f"{name}: domains have different channel counts {sorted(channels)}")
    new_id: list[dict[int, int]] = [{} for _ in parts]
    class_names: list[str] = []
    domains: dict[int, str] = {}
    splits: dict[str, list[int]] = {s: [] for s in SPLITS}
    for s in SPLITS:
        for k, (dom, ds) in enumerate(parts):
            for c in ds.splits[s]:
                gid = len(class_names)
                new_id[k][int(c)] = gid
                class_names.append(f"{dom}/{ds.class_names[int(c)]}")
                domains[gid] = dom
                splits[s].append(gid)
    images, labels = [], []
    for k, (dom, ds) in enumerate(parts):
        lut = torch.full((len(ds.class_names),), -1, dtype=torch.long)
        for old, new in new_id[k].items():
            lut[old] = new
        lab = lut[ds.labels]
        keep = lab >= 0  # images of classes in no split are dropped
        images.append(_resize(ds.images[keep] if not bool(keep.all()) else ds.images, size))
        labels.append(lab[keep])
    images_t = torch.cat(images)
    labels_t = torch.cat(labels)
    stats = {(tuple(ds.mean), tuple(ds.std)) for _, ds in parts}
    if len(stats) == 1:
        mean, std = next(iter(stats))
    else:
        train_mask = torch.isin(labels_t, torch.tensor(splits["train"], dtype=torch.long))
        mean, std = _channel_stats(images_t[train_mask])
    h = sha256_json([POOL_VERSION, name, size, [(d, ds.hash) for d, ds in parts], mean, std])
    meta = {"domains": dom_names, "size": size, "parts": {d: {"hash": ds.hash, "classes": {s: len(ds.splits[s]) for s in SPLITS},
                                                              "mean": ds.mean, "std": ds.std} for d, ds in parts}}
    return ImageDataset(name, images_t, labels_t, class_names, splits, tuple(mean), tuple(std), h, domains=domains, meta=meta)


class MultiDomain:
    """A pool of several registered datasets (builder of the ``multidomain`` dataset).

    ``domains``: dataset names to pool (default CIFAR-FS, MiniImageNet, CUB: 228 meta-train classes);
    ``size``: the common image side (84, the reference's). Each domain is loaded with the same data root,
    seed and scale, through :func:`dfml_bench.datasets.load_dataset`."""

    name = "multidomain"
    description = "CIFAR-FS + MiniImageNet + CUB pooled (64+64+100 meta-train classes), 84x84, reported per domain"

    def __init__(self, domains: Sequence[str] = ("cifar-fs", "mini-imagenet", "cub"), size: int = 84,
                 name: str | None = None) -> None:
        self.domains = tuple(domains)
        self.size = int(size)
        if name is not None:
            self.name = name

    def load(self, *, seed: int = 0, data_root: str | None = None, scale: str = "cpu") -> ImageDataset:
        from . import load_dataset

        parts = [(d, load_dataset(d, seed=seed, data_root=data_root, scale=scale)) for d in self.domains]
        return pool_datasets(self.name, parts, self.size)


class GlyphsMultiDomain:
    """The cpu-scale pool (``glyphs-multidomain``): two disjoint script groups of the glyph dataset, each
    in its own rendering style, so domains differ in content and in appearance."""

    name = "glyphs-multidomain"
    description = "two glyph domains (disjoint script groups, 'default' vs 'outline' style) pooled, 32x32, per-domain results"

    def __init__(self, styles: dict[str, str] | None = None, images_per_class: int = 60, size: int = 32,
                 classes_per_split: dict[str, int] | None = None, heldout: str = "script") -> None:
        self.styles = dict(styles or {"a": "default", "b": "outline"})
        self.images_per_class = int(images_per_class)
        self.size = int(size)
        self.classes_per_split = classes_per_split
        self.heldout = heldout  # per domain: how its held-out classes split into meta-val / meta-test (GlyphsDataset)

    def domain_builders(self) -> list[tuple[str, object]]:
        from .glyphs import SCRIPT_GROUPS, GlyphsDataset

        unknown = sorted(set(self.styles) - set(SCRIPT_GROUPS))
        if unknown:
            raise DatasetError(f"glyphs-multidomain: unknown script groups {unknown}; groups: {sorted(SCRIPT_GROUPS)}")
        tag = "glyphs-fs" if self.classes_per_split else "glyphs"
        tail = "" if self.heldout == "script" else f"-{self.heldout}"
        return [(f"{tag}-{g}-{style}{tail}", GlyphsDataset(images_per_class=self.images_per_class, size=self.size,
                                                           scripts=SCRIPT_GROUPS[g], style=style, name=f"{tag}-{g}-{style}{tail}",
                                                           classes_per_split=self.classes_per_split, heldout=self.heldout))
                for g, style in self.styles.items()]

    def load(self, *, seed: int = 0, data_root: str | None = None, scale: str = "cpu") -> ImageDataset:
        parts = [(dom, b.load(seed=seed, data_root=data_root, scale=scale)) for dom, b in self.domain_builders()]
        return pool_datasets(self.name, parts, self.size)


class GlyphsFSMultiDomain(GlyphsMultiDomain):
    """``glyphs-fs-multidomain``: the multi-domain cpu proxy, two glyph domains (disjoint script groups,
    'default' vs 'outline' style) each in CIFAR-FS's shape (64 / 16 / 20 classes, 600 images each)."""

    name = "glyphs-fs-multidomain"
    description = "two CIFAR-FS-shaped glyph domains (64/16/20 classes x 600 images each) pooled, per-domain results"

    def __init__(self, styles: dict[str, str] | None = None, images_per_class: int = 600, size: int = 32,
                 heldout: str = "script") -> None:
        from .glyphs import CIFAR_FS_CLASSES

        super().__init__(styles, images_per_class, size, classes_per_split=dict(CIFAR_FS_CLASSES), heldout=heldout)


class GlyphsFSMultiDomainNatural(GlyphsFSMultiDomain):
    """``glyphs-fs-multidomain-natural``: the multi-domain counterpart of ``glyphs-fs-natural``, two
    CIFAR-FS-shaped glyph domains whose classes have their own look: group "a" in the ``natural`` style
    (striped glyph on a striped ground) and group "b" in ``natural-outline`` (hollow glyph on a gradient).

    ``glyphs-fs-multidomain``'s classes are shapes only, the premise the proxy study rejected for
    ``glyphs-fs`` (``docs/proxy-validation.md``); this is the candidate to validate before the
    multi-domain suites move to it."""

    name = "glyphs-fs-multidomain-natural"
    description = ("two CIFAR-FS-shaped glyph domains with class looks ('natural' vs 'natural-outline'), "
                   "64/16/20 classes x 600 images each, pooled, per-domain results")

    def __init__(self, styles: dict[str, str] | None = None, images_per_class: int = 600, size: int = 32,
                 heldout: str = "script") -> None:
        super().__init__(styles or {"a": "natural", "b": "natural-outline"}, images_per_class, size, heldout=heldout)


class GlyphsFSMultiDomainNaturalShuffled(GlyphsFSMultiDomainNatural):
    """``glyphs-fs-multidomain-natural-shuffled``: ``glyphs-fs-multidomain-natural`` whose domains split their
    held-out classes between meta-val and meta-test at random (``heldout="shuffled"``, as
    ``glyphs-fs-natural-shuffled``): in each domain meta-val and meta-test are exchangeable, and
    meta-train is unchanged."""

    name = "glyphs-fs-multidomain-natural-shuffled"
    description = ("glyphs-fs-multidomain-natural with each domain's meta-val and meta-test drawn at random from its "
                   "held-out scripts' classes (exchangeable), pooled, per-domain results")

    def __init__(self, styles: dict[str, str] | None = None, images_per_class: int = 600, size: int = 32) -> None:
        super().__init__(styles, images_per_class, size, heldout="shuffled")
