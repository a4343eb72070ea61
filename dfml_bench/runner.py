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
import shutil
import tempfile
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
from .isolation import Description, FitFailed, FitLimits, FitProcess, load_state
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
    isolate: bool = True  # fit in a separate, restricted process (dfml_bench.isolation); False only to debug
    fit_timeout: float | None = None  # seconds; default: the scenario's, else by scale (isolation.DEFAULT_TIMEOUT)
    fit_memory_gb: float | None = None  # address-space limit of the fit process (CPU); default 75 % of RAM
    fit_user: str | None = None  # auto | same | NAME | UID:GID (see isolation.choose_user)


def init_seed(scenario_name: str, seed: int) -> int:
    """Seed of the meta-learner initialisation of a (scenario, run seed), shared by every method."""
    return derive_seed("meta-learner-init", scenario_name, seed)


def scenario_init_seed(scenario: Scenario, seed: int) -> int:
    """The initialisation seed of ``scenario``: its ``init_key``'s (variants of one scenario share it), else its own."""
    return init_seed(scenario.init_key or scenario.name, seed)


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


def visible_data(dataset: ImageDataset, classes: list[int], val_eps: EpisodeSet) -> tuple[dict, dict]:
    """What a fit process may see of ``dataset``: the images and labels of ``classes`` only (meta-val,
    plus meta-train for a ``not_data_free`` method), in dataset order, and the meta-val episodes
    re-indexed into them. Names of the other classes are blanked. No meta-test image or label is in it."""
    wanted = torch.tensor(sorted(set(int(c) for c in classes)), dtype=torch.long)
    keep = torch.isin(dataset.labels, wanted).nonzero().squeeze(1)
    pos = torch.full((dataset.labels.shape[0],), -1, dtype=torch.long)
    pos[keep] = torch.arange(keep.shape[0])
    sup, qry = pos[val_eps.support], pos[val_eps.query]
    if bool((sup < 0).any()) or bool((qry < 0).any()):
        raise RuntimeError("meta-val episodes use images outside the visible classes")
    visible = set(wanted.tolist())
    splits = {"train": [c for c in dataset.splits["train"] if c in visible], "val": list(dataset.splits["val"]), "test": []}
    from .utils import sha256_json

    data = {"name": dataset.name, "images": dataset.images[keep].clone(), "labels": dataset.labels[keep].clone(),
            "class_names": [n if i in visible else "" for i, n in enumerate(dataset.class_names)], "splits": splits,
            "mean": list(dataset.mean), "std": list(dataset.std),
            "hash": sha256_json(["visible", dataset.hash, sorted(visible)]),
            "domains": {str(c): d for c, d in dataset.domains.items() if c in visible}}
    eps = {"classes": val_eps.classes.clone(), "support": sup, "query": qry, "seed": int(val_eps.seed)}
    return data, eps


def fit_payload(scenario: Scenario, suite: Suite, dataset: ImageDataset, zoo: Zoo, val_eps: EpisodeSet, infos: list[APIInfo],
                seed: int, method_name: str, not_data_free: bool, device: torch.device, n_test: int) -> dict:
    """The job a fit process gets (plain data and tensors, loadable with ``weights_only=True``)."""
    classes = list(dataset.splits["val"]) + (list(dataset.splits["train"]) if not_data_free else [])
    data, eps = visible_data(dataset, classes, val_eps)
    job = {
        "scenario": scenario.name, "access": scenario.access, "scale": suite.scale, "seed": int(seed), "device": str(device),
        "episode_spec": {**asdict(scenario.episodes), "n_episodes": int(n_test)}, "protocol": asdict(scenario.protocol), "backbone": asdict(scenario.backbone),
        "init_seed": scenario_init_seed(scenario, seed), "method_seed": derive_seed("method-rng", scenario.name, method_name, seed),
        "budget": {"total": scenario.budget_total, "per_api": scenario.budget_per_api}, "output_kind": scenario.output_kind,
        "domains": sorted({e.domain for e in zoo.entries}), "infos": [asdict(i) for i in infos], "data": data, "val_episodes": eps,
        "models": [],
    }
    if scenario.access == "whitebox":
        from .utils import sha256_file
        from .zoo import ZooCorrupted

        for i, e in enumerate(zoo.entries):
            f = zoo.path / e.file
            if sha256_file(f) != e.sha256:
                raise ZooCorrupted(f"{f} does not match its manifest sha256; run `dfml-bench zoo build` to rebuild it")
            state = torch.load(f, map_location="cpu", weights_only=True)["state_dict"]
            job["models"].append({"index": i, "backbone": asdict(zoo.spec.backbone_for(i)), "num_classes": zoo.spec.ways,
                                  "classes": [int(c) for c in e.classes], "arch": e.arch, "domain": e.domain, "state_dict": state})
    return job


