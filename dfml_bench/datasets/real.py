"""The literature's real datasets: ``cifar-fs``, ``mini-imagenet`` and ``cub``, read from a local data root.

Nothing is downloaded. The user's data root (``--data-root`` or ``$DFML_BENCH_DATA``) is searched for
one of the layouts the DFML literature and its users have (see :data:`LAYOUT_HELP`):

- per-split folders of class folders (the DFML code's ``cifar100/meta_train/<class>/*.png``, its typo
  ``mete_train`` too, or ``train/val/test``), which is also what ``dfml-bench data prepare`` writes;
- split CSV files ``filename,label`` (Ravi and Larochelle's ``train.csv/val.csv/test.csv`` over an
  ``images`` folder, or the DFML code's ``split/meta_train.csv`` ...);
- one folder of all class folders (``CUB_200_2011/images/<NNN.Name>/`` as distributed, R2D2's
  ``cifar100/data/<class>/``), split by the embedded standard lists.

Whatever the layout, the split of a class is read from the standard class lists embedded in
``splits/*.json`` (CIFAR-FS: Bertinetto et al. 2019; MiniImageNet: Ravi and Larochelle 2017; CUB: the
CloserLook class-index rule), never from folder listing order; a layout that puts a class in another
split is reported as broken. Images are decoded once with ``torchvision.io``, resized with
``torchvision.transforms.v2`` to the literature's resolution (32 for CIFAR-FS, 84 for the others), and
cached as one uint8 tensor under ``$DFML_BENCH_HOME/datasets`` keyed by a fingerprint of the file list
(relative path, class, size and mtime of every file), so later loads are a memory-map.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import paths
from ..utils import sha256_json, sha256_tensor
from .base import SPLITS, DatasetError, ImageDataset

log = logging.getLogger(__name__)

LOADER_VERSION = "real-1"  # bump when decoding/resizing changes, so caches are rebuilt
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
PREPARED_MARKER = ".dfml-bench-prepared.json"
ALLOW_SUBSET_ENV = "DFML_BENCH_ALLOW_SUBSET"

# Split folder / CSV names accepted for each split (the DFML README's "mete_" typo included).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("meta_train", "mete_train", "train"),
    "val": ("meta_val", "mete_val", "val"),
    "test": ("meta_test", "mete_test", "test"),
}
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cub_key(folder: str) -> int | None:
    """CUB class folders are ``NNN.Name``; the 1-based number is the class's index in sorted order + 1."""
    m = re.match(r"^(\d{1,3})[._-]", folder)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RealSpec:
    """What distinguishes one real dataset: where to look, its standard split, geometry and counts."""

    name: str
    folders: tuple[str, ...]  # names of the dataset folder under the data root, in search order
    split_file: str
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    images_per_class: tuple[int, int]  # (min, max) in the full dataset
    prepare_from: str  # what `data prepare --from` takes
    key: Callable[[str], object] = str  # class folder name -> the key used in the split file

    @property
    def folder(self) -> str:
        """The folder ``data prepare`` writes."""
        return self.folders[0]


SPECS: dict[str, RealSpec] = {
    "cifar-fs": RealSpec("cifar-fs", ("cifar-fs", "cifar_fs", "CIFAR-FS", "cifarfs", "cifar100", "CIFAR100", "cifar-100"),
                         "cifar-fs.json", 32, CIFAR100_MEAN, CIFAR100_STD, (600, 600),
                         "the CIFAR-100 python archive cifar-100-python.tar.gz (or its extracted folder)"),
    "mini-imagenet": RealSpec("mini-imagenet", ("mini-imagenet", "miniimagenet", "Miniimagenet", "miniImageNet", "MiniImageNet",
                                                "mini_imagenet"),
                              "mini-imagenet.json", 84, IMAGENET_MEAN, IMAGENET_STD, (600, 600),
                              "a folder with images/ and Ravi-Larochelle train.csv, val.csv, test.csv"),
    "cub": RealSpec("cub", ("cub", "CUB", "CUB_200_2011", "cub-200-2011", "cub_200_2011"), "cub.json", 84, IMAGENET_MEAN,
                    IMAGENET_STD, (41, 60), "CUB_200_2011.tgz (or its extracted CUB_200_2011 folder)", key=_cub_key),
}

LAYOUT_HELP = """\
Expected layouts under the data root (any one of them):
  {root}/{folder}/{{meta_train,meta_val,meta_test}}/<class>/<image>   (what `data prepare` writes; the DFML code's
      folders, `mete_*` and `train/val/test` folder names work too; other folder names tried: {others})
  {root}/{folder}/{{train,val,test}}.csv + images/   (Ravi-Larochelle CSV files `filename,label`; or split/meta_*.csv)
  {root}/{folder}/images/<class>/<image>   (all classes in one folder, e.g. CUB_200_2011 as distributed)
Prepare it from {source}:
  dfml-bench data prepare {name} --from PATH --data-root {root}"""


