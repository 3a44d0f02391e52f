"""Measurements of a trained run (a `Trainer` after `run()`), as the benchmark adds them to a row:
time per sample and FID of a generative rule, linear-probe accuracy of an encoder."""

from __future__ import annotations

import statistics
import time


def time_per_sample(trainer, batch: int, repeats: int) -> float | None:
    """Median seconds to draw `batch` samples from a generative rule, divided by `batch`."""
    import torch

    rule = trainer.rule
    if rule.sample is None:
        return None
    generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.seed)
    cuda = trainer.device.type == "cuda"
    times = []
    for i in range(repeats + 2):  # two warm-up draws
        if cuda:
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        out = rule.sample(trainer.network, trainer.params, trainer.state, batch, generator)
        if cuda:
            torch.cuda.synchronize(trainer.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
        del out
    return statistics.median(times) / batch


def measure_fid(trainer, num_samples: int, batch: int = 100) -> float:
    """FID between `num_samples` samples of a generative rule (seeded by the run's seed) and as many
    test images (the first ones; fewer if the split is smaller): `fa_rules.measures.fid.rule_fid`,
    whose real-image features are cached on disk, so the cells of a benchmark, in one process or
    several, compute them once."""
    from fa_rules.measures.fid import rule_fid

    real = trainer.data.test_x
    return rule_fid(trainer.rule, trainer.network, trainer.params, trainer.state, real,
                    min(num_samples, real.shape[0]), seed=trainer.config.seed, batch_size=batch)["fid"]


def measure_probe(trainer) -> float:
    """Linear-probe test accuracy on the trained model's latent (`fa_rules.measures.probe`)."""
    from fa_rules.measures.probe import linear_probe

    return linear_probe(trainer.network, trainer.params["model"], trainer.data).probe_accuracy
