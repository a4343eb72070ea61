"""Result records: one JSON file per (suite, scale, scenario, method, seed), written atomically.

A record holds everything a result depends on (config, versions, hashes, seeds), the per-episode
accuracies, queries used, wall time, peak memory and device. ``status`` is ``ok``, ``failed`` (with
the error; a re-run retries it) or ``skipped`` (the method cannot run in that scenario, with why).
A re-run of a suite skips every record that is already ``ok`` or ``skipped``: it resumes.
"""

from __future__ import annotations

import math
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .utils import atomic_write_json

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "skipped")


@dataclass
class RunKey:
    suite: str
    scale: str
    scenario: str
    method: str
    seed: int

    def path(self, out: str | Path) -> Path:
        return Path(out) / f"{self.suite}-{self.scale}" / self.scenario / self.method / f"seed-{self.seed}.json"


@dataclass
class ResultRecord:
    key: RunKey
    status: str
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    hashes: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    per_episode: list[float] = field(default_factory=list)
    accuracy: dict = field(default_factory=dict)
    per_domain: dict = field(default_factory=dict)
    queries: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    flags: dict = field(default_factory=dict)
    error: str | None = None
    artifacts: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA_VERSION
        d.update(d.pop("key"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ResultRecord":
        d = dict(d)
        d.pop("schema", None)
        key = RunKey(**{k: d.pop(k) for k in ("suite", "scale", "scenario", "method", "seed")})
        return cls(key=key, **d)


def write_record(out: str | Path, record: ResultRecord) -> Path:
    """Write ``record`` where its key says (atomically). A file already there that is not a valid record
    (edited by hand, corrupted) is kept beside it as ``seed-N.json.rejected-<time>`` rather than lost."""
    from .validate import set_aside_if_invalid

    path = record.key.path(out)
    if path.exists():
        set_aside_if_invalid(path, out)
    atomic_write_json(path, record.to_dict())
    return path


def read_record(path: str | Path) -> ResultRecord:
    """Read one record file through the single validation path (:func:`dfml_bench.validate.validate_file`):
    a record the leaderboard would reject raises :class:`dfml_bench.validate.InvalidRecord` here too."""
    from .validate import validate_file

    return validate_file(path)


def is_finished(out: str | Path, key: RunKey) -> bool:
    """True if a *valid* record with status ok or skipped exists (failed runs are retried, and so are
    records the leaderboard would reject: resume re-runs them)."""
    from .validate import check_record

    return check_record(out, key).state in ("ok", "skipped")


ABLATIONS_DIR = "ablations"  # variants of a method (ablation.py): never read as records of the method
ARCHIVE_DIR = "archive"  # records of retired suite definitions (e.g. the cpu proxy before issue 12): kept, never ranked


def iter_records(root: str | Path) -> list[Path]:
    """Record files under ``root``, skipping ``ablations/`` and ``archive/``."""
    root = Path(root)
    skip = {ABLATIONS_DIR, ARCHIVE_DIR}
    return sorted(p for p in root.rglob("seed-*.json")
                  if not p.name.startswith(".") and not skip.intersection(p.relative_to(root).parts))


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dfml-bench", "torch", "torchvision", "numpy", "scipy", "pandas") + tuple(extra):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def summary_of(per_episode: list[float]) -> dict[str, Any]:
    """Mean and 95% CI (1.96 * population std / sqrt(n), the literature's formula) of per-episode accuracy."""
    n = len(per_episode)
    if n == 0:
        return {"mean": math.nan, "ci95": math.nan, "std": math.nan, "n": 0}
    mean = sum(per_episode) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in per_episode) / n)
    return {"mean": mean, "ci95": 1.96 * std / math.sqrt(n), "std": std, "n": n}
