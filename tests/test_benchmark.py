"""`fa-rules benchmark`: tiny suites on digits, end to end (outputs, ratios, failures, resume)."""

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import Rule, RuleSpec, UserError, no_state_init
from fa_rules import benchmark as bench
from fa_rules.runs import resolve
from fa_rules.plugins.manager import get_registry
from fa_rules.core.trainer import TrainConfig
from fa_rules.rules.backprop import backprop

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["--dataset", "digits", "--depth", "1", "--width", "16", "--batch-size", "128", "-q"]


def _nan_rule() -> Rule:
    def step(network, params, state, batch):
        updates = {"model": {k: torch.zeros_like(v) for k, v in params["model"].items()}}
        return updates, state, {"loss": torch.tensor(float("nan"))}

    return Rule(init=no_state_init, step=step)


def _broken_rule() -> Rule:
    def step(network, params, state, batch):
        raise RuntimeError("broken on purpose")

    return Rule(init=no_state_init, step=step)


def backprop_raising_once(at_call: int, error: BaseException):
    """Backprop whose step raises `error` once, on call number `at_call` (Ctrl-C, a transient I/O
    error), and steps as backprop otherwise."""
    calls = {"n": 0}

    def build() -> Rule:
        inner = backprop()

        def step(network, params, state, batch):
            calls["n"] += 1
            if calls["n"] == at_call:
                raise error
            return inner.step(network, params, state, batch)

        return Rule(init=no_state_init, step=step)

    return build


