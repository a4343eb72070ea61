"""Submissions through entry points: a third-party package declares a method under ``dfml_bench.methods``
(here a temporary ``*.dist-info`` on ``sys.path``, which ``importlib.metadata`` discovers like an installed
package), `dfml-bench list methods` shows it with its package and version, `dfml-bench run` runs it on the
toy suite, and the regenerated leaderboard ranks it. A plugin that fails to import is shown with its
error and breaks nothing else."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfml_bench.cli import main
from dfml_bench.registry import register, unregister
from dfml_bench.results import RunKey

PLUGIN = '''
"""A tiny third-party DFML method: the first zoo model's weights where they fit, else a fresh init."""
import torch
from dfml_bench.methods import Method


class FirstModel(Method):
    name = "first_model"
    description = "first zoo model as the initialisation (test plugin)"
    bias = 0.0

    def fit(self, context):
        model = context.make_backbone()
        if context.access == "whitebox":
            src = context.whitebox()[0].model.state_dict()
            own = model.state_dict()
            model.load_state_dict({k: (src[k] if k in src and src[k].shape == v.shape else v) for k, v in own.items()})
        with torch.no_grad():
            model.head.bias.fill_(self.bias)
        return model
'''


def _dist(site: Path, name: str, version: str, entry_points: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A temporary 'site-packages' with two plugin packages: a working one and a broken one. World-readable
    (outside pytest's private tmp folder): the fit process imports the plugin as an unprivileged user
    when the tests run as root."""
    import os
    import shutil
    import tempfile

    site = Path(tempfile.mkdtemp(prefix="dfml-plugin-site-"))
    os.chmod(site, 0o755)
    (site / "toyplug").mkdir(parents=True)
    (site / "toyplug" / "__init__.py").write_text(PLUGIN)
    _dist(site, "toyplug", "0.3.1", "[dfml_bench.methods]\nfirst_model = toyplug:FirstModel\n")
    _dist(site, "brokenplug", "0.0.1", "[dfml_bench.methods]\nbroken = brokenplug_missing.module:Nope\n")
    for root, dirs, files in os.walk(site):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), 0o755)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield site
    sys.modules.pop("toyplug", None)
    importlib.invalidate_caches()
    shutil.rmtree(site, ignore_errors=True)


def test_list_shows_plugin_package_version_and_broken_plugin(site):
    res = CliRunner().invoke(main, ["list", "methods"])
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines()[1:] if ln.strip()}
    assert "[toyplug 0.3.1]" in lines["first_model"] and "first zoo model" in lines["first_model"]
    assert "[brokenplug 0.0.1] BROKEN: ModuleNotFoundError" in lines["broken"] and "brokenplug_missing" in lines["broken"]
    assert "[dfml-bench 0.1.0]" in lines["random"] and "BROKEN" not in lines["random"]  # the others still load


def test_broken_plugin_is_refused_by_submit_with_its_error(site, tmp_path):
    res = CliRunner().invoke(main, ["submit", "--suite", "toy", "--method", "broken", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0
    assert "failed to import" in res.output and "brokenplug_missing" in res.output
    assert not (tmp_path / "r").exists()  # nothing was run


def test_plugin_runs_through_cli_and_is_ranked_in_the_leaderboard(site, tmp_path):
    out = tmp_path / "results"
    runner = CliRunner()
    res = runner.invoke(main, ["run", "--suite", "toy", "--methods", "first_model,random", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    rec = json.loads(RunKey("toy", "cpu", "wb", "first_model", 0).path(out).read_text())
    assert rec["status"] == "ok" and rec["versions"]["method_package"] == {
        "package": "toyplug", "version": "0.3.1", "entry_point": "toyplug:FirstModel"}
    assert "first_model" in res.output  # run prints the paired-statistics table

    lb = tmp_path / "leaderboard.md"
    res = runner.invoke(main, ["leaderboard", "--results", str(out), "--out", str(lb), "--bootstrap", "200"])
    assert res.exit_code == 0, res.output
    assert "4 records counted" in res.output
    page = lb.read_text()
    for scen in ("wb", "bb"):
        table, _, controls = page.split(f"### {scen}\n")[1].split("\n### ")[0].partition("Gain over the controls")
        assert "| first_model " in controls  # the plugin's gain over random is on the page too
        rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| rank")]
        assert len(rows) == 2 and any("first_model" in r for r in rows) and any("random" in r for r in rows)
        assert rows[0].split("|")[1].strip() in ("1", "1.5") and "**" in rows[0]  # ranked, best in bold
    ranks = page.split("### Average rank (toy, cpu)")[1]
    assert "first_model | toyplug 0.3.1" in " ".join(ranks.split())


def test_submit_runs_the_leaderboard_seeds_and_prints_what_to_commit(site, tmp_path):
    from conftest import toy_suite

    def one_scenario(scale: str):
        s = toy_suite(scale)
        # the leaderboard's seeds differ from the suite's default seeds ([0]): submit must use them
        return dataclasses.replace(s, name="toy-lb", scenarios=s.scenarios[:1], leaderboard_seeds=[1])

    register("dfml_bench.suites", "toy-lb", lambda: {"toy-lb": one_scenario})
    try:
        out = tmp_path / "results"
        res = CliRunner().invoke(main, ["submit", "--suite", "toy-lb", "--method", "first_model", "--out", str(out), "--quiet"])
        assert res.exit_code == 0, res.output
        path = RunKey("toy-lb", "cpu", "wb", "first_model", 1).path(out)
        assert path.exists() and not RunKey("toy-lb", "cpu", "wb", "first_model", 0).path(out).exists()
        assert "1 records ready for a pull request (seeds [1])" in res.output
        assert f"git add {path}" in res.output and "dfml-bench leaderboard" in res.output
        res = CliRunner().invoke(main, ["submit", "--suite", "toy-lb", "--method", "nope", "--out", str(out)])
        assert res.exit_code != 0 and "unknown method" in res.output
    finally:
        unregister("dfml_bench.suites", "toy-lb")
