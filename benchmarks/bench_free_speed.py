"""FREE's speed claim: seconds to recover one model's data with the meta-generator (``gen_steps`` = 5
adaptation steps) vs. from-scratch inversion (fresh generator, 200 iterations; the white-box recovery
of BiDf-MKD / TGR), measured in ONE run on the SAME zoo, with the same generator, batch and loss.

1. The meta-generator is meta-trained (FREE's warm-up: CE only, Reptile outer update) on the first
   half of the zoo; its cost is reported separately (amortised over a run it is paid once).
2. On every model of the second half (models the meta-generator never saw), both recoveries are
   timed; the teacher's accuracy on each recovered batch is measured (on the un-augmented images).
3. ``--meta-learner N``: the same meta-learner training (N MAML meta-batches on tasks replayed from
   each recovery's memory, same seed) is run on both memories and evaluated on the scenario's test
   episodes (a measurement only; nothing is tuned on it).

Usage: python benchmarks/bench_free_speed.py [--suite whitebox-homo] [--models 6] [--meta-learner 60]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.free import FREE, _teacher_groups, _draw_teachers, meta_generator_update, recover_meta  # noqa: E402
from baselines.generator import Generator, reset_generator  # noqa: E402
from baselines.inversion import LossWeights, invert_from_scratch, target_labels, teacher_accuracy  # noqa: E402
from baselines.maml import maml_step  # noqa: E402
from baselines.memory import TaskMemory  # noqa: E402
from benchmarks._context import make_context  # noqa: E402
from dfml_bench.evaluation import evaluate, summarize  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="whitebox-homo")
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", type=int, default=6, help="models (of the zoo's second half) recovered both ways")
    ap.add_argument("--meta-epochs", type=int, default=None, help="meta-generator training epochs (default: FREE's warm-up)")
    ap.add_argument("--scratch-iterations", type=int, default=200)
    ap.add_argument("--meta-learner", type=int, default=0, help="MAML meta-batches trained on each memory (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--w-bn", type=float, default=None, help="BN-statistics weight (default: FREE's at this scale)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ctx, ds, zoo, test_eps, sc = make_context(args.suite, args.scale, args.seed, method="free", log=None)
    cfg = FREE().config(args.scale)
    teachers = ctx.whitebox()
    half = len(teachers) // 2
    train_t, eval_t = teachers[:half], teachers[half:][: args.models]
    ways = ctx.episode_spec.ways
    g = ctx.generator
    c, h, _ = ctx.image_shape
    y = target_labels(ways, cfg["per_class"])
    # FREE's configured loss at this scale (cpu: CE + BN-statistics matching; paper: CE as the reference);
    # no adversarial term: there is no student outside a FREE run
    w = LossWeights(ce=cfg["w_ce"], adv=0.0, bn=cfg["w_bn"] if args.w_bn is None else args.w_bn)
    print(f"inversion loss: CE x {w.ce} + BN-statistics x {w.bn}")

    # 1. meta-train the meta-generator on the first half of the zoo (FREE's warm-up)
    meta = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=h, channels=c)
    reset_generator(meta, g)
    opt = torch.optim.Adam(meta.parameters(), lr=cfg["meta_gen_lr"], betas=(0.5, 0.999))
    groups = _teacher_groups(train_t)
    epochs = args.meta_epochs if args.meta_epochs is not None else cfg["warmup"]
    t0 = time.perf_counter()
    for _ in range(epochs):
        idx = _draw_teachers(groups, cfg["teachers_per_epoch"], "stratified", g)
        states = [recover_meta(meta, None, train_t[i].model, y, w, cfg, g)[2] for i in idx]
        meta_generator_update(meta, None, opt, states, "reptile")
    meta_train_s = time.perf_counter() - t0

    # 2. recover every unseen model both ways
    rows, mem_meta, mem_scratch = [], TaskMemory(), TaskMemory()
    for t in eval_t:
        x, secs, _ = recover_meta(meta, None, t.model, y, w, cfg, g)
        acc_m = teacher_accuracy(t.model, x, y)
        # control: a freshly initialised generator given the same gen_steps (is the meta-learning what helps?)
        fresh = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=h, channels=c)
        reset_generator(fresh, g)
        xf, _, _ = recover_meta(fresh, None, t.model, y, w, cfg, g)
        acc_f = teacher_accuracy(t.model, xf, y)
        mem_meta.add(x, y, t.classes, source=t.index)
        r = invert_from_scratch(t.model, ways, cfg["per_class"], image_shape=ctx.image_shape, generator=g,
                                iterations=args.scratch_iterations, nz=cfg["nz"], ngf=cfg["ngf"], weights=w)
        mem_scratch.add(r.images, r.labels, t.classes, source=t.index)
        rows.append({"model": t.index, "meta_s": secs, "meta_acc": acc_m, "scratch_s": r.seconds, "scratch_acc": r.teacher_acc,
                     "fresh_k_acc": acc_f})
        print(f"model {t.index:3d}: meta-generator {secs:6.2f} s, teacher acc {acc_m:.3f} (fresh generator, same steps: {acc_f:.3f}) | "
              f"from scratch {r.seconds:7.2f} s, teacher acc {r.teacher_acc:.3f}", flush=True)

    meta_s = statistics.median(r["meta_s"] for r in rows)
    scratch_s = statistics.median(r["scratch_s"] for r in rows)
    out = {
        "suite": args.suite, "scale": args.scale, "zoo": zoo.hash, "models_timed": len(rows), "threads": args.threads,
        "gen_steps": cfg["gen_steps"], "scratch_iterations": args.scratch_iterations, "batch": int(y.numel()),
        "generator": {"nz": cfg["nz"], "ngf": cfg["ngf"], "img": h},
        "meta_seconds_per_task": meta_s, "scratch_seconds_per_task": scratch_s, "speedup": scratch_s / meta_s,
        "meta_teacher_acc": statistics.mean(r["meta_acc"] for r in rows),
        "scratch_teacher_acc": statistics.mean(r["scratch_acc"] for r in rows),
        "fresh_same_steps_teacher_acc": statistics.mean(r["fresh_k_acc"] for r in rows),
        "meta_generator_training_s": meta_train_s, "meta_generator_training_epochs": epochs,
        "amortised_speedup": (len(rows) * scratch_s) / (meta_train_s + len(rows) * meta_s), "rows": rows,
    }
    print(f"\nrecovery speed-up (median seconds per task, same zoo, same run): {out['speedup']:.1f}x "
          f"({scratch_s:.2f} s from scratch / {meta_s:.3f} s meta-generator)")
    print(f"teacher accuracy on recovered images: meta-generator {out['meta_teacher_acc']:.3f}, from scratch "
          f"{out['scratch_teacher_acc']:.3f}, fresh generator with the same {cfg['gen_steps']} steps {out['fresh_same_steps_teacher_acc']:.3f}")
    print(f"meta-generator training: {meta_train_s:.1f} s over {epochs} epochs; amortised over these {len(rows)} models: "
          f"{out['amortised_speedup']:.1f}x")

    # 3. optional: the meta-test accuracy each recovery yields under the same meta-learner training
    if args.meta_learner > 0:
        for name, mem in (("meta-generator", mem_meta), ("from scratch", mem_scratch)):
            gen = torch.Generator().manual_seed(1234)
            model = ctx.make_backbone()
            mopt = torch.optim.Adam(model.parameters(), lr=cfg["outer_lr"])
            spec = ctx.episode_spec
            for _ in range(args.meta_learner):
                tasks = [mem.sample_task(spec.ways, spec.shots, spec.queries, gen) for _ in range(cfg["episode_batch"])]
                maml_step(model, mopt, tasks, steps=cfg["inner_steps"], lr=cfg["inner_lr"])
            s = summarize(evaluate(model, ds, test_eps, sc.protocol))
            out[f"meta_test_acc[{name}]"] = s
            print(f"meta-test accuracy after {args.meta_learner} MAML meta-batches on the {name} memory: "
                  f"{s['mean']:.4f} +- {s['ci95']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
