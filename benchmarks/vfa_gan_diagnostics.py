"""What a trained VFA-GAN's generator and discriminator do: why `G(r_hat)` does or does not improve
on VFA's own `r_hat` (the feature alignment paper's claim that VFA-GAN's FID is below VFA's).

On the first N test images `x`, through the run's last checkpoint:

- the discriminator's mean output on `x`, on the flow's `r_hat` and on the refined `G(r_hat)`, and on
  as many samples (prior -> flow -> G); least-squares targets are +1 (real) and -1 (fake), so a
  discriminator that cannot tell real from refined gives about the same value to both;
- the two terms of the generator's loss (Eq. 7) on these images: the adversarial
  `(D(G(r_hat)) - 1)^2` and the perceptual `|mu(x) - mu(G(r_hat))|^2 + |var(x) - var(G(r_hat))|^2`
  with its weight lambda;
- squared error to `x` of `r_hat` and of `G(r_hat)`, and the images' high-frequency energy (mean
  squared 3x3 Laplacian per pixel): speckle that an MSE hardly sees and Inception features do.

    python benchmarks/vfa_gan_diagnostics.py runs/benchmark-NAME/runs/vfa_gan-seed0 [--num 1000]

VFA-GAN's encoder is trained exactly as VFA's (the generator and discriminator take `r_hat` as a
constant), so with the same seed and settings its `r_hat` is VFA's, and VFA's FID is the FID of
these `r_hat`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fa_rules.core.data import as_float
from fa_rules.core.errors import UserError
from fa_rules.rules.generative_baselines import build_aux, least_squares
from fa_rules.rules.variational_feature_alignment import perceptual_distance
from fa_rules.runs import get_registry, load_run

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared 3x3 Laplacian per pixel and channel (0 for a constant image)."""
    c = images.shape[1]
    kernel = LAPLACIAN.to(images).expand(c, 1, 3, 3)
    return F.conv2d(images, kernel, groups=c).pow(2).mean().item()


def diagnose(run_dir: Path, num: int, seed: int) -> dict:
    config, rule, network, params, state, dataset = load_run(run_dir)
    if config.rule != "vfa_gan":
        raise UserError(f"{run_dir} is a {config.rule} run; this script reads vfa_gan runs")
    weight = float({**get_registry().rule("vfa_gan").options, **config.rule_options}["perceptual_weight"])
    x = as_float(dataset.test_x[:num])
    generator = torch.Generator().manual_seed(seed)
    stages = rule.reconstruct(network, params, state, x, generator, stages=True)
    r_hat, refined = stages["r_hat"], stages["x_hat"]
    samples = rule.sample(network, params, state, num, generator)
    discriminator = build_aux("discriminator", network)
    with torch.no_grad():
        d = {name: discriminator.apply(params["discriminator"], images).mean().item()
             for name, images in (("x", x), ("r_hat", r_hat), ("G(r_hat)", refined), ("samples", samples))}
        adversarial = least_squares(discriminator.apply(params["discriminator"], refined), 1.0).item()
        real = network.apply(params["model"], x)
        perceptual = perceptual_distance(real["mu"], real["logvar"].exp(),
                                         network.apply(params["model"], refined)).item()
    mse = {name: (images - x).pow(2).mean().item() for name, images in (("r_hat", r_hat), ("G(r_hat)", refined))}
    energy = {name: high_frequency_energy(images.clamp(0, 1))
              for name, images in (("x", x), ("r_hat", r_hat), ("G(r_hat)", refined), ("samples", samples))}
    return {"num": x.shape[0], "discriminator": d, "adversarial": adversarial, "perceptual": perceptual,
            "perceptual_weight": weight, "mse": mse, "high_frequency": energy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--num", type=int, default=1000, help="test images (and samples) to read")
    parser.add_argument("--seed", type=int, default=0, help="seed of the flow's start and the samples' latents")
    args = parser.parse_args()
    try:
        r = diagnose(args.run_dir, args.num, args.seed)
    except UserError as e:
        parser.exit(2, f"error: {e}\n")
    d, e = r["discriminator"], r["high_frequency"]
    print(f"{args.run_dir} ({r['num']} test images, as many samples)\n")
    print("| images | mean D output (real +1, fake -1) | squared error to x per pixel | high-frequency energy |")
    print("|---|---:|---:|---:|")
    for name in ("x", "r_hat", "G(r_hat)", "samples"):
        mse = f"{r['mse'][name]:.4f}" if name in r["mse"] else ""
        print(f"| {name} | {d[name]:+.3f} | {mse} | {e[name]:.4f} |")
    print(f"\nGenerator loss on G(r_hat) (Eq. 7): adversarial {r['adversarial']:.3f}, perceptual {r['perceptual']:.3f} "
          f"x lambda {r['perceptual_weight']:g} = {r['perceptual'] * r['perceptual_weight']:.4f}")


if __name__ == "__main__":
    main()
