"""Black-box APIs behind a real process boundary (DESIGN.md, "Access").

:func:`start_server` starts ONE server process for a zoo (``torch.multiprocessing``, spawn context). The
server loads every model itself from the zoo's files (sha256-verified; it is given file paths and
architecture specs, never modules), keeps them on the GPU when the device is CUDA, and is the only
process that ever holds the weights. It has two ends:

- the **control pipe**, held by the harness: the server's counts and ``stop``; a method never has it;
- the **method endpoint**: a Unix socket plus two shared-memory buffers (``memfd``), all plain file
  descriptors, so they can be handed to a method's process running as another, unprivileged user
  (:mod:`dfml_bench.isolation`) or used in this process (:func:`serve_zoo`). A client
  (:class:`ServedAPI`) can only ``query(images) -> outputs`` and read metadata.

The wire, and why it is safe and cheap:

- A query copies the images into the input buffer and sends a small JSON header ``{api, dtype, shape}``
  framed by a 4-byte length. The server views the bytes, validates them
  (:func:`~dfml_bench.access.validate_query`), charges the budget, runs the model (in chunks of
  :data:`FORWARD_CHUNK` images, so memory stays bounded), writes the outputs into the output buffer and
  answers with a small JSON header. No tensor is pickled per query.
- The server never unpickles anything from the method endpoint: requests are JSON read with a size
  limit (:data:`MAX_REQUEST_BYTES`); a larger frame is read off and discarded and answered with an
  error, so an oversized request cannot kill the server. Batches above the API's ``max_batch`` are
  refused with :class:`QueryError` (split them); the buffers are allocated once for ``max_batch`` images
  and never grow, so no query can make the server's memory grow without bound.
- Budgets are counted on the server, per API and in total, exactly (requests are served one at a
  time). A query that would exceed a budget is refused whole with :class:`BudgetExhausted`; a malformed
  one with :class:`QueryError`; neither is charged, and a query whose forward pass fails (e.g. out of
  memory) is refunded. The record's counts are read by the harness over the control pipe, never from
  anything the method's process can touch.
- A client in the harness watches the server's liveness (its process sentinel), so a server that dies
  raises :class:`APIServerDied` naming the exit code within a second; a client in another process sees
  the socket close.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import select
import socket
import struct
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
MAX_REQUEST_BYTES = 1 << 16  # a request is a small JSON header; a larger frame is refused (and discarded)
_MAX_REQUEST_BYTES = MAX_REQUEST_BYTES  # old name
FORWARD_CHUNK = 512  # images per forward pass inside the server: bounds activation memory
BODY_TIMEOUT = 30.0  # seconds a client may take to send the body of a frame whose header it sent
_ALIGN = 64  # byte alignment of output parts inside the output buffer
_HEADER = struct.Struct(">I")

# dtypes a client may send (validation then refuses the non-floating ones with a clear message)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}
_MAX_ITEMSIZE = 8  # float64: the widest dtype validation accepts, so the input buffer is sized for it


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


def buffer_sizes(infos: tuple[APIInfo, ...] | list[APIInfo]) -> tuple[int, int]:
    """(input, output) buffer bytes for the largest batch any of ``infos`` accepts."""
    n = max(i.max_batch for i in infos)
    c, h, w = infos[0].input_shape
    k = max(i.num_classes for i in infos)
    return n * c * h * w * _MAX_ITEMSIZE, n * k * 12 + 4 * _ALIGN  # outputs: topk f32+i64 is the widest


# ------------------------------------------------------------------------------------- shared buffers


def _memfd(nbytes: int, name: str) -> int:
    """An anonymous, zero-filled shared-memory file of ``nbytes`` (pages are allocated when touched)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, max(1, nbytes))
    return fd