def _api_infos(zoo: Zoo, scenario: Scenario) -> list[APIInfo]:
    return [APIInfo(index=e.index, num_classes=len(e.classes), classes=tuple(e.classes), input_shape=zoo.dataset.image_shape,
                    output_kind=scenario.output_kind, topk=scenario.topk, domain=e.domain) for e in zoo.entries]


def fit_limits(scenario: Scenario, scale: str, opts: RunOptions, device: torch.device) -> FitLimits:
    """The fit process's limits: ``--fit-timeout`` over the scenario's default over the scale's."""
    from .isolation import DEFAULT_TIMEOUT, default_memory_limit

    timeout = opts.fit_timeout or getattr(scenario, "fit_timeout", None) or DEFAULT_TIMEOUT.get(scale, DEFAULT_TIMEOUT["paper"])
    if opts.fit_memory_gb is not None:
        memory = int(opts.fit_memory_gb * 2**30) if device.type == "cpu" else None
    else:
        memory = default_memory_limit(device)
    return FitLimits(timeout=float(timeout), memory_bytes=memory)


def run_one(suite: Suite, scenario: Scenario, method_name: str, seed: int, opts: RunOptions, bar=None, *,
            fitter: "_Fitter | None" = None, after_fit: Callable[[], None] | None = None) -> ResultRecord:
    """Run one (scenario, method, seed) and write its record. Never raises for a method's own failure.

    ``fit`` runs in a separate process (:mod:`dfml_bench.isolation`) unless ``opts.isolate`` is False
    (a debugging aid: such records say ``flags.isolated: false`` and the leaderboard does not count them).
    It runs with ``opts.threads`` torch threads, whoever calls it (the fit process inherits the count),
    so its results do not depend on the launcher."""
    with fixed_threads(opts.threads):
        return _run_one(suite, scenario, method_name, seed, opts, bar, fitter=fitter, after_fit=after_fit)


