"""Step time and peak saved-for-backward bytes of the feedback-alignment family against backprop:
LeNet, Fashion-MNIST batches of 64, Adam, one torch thread.

Every rule steps in turn on the same batch, step after step, in one process, so the step-time
ratios share the machine's state (`fa_rules.benchmark.timing.interleave`: medians after the
warm-up steps, a new order each round, freed memory kept for reuse). The saved bytes come from the
engine's `SavedTensorsProbe` on one further step of each rule.

    OMP_NUM_THREADS=1 python benchmarks/feedback_step_memory.py relu|tanh [--steps 60] [--warmup 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from fa_rules.benchmark.timing import interleave
from fa_rules.core.autodiff import SavedTensorsProbe
from fa_rules.core.data import as_float
from fa_rules.core.rule import Batch
from fa_rules.core.trainer import TrainConfig, apply_updates, make_optimizers
from fa_rules.plugins.manager import get_registry

RULES = [("backprop", {}), ("feedback_alignment", {}), ("direct_feedback_alignment", {}),
         ("direct_feedback_alignment", {"projection": "conv"}), ("bidirectional_fa", {}),
         ("bidirectional_dfa", {}), ("weight_mirror", {}), ("brsf", {}), ("frsf", {}),
         ("direct_random_target_projection", {})]


def make_stepper(registry, name: str, options: dict, activation: str):
    """(network, rule, params, state, optimisers) from the same seed for every rule."""
    torch.manual_seed(0)
    network = registry.model("lenet").make((1, 28, 28), (10,), activation=activation)
    rule = registry.rule(name).make(**options)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    return [network, rule, params, state, make_optimizers(TrainConfig(), params)]


def stepper_of(stepper, batches: list[Batch]):
    """A stepper for `interleave`: one step of the rule on batch `step` (updates and Adam), timed."""
    def step(step_number: int) -> float:
        network, rule, params, state, optimisers = stepper
        start = time.perf_counter()
        updates, stepper[3], _ = rule.step(network, params, state, batches[step_number])
        apply_updates(rule, params, updates, optimisers)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("activation", choices=["relu", "tanh"])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per rule")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per rule first")
    args = parser.parse_args()
    torch.set_num_threads(1)

    registry = get_registry()
    dataset = registry.dataset("fashion_mnist").load(None)
    total = args.warmup + args.steps
    xs, ys = as_float(dataset.train_x[:64 * total]), dataset.train_y[:64 * total]
    # copies, as the trainer's batches are: a view would keep (and the probe count) the whole slab
    batches = [Batch(xs[i * 64:(i + 1) * 64].clone(), ys[i * 64:(i + 1) * 64].clone(), seed=i) for i in range(total)]
    labels = [name + ("[conv]" if options else "") for name, options in RULES]
    steppers = [make_stepper(registry, name, options, args.activation) for name, options in RULES]
    timed = interleave({i: stepper_of(s, batches) for i, s in enumerate(steppers)}, args.steps, args.warmup)
    peaks = []
    for network, rule, params, state, _ in steppers:
        with SavedTensorsProbe() as probe:
            rule.step(network, params, state, batches[-1])
        peaks.append(probe.peak)

    medians = [timed[i] for i in range(len(RULES))]
    print(f"LeNet ({args.activation}), Fashion-MNIST batch 64, medians of {args.steps} interleaved steps "
          f"after {args.warmup} warm-up, {torch.get_num_threads()} thread(s)")
    print(f"| rule ({args.activation}) | step ms | step x backprop | saved MiB | saved x backprop |")
    print("|---|---:|---:|---:|---:|")
    for label, median, peak in zip(labels, medians, peaks):
        print(f"| {label} | {median * 1e3:.1f} | {median / medians[0]:.2f} | {peak / 2**20:.2f} | "
              f"{peak / peaks[0]:.2f} |")


if __name__ == "__main__":
    main()
