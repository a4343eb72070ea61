"""Diagnostic: what FREE's meta-learner stage gains from different data, measured on META-VAL only.

FREE's recovery is replaced by a fixed data source for each drawn zoo model, everything else (BELL
alignment, memory, replay, schedule, selection) unchanged:

- ``meta``: FREE itself (the meta-generator adapted for 5 steps);
- ``real``: real meta-train images of the model's own classes: perfect recovery, an upper bound that
  no data-free method can reach (it reads training data);
- ``inversion``: from-scratch white-box inversion of the model (200 exact-gradient steps, the
  generator and loss of ``inversion``): the best recovery BiDf-MKD's zero-order estimate can approximate.

Both fixed sources draw from a per-model BANK of the same size (``--bank`` distinct images per class,
at least 16), computed once per model, and every draw takes distinct images of it: real and inverted
data differ in what the images are, not in how many distinct ones there are (the earlier version drew
real images fresh from the whole class but reused one 5-image inversion per model, so it compared
realism and diversity at once). ``benchmarks/validate_proxy.py`` is the full proxy study.

It prints the meta-val curve (epoch 0 = the shared initialisation) and the teachers' accuracy on the
data. Test episodes are never used. It answers "is the recovery or the meta-learning the bottleneck?".

    python benchmarks/diag_free_data_source.py --source real --epochs 60
    python benchmarks/diag_free_data_source.py --source inversion --set w_bn=1.0 --set replay_tasks=per-model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import baselines.free as free_mod  # noqa: E402
from baselines.inversion import LossWeights, invert_from_scratch  # noqa: E402
from benchmarks._context import make_context  # noqa: E402
from dfml_bench.methods import get_method  # noqa: E402
from dfml_bench.utils import parse_params  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["meta", "real", "inversion"], default="real")
    ap.add_argument("--suite", default="whitebox-homo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--inv-bn", type=float, default=1.0, help="BN-statistics weight of the cached inversions")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="FREE parameter KEY=VALUE (JSON value)")
    ap.add_argument("--bank", type=int, default=16, help="distinct images per class in each model's bank (>= 16)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = {"epochs": args.epochs, **parse_params(args.sets)}
    if args.source != "meta":
        params.setdefault("warmup", 0)  # no meta-generator to warm up
    ctx, ds, _zoo, _test, _sc = make_context(args.suite, "cpu", args.seed, method="free", log=None)
    classes_of = {id(t.model): t.classes for t in ctx.whitebox()}
    g = torch.Generator().manual_seed(args.seed + 1)
    cache: dict[int, torch.Tensor] = {}
    cfg_nz = [64, 16]
    if args.bank < 16:
        ap.error("--bank must be at least 16 (distinct images per class)")

    def bank_of(teacher, ways: int) -> torch.Tensor:
        """The model's bank: ``args.bank`` images per class, class-interleaved (row r has label r % ways)."""
        if id(teacher) not in cache:
            if args.source == "real":
                cls = classes_of[id(teacher)]
                picks = [ds.class_indices(c)[torch.randperm(len(ds.class_indices(c)), generator=g)[: args.bank]] for c in cls]
                cache[id(teacher)] = ds.as_float(torch.stack(picks, 1).reshape(-1))
            else:
                cache[id(teacher)] = invert_from_scratch(
                    teacher, ways, args.bank, image_shape=ds.image_shape, generator=g, device="cpu", iterations=200,
                    lr=1e-3, z_lr=1e-3, nz=cfg_nz[0], ngf=cfg_nz[1], weights=LossWeights(1.0, 0.0, args.inv_bn)).images
        return cache[id(teacher)]

    def fixed_source(meta_gen, z0, teacher, y, weights, cfg, gen, student=None, accumulate=False):
        t0 = time.perf_counter()
        ways = int(y.max()) + 1
        cfg_nz[:] = [cfg["nz"], cfg["ngf"]]
        bank = bank_of(teacher, ways).view(args.bank, ways, *ds.image_shape)
        per_class = len(y) // ways  # distinct rows of the bank for this draw, the same for every class
        if per_class > args.bank:
            raise SystemExit(f"FREE draws {per_class} images per class; --bank must be at least that")
        rows = torch.randperm(args.bank, generator=g)[:per_class]
        x = bank[rows].reshape(-1, *ds.image_shape)  # class-interleaved, as the targets y
        return x.to(y.device), time.perf_counter() - t0, {"params": [p.detach() for p in meta_gen.parameters()], "z": None}

    if args.source != "meta":
        free_mod.recover_meta = fixed_source
    m = get_method("free", params)
    t0 = time.perf_counter()
    m.fit(ctx)
    out = {"source": args.source, "params": params, "inv_bn": args.inv_bn if args.source == "inversion" else None,
           "val_curve": [(e, round(a, 4)) for e, a in m.report_["val_curve"]],
           "teacher_acc": round(m.report_["teacher_acc_on_recovered"], 3), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
