"""`fa-rules reconstruct` and `fa-rules probe` on real runs of local_fa, feature_alignment and the ae
baseline; the linear probe itself; the ae decoder; the MNIST path with small IDX files."""

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core import UserError
from fa_rules.models import mlp, paper_encoder
from fa_rules.measures.probe import fit_linear_probe
from fa_rules.runs import load_run
from fa_rules.rules.autoencoder import build_decoder
from test_cli_errors import run_main

TINY = ["--depth", "1", "--width", "32", "--latent-dim", "16", "--batch-size", "32", "--lr", "3e-3", "-q"]
MEAN_IMAGE_MSE = 0.0735  # digits test split against the mean training image


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for rule, epochs in (("local_fa", 3), ("feature_alignment", 3), ("ae", 3)):
        out[rule] = root / rule
        invoke("train", "--rule", rule, "--dataset", "digits", "--epochs", epochs, "--out", out[rule], *TINY)
    return out


@pytest.mark.parametrize("rule", ["local_fa", "feature_alignment", "ae"])
def test_runs_report_reconstruction_error_and_memory(runs, rule):
    summary = json.loads((runs[rule] / "summary.json").read_text())
    assert summary["task"] == "reconstruct"
    # the feature alignment rules learn fast (second order through the flow, or one block at a
    # time); the backprop autoencoder's decoder starts from the mean image and is slower
    bound = 0.95 if rule == "ae" else 0.4
    assert summary["test_recon_mse"] < bound * MEAN_IMAGE_MSE, summary["test_recon_mse"]
    assert summary["peak_saved_bytes"] > 32 * 32 * 4


@pytest.mark.parametrize("rule", ["local_fa", "feature_alignment", "ae"])
def test_reconstruct_writes_a_grid_of_originals_over_reconstructions(runs, rule, tmp_path):
    png = tmp_path / "grid.png"
    result = invoke("reconstruct", runs[rule], "--out", png, "--num", 16)
    assert "recon mse" in result.output
    image = Image.open(png)
    # 16 digits, 8 per row, each enlarged 8 -> 32 px, 2 px padding: 8 x (32 + 2) + 2 wide;
    # two rows of originals, each followed by its row of reconstructions
    assert image.size == (8 * 34 + 2, 4 * 34 + 2)
    pixels = torch.tensor(np.asarray(image.convert("L")), dtype=torch.float32) / 255
    config, rule_, network, params, state, dataset = load_run(runs[rule])
    first = dataset.test_x[0, 0]
    torch.testing.assert_close(pixels[2:34:4, 2:34:4], first, atol=2 / 255, rtol=0)  # top-left original


def test_probe_reports_accuracy_and_records_it_next_to_the_untrained_floor(runs):
    run = runs["local_fa"]
    trained = json.loads(invoke("probe", run, "--json").output)
    floor = json.loads(invoke("probe", run, "--untrained", "--json").output)
    assert trained["rule"] == "local_fa" and floor["untrained"] is True
    assert 0.85 <= trained["probe_accuracy"] <= 1.0 and 0.5 <= floor["probe_accuracy"] <= 1.0
    assert trained["probe_accuracy"] != floor["probe_accuracy"]  # the floor is another encoder
    summary = json.loads((run / "summary.json").read_text())
    assert summary["probe_accuracy"] == trained["probe_accuracy"]
    assert summary["probe_accuracy_untrained"] == floor["probe_accuracy"]
    again = json.loads(invoke("probe", run, "--json").output)
    assert again["probe_accuracy"] == trained["probe_accuracy"]  # deterministic


def test_load_run_untrained_rebuilds_the_run_initialisation(runs):
    _, _, _, trained, _, _ = load_run(runs["feature_alignment"])
    _, _, _, initial, _, _ = load_run(runs["feature_alignment"], trained=False)
    key = "blocks.0.layer.weight"
    assert not torch.equal(trained["model"][key], initial["model"][key])
    w = initial["model"][key]  # the rule's orthogonal initialisation, not the module default
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-5, rtol=0)


def test_a_missing_or_broken_run_directory_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    code, stderr = run_main(["reconstruct", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")], tmp_path,
                            monkeypatch, capsys)
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error:") and "nope" in stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for command in (["probe", tmp_path / "broken"], ["reconstruct", tmp_path / "empty"]):
        result = CliRunner().invoke(app, [str(a) for a in command])
        assert isinstance(result.exception, UserError), result.output


def test_probe_fits_a_separable_problem_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centres = 5 * torch.randn(4, 6, generator=g)
    z = centres[y] + torch.randn(400, 6, generator=g)
    result = fit_linear_probe(z[:300], y[:300], z[300:], y[300:], 4)
    assert result.probe_accuracy >= 0.98 and result.latent_dim == 6
    noise = fit_linear_probe(torch.randn(300, 6, generator=g), y[:300], torch.randn(100, 6, generator=g), y[300:], 4)
    assert noise.probe_accuracy < 0.45


def test_ae_decoder_mirrors_mlp_encoders_and_uses_table_12_for_the_paper_encoder():
    encoder = mlp((1, 8, 8), (16,), depth=2, width=32, activation="asinh")
    decoder = build_decoder(encoder)
    assert [b.layer.out_features for b in decoder.blocks] == [32, 32, 64]
    assert decoder.out_shape == (1, 8, 8)
    out = decoder.apply(decoder.init_params(), torch.randn(3, 16))
    assert out.shape == (3, 1, 8, 8) and 0 <= out.min() and out.max() <= 1  # sigmoid output
    conv_decoder = build_decoder(paper_encoder((1, 28, 28), (8,)))
    assert conv_decoder.family == "gan_generator" and conv_decoder.out_shape == (1, 28, 28)


def _write_idx(path, array):
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    header = bytes([0, 0, 0x08, array.ndim])
    with gzip.open(path, "wb") as f:
        f.write(header + dims + array.to(torch.uint8).numpy().tobytes())


def test_local_fa_on_mnist_idx_files_end_to_end(tmp_path):
    """`fa-rules train --rule local_fa --dataset mnist` on small IDX files written here (no download)."""
    folder = tmp_path / "data" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(48, 28, 28)
    images[:, 6:22, 10:18] = torch.rand(48, 1, 1, generator=g) * 255  # bright bars of random intensity
    _write_idx(folder / "train-images-idx3-ubyte.gz", images[:32])
    _write_idx(folder / "train-labels-idx1-ubyte.gz", torch.arange(32) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images[32:])
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", torch.arange(16) % 10)
    run = tmp_path / "run"
    invoke("train", "--rule", "local_fa", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--epochs", "6",
           "--out", run, "--depth", "1", "--width", "64", "--latent-dim", "8", "--batch-size", "8", "--lr", "1e-2", "-q")
    summary = json.loads((run / "summary.json").read_text())
    mean_image_mse = (images[32:] - images[:32].mean(0)).div(255).pow(2).mean().item()
    assert summary["dataset"] == "mnist" and summary["test_recon_mse"] < 0.5 * mean_image_mse, summary
    invoke("reconstruct", run, "--out", tmp_path / "mnist.png", "--num", "8")
    assert Image.open(tmp_path / "mnist.png").size == (8 * 30 + 2, 2 * 30 + 2)
