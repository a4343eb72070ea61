"""Validation of result records before any table uses them.

Every record file is checked: readable JSON, the schema version this code reads, required fields of the
right types, a known status, and for ``ok`` records: a non-empty per-episode list of accuracies in
[0, 1] that agrees with its own summary (``accuracy.mean`` within 1e-6, ``accuracy.n`` equal), the
dataset / zoo / test-episode hashes present, and the file stored where its key says it belongs.
A record that fails any check is *rejected with the reason*; it is listed, never silently dropped and
never counted. ``failed`` and ``skipped`` records are valid but are kept apart (listed, not counted).

Reported numbers from papers (``results/reported/*.json``) have their own schema, checked by
:func:`load_reported`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import SCHEMA_VERSION, STATUSES, ResultRecord, RunKey, iter_records

MEAN_TOL = 1e-6
REQUIRED_HASHES = ("dataset", "zoo", "test_episodes")
KEY_FIELDS = {"suite": str, "scale": str, "scenario": str, "method": str, "seed": int}
DICT_FIELDS = ("config", "versions", "hashes", "seeds", "accuracy", "per_domain", "queries", "timing", "resources",
               "flags", "artifacts", "extra")


class InvalidRecord(ValueError):
    """A result record that must not be used, with the reason."""


@dataclass
class Rejected:
    path: str
    reason: str


@dataclass
class RecordSet:
    """The records under a results root, sorted into usable, not-ok (failed / skipped) and rejected."""

    ok: list[ResultRecord] = field(default_factory=list)
    not_ok: list[ResultRecord] = field(default_factory=list)
    invalid: list[Rejected] = field(default_factory=list)

    def filter(self, suite: str | None = None, scale: str | None = None) -> "RecordSet":
        def keep(r: ResultRecord) -> bool:
            return (suite is None or r.key.suite == suite) and (scale is None or r.key.scale == scale)

        return RecordSet([r for r in self.ok if keep(r)], [r for r in self.not_ok if keep(r)], list(self.invalid))


def record_problems(d: Any) -> list[str]:
    """Every problem found in a record's JSON dict (empty list: valid)."""
    if not isinstance(d, dict):
        return [f"a record must be a JSON object, got {type(d).__name__}"]
    probs: list[str] = []
    schema = d.get("schema")
    if schema != SCHEMA_VERSION:
        probs.append(f"schema version {schema!r}, this dfml-bench reads version {SCHEMA_VERSION}")
    for k, t in KEY_FIELDS.items():
        v = d.get(k)
        if not isinstance(v, t) or isinstance(v, bool) or (t is str and not v):
            probs.append(f"field {k!r} must be a non-empty {t.__name__}, got {v!r}")
    status = d.get("status")
    if status not in STATUSES:
        probs.append(f"status {status!r} is not one of {STATUSES}")
    for k in DICT_FIELDS:
        if k in d and not isinstance(d[k], dict):
            probs.append(f"field {k!r} must be an object, got {type(d[k]).__name__}")
    if "per_episode" in d and not isinstance(d["per_episode"], list):
        probs.append(f"field 'per_episode' must be a list, got {type(d['per_episode']).__name__}")
    if probs or status != "ok":
        if status in ("failed", "skipped") and not d.get("error"):
            probs.append(f"a {status} record must say why in 'error'")
        return probs
    return probs + _ok_problems(d)


def _ok_problems(d: dict) -> list[str]:
    probs: list[str] = []
    pe = d.get("per_episode") or []
    if not pe:
        return ["an ok record has no per-episode accuracies"]
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and 0.0 <= a <= 1.0 for a in pe):
        probs.append("per-episode accuracies must be finite numbers in [0, 1]")
        return probs
    acc = d.get("accuracy") or {}
    mean, n = acc.get("mean"), acc.get("n")
    actual = sum(pe) / len(pe)
    if n != len(pe):
        probs.append(f"summary says n = {n!r} episodes but the per-episode list has {len(pe)}")
    if not isinstance(mean, (int, float)) or not math.isfinite(mean) or abs(mean - actual) > MEAN_TOL:
        probs.append(f"summary mean {mean!r} disagrees with the mean of its per-episode list ({actual:.6f}); "
                     "the record was edited or corrupted")
    hashes = d.get("hashes") or {}
    missing = [h for h in REQUIRED_HASHES if not isinstance(hashes.get(h), str) or not hashes.get(h)]
    if missing:
        probs.append(f"missing hashes {missing}: without them the episodes it was evaluated on cannot be checked")
    if not isinstance((d.get("config") or {}).get("scenario"), dict):
        probs.append("config.scenario is missing")
    q = d.get("queries") or {}
    if not isinstance(q.get("total", 0), int) or q.get("total", 0) < 0:
        probs.append(f"queries.total must be a non-negative integer, got {q.get('total')!r}")
    budget = q.get("total_budget")
    if isinstance(budget, int) and isinstance(q.get("total"), int) and q["total"] > budget:
        probs.append(f"queries used ({q['total']}) exceed the budget ({budget})")
    return probs + recomputed_problems(d)


