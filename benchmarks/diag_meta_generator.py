"""Diagnostic: does FREE's meta-generator learn? Teacher agreement of its 5-step recovery along warm-up.

FREE's premise is that a meta-generator adapted for ``gen_steps`` (5) steps recovers a model's data as
well as a much longer inversion from scratch. That only holds once the meta-generator has had enough
outer updates (the reference: about a thousand epochs). This prints, every ``--every`` warm-up epochs,
the agreement of held-out zoo models (never drawn during warm-up) with their targets on images from

- the meta-generator adapted 5 steps (FREE's recovery), and
- the same generator architecture freshly initialised and adapted 5 steps (the control: no meta-learning),

with FREE's loss and hyper-parameters at the scale. Only zoo models are used (no image of any split).

    python benchmarks/diag_meta_generator.py --epochs 60 --every 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.free import FREE, _draw_teachers, meta_generator_update, recover_meta  # noqa: E402
from baselines.generator import Generator, reset_generator  # noqa: E402
from baselines.inversion import LossWeights, target_labels, teacher_accuracy  # noqa: E402
from benchmarks._context import make_context  # noqa: E402
from dfml_bench.utils import make_generator  # noqa: E402


def agreement(gen: Generator, teachers, cfg: dict, w: LossWeights, y: torch.Tensor, seed: int) -> float:
    """Mean teacher agreement of ``gen`` adapted ``gen_steps`` steps to each of ``teachers``."""
    accs = []
    for k, t in enumerate(teachers):
        g = make_generator(seed * 1000 + k)
        x, _secs, _fast = recover_meta(gen, None, t.model, y, w, cfg, g)
        accs.append(teacher_accuracy(t.model, x, y))
    return sum(accs) / len(accs)


def warmup_curve(train, held, cfg: dict, image_shape, ways: int, epochs: int, every: int, seed: int):
    """(fresh 5-step control agreement, [(epoch, held-out agreement of the meta-generator's recovery)])."""
    c, h, _ = image_shape
    g = make_generator(seed)
    meta = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=h, channels=c)
    reset_generator(meta, g)
    opt = torch.optim.Adam(meta.parameters(), lr=cfg["meta_gen_lr"], betas=(0.5, 0.999))
    w = LossWeights(cfg["w_ce"], 0.0, cfg["w_bn"], cfg["adv_mode"])
    y = target_labels(ways, cfg["per_class"])
    fresh = Generator(nz=cfg["nz"], ngf=cfg["ngf"], img_size=h, channels=c)
    reset_generator(fresh, make_generator(seed))  # the meta-generator's own initialisation
    control = agreement(fresh, held, cfg, w, y, seed + 1)
    curve = [(0, agreement(meta, held, cfg, w, y, seed + 1))]
    print(f"fresh generator, 5 steps: {control:.3f}; epoch 0: {curve[0][1]:.3f}", flush=True)
    for epoch in range(1, epochs + 1):
        states = []
        for i in _draw_teachers([list(range(len(train)))], cfg["teachers_per_epoch"], "uniform", g):
            _x, _s, fast = recover_meta(meta, None, train[i].model, y, w, cfg, g)
            states.append(fast)
        meta_generator_update(meta, None, opt, states, cfg["meta_gen_update"])
        if epoch % every == 0 or epoch == epochs:
            curve.append((epoch, agreement(meta, held, cfg, w, y, seed + 1)))
            print(f"epoch {epoch}: held-out agreement {curve[-1][1]:.3f} (fresh 5-step control {control:.3f})", flush=True)
    return control, curve


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="whitebox-homo")
    ap.add_argument("--epochs", type=int, default=None, help="warm-up epochs (default: FREE's at the scale)")
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--held-out", type=int, default=8, help="zoo models kept out of warm-up and used to measure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ctx, _ds, _zoo, _test, _sc = make_context(args.suite, "cpu", args.seed, method="free", log=None)
    cfg = FREE().config("cpu")
    epochs = args.epochs if args.epochs is not None else cfg["warmup"]
    teachers = ctx.whitebox()
    held, train = teachers[: args.held_out], teachers[args.held_out:]
    control, curve = warmup_curve(train, held, cfg, ctx.image_shape, ctx.episode_spec.ways, epochs, args.every, args.seed)
    out = {"suite": args.suite, "epochs": epochs, "held_out_models": args.held_out, "fresh_5_step": control, "curve": curve,
           "cfg": {k: cfg[k] for k in ("gen_steps", "per_class", "nz", "ngf", "gen_lr", "meta_gen_lr", "w_bn", "teachers_per_epoch")}}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
