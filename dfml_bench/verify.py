"""Re-run verification of submitted records (``dfml-bench verify RECORD...``).

A submitted record says what a method scored; the harness can vouch for it only by running the method
again. :func:`verify_record` validates the record (every recomputation check, the canonical test-episode
hash included), re-runs its (suite, scenario, method, seed) with the record's own method parameters in
the isolated harness, and compares the per-episode accuracies (exactly on CPU, where a seed fixes them).

A reproduced record is entered in the ledger ``RESULTS/verified.json`` with the sha256 of the record
file, so an entry holds only for the exact bytes that were verified (editing the record, or the ledger's
hash, un-verifies it). The leaderboard lists which entries are re-run verified and which are only
submitted (as RobustBench separates re-run from reported numbers).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .results import RunKey, iter_records
from .utils import atomic_write_json, sha256_file

LEDGER = "verified.json"


@dataclass
class Verification:
    path: str
    key: dict
    reproduced: bool
    problems: list[str] = field(default_factory=list)
    n_episodes: int = 0
    n_equal: int = 0
    max_abs_diff: float | None = None
    rerun_mean: float | None = None
    record_mean: float | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        k = self.key
        name = f"{k.get('suite')}-{k.get('scale')}/{k.get('scenario')}/{k.get('method')}/seed-{k.get('seed')}"
        if self.reproduced:
            return f"REPRODUCED {name}: all {self.n_episodes} per-episode accuracies equal ({self.seconds:.0f} s)"
        if self.max_abs_diff is not None:
            return (f"NOT REPRODUCED {name}: {self.n_equal}/{self.n_episodes} episodes equal, max |diff| "
                    f"{self.max_abs_diff:.4f}, mean {self.rerun_mean:.4f} (re-run) vs {self.record_mean:.4f} (record)"
                    + (f"; {'; '.join(self.problems)}" if self.problems else ""))
        return f"NOT VERIFIED {name}: {'; '.join(self.problems)}"


def results_root_of(path: Path) -> Path:
    """The results folder a record file lies in (``ROOT/<suite>-<scale>/<scenario>/<method>/seed-N.json``)."""
    return path.resolve().parents[3]


def verify_record(path: str | Path, *, device: str | None = None, data_root: str | None = None, atol: float = 0.0,
                  fit_timeout: float | None = None, log=None) -> Verification:
    """Validate ``path`` and re-run it in the isolated harness; whether its per-episode accuracies are reproduced."""
    from .runner import RunOptions, run_one
    from .scenarios import get_suite
    from .validate import InvalidRecord, episode_problems, validate_file

    path = Path(path)
    t0 = time.time()
    try:
        d = json.loads(path.read_text())
        key = {k: d.get(k) for k in ("suite", "scale", "scenario", "method", "seed")}
    except (OSError, ValueError) as exc:
        return Verification(str(path), {}, False, [f"cannot read JSON: {exc}"])
    out = Verification(str(path), key, False)
    try:
        rec = validate_file(path)
    except InvalidRecord as exc:
        out.problems.append(f"invalid record: {exc}")
        return out
    if rec.status != "ok":
        out.problems.append(f"a {rec.status} record has no accuracies to verify")
        return out
    out.problems += episode_problems(d, data_root)
    if out.problems:
        return out
    suite = get_suite(rec.key.suite, rec.key.scale)
    scenario = suite.scenario(rec.key.scenario)
    options = rec.config.get("options") or {}
    params = (rec.config.get("method") or {}).get("params") or {}
    with tempfile.TemporaryDirectory(prefix="dfml-verify-") as tmp:
        opts = RunOptions(out=Path(tmp), device=device or options.get("device") or "cpu", episodes=options.get("episodes"),
                          data_root=data_root, progress=False, log=log, method_params={rec.key.method: dict(params)},
                          fit_timeout=fit_timeout)
        again = run_one(suite, scenario, rec.key.method, rec.key.seed, opts)
    out.seconds = time.time() - t0
    if again.status != "ok":
        out.problems.append(f"the re-run {again.status}: {again.error}")
        return out
    if again.hashes.get("test_episodes") != rec.hashes.get("test_episodes"):
        out.problems.append("the re-run was evaluated on other test episodes")
    if "zoo_weights" in rec.hashes and again.hashes.get("zoo_weights") != rec.hashes["zoo_weights"]:
        out.problems.append("the re-run's zoo has other weights than the record's (same spec, other files: a zoo "
                            "trained with other kernels or by an older version?); rebuild the zoo in an empty "
                            "$DFML_BENCH_HOME to tell which")
    a, b = again.per_episode, rec.per_episode
    out.n_episodes = len(b)
    if len(a) != len(b):
        out.problems.append(f"the re-run has {len(a)} episodes, the record {len(b)}")
        return out
    diffs = [abs(x - y) for x, y in zip(a, b)]
    out.n_equal = sum(dd <= atol for dd in diffs)
    out.max_abs_diff = max(diffs) if diffs else 0.0
    out.rerun_mean, out.record_mean = again.accuracy["mean"], rec.accuracy["mean"]
    if again.config.get("method", {}).get("params") != params:
        out.problems.append("the re-run's method parameters differ from the record's (another version of the method?)")
    out.reproduced = out.n_equal == len(b) and not out.problems
    return out


def load_ledger(root: str | Path) -> dict:
    p = Path(root) / LEDGER
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def enter_in_ledger(root: str | Path, path: str | Path, v: Verification) -> None:
    """Record a reproduced record (by its path under ``root`` and the sha256 of its bytes)."""
    from .results import package_versions

    if not v.reproduced:
        raise ValueError("only a reproduced record is entered in the ledger")
    root, path = Path(root), Path(path)
    ledger = load_ledger(root)
    rel = str(path.resolve().relative_to(root.resolve()))
    ledger[rel] = {"sha256": sha256_file(path), "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "dfml_bench": package_versions().get("dfml-bench"), "episodes": v.n_episodes, "seconds": round(v.seconds, 1)}
    atomic_write_json(root / LEDGER, dict(sorted(ledger.items())))


def is_verified(root: str | Path, key: RunKey, ledger: dict | None = None) -> bool:
    """True if the record of ``key`` under ``root`` is in the ledger with its current bytes."""
    ledger = load_ledger(root) if ledger is None else ledger
    path = key.path(root)
    entry = ledger.get(str(path.relative_to(Path(root))))
    try:
        return isinstance(entry, dict) and entry.get("sha256") == sha256_file(path)
    except OSError:
        return False


def verification_section(records, root: str | Path) -> list[str]:
    """The leaderboard's section: per (suite, scale, scenario, method), seeds re-run verified vs submitted."""
    ledger = load_ledger(root)
    rows: dict[tuple, list[int]] = {}
    for r in records:
        k = (r.key.suite, r.key.scale, r.key.scenario, r.key.method)
        rows.setdefault(k, [0, 0])
        rows[k][0 if is_verified(root, r.key, ledger) else 1] += 1
    if not rows:
        return []
    from tabulate import tabulate

    table = [[f"{s} ({sc})", scen, m, str(v) if v else "-", str(n) if n else "-", "re-run verified" if not n else
              ("partly verified" if v else "submitted")] for (s, sc, scen, m), (v, n) in sorted(rows.items())]
    return ["\n## Re-run verification\n",
            "Seeds whose per-episode accuracies the maintainers reproduced by re-running the method in the isolated "
            "harness (`dfml-bench verify`, ledger `results/verified.json`, bound to each record's sha256), apart from "
            "seeds only submitted.\n",
            tabulate(table, headers=["suite", "scenario", "method", "verified seeds", "submitted seeds", "status"],
                     tablefmt="github", disable_numparse=True) + "\n"]


def find_records(paths: list[str | Path]) -> list[Path]:
    """Record files named by ``paths`` (files, or folders searched for records)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(iter_records(p) if p.is_dir() else [p])
    return out


def as_dict(v: Verification) -> dict:
    return asdict(v)
