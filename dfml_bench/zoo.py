"""Model zoos: pools of pre-trained K-way classifiers, built deterministically from a spec.

Each model is trained on ``ways`` classes sampled from meta-train (class sets of different models may
overlap, as in the literature), with an 80/20 train / held-out split of those classes' images. The
checkpoint kept is a real copy of the best held-out weights (the reference code keeps an alias of the
last epoch by mistake). A zoo lives under ``$DFML_BENCH_HOME/zoos/<spec hash>/`` with one file per model
and ``manifest.json`` (class ids, architecture, seed, held-out accuracy, sha256 of the file, the torch
thread count it was trained with). A file whose sha256 does not match its manifest entry (truncated,
tampered) is rebuilt, never loaded.

The thread count is part of a zoo's identity: CPU kernels sum in a thread-count-dependent order, so a
model trained with 2 threads is not the one trained with 1 (see :mod:`dfml_bench.threads`). A zoo built
with the protocol's count (:data:`~dfml_bench.threads.PROTOCOL_THREADS`) keeps the hash it always had;
any other count gets its own hash and folder, so a benchmark script run with ``--threads 2`` can no
longer leave a zoo that a suite then takes for its own.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BackboneSpec, build_backbone
from .datasets.base import ImageDataset
from .paths import home
from .threads import PROTOCOL_THREADS, check_threads
from .utils import atomic_torch_save, atomic_write_json, derive_seed, make_generator, seeded_torch, sha256_file, sha256_json

ZOO_FORMAT = 2  # 2: models trained in channels-last layout on CPU (other rounding than format 1's NCHW)


@dataclass(frozen=True)
class TrainRecipe:
    """How each zoo model is trained. Literature: Conv4 Adam lr 0.01, 60 epochs; ResNets SGD 0.9,
    wd 5e-4, milestones [30, 50, 80], gamma 0.2; 80/20 held-out split; best held-out checkpoint kept."""

    epochs: int = 20
    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    batch_size: int = 64
    holdout: float = 0.2
    augment: str = "none"  # none | flip_crop
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"TrainRecipe.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.augment not in ("none", "flip_crop"):
            raise ValueError(f"TrainRecipe.augment must be 'none' or 'flip_crop', got {self.augment!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"TrainRecipe.holdout must be in (0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("TrainRecipe needs epochs >= 1, batch_size >= 1 and lr > 0")


@dataclass(frozen=True)
class ZooSpec:
    """Everything a zoo depends on (with the dataset's hash, this is what the zoo's folder is named by)."""

    dataset: str = "glyphs"
    n_models: int = 8
    ways: int = 5
    backbones: tuple[BackboneSpec, ...] = (BackboneSpec("conv4", 32),)
    assignment: str = "cycle"  # cycle: model i gets backbones[i % len]; random: seeded draw
    recipes: tuple[tuple[str, TrainRecipe], ...] = (("*", TrainRecipe()),)  # arch -> recipe ("*" = default)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_models < 1 or self.ways < 2:
            raise ValueError(f"ZooSpec needs n_models >= 1 and ways >= 2, got {self.n_models}, {self.ways}")
        if not self.backbones:
            raise ValueError("ZooSpec.backbones must name at least one architecture")
        if self.assignment not in ("cycle", "random"):
            raise ValueError(f"ZooSpec.assignment must be 'cycle' or 'random', got {self.assignment!r}")

    def recipe_for(self, arch: str) -> TrainRecipe:
        table = dict(self.recipes)
        return table.get(arch, table.get("*", TrainRecipe()))

    def backbone_for(self, i: int) -> BackboneSpec:
        if self.assignment == "cycle":
            return self.backbones[i % len(self.backbones)]
        g = make_generator(derive_seed("zoo-arch", self.seed, i))
        return self.backbones[int(torch.randint(len(self.backbones), (1,), generator=g))]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ZooEntry:
    index: int
    arch: str
    width: int
    classes: list[int]
    seed: int
    heldout_acc: float
    best_epoch: int
    file: str
    sha256: str
    train_seconds: float
    domain: str = ""
    torch_threads: int = 0  # the intra-op thread count it was trained with (0: built before this was recorded)


@dataclass
class Zoo:
    spec: ZooSpec
    path: Path
    hash: str
    entries: list[ZooEntry]
    dataset: ImageDataset = field(repr=False)

    def load_model(self, i: int, device: str | torch.device = "cpu") -> nn.Module:
        """Model ``i`` in eval mode, verified against its manifest sha256 first."""
        e = self.entries[i]
        f = self.path / e.file
        if sha256_file(f) != e.sha256:
            raise ZooCorrupted(f"{f} does not match its manifest sha256; run `dfml-bench zoo build` to rebuild it")
        bb = self.spec.backbone_for(i)
        model = _make_model(bb, self.spec.ways, self.dataset)
        state = torch.load(f, map_location="cpu", weights_only=True)
        # the checkpoint says what it was trained as: it must be what the manifest says (an edited manifest
        # with a recomputed sha256 of a swapped file is still caught here)
        stored = (state.get("classes"), state.get("arch"), state.get("width", bb.width))
        if stored != (list(e.classes), e.arch, e.width):
            raise ZooCorrupted(f"{f} was trained as classes {stored[0]} ({stored[1]}/{stored[2]}) but its manifest says "
                               f"{e.classes} ({e.arch}/{e.width}); run `dfml-bench zoo build` to rebuild it")
        model.load_state_dict(state["state_dict"])
        return model.to(device).eval()

    @property
    def weights_hash(self) -> str:
        """Hash of the model files themselves (their sha256s in index order). ``hash`` names the spec and
        dataset a zoo was built from; this names the weights a result was computed with, so two records
        that used different weights for one spec (another machine's kernels, a legacy cache) tell apart."""
        return sha256_json([e.sha256 for e in self.entries])

    def summary(self) -> dict:
        accs = [e.heldout_acc for e in self.entries]
        return {
            "hash": self.hash,
            "weights_hash": self.weights_hash,
            "torch_threads": sorted({e.torch_threads for e in self.entries}),
            "path": str(self.path),
            "n_models": len(self.entries),
            "archs": sorted({e.arch for e in self.entries}),
            "mean_heldout_acc": sum(accs) / len(accs),
            "min_heldout_acc": min(accs),
            "train_seconds": sum(e.train_seconds for e in self.entries),
        }


class ZooCorrupted(RuntimeError):
    pass


def build_threads(threads: int | None = None) -> int:
    """The thread count a zoo is built (and identified) with: ``threads``, or torch's current count."""
    return check_threads(torch.get_num_threads() if threads is None else threads)


def zoo_hash(spec: ZooSpec, dataset: ImageDataset, threads: int | None = None) -> str:
    """Identity of the zoo of ``spec`` on ``dataset`` trained with ``threads`` torch threads (default: the
    current count). The protocol's count is left out of the hash, so zoos built before the count was part
    of the identity keep their hash."""
    parts = {"format": ZOO_FORMAT, "spec": spec.to_dict(), "dataset": dataset.hash}
    if dataset.domains:
        parts["class_draw"] = "per-domain"
    n = build_threads(threads)
    if n != PROTOCOL_THREADS:
        parts["torch_threads"] = n
    return sha256_json(parts)


def zoo_dir(spec: ZooSpec, dataset: ImageDataset, root: Path | None = None, threads: int | None = None) -> Path:
    return (root or home() / "zoos") / f"{spec.dataset}-{zoo_hash(spec, dataset, threads)[:16]}"


def _make_model(bb: BackboneSpec, ways: int, dataset: ImageDataset) -> nn.Module:
    return build_backbone(bb, ways, dataset.image_shape, dataset.mean, dataset.std, track_running_stats=True)


def model_classes(spec: ZooSpec, dataset: ImageDataset, i: int) -> list[int]:
    """The meta-train classes of model ``i`` (seeded draw, in draw order). In a multi-domain pool,
    model ``i`` belongs to domain ``i mod D`` and draws its classes inside it (the reference trains
    each domain's models on that domain's classes)."""
    from .episodes import domain_groups

    groups = [grp for grp in domain_groups(dataset, dataset.splits["train"]) if len(grp) >= spec.ways]
    if not groups:
        raise ValueError(f"{dataset.name}: no domain has {spec.ways} meta-train classes for a {spec.ways}-way zoo model")
    train = groups[i % len(groups)]
    g = make_generator(derive_seed("zoo-classes", spec.seed, i))
    pick = torch.randperm(len(train), generator=g)[: spec.ways]
    return [train[j] for j in pick.tolist()]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a 4-pixel-padded random crop (the usual CIFAR recipe)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return xp[:, :, dy : dy + h, dx : dx + w]


def _layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on CPU: oneDNN runs Conv4's convolutions, BatchNorm and pooling about 2x faster so
    (one model-epoch of 2400 + 600 held-out 32x32 images at batch 128: ~1.0 s instead of ~2.0 s on one
    core, ``benchmarks/bench_zoo.py``). Other devices keep their default layout."""
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def train_one(
    spec: ZooSpec, dataset: ImageDataset, i: int, device: str | torch.device = "cpu"
) -> tuple[dict, list[int], float, int]:
    """Train zoo model ``i``; return (best state_dict copy, classes, held-out accuracy, best epoch)."""
    bb = spec.backbone_for(i)
    recipe = spec.recipe_for(bb.arch)
    seed = derive_seed("zoo-model", spec.seed, i)
    g = make_generator(seed)
    classes = model_classes(spec, dataset, i)
    tr_idx, ho_idx, tr_y, ho_y = [], [], [], []
    for label, c in enumerate(classes):
        idx = dataset.class_indices(c)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_ho = max(1, round(len(idx) * recipe.holdout))
        ho_idx.append(idx[:n_ho]); tr_idx.append(idx[n_ho:])
        ho_y.append(torch.full((n_ho,), label)); tr_y.append(torch.full((len(idx) - n_ho,), label))
    tr_idx, ho_idx = torch.cat(tr_idx), torch.cat(ho_idx)
    tr_y, ho_y = torch.cat(tr_y).to(device), torch.cat(ho_y).to(device)
    xtr = _layout(dataset.images[tr_idx].to(device).float().div_(255))
    xho = _layout(dataset.images[ho_idx].to(device).float().div_(255))

    with seeded_torch(seed):
        model = _make_model(bb, spec.ways, dataset).to(device)
    if torch.device(device).type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(recipe.milestones), gamma=recipe.gamma)

    best_acc, best_epoch, best_state, since_best = -1.0, -1, None, 0
    for epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(tr_y), generator=g).to(device)
        for s in range(0, len(perm), recipe.batch_size):
            b = perm[s : s + recipe.batch_size]
            x = xtr[b]
            if recipe.augment == "flip_crop":
                x = _augment(x, g)
            x = _layout(x)
            loss = F.cross_entropy(model(x), tr_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        acc = heldout_accuracy(model, xho, ho_y)
        if acc > best_acc:
            # a real copy: the state dict's tensors are cloned, not aliased to the live model
            best_acc, best_epoch, since_best = acc, epoch, 0
            # (in the standard contiguous layout, whatever layout training used)
            best_state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                          for k, v in model.state_dict().items()}
        else:
            since_best += 1
            if recipe.patience is not None and since_best >= recipe.patience:
                break
    return best_state, classes, best_acc, best_epoch


@torch.no_grad()
def heldout_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(y), batch):
        correct += (model(_layout(x[s : s + batch])).argmax(1) == y[s : s + batch]).sum().item()
    return correct / len(y)


ENTRY_TYPES = {"index": int, "arch": str, "width": int, "classes": list, "seed": int, "heldout_acc": (int, float),
               "best_epoch": int, "file": str, "sha256": str, "train_seconds": (int, float)}


def manifest_problem(manifest: object, h: str) -> str | None:
    """Why a manifest's top level cannot be used (None: it can). Entries are checked one by one by
    :func:`entry_problem`, so one bad entry costs one model, not the zoo."""
    if not isinstance(manifest, dict):
        return f"manifest is a {type(manifest).__name__}, not an object"
    if manifest.get("hash") != h:
        return "manifest belongs to another spec or dataset (hash differs)"
    if not isinstance(manifest.get("models"), dict):
        return "manifest has no 'models' object"
    return None


def entry_problem(spec: ZooSpec, dataset: ImageDataset, path: Path, i: int, entry: object,
                  threads: int | None = None) -> str | None:
    """Why manifest entry ``i`` must not be used (None: it is valid). Checked against the schema, against
    what the spec says model ``i`` is (its deterministic class draw, architecture and width) and against
    its file (sha256). An entry edited by hand, e.g. another ``classes`` list, is corruption: the model is
    rebuilt, never loaded with a label map it was not trained with."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    for k, t in ENTRY_TYPES.items():
        v = entry.get(k)
        if not isinstance(v, t) or isinstance(v, bool):
            return f"field {k!r} is missing or not {t.__name__ if isinstance(t, type) else 'a number'}"
    if entry["index"] != i:
        return f"index {entry['index']} under key {i}"
    n, recorded = build_threads(threads), entry.get("torch_threads", 0)
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 0:
        return f"field 'torch_threads' is {recorded!r}, not a thread count"
    if recorded and recorded != n:
        return f"trained with {recorded} torch threads, but this zoo is the one trained with {n}"
    if Path(entry["file"]).name != entry["file"] or entry["file"] in ("", ".", ".."):
        return f"file {entry['file']!r} is not a plain file name inside the zoo folder"
    bb = spec.backbone_for(i)
    if (entry["arch"], entry["width"]) != (bb.arch, bb.width):
        return f"architecture {entry['arch']}/{entry['width']} but the spec says {bb.arch}/{bb.width}"
    want = model_classes(spec, dataset, i)
    if entry["classes"] != want:
        return f"classes {entry['classes']} but model {i} is trained on classes {want}"
    f = path / entry["file"]
    if not f.is_file():
        return f"file {entry['file']} is missing"
    if sha256_file(f) != entry["sha256"]:
        return f"file {entry['file']} does not match its sha256"
    try:  # mmap: only the small metadata is read, not the weights
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        return f"file {entry['file']} cannot be read as a checkpoint ({type(exc).__name__})"
    if not isinstance(state, dict) or "state_dict" not in state:
        return f"file {entry['file']} is not a zoo checkpoint"
    stored = (state.get("classes"), state.get("arch"), state.get("width", bb.width))
    if stored != (entry["classes"], entry["arch"], entry["width"]):
        return (f"file {entry['file']} was trained as classes {stored[0]} ({stored[1]}/{stored[2]}) but the manifest says "
                f"{entry['classes']} ({entry['arch']}/{entry['width']})")
    return None


def _read_manifest(path: Path) -> object:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def build_zoo(
    spec: ZooSpec,
    dataset: ImageDataset,
    *,
    device: str | torch.device = "cpu",
    root: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
) -> Zoo:
    """Build (or complete, or repair) the zoo of ``spec`` and return it. Valid models are reused;
    missing, truncated or tampered ones are (re)trained; training is deterministic, so a rebuilt model
    is the one that was lost. Models are trained with torch's current thread count, which is part of
    the zoo's identity (:func:`zoo_hash`). ``workers`` > 1 trains that many models at once in child
    processes (CPU only), each with this process's torch thread count, so the files are bit for bit the
    serial build's."""
    from filelock import FileLock
    from tqdm.auto import tqdm

    threads = build_threads()
    path = zoo_dir(spec, dataset, root, threads)
    path.mkdir(parents=True, exist_ok=True)
    h = zoo_hash(spec, dataset, threads)
    with FileLock(str(path / ".lock")):
        manifest = _read_manifest(path)
        bad = manifest_problem(manifest, h) if manifest is not None else None
        if manifest is None or bad:
            if bad and log and (path / "manifest.json").exists():
                log(f"zoo {path.name}: {bad}; starting a new manifest (valid model files are re-verified as they are rebuilt)")
            manifest = {"hash": h, "format": ZOO_FORMAT, "spec": spec.to_dict(), "dataset_hash": dataset.hash, "models": {}}
        models = manifest["models"]
        problems = {i: entry_problem(spec, dataset, path, i, models[str(i)], threads) if str(i) in models else "not built"
                    for i in range(spec.n_models)}
        todo = [i for i, p in problems.items() if p]
        bar = tqdm(total=spec.n_models, initial=spec.n_models - len(todo), desc=f"zoo {path.name}", disable=not progress or not todo, leave=False)
        for i in todo:
            if str(i) in models and log:
                log(f"zoo model {i}: {problems[i]}; rebuilding it")
        for i, (state, classes, acc, best_epoch), seconds in _train_models(spec, dataset, todo, device, workers):
            bb = spec.backbone_for(i)
            fname = f"model_{i:03d}.pt"
            atomic_torch_save(path / fname, {"state_dict": state, "classes": classes, "arch": bb.arch, "width": bb.width})
            models[str(i)] = asdict(ZooEntry(
                index=i, arch=bb.arch, width=bb.width, classes=classes, seed=derive_seed("zoo-model", spec.seed, i),
                heldout_acc=acc, best_epoch=best_epoch, file=fname, sha256=sha256_file(path / fname),
                train_seconds=seconds, domain=dataset.domain_of(classes[0]), torch_threads=threads,
            ))
            atomic_write_json(path / "manifest.json", manifest)  # after every model: a killed build resumes
            bar.set_postfix_str(f"{bb.arch} held-out {acc:.2f}")
            bar.update(1)
        manifest["models"] = {str(i): models[str(i)] for i in sorted(int(k) for k in models)}  # index order, however built
        bar.close()
        atomic_write_json(path / "manifest.json", manifest)
    entries = [ZooEntry(**models[str(i)]) for i in range(spec.n_models)]
    return Zoo(spec, path, h, entries, dataset)


def _train_models(spec: ZooSpec, dataset: ImageDataset, todo: list[int], device: str | torch.device,
                  workers: int) -> Iterator[tuple[int, tuple[dict, list[int], float, int], float]]:
    """Train the models ``todo``; yield ``(index, train_one's result, seconds)`` as each finishes.

    With ``workers`` > 1 (and a CPU device) the models are trained by a pool of spawned processes that
    receive the dataset once, through shared memory, and use the caller's thread count: a model's bits
    do not depend on which process trained it. Results arrive in completion order."""
    if workers < 1:
        raise ValueError(f"zoo build workers must be >= 1, got {workers}")
    if workers == 1 or len(todo) < 2 or torch.device(device).type != "cpu":
        for i in todo:
            t0 = time.perf_counter()
            result = train_one(spec, dataset, i, device)
            yield i, result, time.perf_counter() - t0
        return
    import torch.multiprocessing as tmp  # registers the shared-memory reductions of tensors
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=tmp.get_context("spawn"),
                               initializer=_child_init, initargs=(dataset, torch.get_num_threads()))
    try:
        pending = {pool.submit(_child_train, spec, i): i for i in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                result, seconds = fut.result()  # a child's error (or death) is raised here, with its cause
                yield i, result, seconds
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_CHILD: dict = {}


def _child_init(dataset: ImageDataset, threads: int) -> None:
    """A zoo-build child: keep the shared dataset and use the parent's thread count (the protocol's)."""
    from .threads import check_threads

    torch.set_num_threads(check_threads(threads))
    _CHILD["dataset"] = dataset


def _child_train(spec: ZooSpec, i: int) -> tuple[tuple[dict, list[int], float, int], float]:
    t0 = time.perf_counter()
    result = train_one(spec, _CHILD["dataset"], i, "cpu")
    return result, time.perf_counter() - t0


def load_zoo(spec: ZooSpec, dataset: ImageDataset, *, root: Path | None = None, threads: int | None = None) -> Zoo | None:
    """The zoo of ``spec`` trained with ``threads`` torch threads (default: the current count) if it is
    completely built and every file matches its sha256, else None."""
    path = zoo_dir(spec, dataset, root, threads)
    manifest = _read_manifest(path)
    if manifest is None or manifest_problem(manifest, zoo_hash(spec, dataset, threads)):
        return None
    models = manifest["models"]
    if any(str(i) not in models or entry_problem(spec, dataset, path, i, models[str(i)], threads) for i in range(spec.n_models)):
        return None
    return Zoo(spec, path, manifest["hash"], [ZooEntry(**models[str(i)]) for i in range(spec.n_models)], dataset)