@pytest.fixture
def test_rules(monkeypatch):
    registry = get_registry()
    monkeypatch.setitem(registry.rules, "explodes", RuleSpec("explodes", _nan_rule, "loss is NaN"))
    monkeypatch.setitem(registry.rules, "broken", RuleSpec("broken", _broken_rule, "raises in every step"))
    # digits, batch 128: 12 steps per epoch plus one memory probe and one alignment step -> call 16
    # is inside epoch 2, after epoch 1's checkpoint
    monkeypatch.setitem(registry.rules, "ctrl_c", RuleSpec("ctrl_c", backprop_raising_once(16, KeyboardInterrupt()), "backprop, Ctrl-C once"))
    return registry


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def test_cli_two_rules_two_seeds_writes_every_output(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", "--rules", "backprop,readout_only", "--epochs", "2", "--seeds", "2",
                                      "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = _rows(out)
    assert [(r["rule"], r["seed"]) for r in rows] == [
        ("backprop", 0), ("readout_only", 0), ("backprop", 1), ("readout_only", 1)]
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None and r["epochs"] == 2
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_error"] == pytest.approx(1 - r["test_accuracy"])
        assert r["params"] == 64 * 16 + 16 + 16 * 10 + 10 and r["step_time_s"] > 0
        assert (out / r["run_dir"] / "summary.json").is_file()
    bp = {r["seed"]: r for r in rows if r["rule"] == "backprop"}
    ro = {r["seed"]: r for r in rows if r["rule"] == "readout_only"}
    for seed in (0, 1):
        assert bp[seed]["step_time_ratio"] == 1.0 and bp[seed]["peak_saved_ratio"] == 1.0
        assert bp[seed]["alignment_angle_deg"] < 0.01  # backprop is its own reference
        # readout_only: hidden block 90 degrees off, output block exact
        assert ro[seed]["alignment_angle_per_block_deg"][0] == 90.0
        assert ro[seed]["alignment_angle_per_block_deg"][1] < 1e-3
        assert ro[seed]["alignment_angle_deg"] == pytest.approx(45.0, abs=1e-3)
        # detached features: it saves less for backward than backprop, per the same seed's row
        assert ro[seed]["peak_saved_ratio"] == pytest.approx(ro[seed]["peak_saved_bytes"] / bp[seed]["peak_saved_bytes"])
        assert ro[seed]["peak_saved_ratio"] < 1.0
        assert ro[seed]["step_time_ratio"] == pytest.approx(ro[seed]["step_time_s"] / bp[seed]["step_time_s"])
        # the timing phase: both rules of the seed stepped in turn, apart from the training cells
        assert bp[seed]["interleaved_step_ratio"] == 1.0 and ro[seed]["interleaved_step_time_s"] > 0
        assert ro[seed]["interleaved_step_ratio"] == pytest.approx(
            ro[seed]["interleaved_step_time_s"] / bp[seed]["interleaved_step_time_s"])
    assert bp[0]["test_accuracy"] > ro[0]["test_accuracy"]  # learning every block beats the readout alone

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and table[0]["rule"] == "backprop" and float(table[0]["test_accuracy"]) == rows[0]["test_accuracy"]
    report = (out / "report.md").read_text()
    assert "| backprop |" in report and "| readout_only |" in report and "step × backprop" in report
    assert "step × backprop (cells)" in report  # the per-cell medians stay, as the secondary column
    heading = next(line for line in report.splitlines() if "step × backprop |" in line)
    assert heading.index("step × backprop |") < heading.index("step × backprop (cells)")
    machine = json.loads((out / "machine.json").read_text())
    assert f"- machine: {machine['machines'][0]}" in report and f"torch {torch.__version__}" in report
    mean = (bp[0]["test_error"] + bp[1]["test_error"]) / 2
    assert f"{100 * mean:.2f} ±" in report  # the mean over the two seeds
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert (out / "metric_vs_step_time.png").stat().st_size > 1000


def test_every_rule_of_a_seed_starts_from_the_same_weights(tmp_path):
    suite = bench.suite_from_dict({"rules": ["backprop", "readout_only"], "seeds": 2,
                                   "settings": {"epochs": 1, "depth": 1, "width": 16, "batch_size": 128}})
    cells = bench.plan_cells(suite)
    configs = {(c.entry.label, c.seed): c.config.to_dict() for c in cells}
    for seed in (0, 1):
        a, b = configs[("backprop", seed)], configs[("readout_only", seed)]
        assert {k: v for k, v in a.items() if k != "rule"} == {k: v for k, v in b.items() if k != "rule"}
    # and that config fixes the weights: readout_only never moves its hidden block, so after training
    # it still holds the initial weights, equal to a fresh build with the seed and unlike another seed
    rows = bench.run_suite(bench.select_rules(suite, ["readout_only"]), tmp_path / "b")
    from fa_rules.core.checkpoint import load_checkpoint

    hidden = {r["seed"]: load_checkpoint(tmp_path / "b" / r["run_dir"] / "checkpoint.pt")["params"]["model"]
              ["blocks.0.layer.weight"] for r in rows}
    _, _, build = resolve(TrainConfig(**{**configs[("backprop", 0)], "model_options": {"depth": 1, "width": 16}}))
    torch.manual_seed(0)
    assert torch.equal(build().init_params()["blocks.0.layer.weight"], hidden[0])
    assert not torch.equal(hidden[0], hidden[1])


def test_failures_get_rows_suite_goes_on_and_rerun_skips_finished_cells(tmp_path, test_rules):
    suite_file = tmp_path / "tiny.toml"
    suite_file.write_text("""
name = "tiny"
rules = ["readout_only", "broken", "explodes", "backprop"]
seeds = [3]
[settings]
dataset = "digits"
epochs = 1
depth = 1
batch_size = 128
[vary]
width = [8, 16]
[anchors.test_error]
source = "made up for the test"
backprop = 0.5
""")
    suite = bench.load_suite(suite_file)
    out = tmp_path / "out"
    events = []
    rows = bench.run_suite(suite, out, on_event=lambda kind, i, payload: events.append(kind))
    assert [r["rule"] for r in rows[:4]] == ["backprop", "readout_only", "broken", "explodes"]  # reference first
    assert [r["width"] for r in rows] == [8] * 4 + [16] * 4
    by = {(r["rule"], r["width"]): r for r in _rows(out)}
    assert len(by) == 8
    broken = by[("broken", 8)]
    assert broken["status"] == "failed" and broken["error"] == "RuntimeError: broken on purpose"
    assert by[("explodes", 16)]["status"] == "diverged" and "diverged" in by[("explodes", 16)]["error"]
    for width in (8, 16):
        assert by[("backprop", width)]["status"] == "ok" and by[("readout_only", width)]["status"] == "ok"
        assert by[("backprop", width)]["params"] == 64 * width + width + width * 10 + 10
    assert by[("readout_only", 16)]["peak_saved_ratio"] < 1.0
    assert events.count("start") == 8 and events.count("done") == 8
    report = (out / "report.md").read_text()
    assert "test error % (anchor)" in report and "| 50.00 |" in report and "made up for the test" in report
    assert "broken on purpose" in report and "## Failures and notes" in report
    assert (out / "memory_vs_width.png").stat().st_size > 1000 and (out / "metrics_vs_width.png").stat().st_size > 1000

    # rerun: finished and diverged cells are skipped (their rows untouched), failed ones retried
    stamp = (out / by[("backprop", 8)]["run_dir"] / "row.json").stat().st_mtime_ns
    events.clear()
    again = bench.run_suite(bench.load_suite(suite_file), out, on_event=lambda kind, i, payload: events.append(kind))
    assert events.count("skip") == 6 and events.count("start") == 2
    assert (out / by[("backprop", 8)]["run_dir"] / "row.json").stat().st_mtime_ns == stamp
    assert [r["test_accuracy"] for r in again if r["status"] == "ok"] == \
           [r["test_accuracy"] for r in rows if r["status"] == "ok"]

    # other settings in the same directory: one clear error, nothing rewritten
    with pytest.raises(UserError, match="epochs=1.*asks for 2"):
        bench.run_suite(bench.override_settings(suite, {"epochs": 2}), out)
    assert len(_rows(out)) == 8


def test_ctrl_c_keeps_finished_rows_and_rerun_continues_the_cell(tmp_path, test_rules):
    suite = bench.suite_from_dict({
        "rules": ["backprop", "ctrl_c"], "seeds": [0],
        "settings": {"epochs": 2, "depth": 1, "width": 16, "batch_size": 128}})
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bench.run_suite(suite, out)
    rows = _rows(out)
    assert [(r["rule"], r["status"]) for r in rows] == [("backprop", "ok")]
    assert "| backprop |" in (out / "report.md").read_text()
    cell = out / "runs" / "ctrl_c-seed0"
    assert len((cell / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 was checkpointed

    events = []
    rows = bench.run_suite(suite, out, on_event=lambda kind, i, payload: events.append(kind))
    assert events == ["skip", "start", "epoch", "done"]  # only epoch 2 ran again
    bp, resumed = rows
    assert resumed["status"] == "ok" and resumed["epochs"] == 2
    # the interrupted rule is backprop: continued from its checkpoint it ends exactly where backprop did
    assert resumed["test_accuracy"] == bp["test_accuracy"] and resumed["test_loss"] == bp["test_loss"]


@pytest.mark.parametrize("text, message", [
    ('seeds = 2', "no 'rules' given"),
    ('rules = []', "non-empty list"),
    ('rules = ["backprop"]\nseeds = 0', "seeds must be >= 1"),
    ('rules = ["backprop", "backprop"]', "appears twice"),
    ('rules = [{ name = "backprop", lr = 0.1 }]', "optimiser settings are shared"),
    ('rules = [{ name = "x", group_lr = { model = 0.1 } }]', "may not set the 'model' group"),
    ('rules = ["backprop"]\n[settings]\nepochs = "ten"', "setting 'epochs' must be an integer"),
    ('rules = ["backprop"]\n[settings]\nmodel = "lenet"\ndepth = 3', "unknown setting 'depth'"),
    ('rules = ["backprop"]\n[vary]\ndepth = 4', "must be a non-empty list"),
    ('rules = ["backprop"]\n[anchors.test_error]\nsource = "x"\nfa = 0.1', "no rule label"),
    ('rules = ["backprop"]\n[anchors.accuracy]\nbackprop = 0.1', "unknown metric"),
    ('rules = ["backprop"]\nreference = "fa"', "reference 'fa'"),
    ('rules = ["backprop"]\n[measure]\nfid_samples = "many"', "fid_samples"),
    ('rules = ["backprop"]\nepochs = 3', "unknown key 'epochs'"),
    ('rules = ["backprop"\n', "not valid TOML"),
])
def test_suite_mistakes_are_one_line_errors_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        bench.load_suite(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_suites_are_valid_in_both_forms(path):
    full, quick = bench.load_suite(path), bench.load_suite(path, quick=True)
    assert full.description and quick.name == full.name + "-quick"
    assert len(bench.plan_cells(quick)) <= len(bench.plan_cells(full))
    assert quick.settings["epochs"] <= full.settings["epochs"]
    for anchor in full.anchors.values():
        assert anchor["source"] and anchor["values"]


def test_shipped_suites_cover_the_four_comparisons():
    names = {p.stem for p in BENCHMARKS.glob("*.toml")}
    assert {"fashion_mnist_lenet", "fashion_mnist_mlp", "generative", "memory_depth"} <= names
    memory = bench.load_suite(BENCHMARKS / "memory_depth.toml")
    assert len(memory.vary["depth"]) >= 3


def test_cli_without_suite_or_rules_is_a_user_error():
    result = CliRunner().invoke(app, ["benchmark", "-q"])
    assert isinstance(result.exception, UserError) and "--rules" in str(result.exception)


def test_ratios_and_aggregates_follow_seed_and_every_varied_setting():
    def row(rule, seed, epochs, step, saved, acc, status="ok"):
        return {"rule": rule, "rule_name": rule, "seed": seed, "epochs": epochs, "status": status,
                "error": "loss nan" if status != "ok" else None, "step_time_s": step, "peak_saved_bytes": saved, "test_accuracy": acc, "test_error": 1 - acc}

    rows = [row("backprop", 0, 1, 2.0, 100, 0.8), row("fa", 0, 1, 3.0, 50, 0.6),
            row("backprop", 1, 1, 4.0, 100, 0.9), row("fa", 1, 1, 4.0, 50, 0.7),
            row("backprop", 0, 2, 1.0, 100, 0.85), row("fa", 0, 2, 5.0, 400, 0.5),
            row("fa", 1, 2, 9.0, 1, 0.1, status="diverged")]
    with_ratios = bench.add_ratios(rows, "backprop", ["epochs"])  # `epochs` varies: a setting like any other
    assert [r.get("step_time_ratio") for r in with_ratios] == [1.0, 1.5, 1.0, 1.0, 1.0, 5.0, None]
    assert [r.get("peak_saved_ratio") for r in with_ratios] == [1.0, 0.5, 1.0, 0.5, 1.0, 4.0, None]
    aggs = {(a["rule"], a["epochs"]): a for a in bench.aggregate(with_ratios, ["epochs"])}
    fa1 = aggs[("fa", 1)]
    assert fa1["step_time_ratio"] == pytest.approx(1.25) and fa1["step_time_ratio_std"] == pytest.approx(0.3535534)
    assert fa1["test_accuracy"] == pytest.approx(0.65) and fa1["ok"] == 2 and fa1["seeds"] == 2
    fa2 = aggs[("fa", 2)]  # the diverged seed counts as a seed, never as a number
    assert fa2["ok"] == 1 and fa2["seeds"] == 2 and fa2["step_time_s"] == 5.0 and fa2["step_time_s_std"] == 0.0
    assert fa2["errors"] == ["diverged: loss nan"]
    assert bench.add_ratios(rows, None, ["epochs"])[1].get("step_time_ratio") is None


def test_final_metrics_and_the_angle_are_plotted_against_a_varied_setting():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fa_rules.benchmark.plots import _FINAL_METRICS, plot_against

    cells = [("backprop", 8, 0.90, 0.0), ("fa", 8, 0.80, 60.0), ("backprop", 20, 0.92, 0.0), ("fa", 20, 0.78, 70.0)]
    rows = [{"rule": r, "label": r, "seed": s, "depth": d, "status": "ok", "test_accuracy": acc + 0.01 * s,
             "test_error": 1 - acc - 0.01 * s, "alignment_angle_deg": ang + s} for r, d, acc, ang in cells for s in (0, 1)]
    fig = plot_against(rows, "depth", ["depth"], plt, _FINAL_METRICS, "metrics")
    error_ax, angle_ax = fig.axes  # only the metrics the rows have: test error and the angle
    assert error_ax.get_ylabel() == "final test error" and angle_ax.get_ylabel().startswith("angle to backprop")
    lines = {c.get_label(): c.lines[0] for c in error_ax.containers}  # (errorbar: the data line of each)
    assert list(lines["fa"].get_xdata()) == [8, 20]
    assert lines["fa"].get_ydata() == pytest.approx([0.195, 0.215])  # mean over the two seeds
    angles = {c.get_label(): c.lines[0] for c in angle_ax.containers}
    assert angles["fa"].get_ydata() == pytest.approx([60.5, 70.5]) and list(angles["backprop"].get_ydata()) == [0.5, 0.5]
    plt.close(fig)


def test_a_rule_with_its_own_model_is_compared_with_the_reference_rule_on_that_model():
    from fa_rules.benchmark.aggregate import add_ratios
    from fa_rules.benchmark.timing import group_key

    def row(label, name, model, step):
        return {"rule": label, "rule_name": name, "seed": 0, "model": model, "status": "ok", "step_time_s": step}

    rows = [row("backprop", "backprop", "lenet", 1.0), row("dtp", "dtp", "lenet", 3.0),
            row("backprop_svgg", "backprop", "simple_vgg", 2.0), row("dtp_svgg", "dtp", "simple_vgg", 8.0),
            row("dtp_mlp", "dtp", "mlp", 5.0)]
    ratios = {r["rule"]: r.get("step_time_ratio") for r in add_ratios(rows, "backprop")}
    assert ratios == {"backprop": 1.0, "dtp": 3.0, "backprop_svgg": 1.0, "dtp_svgg": 4.0, "dtp_mlp": None}

    suite = bench.suite_from_dict({"name": "m", "rules": ["backprop", {"name": "dtp", "label": "dtp_mlp",
                                   "model": "mlp"}], "settings": {"model": "lenet", "dataset": "digits"}})
    a, b = bench.plan_cells(suite)
    assert group_key(a) != group_key(b)  # timed apart: different networks