def _map(fd: int, nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    mm = mmap.mmap(fd, max(1, nbytes), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mm, torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)


class _Fd:
    """A file descriptor that travels to a spawned process (duplicated into it at start)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _rebuild_fd, (DupFd(self.fd),)


def _rebuild_fd(dup) -> int:
    return dup.detach()


# --------------------------------------------------------------------------------------------- the wire


class _Wire:
    """Length-framed JSON messages over a stream socket, with a size limit on what is read."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def _exact(self, n: int, timeout: float | None) -> bytes:
        self.sock.settimeout(timeout)
        try:
            chunks, got = [], 0
            while got < n:
                b = self.sock.recv(min(n - got, 1 << 20))
                if not b:
                    raise EOFError("connection closed")
                chunks.append(b)
                got += len(b)
            return b"".join(chunks)
        finally:
            self.sock.settimeout(None)

    def recv(self, limit: int = MAX_REQUEST_BYTES, timeout: float | None = None) -> bytes | int:
        """The next frame's bytes; for a frame over ``limit``, its size (the body is read and dropped)."""
        (n,) = _HEADER.unpack(self._exact(_HEADER.size, timeout))
        if n > limit:
            left = n
            while left:
                left -= len(self._exact(min(left, 1 << 20), BODY_TIMEOUT))
            return n
        return self._exact(n, BODY_TIMEOUT)


# ----------------------------------------------------------------------------------------- server side


def _harden() -> None:
    """Make the server's memory unreadable to other processes of the same user (/proc/<pid>/mem,
    ptrace) where the OS allows it. Root can still read it: untrusted methods run as another user."""
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


def _parse_query(req: dict, spec: ServerSpec, in_buf: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The (api, images) a query header designates in the input buffer; :class:`QueryError` if malformed."""
    api, dtype, shape = req.get("api"), req.get("dtype"), req.get("shape")
    if not isinstance(api, int) or isinstance(api, bool) or not 0 <= api < len(spec.infos):
        raise QueryError(f"unknown API index {api!r}")
    if dtype not in _DTYPES:
        raise QueryError(f"query images have an unsupported dtype {dtype!r}; send float32 images in [0, 1]")
    if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise QueryError(f"malformed query shape {shape!r}")
    if shape and shape[0] > spec.infos[api].max_batch:
        raise QueryError(f"query batch of {shape[0]} images exceeds this API's maximum of {spec.infos[api].max_batch}; split it")
    dt = _DTYPES[dtype]
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes > in_buf.numel():
        raise QueryError(f"query of shape {shape} ({nbytes} bytes) does not fit the shared buffer ({in_buf.numel()} bytes)")
    return api, in_buf[:nbytes].view(dt).view(shape)


def _forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits of ``x`` in chunks of :data:`FORWARD_CHUNK` images (bounded activation memory)."""
    outs = [model(x[s : s + FORWARD_CHUNK].to(device, dtype=torch.float32)) for s in range(0, x.shape[0], FORWARD_CHUNK)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _write_outputs(out, out_buf: torch.Tensor) -> list:
    parts = list(out) if isinstance(out, TopK) else [out]
    meta, off = [], 0
    for t in parts:
        t = t.contiguous().cpu()
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


def _answer(raw: bytes | int, spec: ServerSpec, models, meter: QueryMeter, in_buf, out_buf, device) -> dict:
    """The reply to one request from the method endpoint."""
    if isinstance(raw, int):
        return _error(QueryError(f"malformed request: a request frame of {raw} bytes exceeds the limit of "
                                 f"{MAX_REQUEST_BYTES} bytes (images go through the shared buffer, not the request)"))
    try:
        req = json.loads(raw)
        op = req.get("op") if isinstance(req, dict) else None
    except Exception:  # not JSON, too deeply nested, ...: refused below, the server stays up
        req, op = {}, None
    if op == "counts":
        return {"ok": True, "counts": meter.used}
    if op != "query":
        return _error(QueryError(f"malformed request (op {op!r}); valid ops: query, counts"))
    charged = None
    try:
        api, x = _parse_query(req, spec, in_buf)
        validate_query(x, spec.infos[api])
        meter.charge(api, x.shape[0])
        charged = (api, x.shape[0])
        with torch.inference_mode():
            logits = _forward(models[api], x, device)
            out = format_outputs(logits, spec.infos[api].output_kind, spec.infos[api].topk)
            parts = _write_outputs(out, out_buf)
        return {"ok": True, "parts": parts, "counts": meter.used}
    except (QueryError, BudgetExhausted) as exc:
        return _error(exc)
    except Exception as exc:  # the model failed (e.g. out of memory): refund, report, stay up
        if charged is not None:
            meter.used[charged[0]] -= charged[1]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"ok": False, "error": "APIServerError", "message": f"{type(exc).__name__}: {exc}"}


def _serve(ctrl, msock: socket.socket, in_fd: int, out_fd: int, spec: ServerSpec) -> None:
    """The server's main loop (runs in the spawned process): control pipe and method endpoint."""
    _harden()
    torch.set_num_threads(max(1, spec.threads))
    device = torch.device(spec.device)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        models = _load_models(spec, device)
        meter = QueryMeter(len(models), total_budget=spec.total_budget, per_api_budget=spec.per_api_budget)
        meter.used = list(spec.used)
        in_bytes, out_bytes = buffer_sizes(spec.infos)
        _, in_buf = _map(in_fd, in_bytes)
        _, out_buf = _map(out_fd, out_bytes)
        os.close(in_fd)
        os.close(out_fd)
    except Exception as exc:
        ctrl.send(("error", type(exc).__name__, str(exc)))
        ctrl.close()
        return
    ctrl.send(("ready",))
    wire = _Wire(msock)
    while True:
        ready = _mp_wait([ctrl] + ([msock] if wire is not None else []))
        if ctrl in ready:
            try:
                op = ctrl.recv()
            except (EOFError, OSError):
                return  # the harness is gone
            if op == "counts":
                ctrl.send({"ok": True, "counts": list(meter.used)})
            elif op == "stop":
                ctrl.send({"ok": True, "counts": list(meter.used)})
                ctrl.close()
                return
            else:
                ctrl.send({"ok": False, "error": "QueryError", "message": f"unknown control op {op!r}"})
        if wire is not None and msock in ready:
            try:
                raw = wire.recv(MAX_REQUEST_BYTES)
                wire.send(_answer(raw, spec, models, meter, in_buf, out_buf, device))
            except (EOFError, OSError, socket.timeout):  # the method's process is gone or stalled mid-frame
                try:
                    msock.close()
                except OSError:
                    pass
                wire = None


def _server_main(ctrl, msock, in_fd, out_fd, spec: ServerSpec) -> None:
    try:
        _serve(ctrl, msock, in_fd, out_fd, spec)
    except Exception:  # pragma: no cover - last resort: say why before dying
        traceback.print_exc()
        raise


# ----------------------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class Endpoint:
    """The method end of a server: plain file descriptors and sizes, valid in whichever process holds
    them (passed to a method's process with ``pass_fds``)."""

    sock_fd: int
    in_fd: int
    out_fd: int
    infos: tuple[APIInfo, ...]
    total_budget: int | None
    per_api_budget: int | None

    @property
    def fds(self) -> tuple[int, int, int]:
        return (self.sock_fd, self.in_fd, self.out_fd)


class _Channel:
    """A client's end of the server: the socket, the shared I/O buffers and (in the harness) the
    server's liveness. Holds no model and no parameter; one lock serialises queries."""

    __slots__ = ("_wire", "_proc", "_lock", "_in", "_out", "_maps", "_meter", "_device", "_closed", "_timeout")

    def __init__(self, endpoint: Endpoint, meter: QueryMeter, device: torch.device, timeout: float, proc=None):
        in_bytes, out_bytes = buffer_sizes(endpoint.infos)
        m_in, self._in = _map(endpoint.in_fd, in_bytes)
        m_out, self._out = _map(endpoint.out_fd, out_bytes)
        self._maps = (m_in, m_out)
        for fd in (endpoint.in_fd, endpoint.out_fd):  # the mappings keep the memory; the fds are not needed
            os.close(fd)
        self._wire = _Wire(socket.socket(fileno=endpoint.sock_fd))
        self._proc, self._lock = proc, threading.Lock()
        self._meter, self._device, self._closed, self._timeout = meter, device, None, timeout

    def _died(self) -> APIServerDied:
        if self._closed is not None:
            return APIServerDied(f"the black-box API server was {self._closed}; no more queries can be answered")
        if self._proc is None:
            self._closed = "found closed"
            return APIServerDied("the black-box API server closed the connection (it died or was shut down); "
                                 "the query was not answered")
        self._proc.join(timeout=2.0)
        code = self._proc.exitcode
        how = (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        self._closed = f"found dead ({how})"
        return APIServerDied(f"the black-box API server died ({how}){death_hint(code)}; the query was not answered")

    def _reply(self, timeout: float) -> dict:
        """Wait for the server's answer, checking every second that it is still alive."""
        deadline = time.monotonic() + timeout
        sock = self._wire.sock
        while True:
            waits = [sock] + ([self._proc.sentinel] if self._proc is not None else [])
            ready, _, _ = select.select(waits, [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            if sock in ready:
                try:
                    raw = self._wire.recv(1 << 24, timeout=BODY_TIMEOUT)
                    return json.loads(raw)
                except (EOFError, OSError, ValueError):
                    raise self._died() from None
            if self._proc is not None and (ready or not self._proc.is_alive()):
                raise self._died()
            if time.monotonic() >= deadline:
                raise APIServerDied(f"the black-box API server did not answer within {timeout:.0f} s (alive but stuck)")

    def _call(self, req: dict | bytes, timeout: float | None = None) -> dict:
        if self._closed is not None:
            raise self._died()
        try:
            if isinstance(req, bytes):
                self._wire.send_raw(req)
            else:
                self._wire.send(req)
        except OSError:
            raise self._died() from None
        try:
            reply = self._reply(self._timeout if timeout is None else timeout)
        except APIServerDied:
            raise
        except BaseException:  # e.g. Ctrl-C while waiting: the pending reply would answer the next request
            self._closed = "left out of step by an interrupted query"
            raise
        if isinstance(reply.get("counts"), list):
            self._meter.used[:] = reply["counts"]  # mirror of the server's counts (the record reads the server)
        if reply.get("ok"):
            return reply
        err, msg = reply.get("error"), reply.get("message", "")
        if err == "BudgetExhausted":
            raise BudgetExhausted(msg, requested=reply["requested"], used=reply["used"], budget=reply["budget"], scope=reply["scope"])
        if err == "QueryError":
            raise QueryError(msg)
        raise APIServerError(msg)

    def query(self, api: int, images: torch.Tensor):
        images = images.detach().contiguous()
        nbytes = images.numel() * images.element_size()
        with self._lock:
            if nbytes > self._in.numel():
                raise QueryError(f"query of {list(images.shape)} ({nbytes} bytes) exceeds the API's input buffer "
                                 f"({self._in.numel()} bytes); split it")
            self._in[:nbytes].view(images.dtype).view(images.shape).copy_(images.cpu())
            reply = self._call({"op": "query", "api": api, "dtype": str(images.dtype).removeprefix("torch."), "shape": list(images.shape)})
            parts = [self._out[off : off + math.prod(shape) * _DTYPES[dt].itemsize].view(_DTYPES[dt]).view(shape).to(self._device, copy=True)
                     for dt, shape, off in reply["parts"]]
        return TopK(*parts) if len(parts) == 2 else parts[0]

    def counts(self) -> list[int]:
        with self._lock:
            return list(self._call({"op": "counts"})["counts"])

    def close(self, reason: str = "shut down by the harness") -> None:
        if self._closed is None:
            self._closed = reason
        try:
            self._wire.sock.close()
        except OSError:
            pass

    def __reduce__(self):
        raise TypeError("a black-box API channel cannot be pickled")


def death_hint(code: int | None) -> str:
    return {-9: " (signal 9 is usually the out-of-memory killer or an explicit kill)",
            -7: " (signal 7, bus error, usually means /dev/shm or memory is too small for the shared query buffers; "
                "e.g. run docker with --shm-size=2g)"}.get(code, "")


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


def connect(endpoint: Endpoint, device: str | torch.device = "cpu", *, meter: QueryMeter | None = None,
            proc=None, query_timeout: float = 3600.0) -> tuple[list[ServedAPI], _Channel]:
    """Client handles on every API of ``endpoint`` (in this process; the fds become the channel's)."""
    meter = meter or QueryMeter(len(endpoint.infos), total_budget=endpoint.total_budget, per_api_budget=endpoint.per_api_budget)
    channel = _Channel(endpoint, meter, torch.device(device), query_timeout, proc)
    return [ServedAPI(info, channel) for info in endpoint.infos], channel


# ---------------------------------------------------------------------------------------------- start


class ZooServer:
    """The harness's handle on a running server: the control pipe, the process and the method
    endpoint (until it is handed over with :meth:`take_endpoint`)."""

    def __init__(self, proc, ctrl, endpoint: Endpoint | None, meter: QueryMeter):
        self.proc, self._ctrl, self._endpoint, self._meter = proc, ctrl, endpoint, meter
        self._lock = threading.Lock()
        self._stopped = False

    def take_endpoint(self) -> Endpoint:
        """The method endpoint's fds; the caller owns them from now on (close them once passed on)."""
        if self._endpoint is None:
            raise RuntimeError("the method endpoint of this server was already handed out")
        ep, self._endpoint = self._endpoint, None
        return ep

    def alive(self) -> bool:
        return self.proc.is_alive()

    def death(self) -> str | None:
        """Why the server is gone (``None`` while it runs)."""
        if self.proc.is_alive():
            return None
        self.proc.join(timeout=2.0)
        code = self.proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"the black-box API server died ({how}){death_hint(code)}"

    def _ctl(self, op: str, timeout: float) -> dict:
        with self._lock:
            self._ctrl.send(op)
            ready = _mp_wait([self._ctrl, self.proc.sentinel], timeout=timeout)
            if self._ctrl not in ready:
                raise APIServerDied(self.death() or f"the black-box API server did not answer {op!r} within {timeout:.0f} s")
            try:
                return self._ctrl.recv()
            except (EOFError, OSError):
                raise APIServerDied(self.death() or "the black-box API server closed its control pipe") from None

    def counts(self, timeout: float = 60.0) -> list[int]:
        """The server's exact per-API counts (also copied into the harness's meter)."""
        counts = list(self._ctl("counts", timeout)["counts"])
        self._meter.used[:] = counts
        return counts

    def close(self, timeout: float = 10.0) -> None:
        """Sync the final counts into the meter, stop the server, reap it. Idempotent; never hangs."""
        if not self._stopped:
            self._stopped = True
            if self.proc.is_alive():
                try:
                    self._meter.used[:] = self._ctl("stop", timeout)["counts"]
                except Exception:
                    pass
            try:
                self._ctrl.close()
            except OSError:
                pass
            if self._endpoint is not None:
                for fd in self._endpoint.fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                self._endpoint = None
        self.proc.join(timeout=timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=timeout)


def start_server(zoo, infos: list[APIInfo], meter: QueryMeter, device: str | torch.device = "cpu", *,
                 threads: int | None = None, start_timeout: float = 600.0) -> ZooServer:
    """Start the zoo's API server; return the harness's handle (control pipe + method endpoint)."""
    import torch.multiprocessing as tmp

    device = torch.device(device)
    spec = server_spec(zoo, infos, meter, device, threads)
    in_bytes, out_bytes = buffer_sizes(spec.infos)
    in_fd, out_fd = _memfd(in_bytes, "dfml-bench-in"), _memfd(out_bytes, "dfml-bench-out")
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ctx = tmp.get_context("spawn")
    ctrl, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=_server_main, args=(child, theirs, _Fd(in_fd), _Fd(out_fd), spec),
                       name=f"{SERVER_NAME}-{zoo.hash[:8]}", daemon=True)
    try:
        proc.start()
    finally:
        child.close()
        theirs.close()
    endpoint = Endpoint(mine.detach(), in_fd, out_fd, spec.infos, meter.total_budget, meter.per_api_budget)
    server = ZooServer(proc, ctrl, endpoint, meter)
    try:
        ready = _mp_wait([ctrl, proc.sentinel], timeout=start_timeout)
        msg = ctrl.recv() if ctrl in ready else None
    except (EOFError, OSError):
        msg = None
    if msg is None or msg[0] != "ready":
        server.close(timeout=5.0)
        if msg is None:
            raise APIServerDied(f"the black-box API server failed to start: {server.death() or 'no answer'}")
        _, kind, text = msg
        if kind == "ZooCorrupted":
            from .zoo import ZooCorrupted

            raise ZooCorrupted(text)
        raise APIServerDied(f"the black-box API server failed to start: {kind}: {text}")
    return server


def serve_zoo(zoo, infos: list[APIInfo], meter: QueryMeter, device: str | torch.device = "cpu", *,
              threads: int | None = None, query_timeout: float = 3600.0,
              start_timeout: float = 600.0) -> tuple[list[ServedAPI], Callable[[], None]]:
    """Start the zoo's API server and return ``(apis, closer)`` with the clients in THIS process.

    ``apis[i]`` answers with zoo model ``i`` as ``infos[i]`` says (output kind, top-k, limits); budgets
    are those of ``meter``, counted by the server, and ``meter.used`` follows the server's counts.
    ``closer()`` syncs the final counts into ``meter`` and stops the server (idempotent).
    """
    server = start_server(zoo, infos, meter, device, threads=threads, start_timeout=start_timeout)
    apis, channel = connect(server.take_endpoint(), device, meter=meter, proc=server.proc, query_timeout=query_timeout)

    def closer() -> None:
        server.close()
        channel.close()

    return apis, closer
