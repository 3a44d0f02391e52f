"""Every user mistake the CLI can meet is one line on stderr and exit code 2: never a traceback, and
never a run directory left behind. Driven through the command's entry point, `fa_rules.cli.app.main`
(the function the `fa-rules` script calls, with its exit codes), in this process: a subprocess per
case would spend most of its time importing torch. Ctrl-C and the output of a real run go through a
subprocess."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_datasets import write_mnist_like
from typer.testing import CliRunner

from fa_rules.cli.app import app


def run_main(args, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `fa-rules ARGS` run in `cwd` through the entry point."""
    from fa_rules.cli.app import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["fa-rules", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fa_rules", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny generative run (it reconstructs, samples and has an encoder to probe), made once."""
    # a long path: the summary must print it on one line however long it is
    run = tmp_path_factory.mktemp("runs") / ("a-run-directory-with-a-long-name-" * 3).rstrip("-")
    result = CliRunner().invoke(app, ["train", "--rule", "vae", "--epochs", "1", "--width", "32", "--batch-size",
                                      "256", "-q", "--out", str(run)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"run {run}" in result.stdout.splitlines(), result.stdout  # not wrapped at 80 columns
    return run


def _setup(cwd: Path, run: Path) -> None:
    (cwd / "a_file").write_text("not a directory")
    (cwd / "not_json").mkdir()
    (cwd / "not_json" / "config.json").write_text("{not json")
    (cwd / "nan_config").mkdir()
    (cwd / "nan_config" / "config.json").write_text('{"rule": "backprop", "lr": NaN}')
    (cwd / "typed_config").mkdir()
    (cwd / "typed_config" / "config.json").write_text('{"rule": "backprop", "epochs": true}')
    write_mnist_like(cwd / "no_test_split" / "MNIST" / "raw", n_train=20, n_test=0)
    (cwd / "unknown_model.toml").write_text('rules = ["backprop"]\n[settings]\nmodel = "nope"\n')
    (cwd / "vary_type.toml").write_text('rules = ["backprop"]\n[settings]\nepochs = 1\n[vary]\nwidth = ["a", 16]\n')
    if run is not None:
        shutil.copytree(run, cwd / "corrupt_summary")
        (cwd / "corrupt_summary" / "summary.json").write_text('{"test_loss": 0.1,')


TRAIN = ["train", "--epochs", "1", "-q"]
# (id, arguments, what the one line must say); "{run}" is the finished tiny run
CASES = [
    ("lr-negative", [*TRAIN, "--lr", "-1"], "--lr must be a number in (0, 1e+30], got -1"),
    ("lr-nan", [*TRAIN, "--lr", "nan"], "--lr must be a number in (0, 1e+30], got nan"),
    ("group-lr-negative", [*TRAIN, "--group-lr", "model=-1"], "--group-lr model must be a number in (0, 1e+30]"),
    ("momentum-negative", [*TRAIN, "--optimizer", "sgd", "--momentum", "-1"], "--momentum must be a number in [0, 1)"),
    ("weight-decay-negative", [*TRAIN, "--weight-decay", "-1"], "--weight-decay must be a number in [0, 1e+12]"),
    ("latent-dim-negative", [*TRAIN, "--rule", "ae", "--latent-dim", "-4"], "--latent-dim must be an integer in 1.."),
    ("latent-dim-zero", [*TRAIN, "--rule", "ae", "--latent-dim", "0"],
     "--latent-dim must be an integer in 1..16384, got 0"),
    ("epochs-negative", ["train", "--epochs", "-1"], "--epochs must be an integer in 0..1000000, got -1"),
    ("seed-too-large", [*TRAIN, "--seed", str(2**70)], "--seed must be an integer in 0..9223372036854775807"),
    ("divergence-factor-negative", [*TRAIN, "--divergence-factor", "-1"], "--divergence-factor must be"),
    ("device-mps", [*TRAIN, "--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    ("device-meta", [*TRAIN, "--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    ("model-width-zero", [*TRAIN, "--model", "vgg", "--model-opt", "width=0"],
     "model 'vgg' cannot be built with width=0 for inputs (1, 8, 8): RuntimeError"),
    ("model-gives-images", [*TRAIN, "--model", "fa_generator"],
     "model 'fa_generator' maps digits inputs (1, 8, 8) to (1, 8, 8); rule 'backprop' needs outputs of shape (10,)"),
    ("model-takes-a-latent", [*TRAIN, "--model", "gan_generator"], "gan_generator maps a latent vector to an image"),
    ("out-is-a-file", [*TRAIN, "--out", "a_file"], "a_file is a file, not a directory"),
    ("out-unwritable", [*TRAIN, "--out", "/proc/x"], "cannot create run directory /proc/x"),
    ("resume-config-not-json", ["train", "--resume", "not_json"], "not_json/config.json is not a readable JSON"),
    ("resume-config-nan", ["train", "--resume", "nan_config"], "nan_config/config.json: lr must be a number in"),
    ("resume-config-wrong-type", ["train", "--resume", "typed_config"],
     "typed_config/config.json: epochs must be an integer in 0..1000000, got True"),
    ("resume-a-file", ["train", "--resume", "a_file"], "a_file is a file, not a run directory"),
    ("benchmark-a-directory", ["benchmark", "not_json"], "not_json is a directory, not a suite file"),
    ("fid-rule-cannot-sample", [*TRAIN, "--fid", "10"], "--fid needs a rule that draws samples; 'backprop'"),
    ("fid-negative", [*TRAIN, "--rule", "vae", "--fid", "-1"], "--fid needs 2 <= N"),
    ("sample-out-unwritable", ["sample", "{run}", "--num", "4", "--out", "/proc/x/s.png"], "cannot write /proc/x/s.png"),
    ("reconstruct-out-unwritable", ["reconstruct", "{run}", "--num", "4", "--out", "/proc/x/r.png"], "cannot write /proc/x/r.png"),
    ("sample-out-is-a-directory", ["sample", "{run}", "--out", "not_json"], "--out not_json is a directory"),
    ("probe-corrupt-summary", ["probe", "corrupt_summary"], "corrupt_summary/summary.json is not readable JSON"),
    # click's own usage errors: one line too, naming where the options are listed
    ("unknown-option", ["train", "--bogus"], "No such option: --bogus"),
    ("option-without-value", ["train", "--lr"], "Option '--lr' requires an argument"),
    ("option-not-an-integer", ["train", "--batch-size", "x"], "Invalid value for '--batch-size'"),
    ("unknown-command", ["bogus"], "No such command 'bogus' (see 'fa-rules --help')"),
    ("missing-argument", ["sample"], "Missing argument"),
    # settings that contradict each other, or that a resumed run cannot take
    ("flag-and-model-opt", [*TRAIN, "--depth", "2", "--model-opt", "depth=3"],
     "--depth and --model-opt depth both given"),
    ("resume-with-settings", ["train", "--resume", "{run}", "--lr", "0.1", "--seed", "3"],
     "--lr, --seed cannot be given with it (only --epochs, --quiet, --fid, --fid-weights)"),
    ("empty-test-split", [*TRAIN, "--dataset", "mnist", "--data-dir", "no_test_split"],
     "dataset 'mnist' has no test examples"),
    ("fid-weights-not-weights", [*TRAIN, "--rule", "vae", "--fid", "10", "--fid-weights", "a_file"],
     "cannot read FID Inception weights a_file: not a torch state dict file"),
    ("sample-too-many", ["sample", "{run}", "--num", "100000000"], "--num must be in 1..10000"),
    ("sample-label-scale-nan", ["sample", "{run}", "--label-scale", "nan"], "--label-scale must be a finite number"),
    # rule settings out of range
    ("kolen-pollack-negative-decay", [*TRAIN, "--rule", "kolen_pollack", "--opt", "decay=-1"],
     "rule 'kolen_pollack': option 'decay' must be a number in [0, 1e+06], got -1; e.g. --opt decay=0.001"),
    ("weight-mirror-negative-batch", [*TRAIN, "--rule", "weight_mirror", "--opt", "mirror_batch=-1"],
     "option 'mirror_batch' must be an integer in 0..1048576 (0: the training batch size), got -1"),
    ("weight-mirror-zero-noise", [*TRAIN, "--rule", "weight_mirror", "--opt", "noise_std=0"],
     "option 'noise_std' must be a number in (0, 1e+06], got 0"),
    ("vfa-negative-beta", [*TRAIN, "--rule", "vfa", "--opt", "beta=-1"], "option 'beta' must be a number in [0, 1e+06]"),
    ("vae-negative-beta", [*TRAIN, "--rule", "vae", "--opt", "beta=-1"], "option 'beta' must be a number in [0, 1e+06]"),
    # a benchmark checks every cell's data and model before any cell trains
    ("benchmark-model-cannot-build", ["benchmark", "--rules", "backprop,feedback_alignment", "--width", "0", "-q"],
     "mlp needs depth >= 0 and width >= 1"),
    ("benchmark-unknown-activation", ["benchmark", "--rules", "backprop", "--activation", "foo", "-q"],
     "unknown activation 'foo'"),
    ("benchmark-data-not-usable", ["benchmark", "--rules", "backprop", "--dataset", "mnist", "--data-dir",
                                   "no_test_split", "-q"], "dataset 'mnist' has no test examples"),
    ("suite-unknown-model", ["benchmark", "unknown_model.toml"], "unknown_model.toml: unknown model 'nope'"),
    ("suite-model-option-type", ["benchmark", "vary_type.toml"],
     "vary_type.toml: rule 'backprop' seed 0 width=a: model 'mlp': option 'width' must be an integer, got 'a'; "
     "e.g. width = 256"),
    ("benchmark-data-missing", ["benchmark", "--rules", "backprop", "--dataset", "mnist", "--data-dir", "nowhere",
                                "-q"], "mnist: no data files found"),
]


@pytest.mark.parametrize("args, expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_user_mistake_is_one_line_exit_2_and_leaves_nothing_behind(args, expected, tmp_path, request, monkeypatch,
                                                                   capsys):
    run = request.getfixturevalue("finished_run") if "{run}" in args or "corrupt_summary" in args else None
    _setup(tmp_path, run)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run_before = sorted(p.name for p in run.iterdir()) if run else None
    code, stderr = run_main([a.replace("{run}", str(run)) for a in args], tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no runs/, no half run
    if run:
        assert sorted(p.name for p in run.iterdir()) == run_before


def test_a_model_beyond_memory_is_refused_before_it_is_built(tmp_path, monkeypatch, capsys):
    # as if the machine had 64 MiB free: a 4096-wide MLP's weights and gradients need 0.127 GiB
    monkeypatch.setattr("fa_rules.core.network.available_memory", lambda: 64 * 2**20)
    code, stderr = run_main([*TRAIN, "--width", "4096"], tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    assert stderr.strip() == ("error: model 'mlp' with width=4096 has 0.0171 G parameters: 0.127 GiB for its "
                              "weights and their gradients alone, more than the 0.0625 GiB of memory available")
    assert list(tmp_path.iterdir()) == []
    code, stderr = run_main([*TRAIN, "--width", "64", "--out", "small"], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr  # a model that fits trains as before


def test_help_and_version_exit_0_and_no_command_shows_the_help(tmp_path, monkeypatch, capsys):
    for args in (["--help"], ["train", "--help"], ["--version"]):
        code, stderr = run_main(args, tmp_path, monkeypatch, capsys)
        assert code == 0 and stderr == "", (args, stderr)
    from fa_rules.cli.app import main

    monkeypatch.setattr(sys, "argv", ["fa-rules"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "Usage: fa-rules" in capsys.readouterr().out


def test_resuming_a_run_that_never_finished_an_epoch_says_it_starts_over(finished_run, tmp_path, monkeypatch,
                                                                          capsys):
    run = tmp_path / "started"
    run.mkdir()
    shutil.copy(finished_run / "config.json", run / "config.json")  # killed before its first checkpoint
    code, stderr = run_main(["train", "--resume", str(run), "--epochs", "1", "-q"], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    assert f"note: {run} has no finished epoch to continue from: training starts at the first" in stderr
    assert (run / "checkpoint.pt").is_file()


def test_ctrl_c_during_training_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    # Ctrl-C's default action, as in a terminal: a test run started in the background of a
    # non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "fa_rules", "train", "--epochs", "200", "--width", "32", "-q",
                             "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (run / "metrics.jsonl").exists():
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1]
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert line.endswith(f"continue with --resume {run}"), line


def test_rules_table_is_not_cut_off_a_terminal_and_shows_models():
    result = cli("rules")
    assert result.returncode == 0, result.stderr
    assert "direct_feedback_alignment (dfa)" in result.stdout and "…" not in result.stdout
    ae = next(line for line in result.stdout.splitlines() if "│ ae " in line)
    assert "mlp, paper_encoder" in ae
    listing = CliRunner().invoke(app, ["rules", "--json"])  # the JSON form in this process: the table was the point
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["ae"]["models"] == ["mlp", "paper_encoder"] and rows["backprop"]["models"] is None
