"""Step time and peak saved-for-backward bytes of the feedback-alignment family against backprop:
LeNet, Fashion-MNIST batches of 64, Adam, one torch thread.

Every rule's trainer steps in turn on the same batches in one process, so the step-time ratios
share the machine's state (`fa_rules.benchmark.timing.interleave`: medians after the warm-up steps,
a new order each round, freed memory kept for reuse). The saved bytes come from the trainer's
memory probe on one further step of each rule.

    OMP_NUM_THREADS=1 python benchmarks/feedback_step_memory.py relu|tanh [--steps 60] [--warmup 5]
"""

from __future__ import annotations

import argparse

import torch

from fa_rules.benchmark.timing import batch_index, example_order, interleave, ratio_clock, trainer_stepper
from fa_rules.core.config import TrainConfig
from fa_rules.core.trainer import Trainer
from fa_rules.runs import get_registry, resolve

RULES = [("backprop", {}), ("feedback_alignment", {}), ("direct_feedback_alignment", {}),
         ("direct_feedback_alignment", {"projection": "conv"}), ("bidirectional_fa", {}),
         ("bidirectional_dfa", {}), ("weight_mirror", {}), ("brsf", {}), ("frsf", {}),
         ("direct_random_target_projection", {})]


def make_trainer(name: str, options: dict, activation: str, dataset) -> Trainer:
    config = TrainConfig(rule=name, dataset="fashion_mnist", model="lenet", model_options={"activation": activation},
                         rule_options=dict(options), batch_size=64, device="cpu")
    rule, dataset, build_network = resolve(config, dataset=dataset)
    return Trainer(config, rule, build_network, dataset, out_dir="/dev/null", progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("activation", choices=["relu", "tanh"])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per rule")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per rule first")
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = get_registry().dataset("fashion_mnist").load(None)
    labels = [name + ("[conv]" if options else "") for name, options in RULES]
    trainers = [make_trainer(name, options, args.activation, dataset) for name, options in RULES]
    order = example_order(trainers[0], 0)
    medians = interleave({i: trainer_stepper(t, order) for i, t in enumerate(trainers)}, args.steps, args.warmup)
    failed = {labels[i]: m for i, m in medians.items() if isinstance(m, str)}
    if failed:
        raise SystemExit("; ".join(f"{label}: {m}" for label, m in failed.items()))
    last = args.warmup + args.steps
    for trainer in trainers:
        trainer.probe_memory(trainer.make_batch(batch_index(order, last, 64), last))
    peaks = [t.peak_saved_bytes for t in trainers]

    print(f"LeNet ({args.activation}), Fashion-MNIST batch 64, medians of {args.steps} interleaved steps "
          f"after {args.warmup} warm-up, {torch.get_num_threads()} thread(s); ratios of {ratio_clock('cpu')}")
    print(f"| rule ({args.activation}) | step CPU ms | step wall ms | step x backprop (CPU) | saved MiB | "
          "saved x backprop |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, label in enumerate(labels):
        print(f"| {label} | {medians[i].cpu * 1e3:.1f} | {medians[i].wall * 1e3:.1f} | {medians[i].cpu / medians[0].cpu:.2f} | "
              f"{peaks[i] / 2**20:.2f} | {peaks[i] / peaks[0]:.2f} |")


if __name__ == "__main__":
    main()