def _run_one(suite: Suite, scenario: Scenario, method_name: str, seed: int, opts: RunOptions, bar=None, *,
             fitter: "_Fitter | None" = None, after_fit: Callable[[], None] | None = None) -> ResultRecord:
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

    try:
        params = {**scenario.method_params.get(method_name, {}), **opts.method_params.get(method_name, {})}
        record.versions["method_package"] = _method_package(method_name)
        stage("start")
        if fitter is None:  # the fit process imports torch and the method while the data is loaded below
            fitter = _Fitter.start(method_name, params, suite, scenario, opts, device)
        stage("dataset")
        dataset = load_dataset(scenario.dataset, seed=scenario.dataset_seed, data_root=opts.data_root, scale=suite.scale)
        stage("zoo")
        zoo = build_zoo(scenario.zoo, dataset, device=device, progress=opts.progress, log=opts.log)
        test_eps, val_eps = scenario_episodes(scenario, dataset, seed, opts.episodes)
        desc = fitter.describe()
        record.config["method"] = {"name": method_name, "params": desc.params, "class": desc.cls}
        record.flags = {"not_data_free": bool(desc.not_data_free), "reported": False, "isolated": bool(opts.isolate)}
        record.resources["isolation"] = fitter.isolation
        try:
            desc.check_scenario(scenario.access, scenario.output_kind)
        except MethodError as exc:
            fitter.skip()
            record.status, record.error = "skipped", str(exc)
            write_record(opts.out, record)
            return record
        record.hashes = {"dataset": dataset.hash, "zoo": zoo.hash, "zoo_weights": zoo.weights_hash,
                         "test_episodes": test_eps.hash, "val_episodes": val_eps.hash}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stage("fit")
        state, t_fit = fitter.fit(dataset, zoo, test_eps, val_eps, seed)
        if after_fit is not None:
            after_fit()  # e.g. start the next job's fit process while this one is evaluated
        # the harness's own backbone (the shared initialisation), loaded with the returned weights only
        model = make_backbone_factory(scenario, dataset, scenario_init_seed(scenario, seed), device)()
        model.load_state_dict(state)
        stage("evaluate")
        t0 = time.perf_counter()
        acc = evaluate(model, dataset, test_eps, scenario.protocol, device=device)
        t_eval = time.perf_counter() - t0
        record.per_episode = [round(float(a), 6) for a in acc.tolist()]
        record.accuracy = summary_of(record.per_episode)
        record.per_domain = per_domain_summary(dataset, test_eps, record.per_episode)
        record.queries = fitter.queries()
        record.timing = {"fit_seconds": t_fit, "eval_seconds": t_eval}
        record.extra = fitter.report
        record.artifacts = fitter.artifacts(key, opts.out)
        record.status = "ok"
    except KeyboardInterrupt:
        if fitter is not None:
            fitter.close()
        raise  # an interrupted run leaves no record at all: it is simply redone
    except Exception as exc:  # the run fails, the suite goes on
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        record.extra = {"traceback": getattr(getattr(fitter, "proc", None), "traceback", None) or traceback.format_exc(limit=20)}
        if fitter is not None:
            q = fitter.queries(quiet=True)
            if q:
                record.queries = q  # what the run spent before it failed
        if opts.log:
            opts.log(f"FAILED {scenario.name}/{method_name}/seed{seed}: {record.error}")
    finally:
        if fitter is not None:
            fitter.close()
    record.timing["total_seconds"] = time.time() - t_start
    record.timing["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start))
    record.resources["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        record.resources["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    write_record(opts.out, record)
    return record


class _Fitter:
    """One job's fit, isolated (a :class:`~dfml_bench.isolation.FitProcess`) or, for debugging only, in
    this process. Either way the harness gets a checked ``state_dict``, the method's report, and the
    query counts read from the API server (black-box) or the fit process (white-box, informative)."""

    def __init__(self, method_name, params, suite, scenario, opts, device):
        self.method_name, self.params, self.suite, self.scenario, self.opts, self.device = method_name, params, suite, scenario, opts, device
        self.proc: FitProcess | None = None
        self.method: Method | None = None
        self.server = None
        self.meter: QueryMeter | None = None
        self.local_queries: dict | None = None
        self.report: dict = {}
        self.traceback: str | None = None
        self._artifact_names: dict = {}
        self.isolation: dict = {"process": "same (isolation off)", "privilege_separation": False}
        self._closer: Callable[[], None] = lambda: None

    @classmethod
    def start(cls, method_name, params, suite, scenario, opts, device) -> "_Fitter":
        self = cls(method_name, params, suite, scenario, opts, device)
        if opts.isolate:
            from .isolation import choose_user, describe_isolation, harden_self, protect_paths
            from .registry import entry_info

            entry = entry_info("dfml_bench.methods", method_name)
            if entry is None:
                raise MethodError(f"unknown method {method_name!r}")
            user = choose_user(opts.fit_user)
            limits = fit_limits(scenario, suite.scale, opts, device)
            protect = [str(p) for p in (home(), opts.out, opts.data_root or os.environ.get("DFML_BENCH_DATA")) if p]
            Path(opts.out).mkdir(parents=True, exist_ok=True)
            protect_paths(protect, user, opts.log)
            if user is None:
                harden_self()  # same user: at least this process's memory is not readable through /proc
                _warn_same_user(opts.log)
            self.isolation = describe_isolation(user, limits)
            self.limits = limits
            self.proc = FitProcess(method_name, entry.value, _plain(params), user=user, limits=limits,
                                   threads=torch.get_num_threads(), log=opts.log, protect=protect)
        return self

    def describe(self) -> Description:
        if self.proc is not None:
            self._desc = self.proc.describe()
            return self._desc
        self.method = get_method(self.method_name, self.params)
        m = self.method
        self._desc = Description(self.method_name, f"{type(m).__module__}.{type(m).__qualname__}", sorted(m.access),
                                 sorted(m.output_kinds), bool(m.not_data_free), m.get_params())
        return self._desc

    def skip(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def fit(self, dataset, zoo, test_eps, val_eps, seed) -> tuple[dict, float]:
        sc, device = self.scenario, self.device
        self.meter = QueryMeter(len(zoo.entries), total_budget=sc.budget_total, per_api_budget=sc.budget_per_api)
        infos = _api_infos(zoo, sc)
        reference = make_backbone_factory(sc, dataset, scenario_init_seed(sc, seed), device)()
        if self.proc is None:
            self._test_spec = test_eps.spec
            return self._fit_in_process(dataset, zoo, val_eps, seed, infos, reference)
        fds: tuple[int, ...] = ()
        if sc.access == "blackbox":
            from .server import start_server

            self.server = start_server(zoo, infos, self.meter, device)
            ep = self.server.take_endpoint()
            fds = ep.fds
        payload = fit_payload(sc, self.suite, dataset, zoo, val_eps, infos, seed, self.method_name,
                              self._desc.not_data_free, device, len(test_eps))
        try:
            self.proc.go(payload, fds)
        finally:
            for fd in fds:  # the fit process has its own copies now; the server sees EOF when it exits
                os.close(fd)
        del payload
        t_fit = self.proc.wait(self.limits.timeout)
        from .isolation import kill_user

        kill_user(self.proc.user)  # whatever it left running (daemons) goes before anything is read
        try:
            res = self.proc.result()
        except FitFailed as exc:
            death = self.server.death() if self.server is not None else None
            raise FitFailed(f"{exc} ({death})" if death else str(exc)) from None
        self.report = res.get("report") if isinstance(res.get("report"), dict) else {}
        self._artifact_names = res.get("artifacts") if isinstance(res.get("artifacts"), dict) else {}
        self.local_queries = res.get("whitebox_queries") if isinstance(res.get("whitebox_queries"), dict) else None
        state = load_state(self.proc.scratch / "result.pt", reference, self.method_name)
        return state, t_fit

    def _fit_in_process(self, dataset, zoo, val_eps, seed, infos, reference) -> tuple[dict, float]:
        """The pre-isolation path (debugging only): fit in this process, then the same checks."""
        import io

        sc, device, opts = self.scenario, self.device, self.opts
        whitebox = None
        if sc.access == "whitebox":
            whitebox = [WhiteBoxModel(zoo.load_model(i, device), list(e.classes), e.arch, i, e.domain, dataset.image_shape)
                        for i, e in enumerate(zoo.entries)]
        apis, self._closer = make_apis(zoo, sc, self.meter, device, opts.isolated_apis and sc.access == "blackbox")
        data, eps = visible_data(dataset, list(dataset.splits["val"]) + (list(dataset.splits["train"]) if self.method.not_data_free else []), val_eps)
        vis = ImageDataset(data["name"], data["images"], data["labels"], data["class_names"], data["splits"], tuple(data["mean"]),
                           tuple(data["std"]), data["hash"], domains={int(k): v for k, v in data["domains"].items()})
        veps = EpisodeSet(eps["classes"], eps["support"], eps["query"], "val", vis.hash, eps["seed"])

        def evaluate_val(model: nn.Module, n: int | None = None) -> torch.Tensor:
            return evaluate(model, vis, veps if n is None else veps.subset(slice(0, n)), sc.protocol, device=device)

        ctx = MethodContext(
            scenario_name=sc.name, access=sc.access, episode_spec=self._test_spec,
            protocol=sc.protocol, make_backbone=make_backbone_factory(sc, dataset, scenario_init_seed(sc, seed), device),
            val_episodes=veps, val_dataset=vis, device=device, seed=seed,
            generator=make_generator(derive_seed("method-rng", sc.name, self.method_name, seed)),
            progress=Progress(log=opts.log, bar_factory=_bar_factory(opts.progress)), scale=self.suite.scale,
            image_shape=dataset.image_shape, budget={"total": sc.budget_total, "per_api": sc.budget_per_api},
            output_kind=sc.output_kind, domains=sorted({e.domain for e in zoo.entries}), _whitebox=whitebox, _apis=apis,
            _real_train=(lambda: vis) if self.method.not_data_free else None, _evaluate_val=evaluate_val)
        t0 = time.perf_counter()
        model = self.method.fit(ctx)
        t_fit = time.perf_counter() - t0
        self._closer()
        if not isinstance(model, nn.Module):
            raise MethodError(f"method {self.method_name!r} returned {type(model).__name__}; fit() must return the meta-learner nn.Module")
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
        path = Path(tempfile.mkdtemp(prefix="dfml-fit-")) / "result.pt"
        path.write_bytes(buf.getvalue())
        try:
            state = load_state(path, reference, self.method_name)
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        self.report = getattr(self.method, "report_", {}) or {}
        return state, t_fit

    def queries(self, quiet: bool = False) -> dict:
        """The record's query counts: the API server's own (black-box), else what was counted by the
        fit process (white-box: informative only), else the harness's meter."""
        if self.meter is None:
            return {}
        if self.server is not None:
            try:
                if self.proc is not None and self.proc.proc.poll() is None:
                    pass  # still running (a failure mid-fit): the server still answers the control pipe
                self.server.counts(timeout=30.0)
            except Exception:
                if not quiet:
                    raise
        elif self.local_queries is not None:
            snap = self.local_queries
            used = snap.get("per_api") if isinstance(snap.get("per_api"), list) else []
            if len(used) == len(self.meter.used) and all(isinstance(u, int) and u >= 0 for u in used):
                self.meter.used[:] = used
        return self.meter.snapshot()

    def artifacts(self, key: RunKey, out: Path) -> dict:
        if self.proc is None:
            return _save_artifacts(self.method, key, out) if self.method is not None else {}
        from .isolation import copy_artifacts

        dest = key.path(out).parent
        dest.mkdir(parents=True, exist_ok=True)
        return copy_artifacts(self.proc.scratch, self._artifact_names, dest, f"seed-{key.seed}")

    def close(self) -> None:
        try:
            self._closer()
        except Exception:
            pass
        if self.proc is not None:
            self.proc.close()
        if self.server is not None:
            self.server.close()


def _plain(params: dict) -> dict:
    """Method parameters as JSON data (they travel to the fit process on its command line)."""
    import json

    try:
        return json.loads(json.dumps(params))
    except (TypeError, ValueError) as exc:
        raise MethodError(f"method parameters must be JSON data (numbers, strings, lists, dicts): {exc}") from None


_WARNED = {"same_user": False}


def _warn_same_user(log) -> None:
    if not _WARNED["same_user"]:
        _WARNED["same_user"] = True
        msg = ("isolation: dfml-bench is not root, so fit runs in a separate process as the SAME user: it cannot see "
               "test data or the harness's memory, but it could read files this user can read (the zoo cache) and "
               "write into the results folder. Run as root in a container for privilege separation.")
        (log or (lambda m: print(m, file=sys.stderr)))(msg)


def per_domain_summary(dataset: ImageDataset, eps: EpisodeSet, acc: list[float]) -> dict:
    """Accuracy summary per domain for multi-domain pools (an episode's domain is its first class's;
    ``acc`` may cover only the first episodes of ``eps``); empty for one domain."""
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
    from .registry import entry_info

    e = entry_info("dfml_bench.methods", name)  # metadata only: the plugin is never imported here
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
    _validate_methods(methods, opts.isolate, opts.fit_user)
    jobs = [(sc, m, s) for s in seeds for sc in suite.scenarios for m in methods]
    todo = [(sc, m, s) for sc, m, s in jobs if not is_finished(opts.out, RunKey(suite.name, suite.scale, sc.name, m, s))]
    out: list[ResultRecord] = []
    bar = tqdm(total=len(jobs), desc=f"suite {suite.name} ({suite.scale})", disable=not opts.progress)
    bar.update(len(jobs) - len(todo))
    ready: dict[int, _Fitter] = {}

    def prestart(i: int) -> Callable[[], None]:
        def start() -> None:  # the next job's fit process starts (imports) while this job is evaluated
            if opts.isolate and i < len(todo) and i not in ready:
                sc, m, s = todo[i]
                try:
                    params = {**sc.method_params.get(m, {}), **opts.method_params.get(m, {})}
                    ready[i] = _Fitter.start(m, params, suite, sc, opts, resolve_device(opts.device))
                except Exception:
                    pass  # run_one starts it itself and records the failure
        return start

    try:
        for i, (sc, m, s) in enumerate(todo):
            out.append(run_one(suite, sc, m, s, opts, bar, fitter=ready.pop(i, None), after_fit=prestart(i + 1)))
            bar.update(1)
    finally:
        for f in ready.values():
            f.close()
    bar.close()
    return out


def _validate_methods(methods: list[str], isolate: bool = True, fit_user: str | None = None) -> None:
    """Refuse unknown methods and plugins that fail to import, before any work. With isolation the
    plugins are imported in a throwaway process (as the fit user), never in this one."""
    from .registry import entry_info, load_group

    if not isolate:
        reg = load_group("dfml_bench.methods")
        entries = {m: reg.get(m) for m in methods}
    else:
        entries = {m: entry_info("dfml_bench.methods", m) for m in methods}
    unknown = [m for m, e in entries.items() if e is None]
    if unknown:
        from .registry import entry_names

        raise MethodError(f"unknown method(s) {unknown}; registered methods: {', '.join(sorted(entry_names('dfml_bench.methods')))}")
    if isolate:
        from .isolation import choose_user, probe_imports

        errors = probe_imports({m: e.value for m, e in entries.items()}, choose_user(fit_user))  # nothing to protect: no data yet
    else:
        errors = {m: e.error for m, e in entries.items()}
    for m in methods:
        if errors.get(m):
            raise MethodError(f"method plugin {m!r} ({entries[m].value}) failed to import: {errors[m]}; fix or uninstall it")
