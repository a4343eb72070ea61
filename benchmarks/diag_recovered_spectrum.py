"""Diagnostic: how much fine detail the recovered images of each record carry, against real images.

Reads the ``seed-N-recovered.png`` grids that replay methods save beside their records (rows of one
recovered class, ``--cols`` images each, ``--size`` pixels square, drawn with nearest-neighbour
scaling), cuts the grid back into images and reports the share of each image's spectral power (grey,
mean removed) above ``--radius`` cycles per image: the high-frequency share. The same figure for
real meta-train images of the record's dataset is printed as the reference.

Why: ``bidf-mkd-qe`` estimates zero-order gradients in low-resolution directions. On
``glyphs-fs-natural`` its teachers label its recovered images as intended more often than
``bidf-mkd``'s (56-58 % against 35-38 %) yet it gains less; this checks whether its images lack the
texture that carries part of a class's look. It reads only records and meta-train images, never test
episodes. The figure is approximate (it is read back from the saved picture, not from the memory),
so compare methods with one another rather than trusting the third digit.

    python benchmarks/diag_recovered_spectrum.py results/archive/glyphs-fs-natural-script-split/blackbox-homo-cpu/glyphs-fs-natural-conv4-5w1s \
        --methods bidf-mkd,bidf-mkd-qe,placebo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfml_bench.datasets import load_dataset  # noqa: E402


def high_frequency_share(image: np.ndarray, radius: float) -> float:
    """Share of the spectral power of an [H, W, C] image in [0, 1] (grey, mean removed) above ``radius`` cycles."""
    grey = image.mean(-1)
    grey = grey - grey.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey))) ** 2
    h, w = grey.shape
    y, x = np.mgrid[-(h // 2):h - h // 2, -(w // 2):w - w // 2]
    total = power.sum()
    return float(power[np.hypot(y, x) > radius].sum() / total) if total > 0 else 0.0


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of True in a 1-D mask."""
    best, start = (0, 0), None
    for i, v in enumerate(list(mask) + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            best = max(best, (start, i), key=lambda r: r[1] - r[0])
            start = None
    return best


def _grid_cells(png: Path, cols: int, size: int) -> np.ndarray | None:
    """The cells of a saved recovered grid, [rows, cols, H, W, 3]: crop the drawn area (below the
    title), resample to cells; None when nothing is drawn."""
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).astype(np.float64) / 255.0
    drawn = (a < 250 / 255).any(-1)
    top, bottom = _longest_run(drawn.any(1))  # the grid is the tallest band of drawn rows (the title is a thin one)
    if bottom <= top:
        return None
    xs = np.nonzero(drawn[top:bottom].any(0))[0]
    a = a[top:bottom, xs.min(): xs.max() + 1]
    height, width = a.shape[:2]
    rows = max(1, round(height / (width / cols)))
    yi = ((np.arange(rows * size) + 0.5) * height / (rows * size)).astype(int)
    xi = ((np.arange(cols * size) + 0.5) * width / (cols * size)).astype(int)
    return a[yi][:, xi].reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4)  # [rows, cols, H, W, 3]


def grid_rows(png: Path, cols: int, size: int) -> list[list[np.ndarray]]:
    """The grid's images row by row (a row is one recovered class), blank padding cells dropped."""
    cells = _grid_cells(png, cols, size)
    return [] if cells is None else [[c for c in row if c.std() > 0.02] for row in cells]  # padding cells are blank


def grid_images(png: Path, cols: int, size: int) -> list[np.ndarray]:
    """The images of a saved recovered grid, row after row."""
    return [c for row in grid_rows(png, cols, size) for c in row]


def _mean_pairwise(a: list[np.ndarray], b: list[np.ndarray] | None = None) -> float:
    """Mean RMS pixel distance over pairs (within ``a`` when ``b`` is None, else across ``a`` x ``b``)."""
    x = np.stack([i.ravel() for i in a])
    y = x if b is None else np.stack([i.ravel() for i in b])
    d = np.sqrt(((x[:, None] - y[None]) ** 2).mean(-1))
    if b is None:
        n = len(a)
        return float(d.sum() / (n * (n - 1))) if n > 1 else float("nan")
    return float(d.mean())


def class_diversity(rows: list[list[np.ndarray]]) -> tuple[float, float]:
    """(mean RMS distance between two images of one class, between images of two different classes):
    a memory of near-duplicates has a within-class distance far below the between-class one."""
    rows = [r for r in rows if len(r) > 1]
    within = float(np.mean([_mean_pairwise(r) for r in rows])) if rows else float("nan")
    between = [_mean_pairwise(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    return within, float(np.mean(between)) if between else float("nan")


def real_reference(dataset: str, n: int, seed: int, radius: float) -> float:
    """Mean high-frequency share of ``n`` random meta-train images of ``dataset``."""
    ds = load_dataset(dataset)
    idx = torch.nonzero(torch.isin(ds.labels, torch.tensor(ds.splits["train"]))).squeeze(1)
    pick = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]]
    return float(np.mean([high_frequency_share(ds.images[i].permute(1, 2, 0).numpy() / 255.0, radius) for i in pick]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("scenario_dir", type=Path, help="a results/<suite>-<scale>/<scenario> folder")
    p.add_argument("--methods", default="bidf-mkd,bidf-mkd-qe,placebo")
    p.add_argument("--cols", type=int, default=8, help="images per class row in the saved grid")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--radius", type=float, default=4.0, help="cycles per image above which power counts as fine detail")
    p.add_argument("--real", type=int, default=400, help="real meta-train images for the reference (0: skip)")
    args = p.parse_args(argv)
    dataset = None
    print(f"high-frequency share (power above {args.radius:g} cycles/image), mean over the images of each grid; "
          "within- and between-class RMS pixel distance (diversity of a class's recovered images)")
    for method in args.methods.split(","):
        for png in sorted((args.scenario_dir / method).glob("seed-*-recovered.png")):
            record = json.loads(png.with_name(png.name.replace("-recovered.png", ".json")).read_text())
            dataset = record["config"]["scenario"]["dataset"]
            rows = grid_rows(png, args.cols, args.size)  # the picture is read once for both figures
            shares = [high_frequency_share(c, args.radius) for row in rows for c in row]
            within, between = class_diversity(rows)
            extra = record.get("extra", {})
            agreement = extra.get("recovery_agreement_mean", extra.get("teacher_acc_on_recovered"))
            print(f"  {method:14s} {png.name:22s} {np.mean(shares):.3f}  within/between-class distance "
                  f"{within:.3f}/{between:.3f} = {within / between:.2f}  ({len(shares)} images"
                  + (f", teacher agreement {agreement:.2f})" if agreement is not None else ")"))
    if dataset and args.real:
        print(f"  {'real':14s} {dataset + ' meta-train':22s} {real_reference(dataset, args.real, 0, args.radius):.3f}  ({args.real} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