# ------------------------------------------------------------------ recomputation checks (issue 13)
# What the harness can recompute from a record alone, or from the installed plugins. Called from the
# single entry point (record_problems -> _ok_problems); the canonical test-episode hash, which needs
# the dataset, is recomputed by :func:`episode_problems` (``dfml-bench verify``, ``load_records(deep=True)``).

ACC_TOL = 1e-4  # per-episode accuracies are stored rounded to 6 decimals


def recomputed_problems(d: dict) -> list[str]:
    """Every cheap recomputation check of an ``ok`` record."""
    return query_problems(d) + episode_size_problems(d) + flag_problems(d)


def query_problems(d: dict) -> list[str]:
    """``per_api`` non-negative integers summing to ``total``; within the per-API and total budgets, and
    those budgets the scenario's own (a record cannot claim a larger budget than its scenario)."""
    q = d.get("queries") or {}
    if not q:
        return []
    probs = []
    per_api, total = q.get("per_api"), q.get("total")
    if per_api is not None:
        if not isinstance(per_api, list) or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in per_api):
            return [f"queries.per_api must be a list of non-negative integers, got {per_api!r}"]
        if isinstance(total, int) and sum(per_api) != total:
            probs.append(f"queries.per_api sums to {sum(per_api)} but queries.total says {total}")
        pb = q.get("per_api_budget")
        if isinstance(pb, int) and any(u > pb for u in per_api):
            probs.append(f"an API answered {max(per_api)} queries, over the per-API budget of {pb}")
    sc = (d.get("config") or {}).get("scenario") or {}
    for field_, key in (("total_budget", "budget_total"), ("per_api_budget", "budget_per_api")):
        if key in sc and field_ in q and q[field_] != sc[key]:
            probs.append(f"queries.{field_} is {q[field_]!r} but the scenario's {key} is {sc[key]!r}")
    return probs


def episode_size_problems(d: dict) -> list[str]:
    """Accuracies possible for the episode size (k / (ways * queries)), and as many episodes as the
    scenario (or the run's ``--episodes``) asks for."""
    sc = (d.get("config") or {}).get("scenario") or {}
    eps = sc.get("episodes") if isinstance(sc.get("episodes"), dict) else None
    if not eps:
        return []
    probs = []
    ways, queries = eps.get("ways"), eps.get("queries")
    if isinstance(ways, int) and isinstance(queries, int) and ways > 0 and queries > 0:
        m = ways * queries
        bad = [a for a in d.get("per_episode") or [] if abs(a * m - round(a * m)) > ACC_TOL * m]
        if bad:
            probs.append(f"{len(bad)} per-episode accuracies (e.g. {bad[0]!r}) are impossible for episodes of "
                         f"{m} query images (they must be multiples of 1/{m})")
    want = ((d.get("config") or {}).get("options") or {}).get("episodes") or eps.get("n_episodes")
    n = len(d.get("per_episode") or [])
    if isinstance(want, int) and n != want:
        probs.append(f"the record has {n} per-episode accuracies but its scenario asks for {want} test episodes")
    return probs


_REGISTERED_FLAGS: dict[str, bool | None] = {}


