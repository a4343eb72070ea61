"""benchmarks/diag_recovered_spectrum.py reads saved recovered grids back into images and ranks fine detail
correctly: smooth images score a lower high-frequency share than noisy ones, after the round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.memory import save_image_grid

from conftest import load_benchmark


@pytest.fixture(scope="module")
def diag():
    return load_benchmark("diag_recovered_spectrum")


def _images(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        x = torch.rand(n, 3, 32, 32, generator=g)
    else:  # smooth: a 4x4 random field upsampled, only low frequencies
        x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)
    return (x * 200 + 20).to(torch.uint8)  # never pure white, as the cropping expects of drawn images


def test_high_frequency_share_orders_smooth_below_noise(diag) -> None:
    smooth = _images("smooth", 4, 0).permute(0, 2, 3, 1).numpy() / 255.0
    noise = _images("noise", 4, 1).permute(0, 2, 3, 1).numpy() / 255.0
    s = [diag.high_frequency_share(im, 4.0) for im in smooth]
    n = [diag.high_frequency_share(im, 4.0) for im in noise]
    assert max(s) < 0.2 and min(n) > 0.8  # white noise: ~95 % of frequencies lie above 4 cycles
    assert diag.high_frequency_share(np.full((32, 32, 3), 0.5), 4.0) == 0.0  # flat image: no power at all


def test_grid_round_trip_recovers_the_images(diag, tmp_path) -> None:
    rows = [_images("smooth" if r % 2 == 0 else "noise", 8, r) for r in range(5)]
    grid = torch.stack(rows)  # [5 classes, 8 images, C, H, W]
    path = tmp_path / "seed-0-recovered.png"
    save_image_grid(grid, path, title="toy: recovered samples")
    cells = diag.grid_images(path, cols=8, size=32)
    assert len(cells) == 40
    truth = grid.reshape(-1, 3, 32, 32).permute(0, 2, 3, 1).numpy() / 255.0
    # the picture is drawn with nearest-neighbour scaling: the cells come back close to the originals
    assert np.mean([np.abs(c - t).mean() for c, t in zip(cells, truth)]) < 0.05
    shares = np.array([diag.high_frequency_share(c, 4.0) for c in cells]).reshape(5, 8)
    assert shares[0::2].max() < shares[1::2].min()


def test_longest_run(diag) -> None:
    assert diag._longest_run(np.array([1, 1, 0, 1, 1, 1, 0], dtype=bool)) == (3, 6)
    assert diag._longest_run(np.zeros(4, dtype=bool)) == (0, 0)


def test_class_diversity_tells_near_duplicates_from_varied_classes(diag, tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    centres = torch.rand(4, 3, 32, 32, generator=g) * 200 + 20
    dup = torch.stack([c + torch.randn(8, 3, 32, 32, generator=g) * 2 for c in centres])  # each class: one image, jittered
    varied = torch.rand(4, 8, 3, 32, 32, generator=g) * 200 + 20  # each image its own
    ratios = {}
    for name, grid in (("dup", dup), ("varied", varied)):
        path = tmp_path / f"{name}-recovered.png"
        save_image_grid(grid.clamp(0, 255).to(torch.uint8), path, title="toy")
        rows = diag.grid_rows(path, cols=8, size=32)
        assert [len(r) for r in rows] == [8, 8, 8, 8]
        within, between = diag.class_diversity(rows)
        ratios[name] = within / between
    assert ratios["dup"] < 0.2 and ratios["varied"] > 0.9
