"""What the process and the command line meet besides the settings, each one line on stderr (exit
code 2 for a mistake) or the usual quiet exit, never a traceback or a hang: path names over the
filesystem's limit, seeds beyond torch's generators, suite files that are not files or nest without
end, a partial torchrun environment, a rule with nothing to train on a model, mistyped options;
standard output that is full, closed or ASCII-only; Ctrl-C while torch is imported.

Mistakes run through the entry point in this process (`run_main`, as in test_cli_errors: a
subprocess per case would mostly import torch); what only a real process shows (what Python does at
exit, a signal during start-up) runs in a subprocess."""

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cli_errors import run_main

LONG = "x" * 300  # a file or folder name over the 255 bytes of the usual filesystems
MAX_SEED = 2**63 - 1
TRAIN = ["train", "--epochs", "1", "-q"]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny trained generative run (it samples, reconstructs and has a FID to ask for)."""
    from fa_rules.runs import train

    run = tmp_path_factory.mktemp("runs") / "vae"
    train(rule="vae", epochs=1, batch_size=256, model_options={"width": 32}, out_dir=run, progress=False)
    return run


def _files(folder: Path) -> list:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def _one_line(code: int, stderr: str, expected: str, exit_code: int = 2) -> str:
    assert code == exit_code, stderr
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    return lines[0]


def _write_suites(folder: Path) -> None:
    (folder / "nested.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    (folder / "nested_tables.toml").write_text("a = " + "{b = " * 100_000 + "}" * 100_000 + "\n")
    (folder / "binary.toml").write_bytes(b'rules = ["backprop"]\n\xff\xfe\n')
    with open(folder / "huge.toml", "wb") as f:  # 2 MB of (sparse) NUL bytes
        f.truncate(2 << 20)
    (folder / "loop.toml").symlink_to("loop.toml")


# (id, arguments, what the one line must say)
CASES = [
    # a name longer than the filesystem allows (ENAMETOOLONG): pathlib's checks raise it
    ("out-name-too-long", [*TRAIN, "--out", LONG], f"the name '{'x' * 40}...' is 300 bytes long, more than the 255"),
    ("out-nested-name-too-long", [*TRAIN, "--out", f"a/{LONG}/b"], "is 300 bytes long, more than the 255"),
    ("out-path-too-long", [*TRAIN, "--out", "ab/" * 1400], "is 4199 bytes long, more than the 4095 a path may have"),
    ("resume-name-too-long", ["train", "--resume", LONG], "is 300 bytes long"),
    ("run-dir-name-too-long", ["sample", LONG], "is 300 bytes long"),
    ("suite-name-too-long", ["benchmark", LONG + ".toml"], "is 305 bytes long"),
    ("report-name-too-long", ["benchmark", "--rules", "backprop", "--report", f"{LONG}/r.md"], "is 300 bytes long"),
    ("data-dir-name-too-long", [*TRAIN, "--dataset", "mnist", "--data-dir", f"{LONG}/d"], "is 300 bytes long"),
    # suite files that are not suites: read without hanging, without reading forever, one line
    ("suite-nested-arrays", ["benchmark", "nested.toml"], "nested.toml: not a suite: its arrays or tables are nested "
                                                          "too deeply"),
    ("suite-nested-tables", ["benchmark", "nested_tables.toml"], "nested too deeply"),
    ("suite-a-device", ["benchmark", os.devnull], f"{os.devnull}: not a regular file (a pipe, a device or a socket)"),
    ("suite-too-large", ["benchmark", "huge.toml"], "huge.toml: more than 1 MiB, too large for a suite file"),
    ("suite-not-text", ["benchmark", "binary.toml"], "binary.toml: not a text file (byte 21 is not UTF-8)"),
    ("suite-link-loop", ["benchmark", "loop.toml"], "loop.toml: cannot read the suite file: Too many levels of "
                                                    "symbolic links"),
    # a rule whose parameter group is empty on this model (torch: "optimizer got an empty parameter list")
    ("kolen-pollack-nothing-to-train", [*TRAIN, "--rule", "kolen_pollack", "--depth", "0"],
     "rule 'kolen_pollack' reaches no layer of this network: no weight of a linear map or convolution past the "
     "first layer sends the error backwards"),
    # a mistyped option: only the options close to it (click offered --fid, --resume, --rule)
    ("option-typo", ["train", "--sed", "3"], "No such option: --sed (did you mean --seed?) (see 'fa-rules train --help')"),
    ("option-typo-far-from-others", ["train", "--lr-shedule", "cosine"],
     "No such option: --lr-shedule (did you mean --lr-schedule?) (see"),
]


@pytest.mark.parametrize("args, expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_mistake_is_one_line_and_leaves_nothing_behind(args, expected, tmp_path, monkeypatch, capsys):
    _write_suites(tmp_path)
    before = _files(tmp_path)
    line = _one_line(*run_main(args, tmp_path, monkeypatch, capsys), expected)
    assert _files(tmp_path) == before  # no run directory, not even the existing part of a path
    if "option-typo" in line:
        assert "--fid" not in line and "--resume" not in line


def test_a_data_dir_variable_with_a_name_too_long_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FA_RULES_DATA_DIR", str(tmp_path / LONG))
    before = _files(tmp_path)
    _one_line(*run_main([*TRAIN, "--dataset", "mnist"], tmp_path, monkeypatch, capsys),
              "FA_RULES_DATA_DIR: the name 'xxx")
    assert _files(tmp_path) == before


@pytest.mark.parametrize("command, seed", [("sample", 2**64), ("reconstruct", -1), ("fid", MAX_SEED + 1)])
def test_seed_outside_torchs_range_is_one_line_for_every_command_that_draws(command, seed, vae_run, tmp_path,
                                                                           monkeypatch, capsys):
    before = _files(vae_run)
    code, stderr = run_main([command, str(vae_run), f"--seed={seed}"], tmp_path, monkeypatch, capsys)
    _one_line(code, stderr, f"--seed must be an integer in 0..{MAX_SEED}, got {seed}")  # train's message
    assert _files(vae_run) == before


def test_largest_seed_draws(vae_run, tmp_path, monkeypatch, capsys):
    code, stderr = run_main(["sample", str(vae_run), "--num", "4", f"--seed={MAX_SEED}", "--out", "s.png"], tmp_path,
                            monkeypatch, capsys)
    assert code == 0, stderr
    assert (tmp_path / "s.png").is_file()


BENCHMARK = ["benchmark", "--rules", "backprop", "--epochs", "1", "-q"]


@pytest.mark.parametrize("env, command, expected", [
    ({"WORLD_SIZE": "2"}, TRAIN, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT are not set: launch with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, TRAIN, "WORLD_SIZE=2 but MASTER_PORT is not set"),
    ({"RANK": "1"}, TRAIN, "RANK=1 is set but WORLD_SIZE is not (or is 1): launch with torchrun"),
    # rank 5 of 2 would wait for its peers until the rendezvous timeout
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}, TRAIN,
     "RANK must be an integer in 0..1, got '5'"),
    ({"WORLD_SIZE": "2"}, BENCHMARK, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT are not set"),  # not a row per cell
], ids=["world-size-alone", "no-master-port", "rank-alone", "rank-beyond-world", "benchmark-world-size-alone"])
def test_partial_torchrun_environment_is_one_line_before_any_run_directory(env, command, expected, tmp_path,
                                                                           monkeypatch, capsys):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _one_line(*run_main([*command, "--out", "out"], tmp_path, monkeypatch, capsys), expected)
    assert list(tmp_path.iterdir()) == []


def test_suite_fifo_is_refused_without_waiting_for_a_writer(tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "suite.toml"
    os.mkfifo(fifo)

    def release():  # should the reader block on the FIFO, a writer comes (and goes) after 20 s
        time.sleep(20)
        with open(fifo, "w"):
            pass

    threading.Thread(target=release, daemon=True).start()
    start = time.monotonic()
    code, stderr = run_main(["benchmark", "suite.toml"], tmp_path, monkeypatch, capsys)
    _one_line(code, stderr, "suite.toml: not a regular file (a pipe, a device or a socket)")
    assert time.monotonic() - start < 15


# -- standard output: full, ASCII-only, closed --------------------------------------------------------
def test_full_standard_output_is_one_line(tmp_path, monkeypatch, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        code, stderr = run_main(["rules"], tmp_path, monkeypatch, capsys)  # through rich's console
    _one_line(code, stderr, "cannot write to standard output (No space left on device)", exit_code=1)


def test_full_standard_output_is_one_line_at_exit_too(tmp_path):
    """`print` output waits in Python's buffer (stdout not unbuffered): the write fails at exit."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "fa_rules", "datasets", "--json"], stdout=full,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=300)
    _one_line(result.returncode, result.stderr, "cannot write to standard output (No space left on device)",
              exit_code=1)


def test_ascii_only_standard_output_escapes_what_it_cannot_encode(tmp_path, monkeypatch, capsys):
    """As under PYTHONIOENCODING=ascii: 'Nøkland' in the rules table is written, escaped."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    code, stderr = run_main(["rules"], tmp_path, monkeypatch, capsys)
    assert code == 0, stderr
    sys.stdout.flush()
    assert "N\\xf8kland" in raw.getvalue().decode("ascii")


def test_closed_standard_output_exits_quietly(tmp_path):
    """`fa-rules datasets --json | head -0`: the reader has gone before the output is written."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "fa_rules", "datasets", "--json"], stdout=write,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=300)
    finally:
        os.close(write)
    assert result.returncode == 1 and result.stderr == "", result.stderr  # no "Exception ignored ... BrokenPipe"


# -- Ctrl-C while the command starts ------------------------------------------------------------------
def _torch_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch being imported")
@pytest.mark.parametrize("later_s", [0.0, 0.4])
def test_ctrl_c_while_torch_is_imported_is_one_line(later_s, tmp_path):
    # Ctrl-C's default action, as in a terminal (a background shell would pass SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", "fa_rules", *TRAIN, "--epochs", "200", "--out", "run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _torch_loading(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(later_s)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "error: interrupted"
