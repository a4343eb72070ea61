"""Checks of what a user types, made before any work starts (issue 14).

Each function takes the raw value of one command-line option and either returns it parsed or raises
:class:`BadInput`, a ``ValueError`` whose message names the option, says what was wrong and what to
type instead. The CLI calls them all before it loads a dataset, builds a zoo or writes a file, so a
typo costs a second, never a half-done run, a silently different run or a lost page.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class BadInput(ValueError):
    """A command-line value that cannot be used, with the fix."""


def split_list(text: str, option: str, what: str, example: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``. Blank text, empty items (``"a,,b"``) and repeats are errors: each
    would otherwise silently change what runs (nothing, the defaults, or the same job twice)."""
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise BadInput(f"{option} {text!r} names no {what}; give a comma-separated list like {option} {example}, "
                       f"or leave {option} out for the suite's defaults")
    if not all(items):
        raise BadInput(f"{option} {text!r} has an empty item (a stray comma?); write it like {option} {example}")
    seen: set[str] = set()
    for v in items:
        if v in seen:
            raise BadInput(f"{option} {text!r} names {v!r} twice; each {what} runs once, write it like {option} {example}")
        seen.add(v)
    return items


def parse_seeds(text: str | None, option: str = "--seeds") -> list[int] | None:
    """Seeds as non-negative integers without repeats; None when the option was not given."""
    if text is None:
        return None
    out = []
    for v in split_list(text, option, "seed", "0,1,2"):
        try:
            s = int(v)
        except ValueError:
            raise BadInput(f"{option}: {v!r} is not an integer seed; write seeds like {option} 0,1,2") from None
        if s < 0:
            raise BadInput(f"{option}: seed {s} is negative; seeds are integers >= 0, like {option} 0,1,2")
        out.append(s)
    if len(set(out)) != len(out):  # "1,01" are the same seed
        raise BadInput(f"{option} {text!r} names one seed twice; each seed runs once")
    return out


def parse_methods(text: str | None, option: str = "--methods") -> list[str] | None:
    """Method names without blanks or repeats (whether they exist is checked against the registry
    by the caller); None when the option was not given."""
    if text is None:
        return None
    return split_list(text, option, "method", "random,average")


def check_device(device: str, *, available: bool = True) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``. With ``available``, the GPU must exist on this machine (it is checked
    here, in a second, not after the dataset has loaded); a Slurm launch checks only the spelling."""
    d = device.strip().lower()
    if d == "cpu":
        return d
    if d != "cuda" and not (d.startswith("cuda:") and d[5:].isdigit()):
        raise BadInput(f"--device {device!r} is not a device; use --device cpu, --device cuda or --device cuda:N")
    if available:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise BadInput(f"--device {device}: torch sees no CUDA device on this machine; use --device cpu")
        if ":" in d and int(d[5:]) >= n:
            raise BadInput(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1}); use one of them")
    return d


def check_out_dir(path: str | os.PathLike, option: str = "--out", *, create: bool = True) -> Path:
    """A folder that results can be written to: not a file, not under a file, writable. With ``create``
    it is made (and a probe file written and removed) so that a run cannot fail on it later."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise BadInput(f"{option} {path}: that is a file, not a folder; give a folder path")
    parent = p
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise BadInput(f"{option} {path}: {parent} is a file, so no folder can be made under it; give another path")
    if not create:
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".dfml-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BadInput(f"{option} {path}: cannot write there ({exc.strerror or exc}); give a folder you can write to") from None
    return p


def check_out_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """A file path a page can be written to: not a folder, its folder exists (or can be made) and is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise BadInput(f"{option} {path}: that is a folder; give a file path such as {Path(path) / 'leaderboard.md'}")
    check_out_dir(p.parent if str(p.parent) else Path("."), option)
    return p


def check_input_dir(path: str | os.PathLike, option: str) -> Path:
    """A folder that must already exist (results to read, a data root): a mistyped one stops here,
    before anything is written from it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInput(f"{option} {path}: no such folder; check the spelling (nothing was written)")
    if not p.is_dir():
        raise BadInput(f"{option} {path}: that is a file, not a folder")
    return p


def check_plugins(plugins: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Each ``--plugin`` is an existing ``.py`` file or an importable module; it is imported here so
    that its errors show now, once, with its name (workers import it again)."""
    from .jobs import import_plugins

    for p in plugins:
        if p.endswith(".py"):
            f = Path(p).expanduser()
            if not f.is_file():
                raise BadInput(f"--plugin {p}: no such file; give a .py file path or an importable module name")
        else:
            import importlib.util

            try:
                found = importlib.util.find_spec(p) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise BadInput(f"--plugin {p}: no module of that name can be imported here (is its package installed, "
                               "or did you mean a path ending in .py?)")
        try:
            import_plugins([p])
        except ImportError as exc:
            cause = exc.__cause__ or exc
            raise BadInput(f"--plugin {p} failed to import: {type(cause).__name__}: {cause}") from None
    return tuple(plugins)


SUBMITIT_ONLY = ("--slurm-config", "--partition", "--time-min", "--gpus-per-job", "--cpus-per-job", "--mem-gb",
                 "--array-parallelism", "--cluster", "--no-wait")


def check_launcher_options(launcher: str, jobs: int | None, given: dict[str, object]) -> None:
    """Options of one launcher given to the other are errors, not silently ignored: ``--jobs`` belongs to
    ``local``; the Slurm options (``given``: option name -> value, None or False when not given) to
    ``submitit``."""
    if launcher == "submitit":
        if jobs is not None and jobs != 1:
            raise BadInput(f"--jobs {jobs} applies to --launcher local only; with --launcher submitit every job is its own "
                           "Slurm task: use --array-parallelism N to run N at once")
        return
    used = [k for k in SUBMITIT_ONLY if given.get(k) not in (None, False)]
    if used:
        raise BadInput(f"{', '.join(used)} appl{'ies' if len(used) == 1 else 'y'} to --launcher submitit only; "
                       f"add --launcher submitit, or drop {'it' if len(used) == 1 else 'them'}")
