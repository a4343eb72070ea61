"""A method's ``fit`` runs in its own process, never in the process that evaluates or writes records.

Methods are untrusted code (other people's packages). The harness (:func:`dfml_bench.runner.run_one`)
starts :mod:`dfml_bench.fit_worker` in a fresh interpreter with :class:`FitProcess`, and gives it only
what the track allows (see :mod:`dfml_bench.fit_worker`); only a ``state_dict`` comes back, read with
``weights_only=True`` and checked by :func:`load_state` against the scenario backbone before the harness
loads it into a backbone it built itself. The method's classes never run in the evaluating process
(the plugin is imported in the fit process only).

What holds, by layer:

- **Always**: a separate process with a clean environment, its own ``$DFML_BENCH_HOME`` and working
  folder (a private scratch folder); no meta-test image, episode or label is sent to it; black-box
  models stay in the API server, whose counts the harness reads over its own control pipe; a wall-time
  limit (:attr:`FitLimits.timeout`) after which the process (group) is killed; a memory limit
  (``RLIMIT_AS``) on CPU runs; ``PR_SET_NO_NEW_PRIVS`` in the fit process.
- **When the harness runs as root** (CI, containers, cluster jobs): the fit process runs as a dedicated
  unprivileged uid/gid (one per job, no supplementary groups; :func:`choose_user`). It cannot read the
  zoo cache, the results folder or the data root (:func:`protect_paths` makes them private when they
  are not), cannot read or ptrace other processes (different uid, and the API server is non-dumpable),
  and everything it left running is killed after the job (:func:`kill_user`).
- **As an ordinary user** the fit process has that user's file permissions: it could read the zoo
  cache (the black-box weights) and write into the results folder. The harness says so in every record
  (``resources.isolation``) and in a log line; use root in a container (or a dedicated account) for a
  public leaderboard. The API server and the harness are non-dumpable, so their memory is not readable
  through ``/proc`` even by the same user.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

LOG_PREFIX = "\x1edfml-log "  # a line the fit process writes to say something through the progress hook
USER_ENV = "DFML_BENCH_FIT_USER"  # "auto" (default), "same", a user name, or "UID:GID"
DEFAULT_TIMEOUT = {"cpu": 3600.0, "paper": 72 * 3600.0}  # fit wall-time limits by scale, in seconds
DESCRIBE_TIMEOUT = 300.0  # seconds the fit process may take to import the method and describe it
MAX_RESULT_JSON = 1 << 20  # bytes of the fit process's result.json
MAX_ARTIFACT = 16 << 20  # bytes of one artifact image
UID_BASE = 0x7E000000  # dedicated uids: UID_BASE + (harness pid, job counter); no account has them
_PNG = b"\x89PNG\r\n\x1a\n"


class FitFailed(RuntimeError):
    """The fit process failed, timed out or returned weights the harness refuses (the record says why)."""


@dataclass(frozen=True)
class FitUser:
    """The user a fit process runs as (``None`` anywhere it is used: this process's own user)."""

    uid: int
    gid: int
    name: str
    dedicated: bool  # a uid of its own: nothing else runs as it, so everything it left can be killed


@dataclass(frozen=True)
class FitLimits:
    timeout: float  # seconds of wall time for fit (from the moment the data is handed over)
    memory_bytes: int | None  # address-space limit of the fit process (None: none; CUDA cannot have one)
    nproc: int | None = 4096  # processes/threads of a dedicated uid (a fork bomb stops there)


_counter = {"n": 0}


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def choose_user(setting: str | None = None) -> FitUser | None:
    """The user fit runs as: ``None`` (this user) unless the harness is root. ``setting`` (or
    ``$DFML_BENCH_FIT_USER``): ``auto`` (a dedicated uid per job when root), ``same`` (no drop, said in
    the record), a user name (e.g. ``nobody``) or ``UID:GID``."""
    setting = (setting or os.environ.get(USER_ENV) or "auto").strip()
    if setting == "same":
        return None
    if not is_root():
        if setting != "auto":
            raise FitFailed(f"fit user {setting!r} was asked for but dfml-bench is not root, so it cannot switch users; "
                            f"unset {USER_ENV} or run as root")
        return None
    if setting == "auto":
        _counter["n"] += 1
        uid = UID_BASE + (os.getpid() % 65536) * 256 + _counter["n"] % 256
        return FitUser(uid, uid, f"dfml-fit-{uid}", dedicated=True)
    if ":" in setting:
        u, g = setting.split(":", 1)
        if not (u.isdigit() and g.isdigit()) or int(u) == 0:
            raise FitFailed(f"{USER_ENV}={setting!r}: expected UID:GID with a non-zero uid")
        return FitUser(int(u), int(g), setting, dedicated=False)
    try:
        pw = pwd.getpwnam(setting)
    except KeyError:
        raise FitFailed(f"{USER_ENV}={setting!r}: no such user") from None
    if pw.pw_uid == 0:
        raise FitFailed(f"{USER_ENV}={setting!r} is root: a method must never run as root")
    return FitUser(pw.pw_uid, pw.pw_gid, setting, dedicated=False)


def describe_isolation(user: FitUser | None, limits: FitLimits) -> dict:
    """What held for one job, for its record."""
    return {"process": "separate", "user": (user.name if user else "same as harness"),
            "privilege_separation": user is not None, "fit_timeout_s": limits.timeout,
            "memory_limit_bytes": limits.memory_bytes}


def default_memory_limit(device: torch.device) -> int | None:
    """75 % of physical memory on CPU; none on CUDA (an address-space limit breaks the CUDA driver)."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75)
    except (ValueError, OSError):
        return None


def harden_self() -> None:
    """Make this process's memory unreadable through /proc and ptrace by processes of the same user."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
        except Exception:
            pass


# ------------------------------------------------------------------------------------------ file system


def _reachable_by_others(path: Path) -> bool:
    """True if a user outside the owner and group could list or read ``path`` (every ancestor has o+x
    and the path itself has o+r or o+x)."""
    try:
        path = path.resolve()
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        return bool(path.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH))
    except OSError:
        return False


