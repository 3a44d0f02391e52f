"""The paper networks at a width multiplier, and the CIFAR-10 and CelebA paths end to end on small
file sets written here (the real datasets are not available offline)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fa_rules import models as zoo
from fa_rules.cli.app import app
from fa_rules.core.errors import UserError
from fa_rules.plugins import datasets as ds
from fa_rules.plugins.manager import get_registry


def _conv_channels(network) -> list[int]:
    return [b.layer.out_channels for b in network.blocks if isinstance(b.layer, (nn.Conv2d, nn.ConvTranspose2d))]


def _linear_widths(network) -> list[int]:
    return [b.layer.out_features for b in network.blocks if isinstance(b.layer, nn.Linear)]


def _count(network) -> int:
    return sum(p.numel() for p in network.parameters())


def test_width_one_is_the_papers_tables():
    enc = zoo.paper_encoder((1, 28, 28), (32,))
    assert _conv_channels(enc) == [32, 32, 64, 64] and _linear_widths(enc) == [4096, 32]  # Table 7
    enc64 = zoo.paper_encoder((3, 64, 64), (128,))
    assert _conv_channels(enc64) == [32, 32, 64, 64, 128, 128, 256, 256] and _linear_widths(enc64)[0] == 4096  # Table 9
    assert _conv_channels(zoo.fa_generator((1, 28, 28))) == [128, 128, 1]  # Table 11
    gen = zoo.gan_generator((32,), (1, 28, 28))
    assert _linear_widths(gen) == [256 * 7 * 7] and _conv_channels(gen) == [256, 128, 128, 1]  # Table 12, 28 px


def test_width_multiplier_scales_channels_and_hidden_width_only():
    enc = zoo.paper_encoder((1, 28, 28), (32,), width_multiplier=0.25)
    assert _conv_channels(enc) == [8, 8, 16, 16] and _linear_widths(enc) == [1024, 32]  # latent stays 32
    assert [b.layer.stride for b in enc.blocks[:4]] == [(1, 1), (2, 2), (1, 1), (2, 2)]
    disc = zoo.paper_discriminator((3, 32, 32), (1,), width_multiplier=0.5)
    assert _conv_channels(disc) == [16, 16, 32, 32, 64, 64] and _linear_widths(disc) == [1024, 1]
    refiner = zoo.fa_generator((3, 32, 32), width_multiplier=0.25)
    assert _conv_channels(refiner) == [32, 32, 3] and refiner.blocks[0].layer.kernel_size == (7, 7)
    gen = zoo.gan_generator((16,), (3, 64, 64), width_multiplier=0.5)
    assert _linear_widths(gen) == [128 * 4 * 4] and _conv_channels(gen) == [128, 64, 64, 32, 32, 16, 16, 3]
    assert gen.apply(gen.init_params(), torch.zeros(2, 16)).shape == (2, 3, 64, 64)
    # most weights join two scaled widths: about multiplier^2 of the parameters
    full, half = (_count(zoo.paper_encoder((1, 28, 28), (32,), width_multiplier=m)) for m in (1.0, 0.5))
    assert 0.2 < half / full < 0.3


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_width_multiplier_must_be_positive_and_finite(bad):
    with pytest.raises(UserError, match="width_multiplier"):
        zoo.paper_encoder((1, 28, 28), (32,), width_multiplier=bad)


def test_generative_rules_size_their_own_networks_from_the_encoders_multiplier():
    registry = get_registry()
    encoder = registry.model("paper_encoder").make((1, 28, 28), (16,), width_multiplier=0.25)
    assert encoder.options["width_multiplier"] == 0.25
    rule = registry.rule("vfa_gan").make()
    encoder = registry.model("paper_encoder").make((1, 28, 28), (16,), rule.heads(16, 10), width_multiplier=0.25)
    params, _ = rule.init(encoder, {"model": encoder.init_params()}, torch.Generator().manual_seed(0))
    assert params["generator"]["blocks.0.layer.weight"].shape == (32, 1, 7, 7)  # Table 11 at 0.25
    assert params["discriminator"]["blocks.0.layer.weight"].shape == (8, 1, 3, 3)  # Table 10 at 0.25
    vae = registry.rule("vae").make()
    encoder = registry.model("paper_encoder").make((1, 28, 28), (16,), vae.heads(16, 10), width_multiplier=0.5)
    params, _ = vae.init(encoder, {"model": encoder.init_params()}, torch.Generator().manual_seed(0))
    assert params["decoder"]["blocks.0.layer.weight"].shape == (128 * 7 * 7, 16)  # Table 12 at 0.5
    ae = registry.rule("ae").make()
    encoder = registry.model("paper_encoder").make((1, 28, 28), (16,), width_multiplier=0.5)
    params, _ = ae.init(encoder, {"model": encoder.init_params()}, torch.Generator().manual_seed(0))
    assert params["decoder"]["blocks.0.layer.weight"].shape == (128 * 7 * 7, 16)


def _write_cifar10(root, n=8):
    folder = root / ds.CIFAR_DIR
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name in (*ds.CIFAR_TRAIN, "test_batch"):
        data = {b"data": torch.randint(0, 256, (n, 3072), generator=g).to(torch.uint8).numpy(),
                b"labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(data))


def _write_celeba(root, n=12, test=4):
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(n):
        name = f"{i:06d}.jpg"
        Image.fromarray(torch.randint(0, 256, (218, 178, 3), generator=g).to(torch.uint8).numpy()).save(
            folder / "img_align_celeba" / name)
        lines.append(f"{name} {2 if i >= n - test else 0}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("dataset, rule, width, size", [
    ("cifar10", "vae", 0.125, 32),     # Table 8 encoder, Table 12 decoder at 32 px
    ("celeba", "vfa_gan", 0.0625, 64),  # Tables 9 and 10-11 at 64 px, unlabelled data
])
def test_paper_networks_train_sample_and_reconstruct_on_colour_datasets(tmp_path, dataset, rule, width, size):
    data = tmp_path / "data"
    (_write_cifar10 if dataset == "cifar10" else _write_celeba)(data)
    run = tmp_path / "run"
    _cli("train", "--rule", rule, "--dataset", dataset, "--data-dir", data, "--model", "paper_encoder",
         "--model-opt", f"width_multiplier={width}", "--latent-dim", 8, "--epochs", 1, "--batch-size", 4,
         "-q", "--out", run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == dataset and summary["epochs"] == 1
    assert json.loads((run / "config.json").read_text())["model_options"]["width_multiplier"] == width
    expected = zoo.paper_encoder((3, size, size), (8,), get_registry().rule(rule).make().heads(8, 10),
                                 width_multiplier=width)
    assert summary["params"] == _count(expected)
    _cli("sample", run, "--num", 4, "--out", tmp_path / "samples.png")
    _cli("reconstruct", run, "--out", tmp_path / "recon.png")
    from PIL import Image

    with Image.open(tmp_path / "samples.png") as img:
        assert min(img.size) >= size  # at least one full-size colour image
    assert (tmp_path / "recon.png").stat().st_size > 0


def test_model_opt_unknown_or_mistyped_is_one_line(tmp_path):
    for args, message in ((["--model-opt", "nosuch=1"], "has no setting 'nosuch'"),
                          (["--model-opt", "width_multiplier=wide"],
                           "option 'width_multiplier' must be a finite number, got 'wide'")):
        result = CliRunner().invoke(app, ["train", "--model", "paper_encoder", "--rule", "vfa", "--dataset", "digits",
                                          "--out", str(tmp_path / "x"), *args])
        assert isinstance(result.exception, UserError) and message in str(result.exception)
        assert not (tmp_path / "x").exists()


def test_gpu_job_parses_its_suites_and_refuses_a_machine_without_cuda():
    import subprocess
    from pathlib import Path

    from fa_rules import benchmark as bench

    root = Path(__file__).resolve().parents[1]
    for name in ("paper_table2_mnist", "paper_table2_cifar10"):
        suite = bench.load_suite(root / "benchmarks" / f"{name}.toml")
        assert len(bench.plan_cells(suite)) == 15 and suite.anchors["fid"]["values"]["vfa_gan"] > 0
        assert len(bench.plan_cells(bench.load_suite(root / "benchmarks" / f"{name}.toml", quick=True))) == 5
    script = root / "benchmarks" / "gpu" / "paper_table2.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if not torch.cuda.is_available():  # here: the job must stop at once, with one line, before any run
        result = subprocess.run(["bash", str(script), "--quick"], capture_output=True, text=True, cwd=root)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "no CUDA GPU" in result.stderr
