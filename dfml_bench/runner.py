"""The flow of a suite run (DESIGN.md, "The flow of one run"):

    suite -> scenarios -> for each (scenario, method, seed):
        dataset -> zoo -> access handles -> method.fit(context) -> meta-learner
        -> evaluator(frozen test episodes, the scenario's protocol) -> result record (JSON)

Every run is isolated from the others: a failing method is recorded as ``failed`` with its error and
the suite goes on; a method that cannot run under a scenario's access is recorded as ``skipped``.
Finished records are never recomputed (resume).
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .access import APIInfo, InProcessAPI, QueryMeter, WhiteBoxModel
from .backbones import build_backbone
from .datasets import ImageDataset, load_dataset
from .episodes import EpisodeSet, EpisodeSpec, frozen_episodes
from .evaluation import evaluate
from .methods import Method, MethodContext, MethodError, Progress, get_method
from .paths import home
from .results import ResultRecord, RunKey, is_finished, package_versions, summary_of, write_record
from .scenarios import Scenario, Suite
from .threads import PROTOCOL_THREADS, fixed_threads
from .utils import derive_seed, make_generator, seeded_torch
from .zoo import Zoo, build_zoo


@dataclass
class RunOptions:
    out: Path = Path("results")
    device: str = "cpu"
    episodes: int | None = None  # override the number of test episodes (quick runs)
    data_root: str | None = None
    progress: bool = True
    log: Callable[[str], None] | None = None
    method_params: dict = field(default_factory=dict)  # method -> params override
    isolated_apis: bool = True  # serve black-box APIs from a separate process when available
    threads: int = PROTOCOL_THREADS  # torch intra-op threads of the run: part of the protocol (threads.py)


def init_seed(scenario_name: str, seed: int) -> int:
    """Seed of the meta-learner initialisation of a (scenario, run seed), shared by every method."""
    return derive_seed("meta-learner-init", scenario_name, seed)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    return torch.device(device)


def scenario_episodes(scenario: Scenario, dataset: ImageDataset, seed: int, n_test: int | None) -> tuple[EpisodeSet, EpisodeSet]:
    """The frozen (test, val) episodes of (scenario, seed); identical for every method."""
    store = home() / "episodes"
    spec = scenario.episodes
    if n_test is not None:
        spec = EpisodeSpec(spec.ways, spec.shots, spec.queries, n_test)
    test = frozen_episodes(dataset, "test", spec, derive_seed("episodes", "test", seed), store)
    vspec = EpisodeSpec(spec.ways, spec.shots, spec.queries, scenario.val_episodes)
    val = frozen_episodes(dataset, "val", vspec, derive_seed("episodes", "val", seed), store)
    return test, val


def make_backbone_factory(scenario: Scenario, dataset: ImageDataset, seed: int, device: torch.device) -> Callable[[], nn.Module]:
    """A factory of fresh meta-learners; the k-th call is initialised from seed (seed, k), so it is
    deterministic. The head's bias starts at 0 (as the reference ``random`` baseline), for every method,
    so that all methods of a (scenario, seed) share one starting point."""
    counter = {"k": 0}

    def make() -> nn.Module:
        with seeded_torch(derive_seed("backbone-init", seed, counter["k"])):
            counter["k"] += 1
            model = build_backbone(scenario.backbone, scenario.episodes.ways, dataset.image_shape, dataset.mean, dataset.std,
                                   track_running_stats=False).to(device)
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear) and head.bias is not None:
            with torch.no_grad():
                head.bias.zero_()
        return model

    return make


def make_apis(zoo: Zoo, scenario: Scenario, meter: QueryMeter, device: torch.device, isolated: bool):
    """Black-box APIs over the zoo: the isolated server if available and asked for, else in-process.
    Returns (apis, closer)."""
    infos = [
        APIInfo(index=e.index, num_classes=len(e.classes), classes=tuple(e.classes), input_shape=zoo.dataset.image_shape,
                output_kind=scenario.output_kind, topk=scenario.topk, domain=e.domain)
        for e in zoo.entries
    ]
    if isolated:
        try:
            from .server import serve_zoo  # process boundary (issue 4)
        except ImportError:
            serve_zoo = None
        if serve_zoo is not None:
            return serve_zoo(zoo, infos, meter, device)
    apis = [InProcessAPI(zoo.load_model(i), infos[i], meter, device) for i in range(len(zoo.entries))]
    return apis, lambda: None


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def check_meta_learner(model: object, reference: nn.Module, method: str) -> nn.Module:
    """A method must return a module with the scenario backbone's parameters (same names and shapes)."""
    if not isinstance(model, nn.Module):
        raise MethodError(f"method {method!r} returned {type(model).__name__}; fit() must return the meta-learner nn.Module")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:4]
        raise MethodError(f"method {method!r} returned a model that is not the scenario's backbone (differs at {diff})")
    return model


