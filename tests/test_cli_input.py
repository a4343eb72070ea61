"""Bad input on the command line (issue 14): every argument is checked before any work, with a
one-line error that names the argument and the fix; no traceback reaches the user (``--debug`` shows
one); a command that writes a page refuses when its input folder does not exist."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfml_bench import cli as cli_mod
from dfml_bench.cli import main
from dfml_bench.results import ResultRecord, RunKey, summary_of, write_record


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(res, *needles: str) -> None:
    """Exit status non-zero, a one-line ``Error:`` naming what was wrong, and no Python traceback."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), f"a traceback would reach the user: {res.exception!r}\n{res.output}"
    assert "Traceback" not in res.output and "Aborted!" not in res.output, res.output
    assert "Error:" in res.output, res.output
    for n in needles:
        assert n in res.output, res.output


@pytest.mark.parametrize("value, needle", [
    (" ", "names no seed"),           # planned nothing and exited 0
    (",", "names no seed"),
    ("0,,1", "empty item"),
    ("0,0", "twice"),                 # ran job 0 twice
    ("0,00", "twice"),
    ("a", "not an integer"),
    ("-1", "negative"),
])
def test_bad_seeds_are_refused_before_any_work(tmp_path, value, needle):
    out = tmp_path / "res"
    res = invoke("run", "--suite", "toy", "--seeds", value, "--out", out, "--quiet")
    assert_clean_error(res, "--seeds", needle)
    assert not out.exists()  # nothing was made


@pytest.mark.parametrize("value, needle", [("", "names no method"), (",,", "names no method"), (" , ", "names no method"),
                                           ("random,random", "twice"), ("random,,average", "empty item")])
def test_bad_methods_are_refused_not_replaced_by_the_defaults(tmp_path, value, needle):
    out = tmp_path / "res"
    res = invoke("run", "--suite", "toy", "--methods", value, "--out", out, "--quiet")
    assert_clean_error(res, "--methods", needle)
    assert not out.exists()


def test_launcher_options_of_the_other_launcher_are_refused(tmp_path):
    res = invoke("run", "--suite", "toy", "--launcher", "submitit", "--jobs", "4", "--out", tmp_path / "a")
    assert_clean_error(res, "--jobs 4 applies to --launcher local", "--array-parallelism")
    res = invoke("run", "--suite", "toy", "--partition", "gpu", "--out", tmp_path / "b")
    assert_clean_error(res, "--partition", "--launcher submitit")
    res = invoke("run", "--suite", "toy", "--no-wait", "--cpus-per-job", "4", "--out", tmp_path / "c")
    assert_clean_error(res, "--cpus-per-job", "--no-wait")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_bad_device_is_refused_at_once(tmp_path):
    res = invoke("run", "--suite", "toy", "--device", "gpu", "--out", tmp_path / "r")
    assert_clean_error(res, "--device 'gpu'", "--device cpu")
    if not torch.cuda.is_available():
        res = invoke("run", "--suite", "toy", "--device", "cuda", "--out", tmp_path / "r")
        assert_clean_error(res, "--device cuda", "no CUDA device")
        res = invoke("zoo", "build", "--suite", "toy", "--device", "cuda")
        assert_clean_error(res, "--device cuda")
    assert not (tmp_path / "r").exists()


def test_out_under_a_file_or_unwritable_is_refused(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    res = invoke("run", "--suite", "toy", "--methods", "random", "--out", f / "sub", "--quiet")
    assert_clean_error(res, "--out", "is a file")
    res = invoke("run", "--suite", "toy", "--methods", "random", "--out", f, "--quiet")
    assert_clean_error(res, "--out", "is a file")
    if Path("/proc/self").exists():
        res = invoke("run", "--suite", "toy", "--methods", "random", "--out", "/proc/dfml-results", "--quiet")
        assert_clean_error(res, "--out /proc/dfml-results", "cannot write")
    res = invoke("ablate", "--suite", "toy", "--method", "oracle", "--out", f / "sub")
    assert_clean_error(res, "--out")


def test_missing_plugin_file_or_module_is_a_clean_error(tmp_path):
    res = invoke("run", "--suite", "toy", "--plugin", tmp_path / "nope.py", "--out", tmp_path / "r")
    assert_clean_error(res, "--plugin", "no such file")
    res = invoke("run", "--suite", "toy", "--plugin", "no_such_module_xyz", "--out", tmp_path / "r")
    assert_clean_error(res, "--plugin no_such_module_xyz", "can be imported")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('plugin bug')\n")
    res = invoke("run", "--suite", "toy", "--plugin", broken, "--out", tmp_path / "r")
    assert_clean_error(res, "--plugin", "plugin bug")
    assert not (tmp_path / "r").exists()


def _ok_record(method: str, acc: list[float], seed: int = 0) -> ResultRecord:
    return ResultRecord(key=RunKey("toy", "cpu", "wb", method, seed), status="ok", per_episode=acc, accuracy=summary_of(acc),
                        hashes={"dataset": "d", "zoo": "z", "test_episodes": f"e{seed}"}, config={"scenario": {"name": "wb"}},
                        flags={"not_data_free": False, "reported": False})


def test_leaderboard_with_a_mistyped_results_folder_keeps_the_page(tmp_path):
    page = tmp_path / "leaderboard.md"
    page.write_text("# the real leaderboard\n")
    res = invoke("leaderboard", "--results", tmp_path / "resluts", "--out", page)
    assert_clean_error(res, "--results", "no such folder")
    assert page.read_text() == "# the real leaderboard\n"  # not overwritten with an empty page
    (tmp_path / "empty").mkdir()
    res = invoke("leaderboard", "--results", tmp_path / "empty", "--out", page)
    assert_clean_error(res, "no result records")
    assert page.read_text() == "# the real leaderboard\n"


def test_report_of_an_unknown_suite_is_an_error(tmp_path):
    root = tmp_path / "results"
    write_record(root, _ok_record("random", [0.2, 0.4]))
    bad = RunKey("toy", "cpu", "wb", "edited", 0).path(root)
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"schema": 1, "status": "ok"}))  # an invalid record does not make a suite exist
    res = invoke("report", root, "--suite", "toyy", "--no-plots", "--bootstrap", "100")
    assert_clean_error(res, "suite 'toyy'", "toy (cpu)")
    assert not (root / "report").exists()