_UNSHARE: dict[str, bool] = {}


def can_unshare() -> bool:
    """Whether a private mount namespace can be made here (root with CAP_SYS_ADMIN; not in every container)."""
    if "ok" not in _UNSHARE:
        ok = False
        if sys.platform.startswith("linux") and is_root():
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                import ctypes

                os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) == 0 else 1)
            ok = os.waitpid(pid, 0)[1] == 0
        _UNSHARE["ok"] = ok
    return _UNSHARE["ok"]


def protect_paths(paths: list[Path | str | None], user: FitUser | None, log: Callable[[str], None] | None = None) -> list[str]:
    """With a separate fit user and no mount namespace to hide them in, make each existing folder in
    ``paths`` (zoo cache, results, data root) unreachable to it (``chmod o-rwx`` on the folder itself
    when others could enter it). Returns what was changed; every change is logged."""
    changed = []
    if user is None or can_unshare():  # the sandbox covers them with empty mounts instead
        return changed
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.exists() and _reachable_by_others(p):
            mode = p.stat().st_mode
            os.chmod(p, stat.S_IMODE(mode) & ~stat.S_IRWXO)
            changed.append(str(p))
            if log:
                log(f"isolation: {p} was readable by other users; made it private (o-rwx) so that a method's "
                    f"process cannot read it")
    return changed


def make_scratch(user: FitUser | None) -> Path:
    """A private, empty working folder owned by the fit user, inside a root-owned 0711 folder (so the fit
    process cannot move it away or put a link in its place)."""
    outer = Path(tempfile.mkdtemp(prefix="dfml-fit-"))
    os.chmod(outer, 0o711)
    d = outer / "w"
    d.mkdir(mode=0o700)
    for sub in ("home", "tmp", "artifacts", "plugins"):
        (d / sub).mkdir()
    _copy_file_plugins(d / "plugins")
    if user is not None:
        for p in (d, d / "home", d / "tmp", d / "artifacts"):
            os.chown(p, user.uid, user.gid)
    return d


def _copy_file_plugins(dest: Path) -> None:
    """Copy each ``--plugin file.py`` imported in this process into ``dest`` under the module name it was
    registered with, so that the fit process (which may be another user, unable to read the original
    folder) imports the same code by its entry ``module:attr``. The copies are read-only to it."""
    from .jobs import FILE_PLUGINS

    for name, src in FILE_PLUGINS.items():
        target = dest / f"{name}.py"
        shutil.copyfile(src, target)
        os.chmod(target, 0o444)
    os.chmod(dest, 0o755)


def remove_scratch(scratch: Path) -> None:
    shutil.rmtree(scratch.parent, ignore_errors=True)  # rmtree never follows links


