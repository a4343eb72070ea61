"""The black-box boundary (issue 4): a served API answers like the in-process one, counts exactly on the
server, refuses bad input and over-budget queries whole, exposes nothing of the model, and a dead server
fails the run cleanly while the suite goes on."""

from __future__ import annotations

import copy
import dataclasses
import gc
import multiprocessing
import os
import pickle
import signal
import threading
import time
import types
import warnings

import pytest
import torch
from torch import nn

from conftest import make_toy_dataset, toy_suite
from dfml_bench.access import AccessError, APIInfo, BudgetExhausted, InProcessAPI, QueryError, QueryMeter, TopK
from dfml_bench.methods import Method
from dfml_bench.registry import register, unregister
from dfml_bench.runner import RunOptions, run_suite
from dfml_bench.scenarios import Suite
from dfml_bench.server import MAX_REQUEST_BYTES, SERVER_NAME, APIServerDied, ServedAPI, connect, serve_zoo, start_server
from dfml_bench.zoo import build_zoo

MAX_BATCH = 64


@pytest.fixture(scope="module")
def zoo():
    return build_zoo(toy_suite().scenarios[1].zoo, make_toy_dataset(), progress=False)


def _infos(zoo, kinds, topk=3, max_batch=MAX_BATCH):
    return [APIInfo(index=e.index, num_classes=len(e.classes), classes=tuple(e.classes), input_shape=zoo.dataset.image_shape,
                    output_kind=k, topk=topk, max_batch=max_batch) for e, k in zip(zoo.entries, kinds)]


@pytest.fixture(scope="module")
def served(zoo):
    """One server: API 0 answers logits, API 1 probs, API 2 top-3; no budget."""
    meter = QueryMeter(3)
    infos = _infos(zoo, ["logits", "probs", "topk"])
    infos[1] = dataclasses.replace(infos[1], max_batch=5000)
    apis, closer = serve_zoo(zoo, infos, meter, "cpu")
    yield apis, meter, infos
    closer()


