"""``dfml-bench data prepare`` and ``dfml-bench data check`` for the real datasets.

prepare builds ``<data root>/<dataset>/{meta_train,meta_val,meta_test}/<class>/<image>`` (the DFML code's
layout) from the original releases, with the standard split embedded in ``splits/``:

- ``cifar-fs`` from the CIFAR-100 python release (``cifar-100-python.tar.gz`` or its extracted folder with
  the ``train``/``test``/``meta`` pickles): the 500 + 100 images of each fine class become 600 PNGs;
- ``cub`` from ``CUB_200_2011.tgz`` (or the extracted folder): the JPEGs are copied as they are;
- ``mini-imagenet`` from a folder with ``images/`` and Ravi-Larochelle ``train/val/test.csv`` (or any
  layout the loader reads, e.g. one folder of wnid class folders).

It is atomic and idempotent: everything is written into ``<data root>/.<dataset>.partial-<id>``; a marker
file (:data:`~dfml_bench.datasets.real.PREPARED_MARKER`) is written last and the folder is renamed into
place, so a half-prepared folder is never found by the loader; a second prepare of a prepared dataset
does nothing; leftovers of an interrupted prepare are removed by the next one.

check reports, for the dataset the loader would read: the layout found, classes per split against the
standard split, images per class, image sizes and unreadable files.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .. import paths
from .base import SPLITS, DatasetError
from .real import (
    PREPARED_MARKER,
    SPECS,
    FileRecord,
    Layout,
    _layout_in,
    assign_splits,
    discover,
    expected_counts,
    quiet_codecs,
    split_of_key,
    standard_split,
)

SPLIT_DIRS = {"train": "meta_train", "val": "meta_val", "test": "meta_test"}
PREPARE_VERSION = 1


# --------------------------------------------------------------------------------------------- prepare


@dataclass
class Item:
    """One image to write: its split, class folder, file name, and either encoded bytes to write or a
    callable producing them."""

    split: str
    cls: str
    filename: str
    data: Callable[[], bytes]


def _fingerprint_source(src: Path) -> dict:
    if src.is_file():
        st = src.stat()
        return {"path": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = sorted(p for p in src.rglob("*") if p.is_file())
    return {"path": str(src.resolve()), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


class _NumpyOnly(pickle.Unpickler):
    """The CIFAR pickles hold dicts of lists, bytes and numpy arrays; nothing else may be constructed."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DatasetError(f"refusing to unpickle {module}.{name}: not a CIFAR-100 python release file")


