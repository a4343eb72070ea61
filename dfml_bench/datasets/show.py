"""A picture of a dataset: a grid of sample images from each split, for a person to look at.

Works for any :class:`ImageDataset` (embedded or real): rows are classes, grouped by split with the
split's name written above the group, and each row is labelled with its class name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..utils import make_generator
from .base import SPLITS, DatasetError, ImageDataset


def sample_grid(
    dataset: ImageDataset, *, classes_per_split: int = 8, per_class: int = 6, seed: int = 0
) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """The rows of the grid: per split, (class name, uint8 images [k, C, H, W]) of sampled classes."""
    for name, value in (("classes_per_split", classes_per_split), ("per_class", per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"save_grid: {name} must be a positive integer, got {value!r}")
    g = make_generator(seed)
    by_class = dataset.indices_by_class()
    out = []
    for split in SPLITS:
        ids = [c for c in dataset.splits[split] if c in by_class]
        if not ids:
            continue
        pick = torch.randperm(len(ids), generator=g)[:classes_per_split].sort().values.tolist()
        rows = []
        for i in pick:
            cls = ids[i]
            idx = by_class[cls]
            take = idx[torch.randperm(len(idx), generator=g)[:per_class]]
            rows.append((dataset.class_names[cls], dataset.images[take]))
        out.append((split, rows))
    return out


def save_grid(
    dataset: ImageDataset, path: str | Path, *, classes_per_split: int = 8, per_class: int = 6, seed: int = 0, zoom: int | None = None
) -> Path:
    """Write a PNG grid of ``per_class`` images of ``classes_per_split`` random classes of each split.

    Images are enlarged by ``zoom`` (default: to about 64 pixels) with nearest-neighbour so pixels
    stay visible. Returns the path written."""
    from PIL import Image, ImageDraw, ImageFont

    groups = sample_grid(dataset, classes_per_split=classes_per_split, per_class=per_class, seed=seed)
    if not groups:
        raise DatasetError(f"save_grid: dataset {dataset.name!r} has no images in any split")
    c, h, w = dataset.image_shape
    zoom = zoom if zoom is not None else max(1, round(64 / max(h, w)))
    th, tw = h * zoom, w * zoom
    gap, header_h, title_h = 2, 22, 26
    font = ImageFont.load_default()
    names = [name for _, rows in groups for name, _ in rows]
    label_w = 12 + max(int(font.getlength(n)) for n in names)
    n_rows = sum(len(rows) for _, rows in groups)
    width = label_w + per_class * (tw + gap) + gap
    height = title_h + len(groups) * header_h + n_rows * (th + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), f"{dataset.name}  {c}x{h}x{w}  hash {dataset.hash[:12]}", fill=(0, 0, 0), font=font)
    y = title_h
    for split, rows in groups:
        draw.rectangle([0, y, width, y + header_h - 2], fill=(225, 230, 240))
        draw.text((4, y + 4), f"meta-{split}  ({len(dataset.splits[split])} classes)", fill=(0, 0, 80), font=font)
        y += header_h
        for name, imgs in rows:
            draw.text((4, y + th // 2 - 6), name, fill=(0, 0, 0), font=font)
            for j, img in enumerate(imgs):
                arr = img.permute(1, 2, 0).contiguous().numpy()
                tile = Image.fromarray(arr[:, :, 0] if c == 1 else arr[:, :, :3], mode="L" if c == 1 else "RGB")
                tile = tile.resize((tw, th), Image.Resampling.NEAREST)
                canvas.paste(tile, (label_w + gap + j * (tw + gap), y))
            y += th + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