def _images(n, shape=(3, 16, 16), seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ answers and kinds


def test_outputs_equal_in_process_api_for_every_kind(zoo, served):
    apis, meter, infos = served
    x = _images(20)
    for i, api in enumerate(apis):
        ref = InProcessAPI(zoo.load_model(i), infos[i], QueryMeter(3))
        got, want = api.query(x), ref.query(x)
        if infos[i].output_kind == "topk":
            assert isinstance(got, TopK) and got.values.shape == (20, 3) and got.indices.dtype == torch.int64
            torch.testing.assert_close(got.values, want.values)
            assert torch.equal(got.indices, want.indices)
        else:
            assert got.shape == (20, 5) and got.dtype == torch.float32
            torch.testing.assert_close(got, want)
        if infos[i].output_kind == "probs":
            torch.testing.assert_close(got.sum(1), torch.ones(20))
    # answers are copies: the next query does not overwrite a previous answer
    a = apis[0].query(x[:4])
    kept = a.clone()
    apis[0].query(_images(4, seed=9))
    assert torch.equal(a, kept)


def test_large_batch_fits_the_fixed_shared_buffers(zoo, served):
    apis, meter, infos = served
    before = meter.snapshot()["per_api"]
    x = _images(1500, seed=3)  # a large batch (buffers are sized once for max_batch)
    ref = InProcessAPI(zoo.load_model(1), infos[1], QueryMeter(3))
    got = apis[1].query(x)
    assert got.shape == (1500, 5)
    torch.testing.assert_close(got, ref.query(x))
    torch.testing.assert_close(apis[1].query(x[:7]), ref.query(x[:7]))
    assert meter.snapshot()["per_api"] == [before[0], before[1] + 1507, before[2]]


# --------------------------------------------------------------------------------------------- budgets


def test_budgets_exact_under_concurrent_threads_and_refused_whole(zoo):
    meter = QueryMeter(3, per_api_budget=100, total_budget=250)
    apis, closer = serve_zoo(zoo, _infos(zoo, ["label"] * 3), meter, "cpu")
    try:
        answered = [0, 0]
        lock = threading.Lock()
        errors = []

        def worker(t: int) -> None:
            g = torch.Generator().manual_seed(t)
            done: set[int] = set()
            try:
                while len(done) < 2:
                    todo = [a for a in (0, 1) if a not in done]
                    api = todo[int(torch.randint(len(todo), (1,), generator=g))]
                    n = int(torch.randint(1, 8, (1,), generator=g))
                    try:
                        out = apis[api].query(_images(n, seed=t))
                    except BudgetExhausted as exc:
                        assert exc.requested == n and exc.scope == f"api:{api}" and exc.budget == 100
                        assert exc.used + n > 100
                        if n == 1:
                            done.add(api)  # even one more image is refused: this API is exactly at its budget
                        continue
                    assert out.shape == (n,)
                    with lock:
                        answered[api] += n
            except Exception as exc:  # surface thread failures in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors
        assert answered == [100, 100]  # every answered image counted, nothing else, nothing lost
        assert meter.snapshot()["per_api"] == [100, 100, 0]

        # exact refusals on the total budget (250), nothing charged when refused; labels as in process
        ref = InProcessAPI(zoo.load_model(2), apis[2].info, QueryMeter(3))
        got = apis[2].query(_images(30))
        assert got.dtype == torch.int64 and torch.equal(got, ref.query(_images(30)))
        with pytest.raises(BudgetExhausted) as info:
            apis[2].query(_images(30))
        e = info.value
        assert (e.requested, e.used, e.budget, e.scope) == (30, 230, 250, "total")
        assert "nothing was answered" in str(e)
        assert meter.snapshot()["total"] == 230 and apis[2].remaining_budget == 20
        apis[2].query(_images(20))  # exactly up to the budget is fine
        with pytest.raises(BudgetExhausted) as info:
            apis[0].query(_images(1))
        assert (info.value.scope, info.value.used, info.value.budget) == ("api:0", 100, 100)
        with pytest.raises(BudgetExhausted) as info:
            apis[2].query(_images(1))
        assert (info.value.scope, info.value.used, info.value.budget) == ("total", 250, 250)
        assert meter.snapshot() == {"per_api": [100, 100, 50], "total": 250, "total_budget": 250, "per_api_budget": 100}
        # the harness's meter is a mirror: tampering with it changes nothing on the server
        meter.used[:] = [0, 0, 0]
        with pytest.raises(BudgetExhausted):
            apis[2].query(_images(1))
    finally:
        closer()
    assert meter.snapshot()["per_api"] == [100, 100, 50]  # closer syncs the server's final counts
    closer()  # idempotent
    with pytest.raises(APIServerDied, match="shut down"):
        apis[0].query(_images(2))
    assert isinstance(apis[0], ServedAPI) and not hasattr(apis[0], "__dict__")


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, match", [
    (torch.rand(4, 3, 16), "shape"),
    (torch.rand(4, 1, 16, 16), "shape"),
    (torch.rand(4, 3, 8, 8), "shape"),
    ((torch.rand(4, 3, 16, 16) * 255).to(torch.uint8), "dtype"),
    (torch.zeros(4, 3, 16, 16, dtype=torch.int64), "dtype"),
    (torch.rand(4, 3, 16, 16) * 2, r"\[0.0, 1.0\]"),
    (torch.rand(4, 3, 16, 16) - 0.5, r"\[0.0, 1.0\]"),
    (torch.full((4, 3, 16, 16), float("nan")), "NaN"),
    (torch.full((4, 3, 16, 16), float("inf")), "NaN or infinite"),
    (torch.rand(0, 3, 16, 16), "empty"),
    (torch.rand(MAX_BATCH + 1, 3, 16, 16), "maximum of 64"),
    ([[0.5]], "torch.Tensor"),
])
def test_bad_input_is_refused_uncharged_and_the_server_stays_up(served, bad, match):
    apis, meter, _ = served
    before = meter.snapshot()["per_api"]
    with pytest.raises(QueryError, match=match):
        apis[0].query(bad)
    assert meter.snapshot()["per_api"] == before
    if isinstance(bad, torch.Tensor) and bad.dim() == 4:
        # the server refuses it too when the client's pre-checks are bypassed
        with pytest.raises(QueryError, match=match):
            apis[0]._channel.query(0, bad)
        assert apis[0]._channel.counts() == before
    assert apis[0].query(_images(2)).shape == (2, 5)  # still up
    assert meter.snapshot()["per_api"][0] == before[0] + 2


