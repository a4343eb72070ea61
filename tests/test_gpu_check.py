"""benchmarks/gpu_check.py runs on CPU (so it is ready when a GPU is lent): every check produces a time,
scaled counts are consistent, reference figures sit beside the 32x32 rows, bad arguments are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import load_benchmark


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_every_check_runs_on_cpu_and_scales(gpu_check) -> None:
    tiny = gpu_check.Counts(episodes=2, per_class=6, tasks=1, zo_q=1, kd_images=10)
    lines: list[str] = []
    rows = gpu_check.run(torch.device("cpu"), [16], ["conv4"], tiny, log=lines.append)
    assert [r.check for r in rows] == ["eval-600", "eval-600-bmm", "zoo-epoch", "maml-10", "maml-10-bmm", "maml-4",
                                      "free-gen-step", "zo-iteration", "kd-inner"]
    assert len(lines) == len(rows)
    for r in rows:
        assert math.isfinite(r.measured_s) and r.measured_s > 0
        assert r.full_s == pytest.approx(r.measured_s * r.full_of / r.measured_of)
        assert r.reference_s is None  # reference figures are 32x32 ones only
    eval_row = rows[0]
    assert (eval_row.measured_of, eval_row.full_of) == (2, 600)


def test_reference_figures_go_beside_32px_conv4_rows(gpu_check) -> None:
    assert gpu_check.REFERENCE["eval-600"] == 86.0 and gpu_check.REFERENCE["zoo-epoch"] == 2.8


def test_bad_arguments(gpu_check, capsys) -> None:
    assert gpu_check.main(["--device", "cpu", "--quick", "--archs", "vgg"]) == 2
    assert "unknown architecture" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_command_line_writes_json(gpu_check, tmp_path) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--archs", "conv4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True and len(data["rows"]) == 9
    assert all(r["reference_s"] is not None for r in data["rows"])  # 32x32 conv4: every row has a reference
