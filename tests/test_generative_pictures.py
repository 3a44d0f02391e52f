"""benchmarks/generative_pictures.py: the sample, reconstruction and interpolation PNGs of every rule
of a finished generative benchmark (a tiny one on digits, through the CLI), and the refusals."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from fa_rules.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
SUITE = """
name = "tiny_generative"
rules = ["ae", "vae"]
seeds = 1
[settings]
dataset = "digits"
model = "mlp"
depth = 1
width = 32
latent_dim = 8
epochs = 1
batch_size = 64
[measure]
fid = false
probe = false
timing = false
sample_repeats = 1
"""


def _pictures_script():
    spec = importlib.util.spec_from_file_location("generative_pictures", ROOT / "benchmarks" / "generative_pictures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_rule_gets_its_pictures_or_the_reason_it_has_none(tmp_path, capsys):
    suite = tmp_path / "tiny.toml"
    suite.write_text(SUITE)
    bench = tmp_path / "bench"
    result = CliRunner().invoke(app, ["benchmark", str(suite), "--out", str(bench), "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pictures"
    assert _pictures_script().main([str(bench), "--out", str(out), "--link-prefix", "img"]) == 0
    stdout = capsys.readouterr().out
    # (the commands say what they wrote; the table comes last)
    rows = {line.split("|")[1].strip(" `"): line for line in stdout.splitlines() if line.startswith("| `")}
    assert stdout.rstrip().splitlines()[-1] == rows["vae"]  # (rows in label order)
    assert set(rows) == {"ae", "vae"}
    # vae makes all three; ae has no prior to sample from (nor to interpolate through)
    for label in ("vae",):
        for picture in ("samples", "reconstructions", "interpolation"):
            assert f"](img/{label}_{picture}.png)" in rows[label]
            with Image.open(out / f"{label}_{picture}.png") as image:
                assert image.width >= 8 * 4 and image.height >= 8 * 2  # a grid of 8x8 digits, not one image
    assert (out / "ae_reconstructions.png").is_file() and not (out / "ae_samples.png").exists()
    assert rows["ae"].count("— (") == 2 and "](img/ae_reconstructions.png)" in rows["ae"]


def test_no_finished_run_is_one_line_and_exit_code_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generative_pictures.py"), str(tmp_path),
                           "--out", str(tmp_path / "p")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: no finished runs of seed 0")