def run_one(suite: Suite, scenario: Scenario, method_name: str, seed: int, opts: RunOptions, bar=None) -> ResultRecord:
    """Run one (scenario, method, seed) and write its record. Never raises for a method's own failure.
    It runs with ``opts.threads`` torch threads, whoever calls it, so its results do not depend on that."""
    with fixed_threads(opts.threads):
        return _run_one(suite, scenario, method_name, seed, opts, bar)


def _run_one(suite: Suite, scenario: Scenario, method_name: str, seed: int, opts: RunOptions, bar=None) -> ResultRecord:
    key = RunKey(suite.name, suite.scale, scenario.name, method_name, seed)
    device = resolve_device(opts.device)
    t_start = time.time()
    record = ResultRecord(key=key, status="failed")
    record.config = {"scenario": scenario.to_dict(), "options": {"episodes": opts.episodes, "device": opts.device, "threads": opts.threads}}
    record.versions = package_versions()
    record.resources = {"device": str(device), "host": socket.gethostname(), "platform": platform.platform(),
                        "torch_threads": torch.get_num_threads(),
                        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                        "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}  # which worker ran it
    record.seeds = {"run": seed, "dataset": scenario.dataset_seed, "zoo": scenario.zoo.seed}

    def stage(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{scenario.name}/{method_name}/seed{seed}: {text}")

    closer = lambda: None  # noqa: E731
    meter: QueryMeter | None = None
    try:
        params = {**scenario.method_params.get(method_name, {}), **opts.method_params.get(method_name, {})}
        method = get_method(method_name, params)
        record.config["method"] = {"name": method_name, "params": method.get_params(), "class": f"{type(method).__module__}.{type(method).__qualname__}"}
        record.flags = {"not_data_free": bool(method.not_data_free), "reported": False}
        record.versions["method_package"] = _method_package(method_name)
        try:
            method.check_scenario(scenario.access, scenario.output_kind)
        except MethodError as exc:
            record.status, record.error = "skipped", str(exc)
            write_record(opts.out, record)
            return record

        stage("dataset")
        dataset = load_dataset(scenario.dataset, seed=scenario.dataset_seed, data_root=opts.data_root, scale=suite.scale)
        stage("zoo")
        zoo = build_zoo(scenario.zoo, dataset, device=device, progress=opts.progress, log=opts.log)
        test_eps, val_eps = scenario_episodes(scenario, dataset, seed, opts.episodes)
        record.hashes = {"dataset": dataset.hash, "zoo": zoo.hash, "test_episodes": test_eps.hash, "val_episodes": val_eps.hash}

        meter = QueryMeter(len(zoo.entries), total_budget=scenario.budget_total, per_api_budget=scenario.budget_per_api)
        stage("access")
        whitebox = None
        if scenario.access == "whitebox":
            whitebox = [WhiteBoxModel(zoo.load_model(i, device), list(e.classes), e.arch, i, e.domain, dataset.image_shape)
                        for i, e in enumerate(zoo.entries)]
        apis, closer = make_apis(zoo, scenario, meter, device, opts.isolated_apis and scenario.access == "blackbox")
        # common random numbers: every method of a (scenario, seed) starts from the same meta-learner
        # initialisation, so paired comparisons measure what the method learned, not initialisation luck
        make_backbone = make_backbone_factory(scenario, dataset, init_seed(scenario.name, seed), device)

        def evaluate_val(model: nn.Module, n: int | None = None) -> torch.Tensor:
            eps = val_eps if n is None else val_eps.subset(slice(0, n))
            return evaluate(model, dataset, eps, scenario.protocol, device=device)

        progress = Progress(log=opts.log, bar_factory=_bar_factory(opts.progress))
        ctx = MethodContext(
            scenario_name=scenario.name, access=scenario.access, episode_spec=test_eps.spec, protocol=scenario.protocol,
            make_backbone=make_backbone, val_episodes=val_eps, val_dataset=dataset, device=device, seed=seed,
            generator=make_generator(derive_seed("method-rng", scenario.name, method_name, seed)),
            progress=progress, scale=suite.scale, image_shape=dataset.image_shape,
            budget={"total": scenario.budget_total, "per_api": scenario.budget_per_api}, output_kind=scenario.output_kind,
            domains=sorted({e.domain for e in zoo.entries}),
            _whitebox=whitebox, _apis=apis,
            _real_train=(lambda: dataset) if method.not_data_free else None,
            _evaluate_val=evaluate_val,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stage("fit")
        t0 = time.perf_counter()
        model = check_meta_learner(method.fit(ctx), make_backbone(), method_name)
        t_fit = time.perf_counter() - t0
        closer()
        closer = lambda: None  # noqa: E731
        stage("evaluate")
        t0 = time.perf_counter()
        acc = evaluate(model, dataset, test_eps, scenario.protocol, device=device)
        t_eval = time.perf_counter() - t0
        record.per_episode = [round(float(a), 6) for a in acc.tolist()]
        record.accuracy = summary_of(record.per_episode)
        record.per_domain = _per_domain(dataset, test_eps, record.per_episode)
        record.queries = meter.snapshot()
        record.timing = {"fit_seconds": t_fit, "eval_seconds": t_eval}
        record.extra = getattr(method, "report_", {}) or {}
        record.artifacts = _save_artifacts(method, key, opts.out)
        record.status = "ok"
    except KeyboardInterrupt:
        raise  # an interrupted run leaves no record at all: it is simply redone
    except Exception as exc:  # the run fails, the suite goes on
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        record.extra = {"traceback": traceback.format_exc(limit=20)}
        if meter is not None:
            record.queries = meter.snapshot()  # what the run spent before it failed
        if opts.log:
            opts.log(f"FAILED {scenario.name}/{method_name}/seed{seed}: {record.error}")
    finally:
        try:
            closer()
        except Exception:
            pass
    record.timing["total_seconds"] = time.time() - t_start
    record.timing["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start))
    record.resources["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        record.resources["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    write_record(opts.out, record)
    return record


def _per_domain(dataset: ImageDataset, eps: EpisodeSet, acc: list[float]) -> dict:
    """Mean accuracy per domain for multi-domain pools (an episode's domain is its first class's)."""
    if not dataset.domains:
        return {}
    groups: dict[str, list[float]] = {}
    for e, a in enumerate(acc):
        groups.setdefault(dataset.domain_of(int(eps.classes[e, 0])), []).append(a)
    return {d: summary_of(v) for d, v in sorted(groups.items())}


def _save_artifacts(method: Method, key: RunKey, out: Path) -> dict:
    """Methods may leave images to show (``method.artifacts_`` = {name: callable(path) writing a PNG});
    they are saved next to the record, each written under a temporary name and renamed into place."""
    arts = getattr(method, "artifacts_", None) or {}
    saved = {}
    for name, fig_writer in arts.items():
        path = key.path(out).with_name(f"seed-{key.seed}-{name}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        try:
            fig_writer(tmp)
            os.replace(tmp, path)
            saved[name] = path.name
        except Exception as exc:  # an artifact never fails a run
            saved[name] = f"error: {exc}"
    return saved


def _method_package(name: str) -> dict:
    from .registry import load_group

    e = load_group("dfml_bench.methods").get(name)
    return {"package": e.package, "version": e.version, "entry_point": e.value} if e else {}


def _bar_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False)


def run_suite(suite: Suite, methods: list[str] | None = None, seeds: list[int] | None = None,
              opts: RunOptions | None = None) -> list[ResultRecord]:
    """Run every (scenario, method, seed) of ``suite`` that has no finished record under ``opts.out``."""
    from tqdm.auto import tqdm

    opts = opts or RunOptions()
    methods = methods or suite.methods
    seeds = seeds if seeds is not None else suite.seeds
    _validate_methods(methods)
    jobs = [(sc, m, s) for s in seeds for sc in suite.scenarios for m in methods]
    out: list[ResultRecord] = []
    bar = tqdm(total=len(jobs), desc=f"suite {suite.name} ({suite.scale})", disable=not opts.progress)
    for sc, m, s in jobs:
        key = RunKey(suite.name, suite.scale, sc.name, m, s)
        if is_finished(opts.out, key):
            bar.update(1)
            continue
        out.append(run_one(suite, sc, m, s, opts, bar))
        bar.update(1)
    bar.close()
    return out


def _validate_methods(methods: list[str]) -> None:
    from .methods import method_registry

    reg = method_registry()
    unknown = [m for m in methods if m not in reg]
    if unknown:
        raise MethodError(f"unknown method(s) {unknown}; registered methods: {', '.join(sorted(reg))}")
    for m in methods:
        if reg[m].error is not None:
            raise MethodError(f"method plugin {m!r} ({reg[m].value}) failed to import: {reg[m].error}; fix or uninstall it")