def read_private(path: Path, limit: int, dir_fd: int | None = None) -> bytes:
    """Read a file the fit process wrote, refusing links, non-regular files and files over ``limit``
    (with ``dir_fd``, ``path`` is a name inside that already-opened folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FitFailed(f"{Path(path).name}: cannot be read safely ({exc.strerror}; links are refused)") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FitFailed(f"{Path(path).name} is not a regular file")
        if st.st_size > limit:
            raise FitFailed(f"{Path(path).name} is {st.st_size} bytes, over the limit of {limit}")
        return fh.read(limit + 1)[:limit]


def state_bytes_limit(reference: nn.Module) -> int:
    """The largest result.pt accepted: the backbone's own size, twice, plus room for the pickle."""
    return 2 * sum(t.numel() * t.element_size() for t in reference.state_dict().values()) + (1 << 20)


def load_state(path: Path, reference: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The state_dict the fit process returned, read with ``weights_only=True`` and checked against the
    harness's own backbone: same keys, shapes and dtypes, every value a finite tensor."""
    import io

    try:
        data = read_private(path, state_bytes_limit(reference))
    except FileNotFoundError:
        raise FitFailed(f"method {method!r} returned no weights") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FitFailed(f"method {method!r} returned weights that cannot be read as tensors ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
    want = reference.state_dict()
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FitFailed(f"method {method!r} returned something other than a state_dict of tensors")
    if set(state) != set(want):
        diff = sorted(set(state) ^ set(want))[:4]
        raise FitFailed(f"method {method!r} returned a model that is not the scenario's backbone (keys differ at {diff})")
    for k, v in want.items():
        got = state[k]
        if tuple(got.shape) != tuple(v.shape) or got.dtype != v.dtype:
            raise FitFailed(f"method {method!r} returned a model that is not the scenario's backbone ({k}: "
                            f"{got.dtype} {list(got.shape)}, expected {v.dtype} {list(v.shape)})")
        if got.layout != torch.strided or got.is_quantized:
            raise FitFailed(f"method {method!r} returned a non-dense tensor for {k}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise FitFailed(f"method {method!r} returned non-finite weights (NaN or infinite values in {k})")
    return state


def copy_artifacts(scratch: Path, names: dict, dest_dir: Path, stem: str) -> dict:
    """PNG images the fit process left under ``artifacts/``: copied next to the record (regular files,
    PNG signature, size-limited, names reduced to ``[a-z0-9_-]``)."""
    from .utils import atomic_write_bytes

    out = {}
    try:  # the fit process owns artifacts/: it may have replaced it by a link
        dfd = os.open(scratch / "artifacts", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return {str(n)[:40]: "error: the artifacts folder was replaced" for n in list(names)[:16]} if isinstance(names, dict) else {}
    try:
        for name in list(names)[:16] if isinstance(names, dict) else []:
            safe = "".join(c for c in str(name).lower() if c.isalnum() or c in "-_")[:40]
            if not safe:
                continue
            try:
                data = read_private(Path(f"{safe}.png"), MAX_ARTIFACT, dir_fd=dfd)
            except (FitFailed, OSError) as exc:
                out[safe] = f"error: {exc}"
                continue
            if not data.startswith(_PNG):
                out[safe] = "error: not a PNG image"
                continue
            path = dest_dir / f"{stem}-{safe}.png"
            atomic_write_bytes(path, data)
            out[safe] = path.name
    finally:
        os.close(dfd)
    return out


# ------------------------------------------------------------------------------------------ processes


def kill_user(user: FitUser | None) -> None:
    """Kill every process of a dedicated fit uid (whatever the method left behind, daemons included):
    a forked helper takes that uid and sends SIGKILL to every process it may signal (``kill(-1)``)."""
    if user is None or not user.dedicated:
        return
    for _ in range(5):
        if not _pids_of(user.uid):
            return
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _pids_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as fh:
                    fields = dict(line.split(":", 1) for line in fh if ":" in line)
                if int(fields["Uid"].split()[0]) == uid and not fields.get("State", "").strip().startswith(("Z", "X")):
                    pids.append(int(d))
            except (OSError, ValueError, KeyError):
                pass
    return pids


# Runs as root (stdlib only, ``python -S``) between fork and the fit process: a private mount namespace
# where the interpreter and packages are reachable (a blocked ancestor such as a 0700 /root is replaced by
# an empty tmpfs holding only the needed subtrees) and the protected folders (zoo cache, results, data
# root) are covered by empty read-only tmpfs; then setgroups([]) / setgid / setuid, no_new_privs, exec.
_SANDBOX = r"""
import ctypes, json, os, sys, tempfile
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
def mount(src, dst, fs, flags, data=None):
    if libc.mount(src.encode() if src else None, dst.encode(), fs.encode() if fs else None, flags,
                  data.encode() if data else None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {src} -> {dst}: {os.strerror(ctypes.get_errno())}")
ns = False
if spec["namespace"] and libc.unshare(0x00020000) == 0:
    ns = True
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    stage = tempfile.mkdtemp(prefix="dfml-ns-")
    for i, (blocked, children) in enumerate(spec["expose"]):
        staged = []
        for j, child in enumerate(children):
            tmp = os.path.join(stage, f"{i}-{j}")
            os.mkdir(tmp)
            mount(os.path.join(blocked, child), tmp, None, MS_BIND | MS_REC)
            staged.append((child, tmp))
        mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for child, tmp in staged:
            os.mkdir(os.path.join(blocked, child))
            mount(tmp, os.path.join(blocked, child), None, MS_BIND | MS_REC)
            libc.umount2(tmp.encode(), 2)
        mount("tmpfs", blocked, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    for m in spec["mask"]:
        if os.path.isdir(m):
            mount("tmpfs", m, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=000")
    for d in os.listdir(stage):
        os.rmdir(os.path.join(stage, d))
    os.rmdir(stage)
elif spec["namespace"] == "required":
    sys.exit("dfml-bench sandbox: cannot create a mount namespace")
os.setgroups([])
os.setgid(spec["gid"])
os.setuid(spec["uid"])
libc.prctl(38, 1, 0, 0, 0)
os.environ["DFML_BENCH_SANDBOX"] = "namespace" if ns else "uid"
os.execv(spec["argv"][0], spec["argv"])
"""


def sandboxed(argv: list[str], user: FitUser | None, protect: list[str] = ()) -> list[str]:
    """``argv`` run as ``user`` through the sandbox (unchanged without a user)."""
    if user is None:
        return argv
    plan = sandbox_plan([str(p) for p in protect if p])
    spec = {"uid": user.uid, "gid": user.gid, "namespace": True, "argv": argv, **plan}
    return [sys.executable, "-S", "-c", _SANDBOX, json.dumps(spec)]


def _blocked_ancestor(path: str) -> str | None:
    """The first ancestor of ``path`` that others cannot traverse (e.g. a 0700 /root), if any."""
    p = Path(path)
    for parent in reversed(p.parents):
        try:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return str(parent)
        except OSError:
            return None
    return None


def sandbox_plan(protect: list[str]) -> dict:
    """What the sandbox exposes (the interpreter, stdlib and sys.path under blocked ancestors) and masks."""
    needed = {os.path.realpath(p) for p in [sys.executable, sys.prefix, sys.base_prefix, *sys.path] if p and os.path.exists(p)}
    expose: dict[str, set[str]] = {}
    for p in sorted(needed):
        b = _blocked_ancestor(p)
        if b is not None and p != b:
            expose.setdefault(b, set()).add(Path(p).relative_to(b).parts[0])
    mask = sorted({os.path.realpath(p) for p in protect if p and os.path.isdir(p)})
    return {"expose": [[b, sorted(c)] for b, c in sorted(expose.items())], "mask": mask}


def _child_env(scratch: Path, threads: int) -> dict:
    path = [str(scratch / "plugins")] + [p for p in sys.path if p and os.path.isdir(p)]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(scratch / "home"), "TMPDIR": str(scratch / "tmp"), "DFML_BENCH_HOME": str(scratch / "home"),
        "MPLCONFIGDIR": str(scratch / "home"), "PYTHONPATH": os.pathsep.join(path), "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
    }
    for k in ("CUDA_VISIBLE_DEVICES", "CUBLAS_WORKSPACE_CONFIG", "LD_LIBRARY_PATH"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


@dataclass
class Description:
    """What the fit process says of the method it imported (checked by the harness)."""

    name: str
    cls: str
    access: list[str]
    output_kinds: list[str]
    not_data_free: bool
    params: dict

    def check_scenario(self, access: str, output_kind: str) -> None:
        from .methods import MethodError

        if access not in self.access:
            raise MethodError(f"method {self.name!r} needs {'/'.join(sorted(self.access))} access; this scenario is {access}")
        if access == "blackbox" and output_kind not in self.output_kinds:
            raise MethodError(f"method {self.name!r} supports black-box outputs {sorted(self.output_kinds)}; this "
                              f"scenario's APIs answer {output_kind!r}")


class FitProcess:
    """One fit process: started early (it imports torch and the method while the harness loads the
    data), describes the method, receives its data and endpoint, fits, writes ``result.pt``."""

    def __init__(self, method: str, entry: str, params: dict, *, user: FitUser | None, limits: FitLimits,
                 threads: int, log: Callable[[str], None] | None = None, protect: list[str] = ()):
        self.method, self.user, self.limits, self.log = method, user, limits, log
        self.scratch = make_scratch(user)
        self.tail: deque[str] = deque(maxlen=60)
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = {"method": method, "entry": entry, "params": params, "threads": threads, "control_fd": child.fileno(),
                "memory_bytes": limits.memory_bytes, "nproc": limits.nproc if user is not None and user.dedicated else None}
        try:
            self.proc = subprocess.Popen(
                sandboxed([sys.executable, "-m", "dfml_bench.fit_worker", json.dumps(spec)], user, protect), cwd=self.scratch,
                env=_child_env(self.scratch, threads), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(child.fileno(),), start_new_session=True)
        except BaseException:
            child.close()
            self._sock.close()
            remove_scratch(self.scratch)
            raise
        child.close()
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        self.t_go: float | None = None
        self.traceback: str | None = None

    def _read_output(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw[:2000].decode("utf-8", "replace").rstrip("\n")
            if line.startswith(LOG_PREFIX):
                if self.log:
                    self.log(f"[{self.method}] {line[len(LOG_PREFIX):]}")
            else:
                self.tail.append(line)

    def _recv(self, timeout: float) -> dict | None:
        from .server import _Wire

        try:
            raw = _Wire(self._sock).recv(1 << 20, timeout=timeout)
            return json.loads(raw) if isinstance(raw, bytes) else None
        except (EOFError, OSError, ValueError, socket.timeout):
            return None

    def describe(self) -> Description:
        """Wait until the fit process has imported the method; its description, or :class:`FitFailed`."""
        msg = self._recv(DESCRIBE_TIMEOUT)
        if not isinstance(msg, dict) or "describe" not in msg:
            self.kill()
            raise FitFailed(self.failure(f"the fit process did not describe method {self.method!r}"))
        d = msg["describe"]
        try:
            desc = Description(name=str(d["name"]), cls=str(d["cls"])[:300], access=[str(a) for a in d["access"]],
                               output_kinds=[str(a) for a in d["output_kinds"]], not_data_free=bool(d["not_data_free"]),
                               params=dict(d["params"]))
        except (KeyError, TypeError, ValueError) as exc:
            self.kill()
            raise FitFailed(f"the fit process described the method malformedly ({exc})") from None
        return desc

    def go(self, payload: dict, fds: tuple[int, ...] = ()) -> None:
        """Hand over the job (``payload`` is written to ``job.pt`` in the scratch folder, owned by the fit
        user) and the server endpoint's fds; the wall-time limit starts now."""
        import io

        buf = io.BytesIO()
        torch.save(payload, buf)
        # written through a descriptor of a fresh file (never a path the fit process could have linked)
        tmp = f".job-{os.getpid()}-{time.monotonic_ns()}.pt"
        fd = os.open(self.scratch / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if self.user is not None:
                os.fchown(fd, self.user.uid, self.user.gid)
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getvalue())
        except BaseException:
            os.unlink(self.scratch / tmp)
            raise
        os.rename(self.scratch / tmp, self.scratch / "job.pt")
        data = json.dumps({"go": "job.pt", "fds": len(fds)}).encode()
        self.t_go = time.perf_counter()
        socket.send_fds(self._sock, [len(data).to_bytes(4, "big") + data], list(fds))

    def stop(self) -> None:
        """Tell a described-but-unneeded fit process to exit (the method was skipped)."""
        try:
            from .server import _Wire

            _Wire(self._sock).send({"stop": True})
        except OSError:
            pass
        self.wait(10.0, quiet=True)

    def wait(self, timeout: float, quiet: bool = False) -> float:
        """Wait for the fit process to exit; kill it (and its group) past ``timeout``. Returns seconds since go."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            if not quiet:
                raise FitFailed(f"fit of {self.method!r} exceeded its time limit of {timeout:g} s and was killed "
                                f"(raise it with --fit-timeout)") from None
        return time.perf_counter() - (self.t_go or time.perf_counter())

    def kill(self) -> None:
        for target in (lambda: os.killpg(self.proc.pid, signal.SIGKILL), lambda: self.proc.kill()):
            try:
                target()
            except (ProcessLookupError, PermissionError, OSError):
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        kill_user(self.user)

    def failure(self, what: str) -> str:
        """``what``, plus the fit process's own error (result.json) or the end of its output."""
        try:
            res = json.loads(read_private(self.scratch / "result.json", MAX_RESULT_JSON))
            if isinstance(res, dict) and res.get("error"):
                return f"{str(res['error'])[:2000]}"
        except (FitFailed, OSError, ValueError):
            pass
        code = self.proc.poll()
        how = (f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}")
        hint = " (signal 9: the memory limit, the out-of-memory killer or a kill)" if code == -9 else ""
        tail = " | ".join(list(self.tail)[-5:])[-800:]
        return f"{what}: the fit process ended ({how}{hint}){'; last output: ' + tail if tail else ''}"

    def result(self) -> dict:
        """The fit process's result.json (after it exited); :class:`FitFailed` with its error otherwise."""
        try:
            res = json.loads(read_private(self.scratch / "result.json", MAX_RESULT_JSON))
        except (FileNotFoundError, ValueError):
            raise FitFailed(self.failure(f"fit of {self.method!r} wrote no result")) from None
        if not isinstance(res, dict) or not res.get("ok") or self.proc.returncode != 0:
            if isinstance(res, dict) and isinstance(res.get("traceback"), str):
                self.traceback = res["traceback"][-8000:]  # the fit process's own traceback, for the record
            raise FitFailed(self.failure(f"fit of {self.method!r} failed"))
        return res

    def close(self) -> None:
        """Kill whatever is left, remove the scratch folder."""
        if self.proc.poll() is None:
            self.kill()
        else:
            kill_user(self.user)
        try:
            self._sock.close()
        except OSError:
            pass
        self._reader.join(timeout=5)
        remove_scratch(self.scratch)


def limits_dict(limits: FitLimits) -> dict:
    return asdict(limits)


def set_own_limits(memory_bytes: int | None, nproc: int | None) -> None:
    """In the fit process, before any method code runs: address space, process count, no new privileges."""
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary can give privileges back
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0: other methods' processes cannot read this one


_PROBE = """
import importlib, json, sys
out = {}
for name, value in json.loads(sys.argv[1]).items():
    module, _, attr = value.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        out[name] = {"error": None, "not_data_free": getattr(obj, "not_data_free", None)}
    except BaseException as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
print(json.dumps(out))
"""


def probe_imports(values: dict[str, str], user: FitUser | None, timeout: float = DESCRIBE_TIMEOUT,
                  protect: list[str] = ()) -> dict[str, str | None]:
    """Import each ``name -> "module:attr"`` in a throwaway process (as ``user``); the import errors."""
    return {k: v.get("error") for k, v in describe_entries(values, user, timeout, protect).items()}


def describe_entries(values: dict[str, str], user: FitUser | None, timeout: float = DESCRIBE_TIMEOUT,
                     protect: list[str] = ()) -> dict[str, dict]:
    """Import each ``name -> "module:attr"`` in a throwaway process (as ``user``):
    ``{name: {"error": str | None, "not_data_free": bool}}``. The harness never imports a plugin itself."""
    scratch = make_scratch(user)
    try:
        res = subprocess.run(sandboxed([sys.executable, "-c", _PROBE, json.dumps(values)], user, protect), cwd=scratch,
                             env=_child_env(scratch, 1), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                             start_new_session=True)
        try:
            last = res.stdout.decode("utf-8", "replace").strip().splitlines()[-1]
            got = json.loads(last)
            return {k: (v if isinstance(v, dict) else {"error": "malformed answer"}) for k, v in got.items() if k in values}
        except (IndexError, ValueError):
            err = res.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            return {k: {"error": f"the import check failed: {err[0][:500]}"} for k in values}
    except subprocess.TimeoutExpired:
        return {k: {"error": f"importing the plugins took over {timeout:g} s"} for k in values}
    finally:
        kill_user(user)
        remove_scratch(scratch)
