"""Teacher pre-training speed: seconds per model-epoch of one zoo model (Conv4-32, 5 classes x 600 32x32
images = 2400 train + 600 held-out, Adam, batch 128), ``dfml_bench.zoo.train_one`` against the same loop
written the reference way (NCHW tensors), in one run. Reference code: 2.8 s per model-epoch; target 1.5 s.

    python benchmarks/bench_zoo.py [--epochs 3] [--threads 1] [--arch conv4] [--width 32] [--size 32]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from dfml_bench.backbones import BackboneSpec
from dfml_bench.datasets.base import ImageDataset
from dfml_bench.zoo import TrainRecipe, ZooSpec, _make_model, heldout_accuracy, train_one

REFERENCE_S = 2.8


def synthetic_dataset(n_classes: int = 10, per_class: int = 600, size: int = 32, seed: int = 0) -> ImageDataset:
    """Random uint8 images, ``n_classes`` meta-train classes of ``per_class`` images (speed only)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = torch.randint(0, 256, (len(labels), 3, size, size), generator=g, dtype=torch.uint8)
    splits = {"train": list(range(n_classes)), "val": [], "test": []}
    return ImageDataset("bench", images, labels, [str(i) for i in range(n_classes)], splits,
                        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), f"bench-zoo-{seed}-{size}")


def reference_epochs(spec: ZooSpec, ds: ImageDataset, epochs: int) -> None:
    """The reference's loop: NCHW tensors, Adam, held-out accuracy after every epoch."""
    recipe = spec.recipe_for(spec.backbones[0].arch)
    model = _make_model(spec.backbones[0], spec.ways, ds)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    idx = torch.cat([ds.class_indices(c) for c in range(spec.ways)])
    x = ds.images[idx].float().div(255)
    y = ds.labels[idx]
    n_tr = int(len(y) * (1 - recipe.holdout))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n_tr)
        for s in range(0, n_tr, recipe.batch_size):
            b = perm[s : s + recipe.batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        heldout_accuracy(model, x[n_tr:], y[n_tr:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", default="conv4")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-style loop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = synthetic_dataset(size=args.size)
    recipe = TrainRecipe(epochs=args.epochs, optimizer="adam", lr=0.01, batch_size=128)
    spec = ZooSpec(dataset="bench", n_models=1, ways=5, backbones=(BackboneSpec(args.arch, args.width),),
                   recipes=(("*", recipe),), seed=0)
    warm = ZooSpec(**{**spec.__dict__, "recipes": (("*", TrainRecipe(epochs=1, batch_size=128)),)})
    train_one(warm, ds, 0)  # one-off oneDNN primitive creation out of the timing
    with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else open(os.devnull) as f:
        load = f.read().strip()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.arch}-{args.width} {args.size}x{args.size}, "
          f"2400 train + 600 held-out, batch 128, {args.epochs} epochs; loadavg {load}")
    t = time.perf_counter()
    train_one(spec, ds, 0)
    ours = (time.perf_counter() - t) / args.epochs
    print(f"zoo.train_one      {ours:6.2f} s per model-epoch (target 1.5 s, reference code {REFERENCE_S} s)")
    if not args.no_reference:
        t = time.perf_counter()
        reference_epochs(spec, ds, args.epochs)
        ref = (time.perf_counter() - t) / args.epochs
        print(f"reference-style    {ref:6.2f} s per model-epoch; speed-up {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