def test_malformed_requests_are_refused_and_float64_half_accepted(served):
    apis, meter, _ = served
    ch = apis[0]._channel
    for req in ({"op": "exec", "code": "print(1)"}, {"op": "query", "api": 7, "dtype": "float32", "shape": [1, 3, 16, 16]},
                {"op": "query", "api": 0, "dtype": "object", "shape": [1]},
                {"op": "query", "api": 0, "dtype": "float32", "shape": [10**6, 3, 16, 16]},
                {"op": "stop"}, {"op": "grow", "images": 10**9, "bytes": 10**12}):
        with ch._lock, pytest.raises(QueryError):
            ch._call(req)
    for raw in (b"\xff\xfe not json", b"[" * 60000, b"{}"):
        with ch._lock, pytest.raises(QueryError, match="malformed request"):
            ch._call(raw)
    # a raw request over the 64 KiB limit is read off, answered with an error, and the server stays up
    with ch._lock, pytest.raises(QueryError, match="exceeds the limit of 65536 bytes"):
        ch._call(b"{" + b" " * (4 * MAX_REQUEST_BYTES))
    assert apis[1].query(_images(3).double()).shape == (3, 5)
    assert apis[1].query(_images(3).half()).shape == (3, 5)


def _vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(l for l in fh if l.startswith("VmHWM")).split()[1]) / 1024


def test_huge_query_is_refused_and_server_memory_stays_bounded(zoo):
    """A 20,000-image query used to take the server to 5.5 GB; now batches above max_batch (default 4096)
    are refused uncharged and the largest allowed one is answered within bounded memory."""
    meter = QueryMeter(3)
    infos = [dataclasses.replace(i, max_batch=APIInfo.max_batch) for i in _infos(zoo, ["logits"] * 3)]
    server = start_server(zoo, infos, meter, "cpu")
    apis, channel = connect(server.take_endpoint(), "cpu", meter=meter, proc=server.proc)
    try:
        with pytest.raises(QueryError, match="exceeds this API's maximum of 4096"):
            apis[0].query(_images(20_000))
        # bypassing the client's check: the server refuses it too, nothing charged
        with channel._lock, pytest.raises(QueryError, match="maximum of 4096"):
            channel._call({"op": "query", "api": 0, "dtype": "float32", "shape": [20_000, 3, 16, 16]})
        assert server.counts() == [0, 0, 0]
        assert apis[0].query(_images(4096)).shape == (4096, 5)
        assert server.counts() == [4096, 0, 0]
        assert _vm_hwm_mb(server.proc.pid) < 1500
    finally:
        server.close()
        channel.close()


# ---------------------------------------------------------------------------------------- nothing leaks


def _patterns(zoo) -> list[bytes]:
    """The first 8 float32 values (as bytes) of every weight tensor of the zoo: byte strings that appear
    in a process's tensors only if the weights themselves are there."""
    pats = []
    for i, e in enumerate(zoo.entries):
        state = torch.load(zoo.path / e.file, map_location="cpu", weights_only=True)["state_dict"]
        pats += [t.reshape(-1)[:8].numpy().tobytes() for t in state.values() if t.dtype == torch.float32 and t.numel() >= 8]
        del state
    gc.collect()
    return pats


