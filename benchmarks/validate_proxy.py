"""Proxy validation study (issue 12): does the premise of inversion-based DFML hold on a cpu proxy?

On a candidate proxy (a dataset and a zoo), MAML is meta-trained from the scenario's shared
initialisation on tasks drawn from one of these per-teacher image banks, and its META-VAL accuracy
is printed along training (test episodes are never used):

- ``real``: real meta-train images of each teacher's classes (perfect recovery; not data-free);
- ``inversion``: exact white-box inversions of each teacher (DeepInversion in pixel space: CE + BN
  statistics matching + total variation, :func:`baselines.inversion.deep_inversion`; the teachers
  label them as their targets about 99 % of the time);
- ``placebo``: images of untrained generators with teacher-free labels (:mod:`baselines.placebo`);

plus the ``random`` (the initialisation) and ``average`` (parameter mean of the zoo) levels. Every bank
holds the same number of distinct images per class and teacher (``--per-class``, at least 16), and
tasks are drawn from the banks without replacement, so the sources differ in what the images are, not
in how many there are (the confound of the older ``diag_free_data_source.py --source inversion``).
Tasks are ``mixed`` (5 classes drawn from the pooled banks by global class id, images of several
teachers per class: the papers' interpolated tasks) or ``per-model`` (one teacher's classes).

A proxy is accepted when ``inversion`` beats ``placebo`` and ``random`` clearly (several points) on
meta-val. ``--out`` writes the curves as JSON and the table as markdown.

    python benchmarks/validate_proxy.py --proxy glyphs-fs --out docs/proxy-validation-glyphs-fs
    python benchmarks/validate_proxy.py --proxy glyphs-fs-natural --teachers 32 --out docs/proxy-validation-glyphs-fs-natural
    python benchmarks/validate_proxy.py --proxy glyphs-fs-natural-shuffled --teachers 32 --sources inversion,placebo
    python benchmarks/validate_proxy.py --proxy glyphs-811 --teachers 20
    python benchmarks/validate_proxy.py --proxy glyphs-fs-multidomain-natural --teachers 32 --sources inversion,placebo
    python benchmarks/validate_proxy.py --proxy glyphs-fs-multidomain-natural --zoo-models 200 --zoo-jobs 2 --sources inversion,placebo
    python benchmarks/validate_proxy.py --proxy glyphs-fs-multidomain-natural-shuffled --sources inversion,placebo --tasks per-model
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.inversion import deep_inversion  # noqa: E402
from baselines.maml import maml_step  # noqa: E402
from baselines.memory import TaskMemory  # noqa: E402
from baselines.placebo import placebo_images  # noqa: E402
from benchmarks._context import make_scenario_context  # noqa: E402
from dfml_bench.episodes import EpisodeSpec  # noqa: E402
from dfml_bench.methods import get_method  # noqa: E402
from dfml_bench.runner import per_domain_summary  # noqa: E402
from dfml_bench.scenarios import Scenario  # noqa: E402
from dfml_bench.suites import common  # noqa: E402
from dfml_bench.utils import derive_seed, make_generator  # noqa: E402
from dfml_bench.zoo import TrainRecipe, ZooSpec  # noqa: E402

EPISODES = EpisodeSpec(ways=5, shots=1, queries=15, n_episodes=600)


def candidates() -> dict[str, Scenario]:
    """The candidate proxies: the CIFAR-FS-shaped ``glyphs-fs`` with its 100-teacher zoo, the same with
    class-conditional colour and texture (``glyphs-fs-natural``, same zoo recipe; ``-shuffled``: its
    held-out classes split between meta-val and meta-test at random), and the earlier cpu
    proxy (all 811 meta-train glyph classes, 60 images each, 20 teachers); and the two multi-domain
    proxies, shape-only ``glyphs-fs-multidomain`` and its class-look candidate ``glyphs-fs-multidomain-natural``
    (``-shuffled``: each domain's held-out classes split between meta-val and meta-test at random)."""
    old_zoo = ZooSpec(dataset="glyphs", n_models=20, ways=5, backbones=(common.CONV4,),
                      recipes=(("*", TrainRecipe(epochs=12, optimizer="adam", lr=0.005, batch_size=50)),), seed=0)
    return {
        "glyphs-fs": Scenario(name="glyphs-fs-conv4-5w1s", dataset="glyphs-fs", zoo=common.cpu_proxy_zoo(dataset="glyphs-fs"), access="whitebox",
                              episodes=EPISODES),
        # (the multi-domain proxies as the multi-domain suites build them: meta-val pools both domains)
        **{ds: Scenario(name=f"{ds}-conv4-5w1s", dataset=ds, zoo=common.cpu_proxy_zoo(dataset=ds), access="whitebox", episodes=EPISODES)
           for ds in ("glyphs-fs-natural", "glyphs-fs-natural-shuffled", "glyphs-fs-multidomain", "glyphs-fs-multidomain-natural",
                      "glyphs-fs-multidomain-natural-shuffled")},
        "glyphs-811": Scenario(name="glyphs-conv4-5w1s", dataset="glyphs", zoo=old_zoo, access="whitebox", episodes=EPISODES),
    }


def real_bank(ds, teacher, per_class: int, g: torch.Generator) -> torch.Tensor:
    """``per_class`` distinct real images of each of the teacher's classes, class-interleaved like the
    inversion targets (label of row r is r % ways)."""
    picks = []
    for c in teacher.classes:
        idx = ds.class_indices(c)
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    order = torch.stack(picks, 1).reshape(-1)  # [per_class, ways] -> interleaved
    return ds.as_float(order)


def bank_settings(teacher, args) -> dict:
    """What an inversion bank depends on besides its seed: the model file and the inversion settings."""
    return {"steps": args.inv_steps, "w_bn": args.inv_bn, "w_tv": args.inv_tv, "sha256": args.model_sha.get(teacher.index)}


def cached(folder: str | None, teacher, args) -> torch.Tensor | None:
    """A teacher's inversion bank from ``folder/inversion-<index>.pt`` if one was saved for this very model
    file (its sha256) with the same inversion settings, else None."""
    if folder is None:
        return None
    path = Path(folder) / f"inversion-{teacher.index}.pt"
    if not path.exists():
        return None
    obj = torch.load(path, weights_only=True)
    ok = all(obj.get(k) == v for k, v in bank_settings(teacher, args).items()) and len(obj["images"]) == 5 * args.per_class
    return obj["images"] if ok else None


def make_banks(source: str, ctx, ds, teachers, per_class: int, args) -> tuple[TaskMemory, dict]:
    """A :class:`TaskMemory` holding one bank per teacher (each from its own seeded stream), and facts
    about the banks (time, teacher agreement)."""
    ways = ctx.episode_spec.ways
    mem = TaskMemory(max_batches_per_class=10_000)
    y = torch.arange(ways).repeat(per_class)
    agree, grid, t0 = [], None, time.perf_counter()
    for t in teachers:
        g = make_generator(derive_seed("proxy-study-bank", source, args.seed, t.index))
        if source == "real":
            x = real_bank(ds, t, per_class, g)
        elif source == "inversion":
            x = cached(args.bank_cache, t, args)
            if x is None:
                x = deep_inversion(t.model, ways, per_class, image_shape=ds.image_shape, generator=g, iterations=args.inv_steps,
                                   lr=args.inv_lr, w_bn=args.inv_bn, w_tv=args.inv_tv).images
                if args.bank_cache:  # saved with what it depends on, so a re-run skips the inversion
                    Path(args.bank_cache).mkdir(parents=True, exist_ok=True)
                    torch.save({"images": x, **bank_settings(t, args)}, Path(args.bank_cache) / f"inversion-{t.index}.pt")
        elif source == "placebo":
            x, _ = placebo_images(ways, per_class, image_shape=ds.image_shape, nz=args.nz, ngf=args.ngf, latent_spread=0.5, generator=g)
        else:
            raise ValueError(source)
        with torch.no_grad():
            agree.append(float((t.model(x).argmax(1) == y).float().mean()))
        # placebo images are stored under the teacher's classes too, so that the task structure is the same
        mem.add(x, y, t.classes, source=t.index)
        if grid is None:  # the first teacher's bank, to look at: a row of up to 8 images per class
            grid = x.view(per_class, ways, *x.shape[1:]).transpose(0, 1)[:, :8]
    if args.out and grid is not None:
        from baselines.memory import save_image_grid

        save_image_grid((grid.clamp(0, 1) * 255).to(torch.uint8), f"{args.out}-{source}.png",
                        title=f"{source}: one teacher's 5 classes (rows), 8 images each")
    return mem, {"bank_seconds": round(time.perf_counter() - t0, 1), "teacher_agreement": round(sum(agree) / len(agree), 3)}


def val_point(ctx, ds, model: torch.nn.Module, n: int) -> tuple[float, dict[str, float]]:
    """Meta-val accuracy on the first ``n`` episodes, and per domain on a multi-domain pool (an episode's
    domain is its first class's; empty for one domain), so a pooled figure cannot hide a domain that fails."""
    acc = ctx._evaluate_val(model, n)
    per = per_domain_summary(ds, ctx.val_episodes, acc.tolist())
    return float(acc.mean()), {d: s["mean"] for d, s in per.items()}


def train_curve(ctx, ds, init: torch.nn.Module, mem: TaskMemory, args, seed: int) -> tuple[list[tuple[int, float]], dict]:
    """MAML (second-order, 5 inner steps, Adam 1e-3, meta-batch ``args.batch``) on memory tasks from a
    copy of ``init`` (the scenario's shared initialisation); meta-val accuracy every ``args.val_every``
    iterations (iteration 0 included), and per domain ({domain: curve}) on a multi-domain pool."""
    model = copy.deepcopy(init)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = make_generator(derive_seed("proxy-study-tasks", seed))
    spec = ctx.episode_spec
    curve: list[tuple[int, float]] = []
    per_domain: dict[str, list[tuple[int, float]]] = {}

    def point(it: int) -> None:
        mean, per = val_point(ctx, ds, model, args.val_episodes)
        curve.append((it, mean))
        for d, a in per.items():
            per_domain.setdefault(d, []).append((it, a))
        if it:
            print(f"  it {it}: val {mean:.4f}" + "".join(f", {d} {a:.4f}" for d, a in per.items()), flush=True)

    point(0)
    for it in range(1, args.iterations + 1):
        tasks = [mem.sample_task(spec.ways, spec.shots, spec.queries, g, per_source=args.tasks == "per-model")
                 for _ in range(args.batch)]
        maml_step(model, opt, tasks, steps=5, lr=0.01)
        if it % args.val_every == 0:
            point(it)
    return curve, per_domain


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", choices=sorted(candidates()), default="glyphs-fs")
    ap.add_argument("--sources", default="real,inversion,placebo")
    ap.add_argument("--teachers", type=int, default=None, help="use the first T zoo models (default: all)")
    ap.add_argument("--zoo-models", type=int, default=None,
                    help="a zoo of N models instead of the proxy's (same recipe and seeds: model i is the same model in every size)")
    ap.add_argument("--zoo-jobs", type=int, default=1, help="models trained side by side when the zoo must be built")
    ap.add_argument("--per-class", type=int, default=16, help="distinct images per class in each teacher's bank (>= 16)")
    ap.add_argument("--tasks", choices=["mixed", "per-model"], default="mixed")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--val-episodes", type=int, default=200)
    ap.add_argument("--inv-steps", type=int, default=100)
    ap.add_argument("--bank-cache", default=None, help="folder of precomputed inversion banks (inversion-<i>.pt)")
    ap.add_argument("--inv-lr", type=float, default=0.05)
    ap.add_argument("--inv-bn", type=float, default=1.0)
    ap.add_argument("--inv-tv", type=float, default=1.0, help="total-variation weight of the inversion (smoother images)")
    ap.add_argument("--nz", type=int, default=64)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    if args.per_class < EPISODES.shots + 1:
        ap.error("--per-class must leave at least one query image per class")
    if args.zoo_models is not None and args.zoo_models < 1:
        ap.error("--zoo-models must be at least 1")
    torch.set_num_threads(args.threads)  # after every argument check: a refused command changes nothing
    sc = candidates()[args.proxy]
    sc = replace(sc, val_episodes=max(args.val_episodes, 100))
    if args.zoo_models is not None:
        sc = replace(sc, zoo=replace(sc.zoo, n_models=args.zoo_models))
    if args.zoo_jobs > 1:  # build (or verify) the zoo with worker processes first; the context then finds it complete
        from dfml_bench.datasets import load_dataset
        from dfml_bench.zoo import build_zoo

        from dfml_bench.threads import fixed_threads

        with fixed_threads():  # as `dfml-bench zoo build` (default --threads 1): the same model files as the suites'
            build_zoo(sc.zoo, load_dataset(sc.dataset, seed=sc.dataset_seed, scale="cpu"), progress=False, log=print, workers=args.zoo_jobs)
    ctx, ds, zoo, _test, _ = make_scenario_context(sc, "cpu", args.seed, method="proxy-study", log=None)
    teachers = ctx.whitebox()[: args.teachers]
    args.model_sha = {e.index: e.sha256 for e in zoo.entries}  # each bank's model file, checked against cached banks
    covered = sorted({c for t in teachers for c in t.classes})
    per_class_teachers = len(teachers) * ctx.episode_spec.ways / max(1, len(covered))
    out: dict = {"proxy": args.proxy, "dataset": ds.name, "dataset_hash": ds.hash, "zoo_hash": zoo.hash,
                 "teachers": len(teachers), "classes_covered": len(covered), "meta_train_classes": len(ds.splits["train"]),
                 "teachers_per_class": round(per_class_teachers, 2),
                 "args": {k: v for k, v in vars(args).items() if k != "model_sha"}, "levels": {}, "sources": {}}
    print(f"{args.proxy}: {len(teachers)} teachers cover {len(covered)}/{len(ds.splits['train'])} meta-train classes "
          f"({per_class_teachers:.1f} teachers per covered class)", flush=True)
    # the scenario's shared initialisation is the context's FIRST backbone (every later call draws a new
    # one), so it is made once here: the random level and every source's curve start from it
    init = ctx.make_backbone()
    for level in ("random", "average"):
        model = init if level == "random" else get_method(level).fit(ctx)
        out["levels"][level] = round(ctx.evaluate_val(model, args.val_episodes), 4)
        print(f"{level}: val {out['levels'][level]:.4f}", flush=True)
    for source in [s for s in args.sources.split(",") if s]:
        print(f"{source}: building banks", flush=True)
        mem, facts = make_banks(source, ctx, ds, teachers, args.per_class, args)
        print(f"{source}: {facts}", flush=True)
        t0 = time.perf_counter()
        curve, per_domain = train_curve(ctx, ds, init, mem, args, args.seed)
        if abs(curve[0][1] - out["levels"]["random"]) > 1e-4:  # the level is rounded to 4 places
            raise RuntimeError(f"{source}: the curve starts at {curve[0][1]:.4f}, not at the shared initialisation's "
                               f"{out['levels']['random']:.4f}")
        out["sources"][source] = {**facts, "curve": curve, "best": max(a for _, a in curve), "last": curve[-1][1],
                                  "train_seconds": round(time.perf_counter() - t0, 1),
                                  **({"per_domain": per_domain} if per_domain else {})}
    print(json.dumps(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(out, indent=1))
        Path(args.out + ".md").write_text(markdown(out))
    return out


def markdown(out: dict) -> str:
    """The study's table: meta-val accuracy (%) along training per source, with the levels."""
    its = sorted({it for s in out["sources"].values() for it, _ in s["curve"]})
    head = "| source | teacher agreement | " + " | ".join(f"it {i}" for i in its) + " | best |\n"
    head += "|---|---|" + "---|" * (len(its) + 1) + "\n"
    rows = []
    for name, s in out["sources"].items():
        vals = dict(s["curve"])
        rows.append(f"| {name} | {s['teacher_agreement']:.2f} | " + " | ".join(f"{100 * vals[i]:.1f}" if i in vals else "" for i in its)
                    + f" | {100 * s['best']:.1f} |")
        for dom, dcurve in s.get("per_domain", {}).items():  # multi-domain pools: the same curve per domain
            dvals = dict((it, a) for it, a in dcurve)
            rows.append(f"| {name}, domain {dom} | | " + " | ".join(f"{100 * dvals[i]:.1f}" if i in dvals else "" for i in its)
                        + f" | {100 * max(dvals.values()):.1f} |")
    lv = ", ".join(f"{k} {100 * v:.1f}" for k, v in out["levels"].items())
    return (f"Proxy `{out['proxy']}` ({out['teachers']} teachers, {out['classes_covered']} of {out['meta_train_classes']} "
            f"meta-train classes covered, {out['teachers_per_class']} teachers per class; {out['args']['tasks']} tasks, "
            f"{out['args']['per_class']} images per class and teacher, meta-val {out['args']['val_episodes']} episodes). "
            f"Levels: {lv}.\n\n" + head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