def test_status_with_a_garbage_plan_file_is_a_clean_error(tmp_path):
    jobs = tmp_path / "run" / ".jobs"
    jobs.mkdir(parents=True)
    for text in ("not json", "[1, 2]", json.dumps({"suite": "toy", "scale": "cpu"}),
                 json.dumps({"suite": "toy", "scale": "cpu", "jobs": [{"id": 1}]})):
        (jobs / "plan-toy-cpu.json").write_text(text)
        res = invoke("status", tmp_path / "run")
        assert_clean_error(res, "plan-toy-cpu.json", "delete it")


def test_compare_rejects_what_the_leaderboard_rejects(tmp_path):
    root = tmp_path / "results"
    write_record(root, _ok_record("a", [0.5, 0.5, 0.5]))
    write_record(root, _ok_record("b", [0.4, 0.5, 0.6]))
    # 150 % accuracies, with a summary that agrees with them: the leaderboard rejects it
    impossible = _ok_record("a", [1.5, 1.5, 1.5], seed=1)
    write_record(root, _ok_record("b", [0.2, 0.3, 0.4], seed=1))
    path = impossible.key.path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(impossible.to_dict()))
    garbage = RunKey("toy", "cpu", "wb", "a", 2).path(root)
    garbage.write_text("{not json")
    res = invoke("compare", "--results", root, "--method", "a", "--against", "b", "--bootstrap", "200")
    assert res.exit_code == 0, res.output
    assert "seed 1" not in res.output  # the 150 % record is not compared
    assert "rejected" in res.output and "[0, 1]" in res.output and "cannot read JSON" in res.output
    assert "+123" not in res.output and "+0.00" in res.output
    res = invoke("compare", "--results", root, "--method", "a", "--against", "")
    assert_clean_error(res, "--against")


def test_truncated_archive_in_data_prepare_says_so(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        data = os.urandom(300_000)
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    arch = tmp_path / "cifar-100-python.tar.gz"
    arch.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    res = invoke("data", "prepare", "cifar-fs", "--from", arch, "--data-root", tmp_path / "data", "--quiet")
    assert_clean_error(res, "ended early or is damaged", "again")
    assert not (tmp_path / "data" / "cifar-fs").exists()


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import dfml_bench.jobs as jobs_mod

    def boom(out):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(jobs_mod, "run_status", boom)
    (tmp_path / "run").mkdir()
    res = invoke("status", tmp_path / "run")
    assert_clean_error(res, "unexpected ZeroDivisionError", "--debug")
    res = invoke("--debug", "status", tmp_path / "run")
    assert isinstance(res.exception, ZeroDivisionError)  # the traceback, for those who asked


def test_describe_error_names_damaged_files_and_keeps_input_messages():
    assert "ended early" in cli_mod.describe_error(EOFError("Compressed file ended"))
    assert cli_mod.describe_error(ValueError("--seeds: bad")) == "--seeds: bad"
    assert "bug" in cli_mod.describe_error(AttributeError("x"))


def test_a_cache_folder_that_is_a_file_is_named_before_any_work(tmp_path, monkeypatch):
    f = tmp_path / "cachefile"
    f.write_text("x")
    monkeypatch.setenv("DFML_BENCH_HOME", str(f))
    res = invoke("run", "--suite", "toy", "--methods", "random", "--out", tmp_path / "r", "--quiet")
    assert_clean_error(res, "DFML_BENCH_HOME", str(f))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text", ["[1, 2]", '{"slurm": 3}', "{not json", '{"gpus": 1}'])
def test_a_slurm_config_of_the_wrong_shape_is_a_clean_error(tmp_path, text):
    cfg = tmp_path / "slurm.json"
    cfg.write_text(text)
    res = invoke("run", "--suite", "toy", "--launcher", "submitit", "--slurm-config", cfg, "--out", tmp_path / "r")
    assert_clean_error(res)
    assert not (tmp_path / "r").exists()
