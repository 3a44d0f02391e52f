"""`fa-rules benchmark` at its edges (issue 13): resume of failed cells, the output lock, names and
settings refused before any cell trains, the cell cap, exit status, damaged files, uncut tables."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fa_rules import benchmark as bench
from fa_rules.benchmark import output_lock
from fa_rules.core import RuleSpec, UserError
from fa_rules.plugins.manager import get_registry
from test_benchmark import backprop_raising_once
from test_cli_errors import run_main

ROOT = Path(__file__).resolve().parent.parent
TINY = {"epochs": 1, "depth": 1, "width": 16, "batch_size": 128}


@pytest.fixture
def flaky(monkeypatch):
    # digits, batch 128: 12 steps per epoch plus one memory probe and one alignment step -> call 16
    # is inside epoch 2, after epoch 1's checkpoint
    monkeypatch.setitem(get_registry().rules, "flaky", RuleSpec("flaky", backprop_raising_once(16, OSError(28, "No space left on device")), "backprop, fails once"))


def _cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fa_rules", "benchmark", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


# 1. a failed cell keeps its checkpoints and resumes from them ------------------------------------------

def test_failed_cell_resumes_from_its_last_checkpoint(tmp_path, flaky):
    suite = bench.suite_from_dict({"rules": ["backprop", "flaky"], "settings": {**TINY, "epochs": 2}})
    out = tmp_path / "out"
    rows = bench.run_suite(suite, out)
    assert [(r["rule"], r["status"]) for r in rows] == [("backprop", "ok"), ("flaky", "failed")]
    assert rows[1]["error"] == "OSError: [Errno 28] No space left on device"
    cell = out / "runs" / "flaky-seed0"
    assert (cell / "checkpoint.pt").is_file() and len((cell / "metrics.jsonl").read_text().splitlines()) == 1

    events = []
    rows = bench.run_suite(suite, out, on_event=lambda kind, i, payload: events.append(kind))
    assert events == ["skip", "start", "epoch", "done"]  # only epoch 2 ran again, from epoch 1's checkpoint
    bp, resumed = rows
    assert resumed["status"] == "ok" and resumed["epochs"] == 2
    assert len((cell / "metrics.jsonl").read_text().splitlines()) == 2
    # the flaky rule is backprop: continued from its checkpoint it ends exactly where backprop did
    assert resumed["test_accuracy"] == bp["test_accuracy"] and resumed["test_loss"] == bp["test_loss"]


# 2. one process per output directory ------------------------------------------------------------------

def test_a_live_lock_holder_refuses_a_second_runner_and_a_dead_ones_lock_is_taken_over(tmp_path):
    suite = bench.suite_from_dict({"rules": ["backprop"], "settings": TINY})
    out = tmp_path / "out"
    out.mkdir()
    lock = out / bench.LOCK_FILE
    holder = subprocess.Popen(  # holds the lock (an flock) until killed
        [sys.executable, "-c", "import sys, time; from fa_rules.benchmark import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another benchmark \\(process {holder.pid}\\)"):
            bench.run_suite(suite, out)
        assert not (out / "runs").exists() and not (out / "suite.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text() == f"{holder.pid}\n"  # killed: its pid stays, its flock went with it
    rows = bench.run_suite(suite, out)
    assert [r["status"] for r in rows] == ["ok"]
    assert lock.read_text() == ""  # released


def test_a_second_benchmark_process_on_one_out_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):  # this process holds the lock; the benchmark command is a second process
        result = _cli("--rules", "backprop", "--epochs", "1", "--width", "16", "-q", "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {out} is in use by another benchmark (process {os.getpid()}); wait for it to finish, or use another --out"]
    assert not (out / "runs").exists()


# 3. unknown names and options: refused before any cell directory exists ------------------------------

@pytest.mark.parametrize("data, message", [
    ({"rules": ["backprop", "nosuch"]}, "unknown rule 'nosuch'"),
    ({"rules": [{"name": "backprop", "options": {"nosuchopt": 1}}]}, "rule 'backprop' has no option nosuchopt"),
    ({"rules": [{"name": "dtp", "label": "d", "options": {"nosuchopt": 1}}]}, "rule 'd' seed 0: rule 'dtp' has no option"),
    ({"rules": ["backprop"], "settings": {"dataset": "nosuchds"}}, "unknown dataset 'nosuchds'"),
    ({"rules": [{"name": "backprop", "model": "nosuchmodel"}]}, "unknown model 'nosuchmodel'"),
    ({"rules": [{"name": "backprop", "model_options": {"nosuchopt": 2}}]}, "model 'mlp' has no option nosuchopt"),
    ({"rules": [{"name": "feedback_alignment", "options": {"scale": "abc"}}]},
     r"rule 'feedback_alignment': option 'scale' must be a number in \[0, 1e\+06\], got 'abc'"),
    ({"rules": [{"name": "feedback_alignment", "options": {"feedback_seed": 1.5}}]},
     "option 'feedback_seed' must be an integer in -1..9223372036854775807 .*, got 1.5"),
    ({"rules": [{"name": "sign_symmetry", "options": {"magnitude": 1}}]},
     "option 'magnitude' must be one of mean_abs, unit, xavier, got 1"),
])
def test_unknown_names_and_options_are_refused_before_any_cell_trains(tmp_path, data, message):
    suite = bench.suite_from_dict({**data, "settings": {**TINY, **data.get("settings", {})}})
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message) as info:
        bench.run_suite(suite, out)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_cli_unknown_rule_is_one_line_exit_2_and_no_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stderr = run_main(["benchmark", "--rules", "backprop,nosuch", "--epochs", "1", "-q", "--out", str(out)],
                            tmp_path, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown rule 'nosuch'" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("report, message", [("/proc/x.md", "cannot write the report to /proc/x.md"),
                                             ("{tmp}", "is a directory; name a file")])
def test_an_unwritable_report_path_is_one_line_exit_2_before_any_cell(tmp_path, report, message, monkeypatch,
                                                                      capsys):
    out = tmp_path / "out"
    code, stderr = run_main(["benchmark", "--rules", "backprop", "--epochs", "1", "-q", "--out", str(out),
                             "--report", report.replace("{tmp}", str(tmp_path))], tmp_path, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []  # no probe file left either


# 4. untrusted suite files: the cell cap and every cell's settings -------------------------------------

@pytest.mark.parametrize("text, message", [
    ('seeds = 1000000000', "seeds = 1000000000 is more than the 10000 cells a suite may have"),
    ('seeds = 10\n[vary]\nwidth = [' + ",".join(map(str, range(1, 31))) + ']\ndepth = ['
     + ",".join(map(str, range(1, 41))) + ']',
     "1 rule(s) x 10 seed(s) x 30 values of width x 40 values of depth is 12000 cells, more than the 10000"),
    ('seeds = [1180591620717411303424]', "seed 1180591620717411303424 is out of range"),
    ('seeds = [-1]', "seed -1 is out of range"),
    ('[settings]\nlr = nan', "rule 'backprop' seed 0: lr must be a number in (0, 1e+30], got nan"),
    ('[settings]\nlr = -1.0', "lr must be a number in (0, 1e+30]"),
    ('[settings]\nweight_decay = inf', "weight_decay must be a number in [0, 1e+12]"),
    ('[settings]\neval_batch_size = 0', "eval_batch_size must be an integer in 1..1048576, got 0"),
    ('[settings]\nbatch_size = 0', "batch_size must be an integer in 1..1048576"),
    ('[settings]\noptimizer = "adamw"', "optimizer must be adam or sgd, got 'adamw'"),
    ('[vary]\nbatch_size = [1, 0]', "seed 0 batch_size=0: batch_size must be an integer in 1..1048576"),
    ('[[rules]]\nname = "vae"\nlatent_dim = "big"', "latent_dim must be an integer in 1..16384, got 'big'"),
    ('[[rules]]\nname = "gan"\neval_every = 0', "eval_every must be an integer in 1..1000000, got 0"),
    ('[[rules]]\nname = "dtp"\noptions = { noise = nan }', "rule 'dtp' has no option noise (did you mean feedback_noise?"),
    ('[[rules]]\nname = "dtp"\noptions = { beta = nan }', "rule 'dtp': option 'beta' must be a number in (0, 1e+06], got nan"),
])
def test_untrusted_suites_are_refused_in_one_line_before_any_allocation(tmp_path, text, message):
    if "[[rules]]" not in text:
        text = 'rules = ["backprop"]\n' + text
    path = tmp_path / "bad.toml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        bench.plan_cells(bench.load_suite(path))
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 5  # refused from the counts, not after listing a billion seeds


def test_command_line_seeds_are_capped_too():
    suite = bench.suite_from_dict({"rules": ["backprop", "feedback_alignment"]})
    with pytest.raises(UserError, match="more than the 10000 cells"):
        bench.override_settings(suite, {}, seeds=10**12)
    with pytest.raises(UserError, match="2 rule\\(s\\) x 6000 seed\\(s\\) is 12000 cells"):
        bench.override_settings(suite, {}, seeds=6000)
    assert bench.cell_count(bench.override_settings(suite, {}, seeds=5000)) == 10000


# 5 and 8. exit status 1 after every output; tables off a terminal are not cut ------------------------

def test_failed_cell_exits_1_after_writing_every_output_and_piped_tables_are_whole(tmp_path):
    (tmp_path / "w.toml").write_text("""