@lru_cache(maxsize=None)
def standard_split(name: str) -> dict:
    """The embedded standard split file of ``name`` (``splits`` plus its ``source``)."""
    spec = SPECS[name]
    text = resources.files("dfml_bench.datasets").joinpath("splits", spec.split_file).read_text()
    return json.loads(text)


def split_of_key(name: str) -> dict[object, str]:
    """Class key -> split name, from the embedded standard lists."""
    return {k: s for s, keys in standard_split(name)["splits"].items() for k in keys}


def expected_counts(name: str) -> dict[str, int]:
    return {s: len(v) for s, v in standard_split(name)["splits"].items()}


@dataclass
class FileRecord:
    path: Path
    cls: str  # class folder name / CSV label
    hint: str | None  # split given by the layout (folder or CSV), None if the layout has none


@dataclass
class Layout:
    """What :func:`discover` found: the dataset folder, the kind of layout and every image file."""

    root: Path
    kind: str  # split-folders | split-csv | class-folders
    records: list[FileRecord]
    problems: list[str] = field(default_factory=list)  # unresolvable CSV rows etc.


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p))


def _split_folders(d: Path) -> dict[str, Path]:
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for a in aliases:
            if _class_dirs(d / a):
                found[split] = d / a
                break
    return found


def _split_csvs(d: Path) -> dict[str, Path]:
    found = {}
    for base in (d / "split", d / "splits", d):
        for split, aliases in SPLIT_ALIASES.items():
            for a in aliases:
                if split not in found and (base / f"{a}.csv").is_file():
                    found[split] = base / f"{a}.csv"
        if found:
            return found
    return found


def _resolve_csv_path(d: Path, csv_dir: Path, filename: str, label: str) -> Path | None:
    p = Path(filename)
    parts = p.parts
    candidates = [p] if p.is_absolute() else []
    candidates += [d / p, csv_dir / p, d / "images" / p.name, d / "images" / label / p.name]
    if len(parts) >= 2:
        candidates += [d / Path(*parts[-2:]), d / "images" / Path(*parts[-2:])]
    if len(parts) >= 3:
        candidates.append(d / Path(*parts[-3:]))
    for c in candidates:
        if c.is_file():
            return c
    return None


def _read_csvs(d: Path, csvs: dict[str, Path]) -> Layout:
    records, problems = [], []
    for split, path in csvs.items():
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
            rows = rows[1:]
        for row in rows:
            if len(row) < 2:
                continue
            fname, label = row[0].strip(), row[1].strip()
            resolved = _resolve_csv_path(d, path.parent, fname, label)
            if resolved is None:
                problems.append(f"{path.name}: image {fname!r} (class {label}) not found under {d} or {d / 'images'}")
                continue
            records.append(FileRecord(resolved, label, split))
    return Layout(d, "split-csv", records, problems)


def _layout_in(d: Path) -> Layout | None:
    """The layout found in dataset folder ``d``, or None if ``d`` holds none."""
    folders = _split_folders(d)
    if folders:
        recs = [FileRecord(f, c.name, split) for split, sd in folders.items() for c in _class_dirs(sd) for f in _images_in(c)]
        return Layout(d, "split-folders", recs)
    csvs = _split_csvs(d)
    if csvs:
        return _read_csvs(d, csvs)
    for sub in ("images", "data", "."):
        classes = _class_dirs(d / sub)
        if classes and any(_images_in(c) for c in classes[:5]):
            return Layout((d / sub).resolve(), "class-folders", [FileRecord(f, c.name, None) for c in classes for f in _images_in(c)])
    return None


def candidate_dirs(spec: RealSpec, root: Path) -> list[Path]:
    """Where the dataset is looked for, in order: ``root/<folder>`` for each known folder name, a nested
    ``CUB_200_2011`` (as the archive extracts), then ``root`` itself."""
    out = []
    for f in spec.folders:
        out.append(root / f)
        out.append(root / f / f)
    out.append(root)
    return out


def missing_message(spec: RealSpec, root: Path | None, looked: Iterable[Path] = ()) -> str:
    if root is None:
        return (f"{spec.name}: no data root given. Pass --data-root PATH (or set $DFML_BENCH_DATA) to the folder that holds "
                f"{spec.folder}/.\n" + LAYOUT_HELP.format(root="PATH", folder=spec.folder, others=", ".join(spec.folders[1:]),
                                                        source=spec.prepare_from, name=spec.name))
    looked = [str(p) for p in looked]
    return (f"{spec.name}: no dataset found under data root {root}. Looked in: {', '.join(looked)}.\n"
            + LAYOUT_HELP.format(root=root, folder=spec.folder, others=", ".join(spec.folders[1:]), source=spec.prepare_from,
                                 name=spec.name))


