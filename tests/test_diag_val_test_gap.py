"""benchmarks/diag_val_test_gap.py: meta-val gain against test gain, per record, on hand-made records."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def gap():
    return load_benchmark("diag_val_test_gap")


def _record(root, method, seed, test, curve=None, test_hash="T0", suite="s", scenario="sc", status="ok"):
    path = root / f"{suite}-cpu" / scenario / method / f"seed-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {"suite": suite, "scale": "cpu", "scenario": scenario, "method": method, "seed": seed, "status": status,
         "accuracy": {"mean": test}, "hashes": {"test_episodes": test_hash}, "extra": {"val_curve": curve} if curve else {}}
    path.write_text(json.dumps(d))


def test_gains_and_optimism_are_read_from_the_curve_and_the_random_record(tmp_path, gap):
    for seed in (0, 1):
        _record(tmp_path, "random", seed, 0.40)
    _record(tmp_path, "m", 0, 0.43, [[0, 0.35], [5, 0.41], [10, 0.39]])  # val +6, test +3
    _record(tmp_path, "m", 1, 0.45, [[0, 0.35], [5, 0.40]])  # val +5, test +5
    rows = gap.gap_rows(tmp_path)
    assert [(r.method, r.seed) for r in rows] == [("m", 0), ("m", 1)]
    assert rows[0].val_gain == pytest.approx(6.0) and rows[0].test_gain == pytest.approx(3.0) and rows[0].best_step == 5
    assert rows[0].optimism == pytest.approx(3.0) and rows[1].optimism == pytest.approx(0.0)
    (s,) = gap.summarise(rows, ("method",))
    assert s["n"] == 2 and s["optimism"] == pytest.approx(1.5)
    lo, hi = s["optimism_ci"]
    assert lo < 1.5 < hi and hi - lo > 10  # two records: a wide t interval (t_0.975,1 = 12.7)


def test_records_that_cannot_be_paired_are_left_out(tmp_path, gap):
    _record(tmp_path, "random", 0, 0.40)
    _record(tmp_path, "other-episodes", 0, 0.50, [[0, 0.35], [5, 0.45]], test_hash="T1")  # not the same test episodes
    _record(tmp_path, "no-curve", 0, 0.50)  # no meta-val curve (e.g. average, oracle)
    _record(tmp_path, "no-init", 0, 0.50, [[5, 0.45], [10, 0.44]])  # curve without the initialisation
    _record(tmp_path, "failed", 0, 0.50, [[0, 0.35], [5, 0.45]], status="failed")
    _record(tmp_path, "unpaired", 1, 0.50, [[0, 0.35], [5, 0.45]])  # no random record for seed 1
    assert gap.gap_rows(tmp_path) == []


def test_main_prints_the_table_and_writes_json_and_plot(tmp_path, gap, capsys):
    _record(tmp_path, "random", 0, 0.40)
    _record(tmp_path, "random", 1, 0.38)
    _record(tmp_path, "m", 0, 0.43, [[0, 0.35], [5, 0.41]])
    _record(tmp_path, "m", 1, 0.40, [[0, 0.34], [5, 0.37]])
    out, png = tmp_path / "gap.json", tmp_path / "gap.png"
    gap.main(["--results", str(tmp_path), "--by", "method", "--out", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert "| m | 2 | +4.50 | +2.50 | +2.00" in text and "2 records" in text
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 and data["summary"][0]["method"] == "m"
    assert png.stat().st_size > 1000
    with pytest.raises(SystemExit):
        gap.main(["--results", str(tmp_path), "--by", "colour"])
