"""Frozen N-way K-shot episodes.

Test and validation episodes are drawn once per (scenario, seed) from meta-test / meta-val, stored as
index tensors with a hash, and shared by every method, so every comparison between methods is paired
on exactly the same tasks. An episode is a set of ``ways`` classes, ``shots`` support images and
``queries`` query images per class; the label of an image is the position of its class in the
episode's class list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .datasets.base import DatasetError, ImageDataset
from .utils import atomic_torch_save, make_generator, sha256_json, sha256_tensor


@dataclass(frozen=True)
class EpisodeSpec:
    ways: int = 5
    shots: int = 1
    queries: int = 15
    n_episodes: int = 600

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries", "n_episodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EpisodeSpec.{name} must be a positive integer, got {value!r}")
        if self.ways < 2:
            raise ValueError("EpisodeSpec.ways must be at least 2")


@dataclass
class EpisodeSet:
    """Index tensors of a frozen set of episodes over one dataset split."""

    classes: torch.Tensor  # int64 [E, N] global class ids
    support: torch.Tensor  # int64 [E, N, K] image indices
    query: torch.Tensor  # int64 [E, N, Q] image indices
    split: str
    dataset_hash: str
    seed: int

    @property
    def hash(self) -> str:
        return sha256_json(
            [self.split, self.dataset_hash, sha256_tensor(self.classes), sha256_tensor(self.support), sha256_tensor(self.query)]
        )

    @property
    def spec(self) -> EpisodeSpec:
        e, n, k = self.support.shape
        return EpisodeSpec(ways=n, shots=k, queries=self.query.shape[2], n_episodes=e)

    def __len__(self) -> int:
        return self.classes.shape[0]

    def subset(self, idx: slice | torch.Tensor) -> "EpisodeSet":
        return EpisodeSet(self.classes[idx], self.support[idx], self.query[idx], self.split, self.dataset_hash, self.seed)

    def tensors(
        self, dataset: ImageDataset, idx: slice | torch.Tensor | None = None, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images and labels of episodes ``idx``: ``sx [e, N*K, C, H, W]``, ``sy [e, N*K]``, ``qx``, ``qy``.

        Images are float in [0, 1]; labels are positions 0..N-1 of the class in the episode.
        """
        if dataset.hash != self.dataset_hash:
            raise DatasetError("episodes were drawn from a different dataset (hash mismatch); rebuild them")
        sup = self.support if idx is None else self.support[idx]
        qry = self.query if idx is None else self.query[idx]
        return _gather(dataset, sup, device) + _gather(dataset, qry, device)