def discover(name: str, data_root: str | os.PathLike | None = None) -> Layout:
    """Find the dataset ``name`` under the data root; :class:`DatasetError` naming the paths looked at,
    the expected layouts and the prepare command if there is none."""
    spec = SPECS[name]
    root = paths.data_root(data_root)
    if root is None:
        raise DatasetError(missing_message(spec, None))
    looked = []
    for d in candidate_dirs(spec, root):
        if not d.is_dir():
            continue
        looked.append(d)
        layout = _layout_in(d)
        if layout is not None and layout.records:
            return layout
    raise DatasetError(missing_message(spec, root, looked or [root / spec.folder]))


@dataclass
class Assignment:
    """Classes present, their global ids and splits, and what is wrong with the class set."""

    class_names: list[str]  # global id -> class folder name
    splits: dict[str, list[int]]
    errors: list[str]  # unknown classes, classes in the wrong split: always fatal
    missing: dict[str, list[str]]  # split -> standard classes absent (fatal unless a subset is allowed)


def assign_splits(name: str, records: list[FileRecord]) -> Assignment:
    """Split every class present by the embedded standard lists; class ids are consecutive, train classes
    first, each split's classes in the order of their standard key (never folder listing order)."""
    spec = SPECS[name]
    table = split_of_key(name)
    seen: dict[str, str | None] = {}
    errors = []
    for r in records:
        if r.cls not in seen:
            seen[r.cls] = r.hint
        elif seen[r.cls] != r.hint:
            errors.append(f"class {r.cls} appears in two splits of the layout ({seen[r.cls]} and {r.hint})")
    by_split: dict[str, list[tuple[object, str]]] = {s: [] for s in SPLITS}
    for cls, hint in seen.items():
        key = spec.key(cls)
        if key is None or key not in table:
            errors.append(f"class folder {cls!r} is not a {name} class of the standard split ({standard_split(name)['source'][:60]}...)")
            continue
        split = table[key]
        if hint is not None and hint != split:
            errors.append(f"class {cls} is in the layout's meta-{hint} but the standard split puts it in meta-{split}")
        by_split[split].append((key, cls))
    class_names, splits = [], {}
    for s in SPLITS:
        ids = []
        for _, cls in sorted(by_split[s], key=lambda kc: kc[0]):
            ids.append(len(class_names))
            class_names.append(cls)
        splits[s] = ids
    present = {spec.key(c) for c in seen}
    missing = {s: [str(k) for k in keys if k not in present] for s, keys in standard_split(name)["splits"].items()}
    return Assignment(class_names, splits, sorted(set(errors)), {s: v for s, v in missing.items() if v})


def allow_subset_default() -> bool:
    return os.environ.get(ALLOW_SUBSET_ENV, "").strip().lower() in ("1", "true", "yes")


# torchvision 0.29 deprecates its image codecs in favour of torchcodec (not in the pinned stack); the
# warning would be repeated for every one of 60k files.
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


class quiet_codecs:
    """Context manager that silences torchvision's codec deprecation warning (and nothing else). Enter it
    in the main thread around a thread pool: the filter is process-wide while it is active."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION, category=DeprecationWarning)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def decode_one(path: Path, size: int | None) -> torch.Tensor:
    """Decode one image file to uint8 RGB ``[3, size, size]`` (torchvision.io; antialiased resize)."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as TF

    img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    if size is not None and tuple(img.shape[1:]) != (size, size):
        img = TF.resize(img, [size, size], antialias=True)
    return img