def _storage_bytes(t: torch.Tensor) -> bytes | None:
    try:
        st = t.untyped_storage()
        if st.device.type != "cpu":
            return None
        return torch.empty(0, dtype=torch.uint8).set_(st).numpy().tobytes()
    except Exception:
        return None


def _reachable(root) -> list:
    """Objects reachable from ``root`` through instance state (gc referents; functions through their
    closures and bound selves only, never through module globals; types and modules not entered)."""
    seen, out, todo = set(), [], [root]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.CodeType)):
            continue
        seen.add(id(o))
        out.append(o)
        if isinstance(o, types.FunctionType):
            todo.extend(c.cell_contents for c in (o.__closure__ or ()) if c.cell_contents is not None)
        elif isinstance(o, types.MethodType):
            todo.append(o.__self__)
        else:
            todo.extend(gc.get_referents(o))
    return out


def _children_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        pids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def _can_ptrace() -> bool:
    with open("/proc/self/status") as fh:
        cap = int(next(l for l in fh if l.startswith("CapEff")).split()[1], 16)
    return bool(cap & (1 << 19))  # CAP_SYS_PTRACE


class Probe(Method):
    """A hostile method: tries every way it knows to reach the weights through its handles."""

    name = "probe"
    patterns: list = []  # hex strings (parameters travel to the fit process as JSON)

    def fit(self, context):
        rep = {}
        self.patterns = [bytes.fromhex(p) for p in self.patterns]
        apis = context.apis()
        apis[0].query(torch.rand(7, *context.image_shape))
        apis[1].query(torch.rand(5, *context.image_shape))
        rep["api_type"] = type(apis[0]).__name__
        rep["has_dict"] = any(hasattr(a, "__dict__") for a in apis)
        try:
            context.whitebox()
            rep["whitebox"] = "granted"
        except AccessError:
            rep["whitebox"] = "AccessError"
        pickled = 0
        for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
            try:
                attempt(apis[0])
                pickled += 1
            except Exception:
                pass
        rep["pickled"] = pickled
        try:
            apis[0].foo = 1
            rep["settable"] = True
        except AttributeError:
            rep["settable"] = False
        # everything reachable from the handles
        reach = [o for a in apis for o in _reachable(a)]
        rep["reach_modules"] = sum(isinstance(o, nn.Module) for o in reach)
        rep["reach_params"] = sum(isinstance(o, nn.Parameter) for o in reach)
        blobs = [b for o in reach if isinstance(o, torch.Tensor) for b in [_storage_bytes(o)] if b]
        rep["reach_tensors"] = len(blobs)
        rep["reach_weight_hits"] = sum(p in b for b in blobs for p in self.patterns)
        # everything in this process
        t0 = time.perf_counter()
        gc.collect()
        seen, hits = set(), 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() on torch's deprecated lazy attributes warns
            tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        for o in tensors:
            try:
                key = (o.untyped_storage().data_ptr(), o.untyped_storage().nbytes())
            except Exception:
                continue
            if key not in seen:
                seen.add(key)
                b = _storage_bytes(o)
                hits += sum(p in b for p in self.patterns) if b else 0
        rep["process_weight_hits"] = hits
        rep["process_storages"] = len(seen)
        rep["scan_seconds"] = time.perf_counter() - t0
        # the server's memory through the OS
        denied = []
        for pid in _children_pids():
            try:
                with open(f"/proc/{pid}/maps") as fh:
                    start = int(fh.readline().split("-")[0], 16)
                with open(f"/proc/{pid}/mem", "rb") as fh:
                    fh.seek(start)
                    fh.read(16)
                denied.append(False)
            except (PermissionError, OSError):
                denied.append(True)
        rep["proc_mem_denied"] = denied
        rep["remaining"] = apis[0].remaining_budget
        self.report_ = rep
        return context.make_backbone()


