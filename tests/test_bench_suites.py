"""benchmarks/bench_suites.py --from-records: a cold seed's cost replayed from records and zoo manifests."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark
from dfml_bench.scenarios import get_suite


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_suites")


def _record(root, suite, scenario, method, seed, seconds, zoo="Z1", scale="cpu", status="ok"):
    path = root / f"{suite}-{scale}" / scenario / method / f"seed-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": suite, "scale": scale, "scenario": scenario, "method": method, "seed": seed,
                                "status": status, "timing": {"total_seconds": seconds}, "hashes": {"zoo": zoo}}))


def _zoo(home, name, zhash, seconds):
    d = home / "zoos" / name
    d.mkdir(parents=True)
    models = {str(i): {"train_seconds": s} for i, s in enumerate(seconds)}
    (d / "manifest.json").write_text(json.dumps({"hash": zhash, "models": models}))


def test_replay_shares_the_zoo_and_runs_the_longest_job_first(tmp_path, bench):
    suite = get_suite("blackbox-homo", "cpu")
    scenario = suite.scenarios[0].name
    secs = dict(zip(suite.methods, [100.0, 200.0, 900.0, 300.0, 50.0]))
    for m, s in secs.items():
        _record(tmp_path / "results", "blackbox-homo", scenario, m, 0, s)
    _record(tmp_path / "results", "blackbox-homo", "a-scenario-the-suite-no-longer-has", "random", 0, 5000.0)
    _record(tmp_path / "results", "blackbox-homo", scenario, "random", 1, 10.0)  # seed 1: one job only
    _zoo(tmp_path / "home", "z", "Z1", [60.0] * 10)
    rows = bench.record_costs(tmp_path / "results", tmp_path / "home", 2, ["blackbox-homo"])
    assert [(r.suite, r.seed) for r in rows] == [("blackbox-homo", 0), ("blackbox-homo", 1)]
    full, partial = rows
    assert full.jobs == secs and full.missing == () and full.zoo_seconds == pytest.approx(600.0)
    # zoo 600 s over 2 workers, then 900 | 300+200+100+50 (longest first): 300 + 900
    assert full.wall == pytest.approx(1200.0) and full.longest == (suite.methods[2], 900.0)
    assert set(partial.missing) == set(suite.methods) - {"random"}
    table = bench.records_markdown(rows)
    assert "| blackbox-homo | 0 | 20.0 min | 30 min | yes |" in table
    assert "incomplete (no record:" in table.splitlines()[-1]


def test_over_budget_and_unknown_zoo_are_said(tmp_path, bench):
    suite = get_suite("blackbox-homo", "cpu")
    for m in suite.methods:
        _record(tmp_path / "results", "blackbox-homo", suite.scenarios[0].name, m, 0, 2000.0, zoo="Z2")
    rows = bench.record_costs(tmp_path / "results", tmp_path / "home", 2, ["blackbox-homo"])
    assert rows[0].zoo_seconds is None and rows[0].wall is None
    assert "n/a (zoo not in cache)" in bench.records_markdown(rows)
    _zoo(tmp_path / "home", "z2", "Z2", [10.0])
    rows = bench.record_costs(tmp_path / "results", tmp_path / "home", 2, ["blackbox-homo"])
    assert rows[0].wall > 1800 and "**no**" in bench.records_markdown(rows)