def _load_pickle(raw: bytes) -> dict:
    obj = _NumpyOnly(io.BytesIO(raw), encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_parts(src: Path) -> dict[str, dict]:
    """The ``train``, ``test`` and ``meta`` pickles from the archive or an extracted folder."""
    want = ("train", "test", "meta")
    parts: dict[str, dict] = {}
    if src.is_file():
        try:
            with tarfile.open(src, "r:*") as tar:
                for m in tar:
                    base = os.path.basename(m.name)
                    if m.isfile() and base in want and base not in parts:
                        parts[base] = _load_pickle(tar.extractfile(m).read())
        except tarfile.TarError as exc:
            raise DatasetError(f"{src} is not a readable tar archive ({exc}); expected cifar-100-python.tar.gz") from exc
    else:
        for d in (src, src / "cifar-100-python"):
            for w in want:
                if w not in parts and (d / w).is_file():
                    parts[w] = _load_pickle((d / w).read_bytes())
    missing = [w for w in want if w not in parts]
    if missing:
        raise DatasetError(f"{src}: the CIFAR-100 python release lacks {missing}; expected cifar-100-python.tar.gz or a folder "
                           "holding its pickle files train, test and meta")
    return parts


def cifar_fs_items(src: Path) -> tuple[list[Item], dict]:
    """CIFAR-FS from CIFAR-100: every image of every fine class, put in the class's standard split."""
    import numpy as np
    from torchvision.io import encode_png

    parts = _cifar_parts(src)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in parts["meta"]["fine_label_names"]]
    table = split_of_key("cifar-fs")
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise DatasetError(f"{src}: fine label names {unknown[:5]} are not CIFAR-100 classes of the CIFAR-FS split")
    items: list[Item] = []
    for part in ("train", "test"):
        blob = parts[part]
        data = np.asarray(blob["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = list(blob["fine_labels"])
        files = [f.decode() if isinstance(f, bytes) else str(f) for f in blob.get("filenames", [])] or [
            f"{part}_{i:05d}.png" for i in range(len(labels))]
        if not (len(data) == len(labels) == len(files)):
            raise DatasetError(f"{src}: {part} has {len(data)} images, {len(labels)} labels, {len(files)} file names")
        for i, (lab, fname) in enumerate(zip(labels, files)):
            cls = names[lab]
            img = torch.from_numpy(np.ascontiguousarray(data[i]))
            stem = os.path.splitext(os.path.basename(fname))[0]
            items.append(Item(table[cls], cls, f"{part}-{stem}.png", lambda img=img: bytes(encode_png(img).numpy())))
    return items, {"kind": "cifar-100-python", "fine_classes": len(names)}


def _cub_tar_items(src: Path) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    with tarfile.open(src, "r:*") as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) < 3 or parts[-3] != "images" or parts[-1].startswith("."):
                continue
            data = tar.extractfile(m).read()  # streamed in archive order; the tgz is read once
            yield parts[-2], parts[-1], (lambda data=data: data)


def cub_items(src: Path) -> tuple[list[Item], dict]:
    """CUB from the distributed archive or folder; the split is the CloserLook class-index rule."""
    spec = SPECS["cub"]
    table = split_of_key("cub")
    if src.is_file():
        if not tarfile.is_tarfile(src):
            raise DatasetError(f"{src} is not a readable tar archive; expected CUB_200_2011.tgz")
        raw: Iterable[tuple[str, str, Callable[[], bytes]]] = _cub_tar_items(src)  # streamed: never all in memory
    else:
        layout = _find_layout(src)
        raw = [(r.cls, r.path.name, (lambda p=r.path: p.read_bytes())) for r in layout.records]

    def items() -> Iterator[Item]:
        n = 0
        for cls, fname, data in raw:
            key = spec.key(cls)
            if key not in table:
                raise DatasetError(f"{src}: class folder {cls!r} is not NNN.Name with NNN in 1..200")
            n += 1
            yield Item(table[key], cls, fname, data)
        if n == 0:
            raise DatasetError(f"{src}: no CUB_200_2011/images/<NNN.Name>/*.jpg found; expected CUB_200_2011.tgz or its folder")

    return (items() if src.is_file() else list(items())), {"kind": "CUB_200_2011"}


def _find_layout(src: Path) -> Layout:
    for d in (src, src / "CUB_200_2011"):
        if d.is_dir():
            layout = _layout_in(d)
            if layout is not None and layout.records:
                if layout.problems:
                    raise DatasetError(f"{src}: " + "; ".join(layout.problems[:5]))
                return layout
    raise DatasetError(f"{src}: found no images in a layout dfml-bench reads (split folders, split CSVs with images/, "
                       "or a folder of class folders)")


def mini_items(src: Path) -> tuple[list[Item], dict]:
    """MiniImageNet from an image folder plus the Ravi-Larochelle CSVs (or class folders); the CSVs' split
    must agree with the embedded standard split."""
    layout = _find_layout(src)
    asg = assign_splits("mini-imagenet", layout.records)
    if asg.errors:
        raise DatasetError(f"{src}: " + "; ".join(asg.errors[:5]))
    table = split_of_key("mini-imagenet")
    items = [Item(table[r.cls], r.cls, r.path.name, (lambda p=r.path: p.read_bytes())) for r in layout.records]
    return items, {"kind": layout.kind}


SOURCES: dict[str, Callable[[Path], tuple[Iterable[Item], dict]]] = {
    "cifar-fs": cifar_fs_items,
    "cub": cub_items,
    "mini-imagenet": mini_items,
}


def _write_items(tmp: Path, items: Iterable[Item], progress: bool, desc: str) -> Counter:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    counts: Counter = Counter()

    def write(it: Item) -> None:
        path = tmp / SPLIT_DIRS[it.split] / it.cls / it.filename
        if path.exists():
            raise DatasetError(f"two source images map to {path.relative_to(tmp)}")
        path.write_bytes(it.data())

    if not isinstance(items, list):  # a stream (a tar read once, in order): written as it comes
        with quiet_codecs(), tqdm(desc=desc, disable=not progress, leave=False, unit="img") as bar:
            for it in items:
                (tmp / SPLIT_DIRS[it.split] / it.cls).mkdir(parents=True, exist_ok=True)
                write(it)
                counts[(it.split, it.cls)] += 1
                bar.update(1)
        return counts
    for cls_dir in {(it.split, it.cls) for it in items}:
        (tmp / SPLIT_DIRS[cls_dir[0]] / cls_dir[1]).mkdir(parents=True, exist_ok=True)
    with quiet_codecs(), ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool, \
            tqdm(total=len(items), desc=desc, disable=not progress, leave=False) as bar:
        for it, _ in zip(items, pool.map(write, items, chunksize=64)):
            counts[(it.split, it.cls)] += 1
            bar.update(1)
    return counts


def prepared_dir(name: str, data_root: str | os.PathLike | None) -> Path:
    root = paths.data_root(data_root)
    if root is None:
        raise DatasetError("no data root: pass --data-root PATH or set $DFML_BENCH_DATA")
    return root / SPECS[name].folder


def prepare(name: str, source: str | os.PathLike, data_root: str | os.PathLike | None = None, *, progress: bool = True,
            log: Callable[[str], None] | None = None) -> Path:
    """Build ``<data root>/<dataset>/`` from the original release at ``source``; returns the folder.
    A dataset already prepared (marker present) is left as it is."""
    from filelock import FileLock

    if name not in SOURCES:
        raise DatasetError(f"no prepare step for {name!r}; datasets with one: {', '.join(sorted(SOURCES))}")
    log = log or (lambda m: None)
    src = Path(source).expanduser()
    if not src.exists():
        raise DatasetError(f"{name}: --from {src} does not exist; it should be {SPECS[name].prepare_from}")
    final = prepared_dir(name, data_root)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        marker = final / PREPARED_MARKER
        if marker.exists():
            info = json.loads(marker.read_text())
            log(f"{name}: already prepared at {final} (from {info.get('source', {}).get('path')}); nothing to do")
            return final
        if final.exists():
            raise DatasetError(f"{name}: {final} exists but was not made by `data prepare` (no {PREPARED_MARKER}); it may be your "
                               f"own copy, which the loader reads as it is. Move it away to prepare a fresh one.")
        for stale in final.parent.glob(f".{final.name}.partial-*"):
            log(f"{name}: removing leftovers of an interrupted prepare: {stale}")
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            t0 = time.time()
            log(f"{name}: reading {src}")
            items, info = SOURCES[name](src)
            counts = _write_items(tmp, items, progress, f"{name}: writing")
            per_split = {s: len({c for (sp, c) in counts if sp == s}) for s in SPLITS}
            blob = {"dataset": name, "version": PREPARE_VERSION, "source": _fingerprint_source(src), "source_info": info,
                    "classes_per_split": per_split, "images": sum(counts.values()),
                    "split_source": standard_split(name)["source"], "seconds": round(time.time() - t0, 1),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / PREPARED_MARKER).write_text(json.dumps(blob, indent=1) + "\n")
            os.replace(tmp, final)  # atomic: the folder appears complete, or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"{name}: prepared {blob['images']} images, classes per split {per_split}, in {final}")
    return final


# --------------------------------------------------------------------------------------------- check


@dataclass
class CheckReport:
    name: str
    root: str = ""
    layout: str = ""
    classes: dict[str, int] = field(default_factory=dict)
    expected_classes: dict[str, int] = field(default_factory=dict)
    images_per_class: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (min, max)
    sizes: dict[str, int] = field(default_factory=dict)  # "HxW" -> count
    n_images: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{self.name}: {self.layout} layout at {self.root}" if self.root else f"{self.name}:"]
        if self.classes:
            lines.append("  classes per split: " + ", ".join(f"{s} {self.classes.get(s, 0)}/{self.expected_classes.get(s, '?')}"
                                                              for s in SPLITS))
            lines.append("  images per class:  " + ", ".join(f"{s} {lo}-{hi}" for s, (lo, hi) in self.images_per_class.items()))
            top = sorted(self.sizes.items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"  images: {self.n_images}; sizes: " + ", ".join(f"{k} x{v}" for k, v in top)
                         + (" ..." if len(self.sizes) > 4 else ""))
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems[:30]]
            if len(self.problems) > 30:
                lines.append(f"  - ... and {len(self.problems) - 30} more")
        else:
            lines.append("  OK")
        return "\n".join(lines)