class Killer(Method):
    """Waits in the middle of fit until the test has killed the API server, then records how fast its
    next query fails (in ``signal_dir``: a method's process cannot see the server, the harness can)."""

    name = "killer"
    access = frozenset({"blackbox"})
    signal_dir: str = ""

    def fit(self, context):
        api = context.apis()[0]
        assert api.query(torch.rand(3, *context.image_shape)).shape[0] == 3
        open(os.path.join(self.signal_dir, "ready"), "w").close()
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(self.signal_dir, "killed")) and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.perf_counter()
        try:
            api.query(torch.rand(3, *context.image_shape))
        finally:
            with open(os.path.join(self.signal_dir, "seconds"), "w") as fh:
                fh.write(str(time.perf_counter() - t0))
        return context.make_backbone()


def _kill_server_when_ready(signal_dir: str, spare: set, log: dict) -> None:
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(signal_dir, "ready")) and time.time() < deadline:
        time.sleep(0.05)
    victims = [p for p in multiprocessing.active_children() if p.name.startswith(SERVER_NAME) and p.pid not in spare]
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
    log["victims"] = len(victims)
    open(os.path.join(signal_dir, "killed"), "w").close()


def test_hostile_method_finds_nothing_and_killed_server_fails_cleanly(zoo, served, tmp_path):
    import tempfile

    patterns = [p.hex() for p in _patterns(zoo)]
    signal_dir = tempfile.mkdtemp(prefix="dfml-killer-")
    os.chmod(signal_dir, 0o777)  # the fit process (another user when root) signals through it
    log: dict = {}
    killer = threading.Thread(target=_kill_server_when_ready,
                              args=(signal_dir, {p.pid for p in multiprocessing.active_children()}, log), daemon=True)
    killer.start()
    register("dfml_bench.methods", "probe", Probe)
    register("dfml_bench.methods", "killer", Killer)
    try:
        base = toy_suite()
        suite = Suite(name="toy-boundary", scale="cpu", scenarios=base.scenarios, methods=["killer", "probe"], seeds=[0])
        t0 = time.perf_counter()
        opts = RunOptions(out=tmp_path, progress=False, method_params={"probe": {"patterns": patterns}, "killer": {"signal_dir": signal_dir}})
        records = {(r.key.scenario, r.key.method): r for r in run_suite(suite, opts=opts)}
        wall = time.perf_counter() - t0
    finally:
        unregister("dfml_bench.methods", "probe")
        unregister("dfml_bench.methods", "killer")

    # white-box stays white-box: the models are in the fit process (the positive control of every probe below)
    wb = records[("wb", "probe")].extra
    assert records[("wb", "probe")].status == "ok" and wb["whitebox"] == "granted" and wb["api_type"] == "InProcessAPI"
    assert wb["reach_modules"] > 0 and wb["process_weight_hits"] > 0
    assert records[("wb", "killer")].status == "skipped"

    # killed server: a clean failure naming the signal, within seconds; the suite went on
    kill = records[("bb", "killer")]
    assert kill.status == "failed" and "APIServerDied" in kill.error and "signal 9" in kill.error, kill.error
    assert log["victims"] == 1 and float(open(os.path.join(signal_dir, "seconds")).read()) < 5.0
    probe = records[("bb", "probe")]
    assert probe.status == "ok", probe.error

    # black-box: nothing of the model can be reached
    bb = probe.extra
    assert bb["api_type"] == "ServedAPI" and bb["whitebox"] == "AccessError"
    assert not bb["has_dict"] and not bb["settable"] and bb["pickled"] == 0
    assert bb["reach_modules"] == 0 and bb["reach_params"] == 0
    assert bb["reach_tensors"] >= 2 and bb["reach_weight_hits"] == 0  # the shared I/O buffers hold no weight
    assert bb["process_weight_hits"] == 0 and bb["process_storages"] > 10
    assert bb["proc_mem_denied"] == [] or all(bb["proc_mem_denied"])  # the fit process has no children to read
    # the record holds the server's exact counts
    assert probe.queries["per_api"] == [7, 5, 0] and probe.queries["total"] == 12
    assert bb["remaining"] == 10_000 - 12
    assert wall < 180
