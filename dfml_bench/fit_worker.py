"""The fit process (``python -m dfml_bench.fit_worker SPEC``): runs one method's ``fit`` with only what
its track allows, and writes back only a ``state_dict``.

Started by :class:`dfml_bench.isolation.FitProcess` (as an unprivileged user when the harness is root).
In order, before any data arrives: set its own limits (address space, process count, no new
privileges, non-dumpable), import the method's class from its entry point and instantiate it, and
describe it to the harness (access kinds, output kinds, ``not_data_free``, parameters). Then it waits
for the job: ``job.pt`` in its scratch folder, plus, for a black-box scenario, the API server's
endpoint as file descriptors. The job holds:

- white-box: the zoo models' weights (BatchNorm statistics included), architectures and class ids;
- black-box: nothing of the zoo (the endpoint answers queries, metered by the server);
- both: the meta-val images and labels (meta-val classes only; meta-train too only for a method
  flagged ``not_data_free``), the meta-val episodes re-indexed into them, the scenario facts (episode
  spec, protocol, backbone, image shape, budgets) and the seeds.

No meta-test image, episode or label is ever in it. ``fit`` runs; its module's ``state_dict`` is saved
(CPU, detached) to ``result.pt`` and a small ``result.json`` says what else the method reported.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback


def _send(sock: socket.socket, obj) -> None:
    data = json.dumps(obj, default=str).encode()
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _recv_go(sock: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
    if not data:
        raise EOFError("the harness went away")
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        more = sock.recv(1 << 16)
        if not more:
            raise EOFError("the harness went away")
        data += more
    n = int.from_bytes(data[:4], "big")
    return json.loads(data[4 : 4 + n]), list(fds)


def _log(message: str) -> None:
    from .isolation import LOG_PREFIX

    text = str(message).replace("\n", " ")[:1000]
    print(LOG_PREFIX + text, file=sys.stderr, flush=True)


def _jsonable(obj, depth: int = 0):
    """``obj`` as plain JSON data (tensors and numbers as floats, unknown objects as strings)."""
    import math

    import torch

    if depth > 8:
        return str(obj)[:200]
    if isinstance(obj, torch.Tensor):
        obj = obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in list(obj.items())[:500]}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in list(obj)[:10000]]
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)[:200]


def _load_method(entry: str, name: str, params: dict):
    import importlib
    import inspect

    from .methods import Method, MethodError

    module, _, attr = entry.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, Method)):
        raise MethodError(f"entry point {name!r} -> {entry} is not a dfml_bench.methods.Method subclass")
    inst = obj(**params)
    if not obj.name:
        inst.name = name
    return inst


def _context(job: dict, fds: list[int], method):
    """The :class:`MethodContext` of the job (built here, from plain data)."""
    import torch

    from .access import APIInfo, InProcessAPI, QueryMeter, WhiteBoxModel
    from .backbones import BackboneSpec, build_backbone
    from .datasets.base import ImageDataset
    from .episodes import EpisodeSet, EpisodeSpec
    from .evaluation import AdaptProtocol, evaluate
    from .methods import MethodContext, Progress
    from .utils import make_generator, seeded_torch, derive_seed

    device = torch.device(job["device"])
    d = job["data"]
    data = ImageDataset(d["name"], d["images"], d["labels"], list(d["class_names"]), d["splits"], tuple(d["mean"]),
                        tuple(d["std"]), d["hash"], domains={int(k): v for k, v in d["domains"].items()})
    v = job["val_episodes"]
    val_eps = EpisodeSet(v["classes"], v["support"], v["query"], "val", data.hash, int(v["seed"]))
    spec = EpisodeSpec(**job["episode_spec"])
    protocol = AdaptProtocol(**job["protocol"])
    bb = BackboneSpec(**job["backbone"])
    init_seed = int(job["init_seed"])
    counter = {"k": 0}

    def make_backbone() -> torch.nn.Module:  # as runner.make_backbone_factory, from the same seeds
        with seeded_torch(derive_seed("backbone-init", init_seed, counter["k"])):
            counter["k"] += 1
            model = build_backbone(bb, spec.ways, data.image_shape, data.mean, data.std, track_running_stats=False).to(device)
        head = getattr(model, "head", None)
        if isinstance(head, torch.nn.Linear) and head.bias is not None:
            with torch.no_grad():
                head.bias.zero_()
        return model

    def evaluate_val(model, n=None):
        eps = val_eps if n is None else val_eps.subset(slice(0, n))
        return evaluate(model, data, eps, protocol, device=device)

    budget = job["budget"]
    infos = [APIInfo(**{**i, "classes": tuple(i["classes"]), "input_shape": tuple(i["input_shape"]),
                        "value_range": tuple(i["value_range"])}) for i in job["infos"]]
    whitebox, apis, wb_meter = None, None, None
    if job["access"] == "whitebox":
        whitebox = []
        for m in job["models"]:
            net = build_backbone(BackboneSpec(**m["backbone"]), int(m["num_classes"]), data.image_shape, data.mean, data.std,
                                 track_running_stats=True)
            net.load_state_dict(m["state_dict"])
            whitebox.append(WhiteBoxModel(net.to(device).eval(), list(m["classes"]), m["arch"], int(m["index"]), m["domain"],
                                          data.image_shape))
        wb_meter = QueryMeter(len(whitebox), total_budget=budget["total"], per_api_budget=budget["per_api"])
        apis = [InProcessAPI(w.model, infos[i], wb_meter, device) for i, w in enumerate(whitebox)]
    else:
        from .server import Endpoint, connect

        if len(fds) != 3:
            raise RuntimeError(f"a black-box job needs the API endpoint (3 file descriptors), got {len(fds)}")
        ep = Endpoint(fds[0], fds[1], fds[2], tuple(infos), budget["total"], budget["per_api"])
        apis, _ = connect(ep, device)
    ctx = MethodContext(
        scenario_name=job["scenario"], access=job["access"], episode_spec=spec, protocol=protocol, make_backbone=make_backbone,
        val_episodes=val_eps, val_dataset=data, device=device, seed=int(job["seed"]),
        generator=make_generator(int(job["method_seed"])), progress=Progress(log=_log), scale=job["scale"],
        image_shape=data.image_shape, budget=dict(budget), output_kind=job["output_kind"], domains=list(job["domains"]),
        _whitebox=whitebox, _apis=apis, _real_train=(lambda: data) if method.not_data_free else None, _evaluate_val=evaluate_val)
    return ctx, wb_meter


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    sock = socket.socket(fileno=int(spec["control_fd"]))
    result: dict = {"ok": False}
    try:
        import torch

        from .isolation import set_own_limits

        set_own_limits(spec.get("memory_bytes"), spec.get("nproc"))
        torch.set_num_threads(max(1, int(spec["threads"])))
        method = _load_method(spec["entry"], spec["method"], dict(spec["params"]))
        _send(sock, {"describe": {"name": spec["method"], "cls": f"{type(method).__module__}.{type(method).__qualname__}",
                                  "access": sorted(method.access), "output_kinds": sorted(method.output_kinds),
                                  "not_data_free": bool(method.not_data_free), "params": _jsonable(method.get_params())}})
        msg, fds = _recv_go(sock)
        if "go" not in msg:
            return 0  # skipped: nothing to do
        job = torch.load(msg["go"], map_location="cpu", weights_only=True)
        os.unlink(msg["go"])
        ctx, wb_meter = _context(job, fds, method)
        t0 = time.perf_counter()
        model = method.fit(ctx)
        fit_seconds = time.perf_counter() - t0
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"method {spec['method']!r} returned {type(model).__name__}; fit() must return the meta-learner nn.Module")
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        torch.save(state, "result.pt")
        artifacts = {}
        for name, writer in (getattr(method, "artifacts_", None) or {}).items():
            safe = "".join(c for c in str(name).lower() if c.isalnum() or c in "-_")[:40]
            try:
                writer(os.path.join("artifacts", f"{safe}.png"))
                artifacts[safe] = True
            except Exception as exc:  # an artifact never fails a run
                artifacts[safe] = f"error: {exc}"
        result = {"ok": True, "report": _jsonable(getattr(method, "report_", {}) or {}), "artifacts": artifacts,
                  "fit_seconds": fit_seconds, "whitebox_queries": wb_meter.snapshot() if wb_meter is not None else None}
        return 0
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the harness
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000], "traceback": traceback.format_exc(limit=20)[-8000:]}
        return 1
    finally:
        try:
            with open("result.json.tmp", "w") as fh:
                json.dump(result, fh, default=str)
            os.replace("result.json.tmp", "result.json")
        except Exception:
            pass


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
