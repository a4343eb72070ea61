"""Build a MethodContext for a suite scenario outside the runner (benchmarks / dev runs): white-box models,
or metered in-process APIs for a black-box scenario."""

from __future__ import annotations

from dataclasses import replace

import torch

from dfml_bench.access import QueryMeter, WhiteBoxModel
from dfml_bench.datasets import load_dataset
from dfml_bench.evaluation import evaluate
from dfml_bench.methods import MethodContext, Progress
from dfml_bench.runner import make_apis, make_backbone_factory, scenario_episodes, scenario_init_seed
from dfml_bench.scenarios import get_suite
from dfml_bench.threads import fixed_threads
from dfml_bench.utils import derive_seed, make_generator
from dfml_bench.zoo import build_zoo


def make_context(suite_name: str, scale: str = "cpu", seed: int = 0, method: str = "free", device: str = "cpu", log=print,
                 zoo_models: int | None = None):
    """(context, dataset, zoo, test episodes, scenario) for the suite's first scenario, as run_one builds them.
    ``zoo_models`` swaps in a zoo of that many models (same recipe and seeds: model i is the same model in
    every size, so a bigger zoo extends the suite's); the scenario keeps its name, hence its
    initialisation and its meta-val episodes."""
    sc = get_suite(suite_name, scale).scenarios[0]
    if zoo_models is not None:
        sc = replace(sc, zoo=replace(sc.zoo, n_models=zoo_models))
    return make_scenario_context(sc, scale, seed, method, device, log)


def make_scenario_context(sc, scale: str = "cpu", seed: int = 0, method: str = "free", device: str = "cpu", log=print):
    """(context, dataset, zoo, test episodes, scenario) for the scenario ``sc``, as run_one builds them."""
    dev = torch.device(device)
    ds = load_dataset(sc.dataset, seed=sc.dataset_seed, scale=scale)
    # with the protocol's thread count, whatever the script runs with: the suites' own zoo, not one of
    # its own (the thread count is part of a zoo's identity; before it was, a zoo a script trained with 2
    # threads was taken by the suites for theirs: the glyphs-fs-natural zoo of the script-split records)
    with fixed_threads():
        zoo = build_zoo(sc.zoo, ds, device=dev, progress=False, log=None)
    test_eps, val_eps = scenario_episodes(sc, ds, seed, None)
    wb = None
    if sc.access == "whitebox":
        wb = [WhiteBoxModel(zoo.load_model(i, dev), list(e.classes), e.arch, i, e.domain, ds.image_shape)
              for i, e in enumerate(zoo.entries)]
    meter = QueryMeter(len(zoo.entries), total_budget=sc.budget_total, per_api_budget=sc.budget_per_api)
    apis, _ = make_apis(zoo, sc, meter, dev, isolated=False)

    def evaluate_val(model, n=None):
        eps = val_eps if n is None else val_eps.subset(slice(0, n))
        return evaluate(model, ds, eps, sc.protocol, device=dev)

    ctx = MethodContext(
        scenario_name=sc.name, access=sc.access, episode_spec=test_eps.spec, protocol=sc.protocol,
        make_backbone=make_backbone_factory(sc, ds, scenario_init_seed(sc, seed), dev),
        val_episodes=val_eps, val_dataset=ds, device=dev, seed=seed,
        generator=make_generator(derive_seed("method-rng", sc.name, method, seed)), progress=Progress(log=log),
        scale=scale, image_shape=ds.image_shape, domains=sorted({e.domain for e in zoo.entries}),
        budget={"total": sc.budget_total, "per_api": sc.budget_per_api}, output_kind=sc.output_kind,
        _whitebox=wb, _apis=apis, _evaluate_val=evaluate_val)
    return ctx, ds, zoo, test_eps, sc