def registered_not_data_free(method: str) -> bool | None:
    """The ``not_data_free`` flag of the method registered under ``method`` in this installation (read
    in a throwaway process: a plugin's code never runs in this one); ``None`` if it is not installed."""
    if method not in _REGISTERED_FLAGS:
        from .registry import entry_info

        e = entry_info("dfml_bench.methods", method)
        if e is None:
            _REGISTERED_FLAGS[method] = None
        elif e.obj is not None or e.package == "dfml-bench":  # registered in this process, or a built-in
            from importlib import import_module

            obj = e.obj
            if obj is None:
                module, _, attr = e.value.partition(":")
                obj = import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            _REGISTERED_FLAGS[method] = bool(getattr(obj, "not_data_free", False))
        else:
            from .isolation import choose_user, describe_entries

            info = describe_entries({method: e.value}, choose_user()).get(method) or {}
            flag = info.get("not_data_free")
            _REGISTERED_FLAGS[method] = bool(flag) if isinstance(flag, bool) else None
    return _REGISTERED_FLAGS[method]


def flag_problems(d: dict) -> list[str]:
    """``flags.not_data_free`` must be the registered method's own flag (an oracle cannot pass as data-free),
    and the method must have been fitted in an isolated process."""
    flags = d.get("flags") or {}
    if flags.get("isolated") is False:
        return ["its method was fitted in the harness's own process (isolate=False, a debugging mode): not counted"]
    if "not_data_free" not in flags or flags.get("reported"):
        return []
    want = registered_not_data_free(str(d.get("method")))
    if want is not None and bool(flags["not_data_free"]) != want:
        return [f"flags.not_data_free is {flags['not_data_free']!r} but the registered method {d.get('method')!r} "
                f"says {want!r}"]
    return []


def canonical_test_hash(suite: str, scale: str, scenario: str, seed: int, n_episodes: int | None,
                        data_root: str | None = None) -> str:
    """The hash of the frozen test episodes of (suite, scale, scenario, seed), recomputed here."""
    from .datasets import load_dataset
    from .runner import scenario_episodes
    from .scenarios import get_suite

    sc = get_suite(suite, scale).scenario(scenario)
    ds = load_dataset(sc.dataset, seed=sc.dataset_seed, data_root=data_root, scale=scale)
    test, _ = scenario_episodes(sc, ds, seed, n_episodes)
    return test.hash


def episode_problems(d: dict, data_root: str | None = None) -> list[str]:
    """The record's test-episode hash must be the canonical one of its (suite, scale, scenario, seed)."""
    try:
        n = ((d.get("config") or {}).get("options") or {}).get("episodes")
        want = canonical_test_hash(d["suite"], d["scale"], d["scenario"], int(d["seed"]), n, data_root)
    except Exception as exc:  # unknown suite, missing dataset, ...
        return [f"cannot recompute its test episodes: {type(exc).__name__}: {exc}"]
    got = (d.get("hashes") or {}).get("test_episodes")
    if got != want:
        return [f"its test-episode hash {str(got)[:12]}... is not the canonical {want[:12]}... of "
                f"({d['suite']}, {d['scale']}, {d['scenario']}, seed {d['seed']}): evaluated on other episodes"]
    return []


def validate_record_dict(d: Any) -> ResultRecord:
    """The :class:`ResultRecord` of a valid dict; :class:`InvalidRecord` listing every problem otherwise."""
    probs = record_problems(d)
    if probs:
        raise InvalidRecord("; ".join(probs))
    try:
        return ResultRecord.from_dict(d)
    except TypeError as exc:  # unknown fields
        raise InvalidRecord(f"unexpected fields: {exc}") from exc


def validate_record(record: ResultRecord) -> None:
    """Raise :class:`InvalidRecord` if an in-memory record would be rejected."""
    validate_record_dict(record.to_dict())


def validate_file(path: str | Path, root: str | Path | None = None) -> ResultRecord:
    """Read and validate one record file; with ``root``, also check it lies where its key says."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRecord(f"cannot read JSON: {exc}") from exc
    rec = validate_record_dict(d)
    if root is not None:
        want = rec.key.path(root)
        if path.resolve() != want.resolve():
            raise InvalidRecord(f"its key ({rec.key.suite}, {rec.key.scale}, {rec.key.scenario}, {rec.key.method}, seed "
                                f"{rec.key.seed}) belongs at {_show(want, root)}, not here (moved or copied by hand?)")
    return rec


@dataclass
class RecordCheck:
    """What is stored for one run key: ``state`` is ``missing``, ``invalid`` (with ``reason``), or the
    status of a valid record (``ok`` / ``failed`` / ``skipped``, with ``record``)."""

    state: str
    record: ResultRecord | None = None
    reason: str = ""


def check_record(out: str | Path, key: RunKey) -> RecordCheck:
    """The one answer every reader of a run folder uses for a key (resume, ``status``, ``submit``): the
    same checks as the leaderboard's, location included."""
    path = key.path(out)
    if not path.exists():
        return RecordCheck("missing")
    try:
        rec = validate_file(path, out)
    except InvalidRecord as exc:
        return RecordCheck("invalid", reason=str(exc))
    return RecordCheck(rec.status, rec)


