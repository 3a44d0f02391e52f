"""The torchvision suite's quick form runs end to end (tiny Fashion-MNIST-format files written here):
MobileNetV3-Small as it is, three of the suite's rules, every cell trained and reported (ResNet-18 runs
every rule in tests/test_any_model.py)."""

import json
from pathlib import Path

from typer.testing import CliRunner

from fa_rules.cli.app import app

from test_datasets import write_mnist_like

ROOT = Path(__file__).resolve().parents[1]
RULES = {"backprop", "feedback_alignment", "direct_feedback_alignment"}


def test_fashion_mnist_torchvision_quick_suite_runs_on_a_fashion_mnist_format_file_set(tmp_path):
    write_mnist_like(tmp_path / "data" / "fashion_mnist", n_train=16, n_test=8)
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(ROOT / "benchmarks" / "fashion_mnist_torchvision.toml"),
                                      "--quick", "--data-dir", str(tmp_path / "data"), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = json.loads((out / "results.json").read_text())
    assert {(r["rule"], r["model"]) for r in rows} == {(rule, "torchvision:mobilenet_v3_small") for rule in RULES}
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    by_cell = {(r["rule"], r["model"]): r for r in rows}
    # the rules' signals reached the convolutions: their updates are not backprop's
    for rule in ("feedback_alignment", "direct_feedback_alignment"):
        angles = by_cell[(rule, "torchvision:mobilenet_v3_small")]["alignment_angle_per_block_deg"]
        assert max(angles) > 1.0, (rule, angles)
    assert "torchvision:mobilenet_v3_small" in (out / "report.md").read_text()