def _image_size(path: Path) -> tuple[int, int]:
    from torchvision.io import ImageReadMode, decode_image, read_file

    img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    return int(img.shape[1]), int(img.shape[2])


def check(name: str, data_root: str | os.PathLike | None = None, *, decode: bool = True, progress: bool = True) -> CheckReport:
    """Check the dataset the loader would read: classes per split against the standard split, images per
    class against the literature's counts, image sizes, and (``decode``) that every file decodes."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if name not in SPECS:
        raise DatasetError(f"no check for {name!r}; real datasets: {', '.join(sorted(SPECS))}")
    spec = SPECS[name]
    rep = CheckReport(name, expected_classes=expected_counts(name))
    try:
        layout = discover(name, data_root)
    except DatasetError as exc:
        rep.problems.append(str(exc))
        return rep
    rep.root, rep.layout = str(layout.root), layout.kind
    if (layout.root / PREPARED_MARKER).exists():
        rep.notes.append(f"prepared by dfml-bench ({PREPARED_MARKER} present)")
    rep.problems += layout.problems
    asg = assign_splits(name, layout.records)
    rep.problems += asg.errors
    rep.classes = {s: len(v) for s, v in asg.splits.items()}
    for s, miss in asg.missing.items():
        rep.problems.append(f"meta-{s} has {rep.classes[s]} of the standard {rep.expected_classes[s]} classes; missing "
                            f"{', '.join(miss[:8])}{' ...' if len(miss) > 8 else ''}")
    per_class = Counter(r.cls for r in layout.records)
    lo, hi = spec.images_per_class
    off = []
    for s, ids in asg.splits.items():
        counts = [per_class[asg.class_names[i]] for i in ids]
        if counts:
            rep.images_per_class[s] = (min(counts), max(counts))
        off += [f"{asg.class_names[i]} ({per_class[asg.class_names[i]]})" for i in ids
                if not lo <= per_class[asg.class_names[i]] <= hi]
    if off:
        want = f"{lo}" if lo == hi else f"{lo}-{hi}"
        rep.problems.append(f"{len(off)} classes do not have the {want} images per class of {name}: "
                            f"{', '.join(off[:6])}{' ...' if len(off) > 6 else ''}")
    rep.n_images = len(layout.records)
    if decode:
        sizes: Counter = Counter()
        unreadable: list[str] = []

        def probe(r: FileRecord) -> None:
            try:
                h, w = _image_size(r.path)
                sizes[f"{h}x{w}"] += 1
            except Exception as exc:  # noqa: BLE001 - reported per file
                unreadable.append(f"unreadable image {r.path}: {type(exc).__name__}")

        with quiet_codecs(), ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool, \
                tqdm(total=len(layout.records), desc=f"{name}: checking files", disable=not progress, leave=False) as bar:
            for _ in pool.map(probe, layout.records, chunksize=64):
                bar.update(1)
        rep.sizes = dict(sizes)
        rep.problems += sorted(unreadable)
        r = spec.resolution
        if name == "cifar-fs" and set(sizes) - {f"{r}x{r}"}:
            rep.problems.append(f"CIFAR-FS images are {r}x{r}; found sizes {sorted(set(sizes) - {f'{r}x{r}'})[:5]}")
        small = sum(v for k, v in sizes.items() if min(map(int, k.split("x"))) < r)
        if small and name != "cifar-fs":
            rep.notes.append(f"{small} images are smaller than {r}x{r} and will be upsampled")
    else:
        rep.notes.append("files not decoded (--no-decode)")
    return rep
