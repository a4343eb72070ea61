"""Tiny fixture datasets in every real layout dfml-bench reads (a few classes of the standard splits, a few
images each, the right folder/CSV/archive structure), for tests of loading, prepare and check."""

from __future__ import annotations

import csv
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg, encode_png

from dfml_bench.datasets.real import standard_split
from dfml_bench.utils import derive_seed, make_generator

CUB_NAMES = {1: "Black_footed_Albatross", 2: "Laysan_Albatross", 3: "Sooty_Albatross", 4: "Groove_billed_Ani",
             5: "Crested_Auklet", 6: "Least_Auklet", 7: "Parakeet_Auklet", 8: "Rhinoceros_Auklet", 9: "Brewer_Blackbird",
             10: "Red_winged_Blackbird", 11: "Rusty_Blackbird", 12: "Yellow_headed_Blackbird"}


def class_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """``n`` uint8 RGB images of one class: a smooth random colour template plus noise (learnable)."""
    g = make_generator(seed)
    t = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    x = (t + 0.15 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def write_image(path: Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(img) if path.suffix == ".png" else encode_jpeg(img, quality=95)
    path.write_bytes(bytes(data.numpy()))


def pick_classes(name: str, counts: dict[str, int]) -> dict[str, list]:
    """The first ``counts[split]`` standard classes of each split (keys as in the split file)."""
    std = standard_split(name)["splits"]
    return {s: std[s][:n] for s, n in counts.items()}


def split_folder_layout(root: Path, name: str, folder: str, counts: dict[str, int], per_class: int, size: tuple[int, int],
                        split_dirs: dict[str, str] | None = None, ext: str = ".png", seed: int = 0) -> Path:
    """``root/folder/<split dir>/<class>/<i>.ext`` (the DFML code's layout)."""
    split_dirs = split_dirs or {"train": "meta_train", "val": "meta_val", "test": "meta_test"}
    base = root / folder
    for s, classes in pick_classes(name, counts).items():
        for k, c in enumerate(classes):
            cname = cub_folder(c) if name == "cub" else c
            imgs = class_images(per_class, *size, seed=derive_seed("fixture", seed, s, k))
            for i in range(per_class):
                write_image(base / split_dirs[s] / cname / f"{cname}_{i:03d}{ext}", imgs[i])
    return base


def cub_folder(number: int) -> str:
    return f"{number:03d}.{CUB_NAMES.get(number, f'Bird_{number}')}"


def mini_ravi_layout(root: Path, counts: dict[str, int], per_class: int, size: int = 84, folder: str = "mini-imagenet",
                     seed: int = 0) -> Path:
    """``root/folder/{train,val,test}.csv`` (``filename,label``) over a flat ``images/`` folder (Ravi-Larochelle)."""
    base = root / folder
    (base / "images").mkdir(parents=True, exist_ok=True)
    for s, wnids in pick_classes("mini-imagenet", counts).items():
        with open(base / f"{s}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", "label"])
            for k, wnid in enumerate(wnids):
                imgs = class_images(per_class, size, size, seed=derive_seed("fixture", seed, s, k))
                for i in range(per_class):
                    fname = f"{wnid}{i + 1:08d}.jpg"
                    write_image(base / "images" / fname, imgs[i])
                    w.writerow([fname, wnid])
    return base


def cub_numbers(counts: dict[str, int]) -> list[int]:
    return sorted(n for v in pick_classes("cub", counts).values() for n in v)


def cub_distributed(root: Path, counts: dict[str, int], per_class: int, size: tuple[int, int] = (100, 120), seed: int = 0) -> Path:
    """``root/CUB_200_2011/images/NNN.Name/*.jpg`` plus ``classes.txt`` as the archive extracts."""
    base = root / "CUB_200_2011"
    numbers = cub_numbers(counts)
    for n in numbers:
        imgs = class_images(per_class, *size, seed=seed * 1000 + n)
        for i in range(per_class):
            write_image(base / "images" / cub_folder(n) / f"{CUB_NAMES.get(n, 'Bird')}_{i:04d}.jpg", imgs[i])
    (base / "classes.txt").write_text("".join(f"{n} {cub_folder(n)}\n" for n in numbers))
    return base


def cub_tgz(path: Path, counts: dict[str, int], per_class: int, size: tuple[int, int] = (100, 120)) -> Path:
    """A fake ``CUB_200_2011.tgz`` with the distributed structure (and an extra top-level file)."""
    staging = path.parent / "cub-staging"
    cub_distributed(staging, counts, per_class, size)
    (staging / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging / "CUB_200_2011", arcname="CUB_200_2011")
        tar.add(staging / "attributes.txt", arcname="attributes.txt")
    return path


def cifar100_python(dest: Path, counts: dict[str, int], n_train: int = 5, n_test: int = 2, as_archive: bool = True,
                    extra_classes: int = 1) -> Path:
    """A fake CIFAR-100 python release: pickles ``train``, ``test``, ``meta`` with the real keys, over the
    first classes of each CIFAR-FS split (plus ``extra_classes`` not in the picks, which prepare must still
    place by the standard split). Fine label ids follow the sorted fine names, as in the real release."""
    picked = pick_classes("cifar-fs", counts)
    std = standard_split("cifar-fs")["splits"]
    names = sorted({c for v in picked.values() for c in v} | set(std["train"][counts.get("train", 0):][:extra_classes]))
    all_fine = sorted(c for v in std.values() for c in v)  # the 100 fine names; ids by sorted order
    blobs = {}
    for part, n in (("train", n_train), ("test", n_test)):
        data, fine, files = [], [], []
        for c in names:
            imgs = class_images(n, 32, 32, seed=all_fine.index(c) * 7 + (part == "test"))
            data.append(imgs.reshape(n, -1).numpy())
            fine += [all_fine.index(c)] * n
            files += [f"{c}_s_{part}_{i:06d}.png".encode() for i in range(n)]
        blobs[part] = {b"filenames": files, b"fine_labels": fine, b"coarse_labels": [0] * len(fine),
                       b"data": np.concatenate(data).astype(np.uint8), b"batch_label": f"{part} batch".encode()}
    blobs["meta"] = {b"fine_label_names": [c.encode() for c in all_fine], b"coarse_label_names": [b"x"] * 20}
    if as_archive:
        path = dest / "cifar-100-python.tar.gz"
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            for part, obj in blobs.items():
                raw = pickle.dumps(obj, protocol=2)
                info = tarfile.TarInfo(f"cifar-100-python/{part}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        return path
    folder = dest / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for part, obj in blobs.items():
        (folder / part).write_bytes(pickle.dumps(obj, protocol=2))
    return folder


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))
