"""Measurements of a trained run (a `Trainer` after `run()`), as the benchmark adds them to a row:
time per sample and FID of a generative rule, linear-probe accuracy of an encoder."""

from __future__ import annotations

import statistics
import time
from typing import Any


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


_REAL_FEATURES: dict[tuple, Any] = {}  # Inception features of real images, shared by the cells of a process


def measure_fid(trainer, num_samples: int, batch: int = 100) -> float:
    """FID between `num_samples` samples of a generative rule and as many test images (the first
    ones; fewer if the split is smaller), with `fa_rules.measures.fid`'s Inception network."""
    import torch

    from fa_rules.core.data import as_float
    from fa_rules.measures.fid import frechet_distance, inception_features, load_inception

    model = load_inception(device=trainer.device)
    real_x = trainer.data.test_x[:num_samples]
    n = real_x.shape[0]
    key = (trainer.config.dataset, n, str(trainer.device))
    if key not in _REAL_FEATURES:
        _REAL_FEATURES[key] = inception_features((as_float(real_x[i : i + batch]) for i in range(0, n, batch)), model)
    generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.seed)

    def samples():
        for i in range(0, n, batch):
            k = min(batch, n - i)
            yield trainer.rule.sample(trainer.network, trainer.params, trainer.state, k, generator).detach()

    return frechet_distance(inception_features(samples(), model), _REAL_FEATURES[key])


def measure_probe(trainer) -> float:
    """Linear-probe test accuracy on the trained model's latent (`fa_rules.measures.probe`)."""
    from fa_rules.measures.probe import linear_probe

    return linear_probe(trainer.network, trainer.params["model"], trainer.data).probe_accuracy