rules = ["backprop", "direct_feedback_alignment",
         { name = "kolen_pollack", label = "exploding_feedback", group_lr = { feedback = 1e30 } }]
[settings]
epochs = 1
depth = 1
width = 16
batch_size = 128
""")
    result = _cli("w.toml", "--out", "out", cwd=tmp_path)  # stdout and stderr are pipes, COLUMNS=80
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "1 of 3 cells failed or diverged (see out/report.md): exit status 1"
    out = tmp_path / "out"
    rows = _rows(out)
    # (a model its settings cannot build is refused before any cell: a rule that blows up fails its cell)
    assert [r["status"] for r in rows] == ["ok", "ok", "diverged"]
    for name in ("results.csv", "report.md", "learning_curves.png", "metric_vs_step_time.png", "machine.json"):
        assert (out / name).is_file(), name
    assert "exploding_feedback" in (out / "report.md").read_text()
    # neither the comparison (stdout) nor the final live table (stderr) cuts or wraps names
    for text in (result.stdout, result.stderr):
        assert "…" not in text
        assert "│ direct_feedback_alignment │" in text and "│ exploding_feedback        │" in text
    # the failure note, whole, on one line
    assert "non-finite update for model/blocks.0.layer.weight at epoch 1, step 3 (not applied) │" in result.stdout


# 6. damaged files of finished cells --------------------------------------------------------------------

def test_damaged_row_cell_machine_and_metrics_files_neither_crash_nor_drop_rows(tmp_path):
    suite = bench.suite_from_dict({"rules": ["backprop", "readout_only"], "settings": {**TINY, "epochs": 2}})
    out = tmp_path / "out"
    first = bench.run_suite(suite, out)
    bp_dir, ro_dir = (out / r["run_dir"] for r in first)
    (bp_dir / "row.json").write_text('{"rule": "backp')  # half-written
    (bp_dir / "cell.json").write_text("garbage")
    (out / "machine.json").write_text("[1, 2")
    with open(ro_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_accu')  # half-written last line of a finished cell
    (out / "learning_curves.png").unlink()

    events = []
    rows = bench.run_suite(suite, out, on_event=lambda kind, i, payload: events.append(kind))
    # backprop's row is rebuilt from its finished run (no epoch trains again), readout_only's is kept
    assert events == ["start", "done", "skip"]
    assert [(r["rule"], r["status"]) for r in rows] == [("backprop", "ok"), ("readout_only", "ok")]
    assert rows[0]["test_accuracy"] == first[0]["test_accuracy"] and rows[0]["epochs"] == 2
    assert len(_rows(out)) == 2
    assert json.loads((bp_dir / "row.json").read_text())["status"] == "ok"
    assert json.loads((bp_dir / "cell.json").read_text()) == bench.plan_cells(suite)[0].config.to_dict()
    machine = json.loads((out / "machine.json").read_text())
    assert machine["machines"] == [bench.machine_description()]
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert "| readout_only |" in (out / "report.md").read_text()


def test_a_damaged_machine_json_does_not_crash_the_report_of_a_finished_suite(tmp_path):
    suite = bench.suite_from_dict({"rules": ["backprop"], "settings": TINY})
    out = tmp_path / "out"
    bench.run_suite(suite, out)
    (out / "machine.json").write_text('{"machines": "not a list"}')
    rows = bench.run_suite(suite, out)  # every cell skipped, nothing trains
    assert [r["status"] for r in rows] == ["ok"]
    assert json.loads((out / "machine.json").read_text())["machines"] == [bench.machine_description()]
    assert f"- machine: {bench.machine_description()}" in (out / "report.md").read_text()


# 7. SUITE paths that are directories or missing ---------------------------------------------------------

def test_suite_path_that_is_a_directory_or_missing_says_which(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path} is a directory; give a suite file"):
        bench.load_suite(tmp_path)
    (tmp_path / "suite.json").write_text("{}")  # a benchmark's output directory
    with pytest.raises(UserError, match="is a directory \\(a benchmark's output; rerun it with its suite file and --out\\)"):
        bench.load_suite(tmp_path)
    with pytest.raises(UserError, match=f"^suite file {tmp_path / 'nope.toml'} does not exist$"):
        bench.load_suite(tmp_path / "nope.toml")


def test_a_stored_cell_must_match_in_what_it_trains_not_in_where_data_lives_or_how_often_it_is_tested(tmp_path):
    from fa_rules.benchmark.runner import check_cell_dir

    def cell_with(settings):
        path = tmp_path / "suite.toml"
        path.write_text('rules = ["backprop"]\n[settings]\nepochs = 4\n' + settings)
        return bench.plan_cells(bench.load_suite(path))[0]

    cell = cell_with("eval_every = 2\n")
    path = tmp_path / "per_rule.toml"  # a rule's own eval_every (a GAN's evaluation is costly)
    path.write_text('rules = ["backprop", { name = "readout_only", eval_every = 3 }]\n')
    assert [c.config.eval_every for c in bench.plan_cells(bench.load_suite(path))] == [1, 3]
    run_dir = tmp_path / "cell"
    run_dir.mkdir()
    stored = cell.config.to_dict()
    for key in ("eval_every", "divergence_factor"):  # written before these settings existed
        stored.pop(key)
    stored["data_dir"] = "/elsewhere"
    (run_dir / "cell.json").write_text(json.dumps(stored))
    check_cell_dir(run_dir, cell)  # eval_every 1 (the default) against 2, and data_dir: both fine
    with pytest.raises(UserError, match="was run with divergence_factor=1000.0, this suite asks for 50.0"):
        check_cell_dir(run_dir, cell_with("divergence_factor = 50.0\n"))  # a missing key is its default
    stored["lr"] = 0.5
    (run_dir / "cell.json").write_text(json.dumps(stored))
    with pytest.raises(UserError, match="was run with lr=0.5, this suite asks for 0.001"):
        check_cell_dir(run_dir, cell)


def test_seeds_run_in_two_directories_then_merged_are_skipped_not_retrained(tmp_path):
    import shutil

    spec = {"rules": ["backprop", "readout_only"], "settings": {**TINY, "epochs": 1}}
    part_a, part_b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "all"
    bench.run_suite(bench.suite_from_dict({**spec, "seeds": [0]}), part_a)
    bench.run_suite(bench.suite_from_dict({**spec, "seeds": [1]}), part_b)
    shutil.copytree(part_a, merged)
    for cell_dir in (part_b / "runs").iterdir():
        shutil.move(str(cell_dir), merged / "runs" / cell_dir.name)
    events = []
    rows = bench.run_suite(bench.suite_from_dict({**spec, "seeds": [0, 1]}), merged,
                           on_event=lambda kind, i, payload: events.append(kind))
    assert events == ["skip"] * 4
    assert sorted((r["rule"], r["seed"], r["status"]) for r in rows) == [
        ("backprop", 0, "ok"), ("backprop", 1, "ok"), ("readout_only", 0, "ok"), ("readout_only", 1, "ok")]
    assert len(_rows(merged)) == 4