def set_aside_if_invalid(path: str | Path, root: str | Path | None = None) -> Path | None:
    """Rename an invalid record file to ``<name>.rejected-<UTC time>`` (never read as a record again, never
    deleted) so that a re-run can write a fresh one; valid files are left alone. Returns the new path."""
    path = Path(path)
    try:
        validate_file(path, root)
        return None
    except InvalidRecord:
        pass
    except FileNotFoundError:
        return None
    dest = path.with_name(f"{path.name}.rejected-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.rejected-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{n}")
        n += 1
    try:
        os.replace(path, dest)
    except FileNotFoundError:  # another process set it aside first
        return None
    return dest


def _show(path: Path, root: str | Path) -> str:
    """``path`` as ``<root name>/<relative path>`` so pages carry no machine-specific prefixes."""
    root = Path(root)
    try:
        return str(Path(root.resolve().name) / Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def load_records(root: str | Path, suite: str | None = None, scale: str | None = None) -> RecordSet:
    """Validate every record under ``root`` (optionally of one suite / scale)."""
    out = RecordSet()
    root = Path(root)
    if not root.exists():
        return out
    for p in iter_records(root):
        if "reported" in p.relative_to(root).parts[:1]:
            continue
        try:
            rec = validate_file(p, root)
        except InvalidRecord as exc:
            out.invalid.append(Rejected(_show(p, root), str(exc)))
            continue
        if (suite is not None and rec.key.suite != suite) or (scale is not None and rec.key.scale != scale):
            continue
        (out.ok if rec.status == "ok" else out.not_ok).append(rec)
    return out


# ------------------------------------------------------------------------------------------ reported numbers

REPORTED_ENTRY = {"method": str, "dataset": str, "ways": int, "shots": int, "accuracy": (int, float), "source": str}


@dataclass
class Reported:
    """One number a paper reported (never re-run here)."""

    method: str
    dataset: str
    ways: int
    shots: int
    accuracy: float  # percent, as printed
    source: str
    paper: str = ""
    venue: str = ""
    setting: str = ""
    backbone: str = ""
    ci95: float | None = None
    checked: str = ""  # how the number was read: "pdf", "aggregator page", ...
    note: str = ""
    file: str = ""


def load_reported(root: str | Path) -> tuple[list[Reported], list[Rejected]]:
    """Entries of ``root/reported/*.json`` (or ``root`` itself if it is that folder), with rejections."""
    root = Path(root)
    folder = root if root.name == "reported" else root / "reported"
    entries: list[Reported] = []
    bad: list[Rejected] = []
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            bad.append(Rejected(_show(p, folder.parent), f"cannot read JSON: {exc}"))
            continue
        if not isinstance(d, dict) or d.get("kind") != "reported" or d.get("schema") != 1:
            bad.append(Rejected(_show(p, folder.parent), "a reported-results file needs \"kind\": \"reported\" and \"schema\": 1"))
            continue
        common = {k: d.get(k, "") for k in ("paper", "venue")}
        for i, e in enumerate(d.get("entries") or []):
            probs = [f"{k!r} must be {t.__name__ if isinstance(t, type) else 'a number'}"
                     for k, t in REPORTED_ENTRY.items() if not isinstance(e.get(k), t) or isinstance(e.get(k), bool)]
            if not probs and not 0 <= e["accuracy"] <= 100:
                probs.append(f"accuracy {e['accuracy']} is not a percentage")
            if probs:
                bad.append(Rejected(f"{_show(p, folder.parent)}#entries[{i}]", "; ".join(probs)))
                continue
            known = {k: v for k, v in {**common, **e}.items() if k in Reported.__dataclass_fields__}
            entries.append(Reported(**{**known, "accuracy": float(e["accuracy"]), "file": p.name}))
        if not d.get("entries"):
            bad.append(Rejected(_show(p, folder.parent), "no entries"))
    return entries, bad
