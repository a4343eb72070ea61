"""Record validation, the generated leaderboard page, reports and the report CLI, on synthetic records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dfml_bench.cli import main
from dfml_bench.leaderboard import render, write_leaderboard
from dfml_bench.report import budget_groups, build_report, render_text, write_report
from dfml_bench.results import ResultRecord, RunKey, summary_of, write_record
from dfml_bench.validate import InvalidRecord, load_records, load_reported, record_problems, validate_record

REPO = Path(__file__).resolve().parents[1]


def make(method: str, acc, *, scenario: str = "wb", seed: int = 0, suite: str = "toy", budget: int | None = None,
         queries: int = 0, not_data_free: bool = False, per_domain: dict | None = None, ep_hash: str | None = None,
         status: str = "ok", error: str | None = None) -> ResultRecord:
    acc = [float(a) for a in acc]
    cfg = {"name": scenario, "dataset": "toy", "access": "blackbox", "budget_total": budget, "budget_per_api": None,
           "episodes": {"ways": 5, "shots": 1}, "description": f"scenario {scenario}"}
    return ResultRecord(
        key=RunKey(suite, "cpu", scenario, method, seed), status=status, error=error,
        config={"scenario": cfg}, per_episode=acc if status == "ok" else [],
        accuracy=summary_of(acc) if status == "ok" else {},
        hashes={"dataset": "d" * 64, "zoo": "z" * 64, "test_episodes": ep_hash or f"{seed:02d}" * 32} if status == "ok" else {},
        queries={"total": queries, "total_budget": budget}, timing={"total_seconds": 2.5},
        resources={"device": "cpu"}, flags={"not_data_free": not_data_free, "reported": False},
        per_domain=per_domain or {}, versions={"method_package": {"package": "pkg", "version": "1.0"}},
    )


def accs(seed: int, p: float, n: int = 60):
    return np.random.default_rng(seed).binomial(25, p, size=n) / 25


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    base = accs(0, 0.4)
    for seed in (0, 1):
        write_record(root, make("good", base, seed=seed))
        write_record(root, make("twin", base, seed=seed))
        write_record(root, make("bad", np.clip(base - 0.2, 0, 1), seed=seed))
        write_record(root, make("oracle", np.clip(base + 0.3, 0, 1), seed=seed, not_data_free=True))
    write_record(root, make("good", accs(1, 0.5), scenario="bb"))
    write_record(root, make("bad", accs(2, 0.3), scenario="bb"))
    write_record(root, make("twin", [], scenario="bb", status="skipped", error="needs white-box access"))
    return root


def test_validation_rejects_a_mean_that_disagrees_with_its_episodes():
    r = make("m", [0.2, 0.4, 0.6])
    validate_record(r)
    r.accuracy["mean"] += 0.01
    with pytest.raises(InvalidRecord, match="disagrees with the mean of its per-episode list"):
        validate_record(r)
    r.accuracy["mean"] -= 0.01 - 5e-7  # within 1e-6: accepted (float rounding of the summary)
    validate_record(r)


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.update(schema=99), "schema version"),
    (lambda d: d["hashes"].pop("test_episodes"), "missing hashes"),
    (lambda d: d["accuracy"].update(n=7), "n = 7"),
    (lambda d: d.update(status="great"), "status"),
    (lambda d: d.update(seed="0"), "'seed'"),
    (lambda d: d["per_episode"].append(1.5), "[0, 1]"),
    (lambda d: d.update(per_episode=[]), "no per-episode"),
    (lambda d: d["queries"].update(total=10, total_budget=5), "exceed the budget"),
    (lambda d: d.update(status="failed", error=None), "say why"),
])
def test_validation_reasons(edit, reason):
    d = make("m", [0.2, 0.4]).to_dict()
    edit(d)
    probs = record_problems(d)
    assert probs and any(reason in p for p in probs), probs


def test_leaderboard_lists_invalid_and_not_ok_records_without_counting_them(results, tmp_path):
    tampered = RunKey("toy", "cpu", "wb", "bad", 0).path(results)
    d = json.loads(tampered.read_text())
    d["accuracy"]["mean"] = 0.99  # someone edited the summary
    tampered.write_text(json.dumps(d))
    moved = results / "toy-cpu" / "wb" / "good" / "seed-7.json"  # a copy whose key says seed 0
    moved.write_text(RunKey("toy", "cpu", "wb", "good", 0).path(results).read_text())
    (results / "toy-cpu" / "wb" / "good" / "seed-8.json").write_text("{not json")

    rs = load_records(results)
    assert len(rs.invalid) == 3 and len(rs.not_ok) == 1
    assert [r.key.seed for r in rs.ok if r.key.scenario == "wb" and r.key.method == "bad"] == [1]

    page = write_leaderboard(results, tmp_path / "lb.md", n_boot=200).read_text()
    invalid = page.split("## Invalid records (rejected, not counted)")[1]
    assert "`results/toy-cpu/wb/bad/seed-0.json`: summary mean 0.99 disagrees with the mean" in invalid
    assert "`results/toy-cpu/wb/good/seed-7.json`: its key" in invalid and "belongs at results/toy-cpu/wb/good/seed-0.json" in invalid
    assert "`results/toy-cpu/wb/good/seed-8.json`: cannot read JSON" in invalid
    assert str(tmp_path) not in page  # no machine-specific paths on the page
    assert "`toy-cpu/bb/twin/seed-0` skipped: needs white-box access" in page
    wb = page.split("### wb")[1].split("###")[0]
    bad_row = next(ln for ln in wb.splitlines() if "| bad" in ln)
    assert bad_row.split("|")[6].strip() == "1"  # seeds column: only seed 1 of 'bad' is counted


def test_leaderboard_page_ranks_marks_and_references(results, tmp_path):
    page = write_leaderboard(results, tmp_path / "lb.md", n_boot=200).read_text()
    assert page.startswith("# dfml-bench leaderboard")
    assert "## How this protocol differs from the papers'" in page and "No test-set selection" in page
    assert "## toy (cpu scale)" in page
    wb = page.split("### wb")[1].split("\n### ")[0]
    lines = [ln for ln in wb.splitlines() if ln.startswith("| ") and "rank" not in ln]
    # good and twin have identical episodes: one is best (bold), the other tied; bad is ranked third
    assert lines[0].startswith("| 1.5") and "**" in lines[0]
    assert lines[1].startswith("| 1.5") and "≈" in lines[1] and "+0.00 [+0.00, +0.00]" in lines[1]
    assert lines[2].startswith("| 3") and "| bad " in lines[2] and "≈" not in lines[2]
    # the oracle is better but not data-free: a reference row, outside the ranking
    assert lines[3].startswith("| ref") and "oracle (not data-free, reference)" in lines[3]
    assert "2 (" in lines[0]  # two seeds with their spread
    assert "### Average rank (toy, cpu)" in page and "pkg 1.0" in page
    # the average rank table lists twin, which is missing from bb, apart, with its rank where it ran
    ranks = page.split("### Average rank")[1]
    assert [ln.split("|")[1:3] for ln in ranks.splitlines() if ln.startswith("| ") and "avg rank" not in ln] == [
        [" 1.00       ", " good     "], [" 2.00       ", " bad      "], [" (1.50)     ", " twin     "]]


def test_leaderboard_reported_section_from_the_repository(results, tmp_path):
    entries, bad = load_reported(REPO / "results")
    assert not bad and entries
    assert {e.dataset for e in entries} >= {"cifar-fs", "mini-imagenet"}
    free = [e for e in entries if e.method == "FREE" and e.dataset == "cifar-fs" and e.shots == 1]
    assert 39.13 in [e.accuracy for e in free] and all(e.source for e in entries)
    page = render(load_records(results), entries, n_boot=100)
    rep = page.split("## Reported in papers (not re-run here)")[1]
    assert "### cifar-fs" in rep and "39.13" in rep and "wizwand" in rep and "not** comparable" in rep
    assert "| FREE" not in page.split("## Reported in papers")[0]  # never in the re-run tables


def test_reported_file_validation(tmp_path):
    folder = tmp_path / "reported"
    folder.mkdir()
    (folder / "x.json").write_text(json.dumps({"schema": 1, "kind": "reported", "entries": [
        {"method": "M", "dataset": "cub", "ways": 5, "shots": 1, "accuracy": 40.0, "source": "paper"},
        {"method": "M", "dataset": "cub", "ways": 5, "shots": 5, "accuracy": 140.0, "source": "paper"},
        {"method": "M", "dataset": "cub", "ways": 5, "shots": 5, "accuracy": 50.0}]}))
    entries, bad = load_reported(tmp_path)
    assert len(entries) == 1 and len(bad) == 2
    assert "not a percentage" in bad[0].reason and "'source'" in bad[1].reason


def test_episode_mismatch_is_refused_on_the_page(tmp_path):
    root = tmp_path / "r"
    write_record(root, make("a", [0.2, 0.4]))
    write_record(root, make("b", [0.4, 0.4], ep_hash="f" * 64))
    page = write_leaderboard(root, tmp_path / "lb.md", n_boot=100).read_text()
    assert "## Scenarios not compared" in page and "test_episodes hashes differ" in page
    assert "### wb" not in page


def test_report_files_budget_plot_and_domains(tmp_path):
    root = tmp_path / "r"
    for i, budget in enumerate((1000, 10_000, 100_000)):
        for m, p in (("zo", 0.3 + 0.05 * i), ("random", 0.25)):
            write_record(root, make(m, accs(i, p, 40), scenario=f"budget-{budget}", budget=budget,
                                    queries=budget if m == "zo" else 0,
                                    per_domain={"glyphs-a": {"mean": p}, "glyphs-b": {"mean": p / 2}}))
    rep = build_report(load_records(root), n_boot=100)
    tables = rep.tables[("toy", "cpu")]
    assert [len(g) for g in budget_groups(tables)] == [3]
    text = render_text(rep, "simple")
    assert "glyphs-a %" in text and "1,000 / 1,000" in text
    paths = write_report(rep, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"report.md", "report.txt", "toy-cpu-scenarios.csv", "toy-cpu-ranks.csv", "toy-cpu-bars.png",
            "toy-cpu-cd.png", "toy-cpu-budget-0.png"} <= names
    rows = list(csv.DictReader((tmp_path / "out" / "toy-cpu-scenarios.csv").open()))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"zo", "random"}
    assert json.loads(rows[0]["per_domain"]).keys() == {"glyphs-a", "glyphs-b"}


def test_report_cli(results, tmp_path):
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", str(results), "--suite", "toy", "--out", str(out), "--bootstrap", "200",
                                    "--format", "markdown"])
    assert res.exit_code == 0, res.output
    assert "### wb" in res.output and "**good**" in res.output and "twin ≈" in res.output
    assert (out / "report.md").exists() and (out / "toy-cpu-bars.png").exists()
    res = CliRunner().invoke(main, ["report", str(results), "--suite", "nope"])
    assert res.exit_code != 0 and "no result records of suite 'nope'" in res.output


def test_gain_over_the_controls_counts_the_seeds_a_method_wins(tmp_path):
    """Issue 12: every table says how much of a method's accuracy is knowledge from the zoo: its paired
    difference to random and the placebo, and in how many seeds it is better with both tests p < 0.01."""
    from dfml_bench.report import control_rows

    root = tmp_path / "results"
    for seed in (0, 1, 2):
        base = accs(10 + seed, 0.35, n=200)
        write_record(root, make("random", base, seed=seed))
        write_record(root, make("placebo", np.clip(base + 0.04, 0, 1), seed=seed))
        write_record(root, make("strong", np.clip(base + 0.12, 0, 1), seed=seed))  # beats both controls in every seed
        lift = 0.12 if seed == 0 else 0.0  # beats random in seed 0 only, equals it otherwise
        write_record(root, make("once", np.clip(base + lift, 0, 1), seed=seed))
    write_record(root, make("good", accs(1, 0.5), scenario="bb"))  # a scenario without controls
    write_record(root, make("bad", accs(2, 0.3), scenario="bb"))
    rep = build_report(load_records(root), n_boot=200)
    (table,) = [t for t in rep.tables[("toy", "cpu")] if t.scenario == "wb"]
    head, rows = control_rows(table, rep.records.ok, n_boot=200)
    assert head[0] == "method" and [h.split(" [")[0] for h in head[1:]] == ["Δ vs random", "Δ vs placebo"]
    by = {r[0]: r[1:] for r in rows}
    assert set(by) == {"strong", "once", "placebo"}  # random is not measured against itself
    assert by["strong"][0].startswith("**+12.") and by["strong"][0].endswith("· 3/3**")
    assert by["strong"][1].startswith("**+8.") and by["strong"][1].endswith("· 3/3**")
    assert by["once"][0].startswith("+4.") and by["once"][0].endswith("· 1/3") and "**" not in by["once"][0]
    assert by["once"][1].endswith("· 1/3")  # above the placebo only where it gained: seed 0
    assert by["placebo"][1] == "" and by["placebo"][0].endswith("· 3/3**")
    (bb,) = [t for t in rep.tables[("toy", "cpu")] if t.scenario == "bb"]
    assert control_rows(bb, rep.records.ok) == ([], [])
    assert render_text(rep, tablefmt="simple").count("Gain over the controls") == 1  # `report` / `run` print it too
    page = write_leaderboard(root, tmp_path / "lb.md", n_boot=200).read_text()
    assert page.split("### wb")[1].count("Gain over the controls") == 1
    assert "Gain over the controls" not in page.split("### bb")[1].split("\n### ")[0]
