"""The generative measurements behind the README's FID tables, with the real Inception weights:
`train --fid N`, `fa-rules fid RUN --num N --json` (against a direct computation with the same
seed, and its update of summary.json), the benchmark's FID, time-per-sample and probe columns and a
failing measurement's note; and FID's trace terms against the closed form.

The tests with real weights find them through FA_RULES_FID_WEIGHTS (CI sets it), else in the
`shared/fid/` folder beside the repository; without either they are skipped. Tiny on purpose: a
one-epoch VAE on 8x8 digits and FID over 5-6 images (the Inception wrapper upsamples to 299x299).
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fa_rules import benchmark as bench
from fa_rules.cli.app import app
from fa_rules.core.data import as_float
from fa_rules.measures import fid
from fa_rules.runs import load_run


from test_fid import WEIGHTS, needs_weights  # the real Inception weights, found as test_fid finds them

TINY_VAE = ["--rule", "vae", "--dataset", "digits", "--epochs", "1", "--depth", "1", "--width", "8",
            "--latent-dim", "2", "--batch-size", "512", "--device", "cpu"]
N_TRAIN, N_COMMAND = 6, 5  # FID sample counts of `train --fid` (and the benchmark) and of `fid --num`


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@functools.lru_cache
def direct_fid(run_dir: Path, num: int, seed: int) -> float:
    """FID computed here: `num` samples drawn at once from a generator seeded with `seed`, against
    the first `num` test images, through `fa_rules.measures.fid.fid`."""
    config, rule, network, params, state, dataset = load_run(run_dir)
    with torch.enable_grad():
        samples = rule.sample(network, params, state, num, torch.Generator().manual_seed(seed)).detach()
    assert samples.shape == (num, 1, 8, 8)
    return fid.fid(samples, as_float(dataset.test_x[:num]), WEIGHTS)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """`train --fid N_TRAIN`: a one-epoch VAE whose summary gets the FID of N_TRAIN samples."""
    run = tmp_path_factory.mktemp("generative") / "vae"
    invoke("train", *TINY_VAE, "--out", run, "--fid", N_TRAIN, "--fid-weights", WEIGHTS, "-q")
    return run


@needs_weights
def test_train_with_fid_adds_the_fid_of_its_samples_to_the_summary(vae_run):
    summary = json.loads((vae_run / "summary.json").read_text())
    assert summary["fid_num"] == N_TRAIN and summary["time_per_sample_s"] > 0
    assert summary["fid"] > 1.0  # one epoch of a 2-d VAE is far from the test images
    assert summary["fid"] == pytest.approx(direct_fid(vae_run, N_TRAIN, seed=0), rel=1e-5)


@needs_weights
def test_fid_command_json_equals_a_direct_computation_and_updates_the_summary(vae_run):
    result = invoke("fid", vae_run, "--num", N_COMMAND, "--seed", 1, "--json", "--fid-weights", WEIGHTS, "--device", "cpu")
    report = json.loads(result.stdout)
    assert report["rule"] == "vae" and report["fid_num"] == N_COMMAND and report["time_per_sample_s"] > 0
    assert report["fid"] == pytest.approx(direct_fid(vae_run, N_COMMAND, seed=1), rel=1e-5)
    summary = json.loads((vae_run / "summary.json").read_text())
    assert {k: summary[k] for k in ("fid", "fid_num", "time_per_sample_s")} == {
        k: report[k] for k in ("fid", "fid_num", "time_per_sample_s")}
    assert summary["rule"] == "vae" and summary["epochs"] == 1  # the rest of the summary is kept


@needs_weights
def test_benchmark_fills_fid_time_per_sample_and_probe_and_notes_a_failing_measurement(vae_run, tmp_path, monkeypatch):
    from fa_rules.benchmark import runner

    monkeypatch.setenv(fid.FID_WEIGHTS_ENV, str(WEIGHTS))  # the benchmark's FID finds the weights as a user's would
    measure_probe = runner.measure_probe

    def probe_failing_for_ae(trainer):
        if trainer.config.rule == "ae":
            raise RuntimeError("probe broke (injected)")
        return measure_probe(trainer)

    monkeypatch.setattr(runner, "measure_probe", probe_failing_for_ae)
    suite_file = tmp_path / "generative.toml"
    suite_file.write_text(f"""
name = "tiny-generative"
rules = ["ae", "vae"]
seeds = [0]
reference = "ae"
[settings]
dataset = "digits"
epochs = 1
depth = 1
width = 8
latent_dim = 2
batch_size = 512
device = "cpu"
[measure]
fid_samples = {N_TRAIN}
probe = true
sample_repeats = 2
""")
    rows = {r["rule"]: r for r in bench.run_suite(bench.load_suite(suite_file), tmp_path / "out")}
    vae = rows["vae"]
    assert vae["status"] == "ok" and vae["notes"] is None, vae
    # the suite's vae is `vae_run` (same settings, same seed), so its FID is the one computed directly
    trained = load_run(tmp_path / "out" / vae["run_dir"])[3]
    assert all(torch.equal(v, load_run(vae_run)[3]["model"][k]) for k, v in trained["model"].items())
    assert vae["fid"] == pytest.approx(direct_fid(vae_run, N_TRAIN, seed=0), rel=1e-5)
    assert vae["time_per_sample_s"] > 0
    assert 0.1 < vae["probe_accuracy"] <= 1.0  # a 2-d latent of one epoch still beats chance (10 classes)
    ae = rows["ae"]  # a failing measurement is a note on an otherwise good row
    assert ae["status"] == "ok" and ae["error"] is None and "test_recon_mse" in ae
    assert ae["notes"] == "probe: RuntimeError: probe broke (injected)"
    assert "probe_accuracy" not in ae and "fid" not in ae  # ae draws no samples: no FID, no note for it
    saved = {r["rule"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert saved["ae"]["notes"] == ae["notes"] and saved["vae"]["fid"] == vae["fid"]


@pytest.mark.parametrize("extra_dims", [0, 40], ids=["more-images-than-dims", "fewer-images-than-dims"])
def test_fid_of_equal_means_and_unequal_covariances_is_the_closed_form(extra_dims):
    """Feature sets {+s_i e_i, -s_i e_i}: mean 0 and diagonal covariance 2 s_i^2 / (n - 1) exactly, so
    FID = tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) = sum_i (sqrt(S1_ii) - sqrt(S2_ii))^2. The first case
    goes through the eigen-decomposition (n > D), the second (zero columns added) through the SVD."""
    d = 6
    s = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.25])
    t = np.array([2.0, 1.0, 0.5, 0.1, 4.0, 1.0])

    def features(scales):
        eye = np.eye(d) * scales[:, None]
        return np.hstack([np.vstack([eye, -eye]), np.zeros((2 * d, extra_dims))])

    a, b = features(s), features(t)
    n = 2 * d
    var_a, var_b = 2 * s**2 / (n - 1), 2 * t**2 / (n - 1)
    mu_a, cov_a = fid.statistics(a)
    assert np.allclose(mu_a, 0) and np.allclose(cov_a[:d, :d], np.diag(var_a))
    expected = var_a.sum() + var_b.sum() - 2 * np.sqrt(var_a * var_b).sum()
    assert expected == pytest.approx(((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())
    assert expected > 1.0
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