def _gather(dataset: ImageDataset, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    e, n, m = index.shape
    x = dataset.images[index.reshape(-1)].to(device, non_blocking=True).float().div_(255.0)
    x = x.reshape(e, n * m, *dataset.image_shape)
    y = torch.arange(n, device=device).repeat_interleave(m).expand(e, n * m).contiguous()
    return x, y


def domain_groups(dataset: ImageDataset, classes: list[int]) -> list[list[int]]:
    """``classes`` grouped by domain (sorted by domain name); one group for a single-domain dataset.

    Multi-domain pools are evaluated as the reference does: every episode comes from one domain, and
    results are reported per domain and averaged."""
    if not dataset.domains:
        return [list(classes)]
    out: dict[str, list[int]] = {}
    for c in classes:
        out.setdefault(dataset.domain_of(c), []).append(c)
    return [out[d] for d in sorted(out)]


def sample_episodes(dataset: ImageDataset, split: str, spec: EpisodeSpec, seed: int) -> EpisodeSet:
    """Draw ``spec.n_episodes`` episodes from ``split`` with an explicit seed (deterministic on any machine)."""
    classes = dataset.splits[split]
    by_class = dataset.indices_by_class()
    if len(classes) < spec.ways:
        raise DatasetError(
            f"{dataset.name} meta-{split} has {len(classes)} classes; a {spec.ways}-way episode needs at least {spec.ways}"
        )
    need = spec.shots + spec.queries
    short = [c for c in classes if len(by_class[c]) < need]
    if short:
        raise DatasetError(
            f"{dataset.name} meta-{split}: classes {short[:5]} have fewer than shots+queries={need} images"
        )
    g = make_generator(seed)
    groups = [torch.tensor(c, dtype=torch.long) for c in domain_groups(dataset, classes) if len(c) >= spec.ways]
    if not groups:
        raise DatasetError(f"{dataset.name} meta-{split}: no domain has {spec.ways} classes for a {spec.ways}-way episode")
    all_cls = torch.empty(spec.n_episodes, spec.ways, dtype=torch.long)
    sup = torch.empty(spec.n_episodes, spec.ways, spec.shots, dtype=torch.long)
    qry = torch.empty(spec.n_episodes, spec.ways, spec.queries, dtype=torch.long)
    for e in range(spec.n_episodes):
        pool_cls = groups[e % len(groups)]  # multi-domain pools: each episode within one domain, domains in turn
        chosen = pool_cls[torch.randperm(len(pool_cls), generator=g)[: spec.ways]]
        all_cls[e] = chosen
        for n, c in enumerate(chosen.tolist()):
            pool = by_class[c]
            pick = pool[torch.randperm(len(pool), generator=g)[:need]]
            sup[e, n] = pick[: spec.shots]
            qry[e, n] = pick[spec.shots :]
    return EpisodeSet(all_cls, sup, qry, split, dataset.hash, int(seed))


def save_episodes(path: str | Path, episodes: EpisodeSet) -> None:
    atomic_torch_save(
        path,
        {
            "classes": episodes.classes,
            "support": episodes.support,
            "query": episodes.query,
            "split": episodes.split,
            "dataset_hash": episodes.dataset_hash,
            "seed": episodes.seed,
            "hash": episodes.hash,
        },
    )


def load_episodes(path: str | Path) -> EpisodeSet:
    """Load a stored episode file; a file whose contents do not match its recorded hash is refused."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    eps = EpisodeSet(blob["classes"], blob["support"], blob["query"], blob["split"], blob["dataset_hash"], int(blob["seed"]))
    if eps.hash != blob["hash"]:
        raise DatasetError(f"episode file {path} does not match its recorded hash; delete it to redraw")
    return eps


def frozen_episodes(
    dataset: ImageDataset, split: str, spec: EpisodeSpec, seed: int, store: str | Path
) -> EpisodeSet:
    """The episodes of (dataset, split, spec, seed): loaded from ``store`` if drawn before, else drawn and stored.

    The file name encodes everything the draw depends on, so every method of a run gets the same file.
    Safe with concurrent workers: the file is published once with an exclusive hard link (never
    replaced while valid, never seen half-written); a process that loses the race reads the winner's
    file. The draw is deterministic, so every candidate holds the same episodes.
    """
    key_parts = [dataset.hash, split, spec.ways, spec.shots, spec.queries, spec.n_episodes, int(seed)]
    if dataset.domains:
        key_parts.append("per-domain")
    key = sha256_json(key_parts)[:16]
    path = Path(store) / f"{dataset.name}-{split}-{spec.ways}w{spec.shots}s{spec.queries}q-{spec.n_episodes}-seed{seed}-{key}.pt"
    if path.exists():
        try:
            return load_episodes(path)  # the common case: read only
        except FileNotFoundError:
            pass
        except Exception:
            path.unlink(missing_ok=True)  # corrupted: redraw (deterministic, so the same episodes come back)
    eps = sample_episodes(dataset, split, spec, seed)
    if not _write_once(path, eps):
        try:
            return load_episodes(path)  # another process published it first
        except FileNotFoundError:
            pass
    return eps


def _write_once(path: Path, eps: EpisodeSet) -> bool:
    """Publish ``eps`` at ``path`` only if no file is there (O_EXCL semantics through ``os.link``).
    Returns True if this call created the file."""
    import os
    import threading

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    save_episodes(tmp, eps)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: an atomic replace (same content) instead
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