def decode_all(files: list[Path], size: int, *, progress: bool = True, desc: str = "decode",
               workers: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Decode ``files`` into one uint8 ``[N, 3, size, size]`` tensor with a thread pool (the torchvision
    ops release the GIL). Returns the tensor and one message per unreadable file."""
    from tqdm.auto import tqdm

    out = torch.zeros(len(files), 3, size, size, dtype=torch.uint8)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = decode_one(files[i], size)
        except Exception as exc:  # noqa: BLE001 - reported per file
            errors.append(f"{files[i]}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with quiet_codecs(), ThreadPoolExecutor(workers) as pool, tqdm(total=len(files), desc=desc, disable=not progress, leave=False) as bar:
        for _ in pool.map(work, range(len(files)), chunksize=64):
            bar.update(1)
    return out, sorted(errors)


def fingerprint(name: str, layout: Layout, ordered: list[tuple[FileRecord, int]]) -> str:
    """Cache key: loader version, dataset, resolution and (path relative to the dataset folder, class, size,
    mtime) of every file, in load order. Stat only, so it costs well under a second for 60k files."""
    spec = SPECS[name]
    rows = []
    for r, label in ordered:
        st = r.path.stat()
        try:
            rel = str(r.path.relative_to(layout.root))
        except ValueError:
            rel = str(r.path)
        rows.append((rel, label, st.st_size, st.st_mtime_ns))
    return sha256_json([LOADER_VERSION, name, spec.resolution, rows])


def _cache_path(name: str, key: str) -> Path:
    return paths.home() / "datasets" / f"{name}-{key[:20]}.pt"


def _save_cache(path: Path, blob: dict) -> None:
    """Atomic: write a temp file in the same folder, fsync, rename (no in-memory copy of 1.3 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(blob, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cache(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt cache is rebuilt
        log.warning("dataset cache %s unreadable (%s); rebuilding", path, exc)
        path.unlink(missing_ok=True)
        return None


def _broken(name: str, layout: Layout, problems: list[str]) -> DatasetError:
    shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
    return DatasetError(f"{name}: the dataset at {layout.root} ({layout.kind} layout) is broken:\n  {shown}\n"
                        f"Run `dfml-bench data check {name}` for a full report.")


class RealDataset:
    """Loader of one real dataset (registered under ``dfml_bench.datasets``).

    ``allow_subset``: accept a dataset that lacks standard classes (tiny fixtures, partial copies); off
    by default, so a paper-scale run never silently uses part of a dataset. None reads
    ``$DFML_BENCH_ALLOW_SUBSET``. Unknown classes, classes in the wrong split and unreadable files are
    always errors."""

    spec: RealSpec
    name: str
    description: str = ""

    def __init__(self, allow_subset: bool | None = None, progress: bool = True):
        self.allow_subset = allow_subset_default() if allow_subset is None else bool(allow_subset)
        self.progress = progress

    def load(self, *, seed: int = 0, data_root: str | None = None, scale: str = "cpu") -> ImageDataset:
        """The dataset as an :class:`ImageDataset` (``seed`` and ``scale`` do not change a real dataset)."""
        spec = self.spec
        layout = discover(spec.name, data_root)
        asg = assign_splits(spec.name, layout.records)
        problems = layout.problems + asg.errors
        if asg.missing and not self.allow_subset:
            counts = {s: len(v) for s, v in asg.splits.items()}
            problems.append(f"class counts per split {counts} but the standard split has {expected_counts(spec.name)} "
                            f"(missing e.g. {', '.join(f'{s}: {v[:3]}' for s, v in asg.missing.items())}); "
                            f"set {ALLOW_SUBSET_ENV}=1 to use a subset on purpose")
        if problems:
            raise _broken(spec.name, layout, problems)
        label_of = {c: i for i, c in enumerate(asg.class_names)}
        ordered = sorted(((r, label_of[r.cls]) for r in layout.records), key=lambda rl: (rl[1], rl[0].path.name, str(rl[0].path)))
        key = fingerprint(spec.name, layout, ordered)
        cache = _cache_path(spec.name, key)
        blob = _load_cache(cache)
        if blob is None:
            files = [r.path for r, _ in ordered]
            images, errors = decode_all(files, spec.resolution, progress=self.progress, desc=f"{spec.name}: decoding")
            if errors:
                raise _broken(spec.name, layout, [f"unreadable image {e}" for e in errors])
            labels = torch.tensor([lab for _, lab in ordered], dtype=torch.long)
            h = sha256_json([spec.name, spec.resolution, spec.mean, spec.std, sha256_tensor(images), sha256_tensor(labels),
                             asg.class_names, asg.splits])
            blob = {"images": images, "labels": labels, "class_names": asg.class_names, "splits": asg.splits, "hash": h,
                    "key": key}
            _save_cache(cache, blob)
        meta = {"root": str(layout.root), "layout": layout.kind, "cache": str(cache), "subset": bool(asg.missing),
                "split_source": standard_split(spec.name)["source"], "resolution": spec.resolution}
        return ImageDataset(spec.name, blob["images"], blob["labels"], list(blob["class_names"]),
                            {s: list(v) for s, v in blob["splits"].items()}, spec.mean, spec.std, blob["hash"], meta=meta)


class CifarFS(RealDataset):
    spec = SPECS["cifar-fs"]
    name = "cifar-fs"
    description = "CIFAR-FS (Bertinetto et al. 2019): 64/16/20 CIFAR-100 classes, 600 images each, 32x32; from --data-root"


class MiniImageNet(RealDataset):
    spec = SPECS["mini-imagenet"]
    name = "mini-imagenet"
    description = "MiniImageNet (Ravi-Larochelle split): 64/16/20 classes, 600 images each, 84x84; from --data-root"


class CUB(RealDataset):
    spec = SPECS["cub"]
    name = "cub"
    description = "CUB-200-2011 (CloserLook split): 100/50/50 classes, 41-60 images each, 84x84; from --data-root"


LOADERS: dict[str, type[RealDataset]] = {"cifar-fs": CifarFS, "mini-imagenet": MiniImageNet, "cub": CUB}
