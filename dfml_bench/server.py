"""Black-box APIs behind a real process boundary (DESIGN.md, "Access").

:func:`serve_zoo` starts ONE server process for a zoo (``torch.multiprocessing``, spawn context). The
server loads every model itself from the zoo's files (sha256-verified; it is given file paths and
architecture specs, never modules), keeps them on the GPU when the device is CUDA, and is the only
process that ever holds the weights. The method's side gets :class:`ServedAPI` clients whose only
operations are ``query(images) -> outputs`` and read-only metadata (``info``, ``remaining_budget``).

The wire, and why it is safe and cheap:

- The server allocates two shared-memory byte buffers (input and output) and hands them to the
  harness once (and again whenever a larger query needs larger buffers). A query copies the images
  into the input buffer and sends a small JSON header ``{api, dtype, shape}``; the server views the
  bytes, validates them (:func:`~dfml_bench.access.validate_query`), charges the budget, runs the
  model, writes the outputs into the output buffer and answers with a small header. No tensor is
  pickled per query, so the boundary costs two memcpys and a pipe round trip.
- The server never unpickles anything the client sends (requests are JSON bytes read with a size
  limit), so a hostile method cannot smuggle code into the server. The shared buffers only ever hold
  query images and outputs, which the method knows anyway.
- Budgets are counted on the server, per API and in total, exactly (queries are serialised through one
  pipe). A query that would exceed a budget is refused whole with :class:`BudgetExhausted`; a malformed
  one with :class:`QueryError`; neither is charged, and a query whose forward pass fails (e.g. out of
  memory) is refunded. Every reply carries the server's counts, which the client copies into the
  harness's :class:`QueryMeter` so that the result record holds them.
- The client waits for replies while watching the server's liveness (its process sentinel), so a
  server that dies (killed, out of memory) raises :class:`APIServerDied` naming the exit code within
  a second instead of hanging.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as _mp_wait
from typing import Callable

import torch

from .access import APIInfo, BlackBoxAPI, BudgetExhausted, QueryError, QueryMeter, TopK, format_outputs, validate_query
from .backbones import BackboneSpec, build_backbone

SERVER_NAME = "dfml-bench-api-server"
_MAX_REQUEST_BYTES = 1 << 16  # a request is a small JSON header; anything larger is malformed
_ALIGN = 64  # byte alignment of output parts inside the output buffer
_INITIAL_IMAGES = 256  # initial buffer capacity, in float32 images (grown on demand)

# dtypes a client may send (validation then refuses the non-floating ones with a clear message)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}


class APIServerDied(RuntimeError):
    """The black-box API server is gone (killed, out of memory, crashed, or shut down)."""


class APIServerError(RuntimeError):
    """The server failed to answer a well-formed query (e.g. out of memory); nothing was charged."""


# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelFile:
    """What the server needs to rebuild one zoo model: its file, checksum and architecture."""

    index: int
    path: str
    sha256: str
    backbone: BackboneSpec
    num_classes: int


@dataclass(frozen=True)
class ServerSpec:
    """Everything the server process is started with (plain data: no module, no tensor)."""

    models: tuple[ModelFile, ...]
    infos: tuple[APIInfo, ...]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str
    threads: int
    total_budget: int | None
    per_api_budget: int | None
    used: tuple[int, ...]


def server_spec(zoo, infos: list[APIInfo], meter: QueryMeter, device: str | torch.device, threads: int | None = None) -> ServerSpec:
    """The :class:`ServerSpec` of a zoo (built like ``Zoo.load_model``: ``build_backbone`` of the
    entry's architecture, the zoo's ``ways`` outputs, the dataset's image shape and mean/std)."""
    ds = zoo.dataset
    models = tuple(
        ModelFile(i, str(zoo.path / e.file), e.sha256, zoo.spec.backbone_for(i), zoo.spec.ways)
        for i, e in enumerate(zoo.entries)
    )
    if len(infos) != len(models):
        raise ValueError(f"serve_zoo got {len(infos)} APIInfo for a zoo of {len(models)} models")
    return ServerSpec(models, tuple(infos), tuple(ds.image_shape), tuple(ds.mean), tuple(ds.std), str(torch.device(device)),
                      int(threads or torch.get_num_threads()), meter.total_budget, meter.per_api_budget, tuple(meter.used))


# ----------------------------------------------------------------------------------------- server side


def _harden() -> None:
    """Make the server's memory unreadable to other processes of the same user (/proc/<pid>/mem,
    ptrace) where the OS allows it. Root can still read it: run untrusted methods as another user."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
        except Exception:
            pass


def _load_models(spec: ServerSpec, device: torch.device) -> list[torch.nn.Module]:
    from .utils import sha256_file
    from .zoo import ZooCorrupted

    models = []
    for m in spec.models:
        if sha256_file(m.path) != m.sha256:
            raise ZooCorrupted(f"{m.path} does not match its manifest sha256; run `dfml-bench zoo build` to rebuild it")
        model = build_backbone(m.backbone, m.num_classes, spec.image_shape, spec.mean, spec.std, track_running_stats=True)
        state = torch.load(m.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
        models.append(model.to(device).eval())
    return models


def _out_bytes(n_images: int, infos: tuple[APIInfo, ...]) -> int:
    """Output-buffer size for ``n_images`` (largest of logits/probs [n,K] f32, topk f32+i64, label i64)."""
    k = max(i.num_classes for i in infos)
    return n_images * k * 12 + 4 * _ALIGN


def _buffers(in_bytes: int, n_images: int, infos: tuple[APIInfo, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh shared I/O buffers, ZEROED: ``torch.empty`` would hand the client recycled heap memory of
    the server, which can hold bytes of the weights (the leak test caught exactly that)."""
    return (torch.zeros(in_bytes, dtype=torch.uint8).share_memory_(),
            torch.zeros(_out_bytes(n_images, infos), dtype=torch.uint8).share_memory_())


def _parse_query(req: dict, spec: ServerSpec, in_buf: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The (api, images) a query header designates in the input buffer; :class:`QueryError` if malformed."""
    api, dtype, shape = req.get("api"), req.get("dtype"), req.get("shape")
    if not isinstance(api, int) or isinstance(api, bool) or not 0 <= api < len(spec.infos):
        raise QueryError(f"unknown API index {api!r}")
    if dtype not in _DTYPES:
        raise QueryError(f"query images have an unsupported dtype {dtype!r}; send float32 images in [0, 1]")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise QueryError(f"malformed query shape {shape!r}")
    dt = _DTYPES[dtype]
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes > in_buf.numel():
        raise QueryError(f"query of shape {shape} ({nbytes} bytes) does not fit the shared buffer ({in_buf.numel()} bytes)")
    return api, in_buf[:nbytes].view(dt).view(shape)


def _write_outputs(out, out_buf: torch.Tensor) -> list:
    parts = list(out) if isinstance(out, TopK) else [out]
    meta, off = [], 0
    for t in parts:
        t = t.contiguous()
        nb = t.numel() * t.element_size()
        if off + nb > out_buf.numel():
            raise APIServerError(f"outputs ({off + nb} bytes) exceed the output buffer ({out_buf.numel()} bytes)")
        out_buf[off : off + nb].view(t.dtype).copy_(t.reshape(-1))
        meta.append((str(t.dtype).removeprefix("torch."), list(t.shape), off))
        off += -(-nb // _ALIGN) * _ALIGN
    return meta


def _error(exc: BaseException) -> dict:
    msg = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, BudgetExhausted):
        msg.update(requested=exc.requested, used=exc.used, budget=exc.budget, scope=exc.scope)
    return msg


def _serve(conn, spec: ServerSpec) -> None:
    """The server's main loop (runs in the spawned process)."""
    _harden()
    torch.set_num_threads(max(1, spec.threads))
    device = torch.device(spec.device)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        models = _load_models(spec, device)
        meter = QueryMeter(len(models), total_budget=spec.total_budget, per_api_budget=spec.per_api_budget)
        meter.used = list(spec.used)
        c, h, w = spec.image_shape
        n_images = _INITIAL_IMAGES
        in_buf, out_buf = _buffers(n_images * c * h * w * 4, n_images, spec.infos)
    except Exception as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
        conn.close()
        return
    conn.send(("ready", in_buf, out_buf, _INITIAL_IMAGES))
    infos = spec.infos
    while True:
        try:
            raw = conn.recv_bytes(_MAX_REQUEST_BYTES)
        except (EOFError, OSError):
            return  # the harness is gone
        try:
            req = json.loads(raw)
            op = req.get("op") if isinstance(req, dict) else None
        except Exception:  # not JSON, too deeply nested, ...: refused below, the server stays up
            req, op = {}, None
        if op == "query":
            charged = None
            try:
                api, x = _parse_query(req, spec, in_buf)
                validate_query(x, infos[api])
                meter.charge(api, x.shape[0])
                charged = (api, x.shape[0])
                with torch.inference_mode():
                    logits = models[api](x.to(device, dtype=torch.float32))
                    out = format_outputs(logits, infos[api].output_kind, infos[api].topk)
                    parts = _write_outputs(out, out_buf)
                conn.send({"ok": True, "parts": parts, "counts": meter.used})
            except (QueryError, BudgetExhausted) as exc:
                conn.send(_error(exc))
            except Exception as exc:  # the model failed (e.g. out of memory): refund, report, stay up
                if charged is not None:
                    meter.used[charged[0]] -= charged[1]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                conn.send({"ok": False, "error": "APIServerError", "message": f"{type(exc).__name__}: {exc}"})
        elif op == "grow":
            n, nbytes = req.get("images"), req.get("bytes")
            limit = max(i.max_batch for i in infos)
            c, h, w = spec.image_shape
            if not (isinstance(n, int) and isinstance(nbytes, int) and 0 < n <= limit and 0 < nbytes <= limit * c * h * w * 16):
                conn.send(_error(QueryError(f"buffer request of {n} images / {nbytes} bytes exceeds the API limits")))
                continue
            # grow geometrically (within the limits) so a slowly rising batch size does not regrow every time
            n = max(n, min(2 * n_images, limit))
            nbytes = max(nbytes, min(2 * in_buf.numel(), limit * c * h * w * 4))
            try:
                in_buf, out_buf = _buffers(nbytes, n, infos)
            except Exception as exc:
                conn.send({"ok": False, "error": "APIServerError", "message": f"{type(exc).__name__}: {exc}"})
                continue
            n_images = n
            conn.send({"ok": True, "buffers": (in_buf, out_buf), "images": n})
        elif op == "counts":
            conn.send({"ok": True, "counts": meter.used})
        elif op == "stop":
            conn.send({"ok": True, "counts": meter.used})
            conn.close()
            return
        else:
            conn.send(_error(QueryError(f"malformed request (op {op!r}); valid ops: query, grow, counts, stop")))


def _server_main(conn, spec: ServerSpec) -> None:
    try:
        _serve(conn, spec)
    except Exception:  # pragma: no cover - last resort: say why before dying
        traceback.print_exc()
        raise


# ----------------------------------------------------------------------------------------- client side


class _Channel:
    """The harness's end of the server: a pipe, the shared I/O buffers and the server's liveness.
    Holds no model and no parameter; one lock serialises queries (the server answers one at a time)."""

    __slots__ = ("_conn", "_proc", "_lock", "_in", "_out", "_in_images", "_meter", "_device", "_closed", "_timeout")

    def __init__(self, conn, proc, in_buf, out_buf, meter: QueryMeter, device: torch.device, timeout: float):
        self._conn, self._proc, self._lock = conn, proc, threading.Lock()
        self._in, self._out = in_buf, out_buf
        self._in_images = 0  # output capacity of the buffers, in images (the server says)
        self._meter, self._device, self._closed, self._timeout = meter, device, None, timeout

    def _died(self) -> APIServerDied:
        if self._closed is not None:
            return APIServerDied(f"the black-box API server was {self._closed}; no more queries can be answered")
        self._proc.join(timeout=2.0)
        code = self._proc.exitcode
        how = (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        self._closed = f"found dead ({how})"
        hint = {-9: " (signal 9 is usually the out-of-memory killer or an explicit kill)",
                -7: " (signal 7, bus error, usually means /dev/shm is too small for the shared query buffers; "
                    "e.g. run docker with --shm-size=2g)"}.get(code, "")
        return APIServerDied(f"the black-box API server died ({how}){hint}; the query was not answered")

    def _reply(self, timeout: float):
        """Wait for the server's answer, checking every second that it is still alive."""
        deadline = time.monotonic() + timeout
        sentinel = self._proc.sentinel
        while True:
            ready = _mp_wait([self._conn, sentinel], timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if self._conn in ready:
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    raise self._died() from None
            if sentinel in ready or not self._proc.is_alive():
                raise self._died()
            if time.monotonic() >= deadline:
                raise APIServerDied(f"the black-box API server did not answer within {timeout:.0f} s (alive but stuck)")

    def _call(self, req: dict, timeout: float | None = None) -> dict:
        if self._closed is not None:
            raise self._died()
        try:
            self._conn.send_bytes(json.dumps(req).encode())
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise self._died() from None
        try:
            reply = self._reply(self._timeout if timeout is None else timeout)
        except APIServerDied:
            raise
        except BaseException:  # e.g. Ctrl-C while waiting: the pending reply would answer the next request
            self._closed = "left out of step by an interrupted query"
            raise
        if "counts" in reply:
            self._meter.used[:] = reply["counts"]  # the server's counts are the truth
        if reply.get("ok"):
            return reply
        err, msg = reply.get("error"), reply.get("message", "")
        if err == "BudgetExhausted":
            raise BudgetExhausted(msg, requested=reply["requested"], used=reply["used"], budget=reply["budget"], scope=reply["scope"])
        if err == "QueryError":
            raise QueryError(msg)
        raise APIServerError(msg)

    def query(self, api: int, images: torch.Tensor):
        images = images.detach()
        n = images.shape[0]
        nbytes = images.numel() * images.element_size()
        with self._lock:
            if nbytes > self._in.numel() or n > self._in_images:
                reply = self._call({"op": "grow", "images": max(n, self._in_images), "bytes": max(nbytes, self._in.numel())})
                self._in, self._out = reply["buffers"]
                self._in_images = reply["images"]
            self._in[:nbytes].view(images.dtype).view(images.shape).copy_(images)
            reply = self._call({"op": "query", "api": api, "dtype": str(images.dtype).removeprefix("torch."), "shape": list(images.shape)})
            parts = [self._out[off : off + math.prod(shape) * _DTYPES[dt].itemsize].view(_DTYPES[dt]).view(shape).to(self._device, copy=True)
                     for dt, shape, off in reply["parts"]]
        return TopK(*parts) if len(parts) == 2 else parts[0]

    def counts(self) -> list[int]:
        with self._lock:
            return list(self._call({"op": "counts"})["counts"])

    def close(self, timeout: float = 10.0) -> None:
        """Sync the final counts into the meter, stop the server, reap it. Idempotent; never hangs."""
        got = self._lock.acquire(timeout=timeout)
        try:
            if self._closed is None and self._proc.is_alive():
                try:
                    self._call({"op": "stop"}, timeout=timeout)
                except Exception:
                    pass
            if self._closed is None:
                self._closed = "shut down by the harness"
        finally:
            if got:
                self._lock.release()
        try:
            self._conn.close()  # a server still waiting for requests sees EOF and exits
        except OSError:
            pass
        self._proc.join(timeout=timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=timeout)

    def __reduce__(self):
        raise TypeError("a black-box API channel cannot be pickled")


class ServedAPI(BlackBoxAPI):
    """A method's handle on one black-box API served by the zoo's server process.

    It holds the API's metadata and the channel to the server, nothing else: the model and its
    parameters exist only in the server process. Cannot be pickled or copied.
    """

    __slots__ = ("_info", "_channel")

    def __init__(self, info: APIInfo, channel: _Channel):
        self._info = info
        self._channel = channel

    @property
    def info(self) -> APIInfo:
        return self._info

    def query(self, images: torch.Tensor):
        """Answer a batch of unnormalised [0, 1] images of shape [B, *info.input_shape]; every image
        is charged against the budget (on the server). Raises :class:`QueryError` for a malformed
        batch and :class:`BudgetExhausted` past a budget (neither is charged), :class:`APIServerDied`
        if the server is gone."""
        info = self._info
        if not isinstance(images, torch.Tensor):
            raise QueryError(f"query expects a torch.Tensor of images, got {type(images).__name__}")
        # cheap checks before anything crosses the boundary (the server validates everything again)
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(info.input_shape):
            raise QueryError(f"query expects images of shape [B, {', '.join(map(str, info.input_shape))}], got {list(images.shape)}")
        if images.shape[0] == 0:
            raise QueryError("query got an empty batch (0 images)")
        if images.shape[0] > info.max_batch:
            raise QueryError(f"query batch of {images.shape[0]} images exceeds this API's maximum of {info.max_batch}; split it")
        if str(images.dtype).removeprefix("torch.") not in _DTYPES:
            raise QueryError(f"query expects floating-point images in [0, 1], got dtype {images.dtype}")
        return self._channel.query(info.index, images)

    @property
    def remaining_budget(self) -> float:
        """Images this API may still answer (per-API and total budgets), as counted by the server."""
        used = self._channel.counts()
        i = self._info.index
        tb, pb = self._channel._meter.total_budget, self._channel._meter.per_api_budget
        left = math.inf if tb is None else tb - sum(used)
        if pb is not None:
            left = min(left, pb - used[i])
        return left

    def __reduce__(self):
        raise TypeError("a black-box API handle cannot be pickled")

    def __reduce_ex__(self, protocol):
        raise TypeError("a black-box API handle cannot be pickled")

    def __copy__(self):
        raise TypeError("a black-box API handle cannot be copied")

    def __deepcopy__(self, memo):
        raise TypeError("a black-box API handle cannot be copied")

    def __repr__(self) -> str:
        return f"ServedAPI(index={self._info.index}, classes={self._info.num_classes}, output={self._info.output_kind})"


# ---------------------------------------------------------------------------------------------- start


def serve_zoo(zoo, infos: list[APIInfo], meter: QueryMeter, device: str | torch.device = "cpu", *,
              threads: int | None = None, query_timeout: float = 3600.0,
              start_timeout: float = 600.0) -> tuple[list[ServedAPI], Callable[[], None]]:
    """Start the zoo's API server and return ``(apis, closer)``.

    ``apis[i]`` answers with zoo model ``i`` as ``infos[i]`` says (output kind, top-k, limits); budgets
    are those of ``meter``, counted by the server, and ``meter.used`` follows the server's counts.
    ``closer()`` syncs the final counts into ``meter`` and stops the server (idempotent).
    ``threads``: torch threads of the server (default: this process's). ``query_timeout``: a server
    alive but silent that long is given up on.
    """
    import torch.multiprocessing as tmp

    device = torch.device(device)
    spec = server_spec(zoo, infos, meter, device, threads)
    ctx = tmp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_server_main, args=(child, spec), name=f"{SERVER_NAME}-{zoo.hash[:8]}", daemon=True)
    proc.start()
    child.close()
    channel = _Channel(parent, proc, None, None, meter, device, query_timeout)
    try:
        msg = channel._reply(start_timeout)
    except BaseException:
        channel.close(timeout=2.0)
        raise
    if msg[0] != "ready":
        _, kind, text = msg
        channel.close(timeout=5.0)
        if kind == "ZooCorrupted":
            from .zoo import ZooCorrupted

            raise ZooCorrupted(text)
        raise APIServerDied(f"the black-box API server failed to start: {kind}: {text}")
    channel._in, channel._out, channel._in_images = msg[1], msg[2], msg[3]
    apis = [ServedAPI(info, channel) for info in infos]
    return apis, channel.close
