"""FID: the Fréchet distance itself, the real offline Inception weights, and one-line weight errors.

The tests with real weights find them through FA_RULES_FID_WEIGHTS (CI sets it), else in the
`shared/fid/` folder beside the repository; without either they are skipped (FID is never computed
with random weights).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fa_rules.measures import fid
from fa_rules.core.errors import UserError
from fa_rules.core.rule import Rule, no_state_init
from fa_rules.plugins.datasets import load_digits


def _weights() -> Path | None:
    env = os.environ.get(fid.FID_WEIGHTS_ENV)
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[2] / "shared" / "fid" / fid.WEIGHTS_FILE
    return beside if beside.is_file() else None


WEIGHTS = _weights()
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason=f"no Inception weights ({fid.FID_WEIGHTS_ENV} unset)")


@pytest.fixture(scope="module")
def inception():
    return fid.load_inception(WEIGHTS)


@pytest.mark.filterwarnings("ignore")  # pytorch-fid's scipy sqrtm warns about singular covariances
def test_frechet_distance_agrees_with_pytorch_fid_in_both_regimes():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    for n_a, n_b, d in [(40, 50, 16), (12, 9, 30)]:  # more images than dimensions, and fewer
        a = rng.normal(size=(n_a, d))
        b = rng.normal(size=(n_b, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
        ours = fid.frechet_distance(a, b)
        ref = calculate_frechet_distance(*fid.statistics(a), *fid.statistics(b))
        assert ours == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert ours > 1.0


def test_frechet_distance_of_a_shift_is_the_squared_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 8))
    shift = np.arange(8) / 4.0
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    assert fid.frechet_distance(a, a[::-1]) == pytest.approx(0.0, abs=1e-9)  # order does not matter


@needs_weights
def test_fid_with_the_real_weights_is_zero_for_the_same_images_and_large_for_changed_ones(inception):
    images = load_digits().test_x[:6]
    once = fid.inception_features(images, inception, batch_size=6)
    again = fid.inception_features(images, inception, batch_size=4)
    assert once.shape == (6, fid.FEATURE_DIM)
    assert np.abs(once - again).max() < 1e-3  # batching does not change a feature
    assert abs(fid.frechet_distance(once, again)) < 1e-2
    darker = fid.inception_features(images * 0.5, inception)
    # measured: 89.5 for these six images
    assert fid.frechet_distance(once, darker) > 20.0


@needs_weights
def test_fid_of_a_rule_that_returns_test_images_is_zero(inception):
    data = load_digits()

    def sample(network, params, state, num, generator, labels=None):
        return data.test_x[:num]  # a perfect generator of the test split's first images

    rule = Rule(init=no_state_init, step=lambda *a: None, task="generate", reconstruct=lambda *a: a[3], sample=sample)
    params = {"model": {"w": torch.zeros(1)}}
    result = fid.rule_fid(rule, None, params, {}, data.test_x, 5, WEIGHTS, batch_size=5)
    assert result["fid_num"] == 5 and result["time_per_sample_s"] >= 0
    assert abs(result["fid"]) < 1e-2


def test_missing_weights_are_one_line_errors_and_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("FA_RULES_OFFLINE", "1")
    monkeypatch.delenv(fid.FID_WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError) as e:
        fid.resolve_weights()
    assert "\n" not in str(e.value) and fid.FID_WEIGHTS_ENV in str(e.value) and "--fid-weights" in str(e.value)
    assert not (tmp_path / "hub").exists()

    monkeypatch.setenv(fid.FID_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="nope.pth"):
        fid.resolve_weights()
    with pytest.raises(UserError, match="no file"):
        fid.resolve_weights(tmp_path / "other.pth")

    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a state dict")
    with pytest.raises(UserError) as e:
        fid.load_inception(broken)
    assert "\n" not in str(e.value) and "broken.pth" in str(e.value)


def test_hub_cache_is_found_without_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(fid.FID_WEIGHTS_ENV, raising=False)
    cached = tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert fid.resolve_weights() == cached
    monkeypatch.setenv(fid.FID_WEIGHTS_ENV, str(cached))  # the variable wins over the cache
    assert fid.resolve_weights(tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_FILE) == cached


def test_fid_command_without_weights_fails_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fa_rules.cli.app import app

    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--rule", "vae", "--epochs", "1", "--width", "8", "--latent-dim", "2",
                                 "--batch-size", "512", "--out", str(run), "-q"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv(fid.FID_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    result = runner.invoke(app, ["fid", str(run), "--num", "10"])
    assert isinstance(result.exception, UserError) and "missing.pth" in str(result.exception)
    result = runner.invoke(app, ["train", "--rule", "vae", "--epochs", "1", "--out", str(tmp_path / "r2"), "--fid", "10"])
    assert isinstance(result.exception, UserError) and not (tmp_path / "r2").exists()  # refused before training


class CountingFeatures(torch.nn.Module):
    """Stands in for Inception where only the caching is under test: counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return [x.flatten(1)[:, :16] * self.scale]


def test_real_image_features_are_computed_once_per_image_set(tmp_path, monkeypatch):
    monkeypatch.setenv(fid.FID_CACHE_ENV, str(tmp_path / "cache"))
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"0" * 10)
    images, model = load_digits().test_x[:12], CountingFeatures()
    first = fid.real_features(images, model, weights, batch_size=5)
    assert model.seen == 12 and len(list((tmp_path / "cache").glob("real-*.npy"))) == 1
    again = fid.real_features(images, model, weights)
    assert model.seen == 12 and np.array_equal(first, again)  # read back, not recomputed
    other = fid.real_features(images[:11], model, weights)
    assert model.seen == 23 and other.shape == (11, 16)  # other images: a new entry
    weights.write_bytes(b"0" * 11)
    fid.real_features(images, model, weights)
    assert model.seen == 35  # other weights: a new entry
    monkeypatch.setenv(fid.FID_CACHE_ENV, "off")
    fid.real_features(images, model, weights)
    assert model.seen == 47 and len(list((tmp_path / "cache").glob("real-*.npy"))) == 3
