"""Ablation runs: variants of a method, kept apart from the leaderboard's records."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from baselines.bidf_mkd import BiDfMKD
from dfml_bench.ablation import variants_of
from dfml_bench.cli import main
from dfml_bench.methods import MethodError
from dfml_bench.results import iter_records

SMALL = {"per_class": 2, "q": 2, "gen_iterations": 2, "max_visits": 2, "meta_iterations": 4, "meta_batch": 2,
         "inner_steps": 1, "kd_inner_steps": 1, "val_every": 2, "val_episodes": 5, "ngf": 8}


def test_variants_flip_one_switch_each():
    vs = variants_of("bidf-mkd")
    assert vs[0].name == "full" and vs[0].params == {}
    names = {v.name: v.params for v in vs[1:]}
    assert names["no-use_kd"] == {"use_kd": False}
    assert names["with-faithful_kd_bug"] == {"faithful_kd_bug": True}  # off by default: the variant turns it on
    assert len(vs) == 1 + len(BiDfMKD.ablation_switches)
    assert "ablation_switches" not in BiDfMKD().get_params()  # a class constant, not a hyper-parameter
    with pytest.raises(MethodError, match="not boolean"):
        variants_of("bidf-mkd", ["q"])
    with pytest.raises(MethodError, match="no ablation_switches"):
        variants_of("random")


def test_ablate_cli_runs_variants_apart_from_the_leaderboard(tmp_path):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    r = CliRunner().invoke(main, ["ablate", "--suite", "toy", "--method", "bidf-mkd", "--switches", "use_kd,use_boundary",
                                  "--episodes", "20", "--out", str(tmp_path), "--quiet", *sets])
    assert r.exit_code == 0, r.output
    table = (tmp_path / "ablations" / "toy-cpu-bidf-mkd.md").read_text()
    for v in ("full", "no-use_kd", "no-use_boundary"):
        assert f"| {v} |" in table
    rec = json.loads(next((tmp_path / "ablations" / "no-use_kd").rglob("seed-0.json")).read_text())
    assert rec["config"]["method"]["params"]["use_kd"] is False and rec["config"]["method"]["params"]["q"] == 2
    assert rec["status"] == "ok"
    assert iter_records(tmp_path) == []  # the leaderboard never sees ablation variants
    # resume: a second call runs nothing new and prints the same table
    r2 = CliRunner().invoke(main, ["ablate", "--suite", "toy", "--method", "bidf-mkd", "--switches", "use_kd,use_boundary",
                                   "--episodes", "20", "--out", str(tmp_path), "--quiet", *sets])
    assert r2.exit_code == 0 and table.split("\n\n")[-1].strip() in r2.output
    bad = CliRunner().invoke(main, ["ablate", "--suite", "toy", "--method", "bidf-mkd", "--switches", "q", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "not boolean" in bad.output
