"""The memory of recovered tasks, shared by BiDf-MKD (task memory replay) and FREE (data pool).

In memory, not PNG files: one ring buffer of uint8 images per *global* class id (the class ids the
zoo's models / APIs report), so a class accumulates images recovered from every model that knows it,
and replay tasks mix classes and images from different models ("interpolated tasks"). Images are
quantised to uint8 exactly as the reference's PNG pool does, which also keeps the memory small.

Fixes a FREE reference bug: :meth:`TaskMemory.add` stores the batch of every model it is given (the
reference stores only the last model's batch of each step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TaskMemory:
    max_batches_per_class: int = 20  # ring buffer depth, as the reference's max_batch_per_class
    _store: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _slot: dict[int, int] = field(default_factory=dict)
    _source: dict[int, list[int]] = field(default_factory=dict)

    def add(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int] | tuple[int, ...], source: int = -1) -> None:
        """Store a recovered batch: ``images`` in [0, 1], ``labels`` local (0..K-1) indices into ``classes``."""
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        q = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        labels = labels.cpu()
        for local, cls in enumerate(classes):
            sel = q[labels == local]
            if len(sel) == 0:
                continue
            buf = self._store.setdefault(int(cls), [])
            slot = self._slot.get(int(cls), 0)
            src = self._source.setdefault(int(cls), [])
            if len(buf) < self.max_batches_per_class:
                buf.append(sel)
                src.append(source)
            else:
                buf[slot] = sel
                src[slot] = source
            self._slot[int(cls)] = (slot + 1) % self.max_batches_per_class

    @property
    def classes(self) -> list[int]:
        """Classes with at least one stored batch ("ready" in the reference)."""
        return sorted(self._store)

    def sources(self) -> set[int]:
        return {s for v in self._source.values() for s in v}

    def n_images(self, cls: int | None = None) -> int:
        if cls is not None:
            return sum(len(b) for b in self._store.get(int(cls), []))
        return sum(len(b) for v in self._store.values() for b in v)

    def class_images(self, cls: int) -> torch.Tensor:
        return torch.cat(self._store[int(cls)])

    def can_sample(self, ways: int, per_class: int) -> bool:
        return sum(self.n_images(c) >= per_class for c in self._store) >= ways

    def _images_from(self, cls: int, source: int) -> torch.Tensor:
        bufs = [b for b, s in zip(self._store[int(cls)], self._source[int(cls)]) if s == source]
        return torch.cat(bufs) if bufs else torch.zeros(0, dtype=torch.uint8)

    def sample_task(self, ways: int, shots: int, queries: int, generator: torch.Generator,
                    device: str | torch.device = "cpu", *, per_source: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An N-way task (support x, y, query x, y) drawn from the memory; images in [0, 1].
        Images are drawn without replacement; if a class holds fewer than ``shots + queries`` images the
        task gets fewer queries per class (the same for every class), and fewer than ``shots + 1`` is an error.

        ``per_source=False`` (the references' interpolated tasks): classes drawn across every model's
        batches. ``per_source=True``: one model (source) is drawn among those that stored at least
        ``ways`` classes, and the task uses only that model's images, so no task can be solved by telling
        apart which generator run produced an image."""
        src = None
        if per_source:
            counts: dict[int, int] = {}
            for c in self.classes:
                for s in set(self._source[c]):
                    counts[s] = counts.get(s, 0) + 1
            ok = sorted(s for s, n in counts.items() if n >= ways)
            if not ok:
                raise ValueError(f"no model stored {ways} classes; a per-source {ways}-way task needs one")
            src = ok[int(torch.randint(len(ok), (1,), generator=generator))]
            eligible = [c for c in self.classes if src in self._source[c]]
        else:
            eligible = [c for c in self.classes if self.n_images(c) > 0]
        if len(eligible) < ways:
            raise ValueError(f"memory holds {len(eligible)} classes; a {ways}-way task needs {ways}")
        pick = torch.randperm(len(eligible), generator=generator)[:ways].tolist()
        pools = [self.class_images(c) if src is None else self._images_from(c, src) for c in (eligible[i] for i in pick)]
        # without replacement, as the references (which draw from >= 20 images a class): a support image
        # never reappears among its own queries; a class with fewer than shots + queries images shortens
        # the task's query set (equal for every class), never duplicates an image
        n_query = min(queries, min(len(p) for p in pools) - shots)
        if n_query < 1:
            raise ValueError(f"a class in memory holds {min(len(p) for p in pools)} images; a {shots}-shot task needs at "
                             f"least {shots + 1} distinct images per class (recover more images per class)")
        sx, qx = [], []
        for imgs in pools:
            sel = imgs[torch.randperm(len(imgs), generator=generator)[: shots + n_query]]
            sx.append(sel[:shots]); qx.append(sel[shots:])
        to = lambda t: torch.cat(t).to(device).float().div_(255)  # noqa: E731
        sy = torch.arange(ways).repeat_interleave(shots).to(device)
        qy = torch.arange(ways).repeat_interleave(n_query).to(device)
        return to(sx), sy, to(qx), qy

    def grid(self, max_classes: int = 10, per_class: int = 8) -> torch.Tensor:
        """A uint8 grid [rows, per_class, C, H, W] of stored images, for a picture of what was recovered."""
        rows = []
        for c in self.classes[:max_classes]:
            imgs = self.class_images(c)[:per_class]
            if len(imgs) < per_class:
                imgs = torch.cat([imgs, torch.zeros(per_class - len(imgs), *imgs.shape[1:], dtype=torch.uint8)])
            rows.append(imgs)
        return torch.stack(rows) if rows else torch.zeros(0, per_class, 3, 8, 8, dtype=torch.uint8)


def save_image_grid(grid: torch.Tensor, path, title: str = "") -> None:
    """Write a [rows, cols, C, H, W] uint8 grid as a PNG (used to save recovered samples next to records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape[:2]
    if rows == 0:
        return
    img = grid.permute(0, 3, 1, 4, 2).reshape(rows * grid.shape[3], cols * grid.shape[4], grid.shape[2]).numpy()
    fig, ax = plt.subplots(figsize=(max(2, cols * 0.6), max(2, rows * 0.6) + 0.4))
    ax.imshow(img.squeeze(), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
