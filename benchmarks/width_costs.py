"""Step time of the generative rules on the feature alignment paper's networks at several width
multipliers, as ratios to each rule's width-1 step, measured interleaved in one process.

Every (rule, width) pair gets its own trainer (same seed, same batches); the pairs take their steps
in turn, round after round, so that all of them see the same machine state. Prints one table:
median seconds per step and the ratio to the same rule at width 1, and an estimate of the hours a
suite of `--epochs` epochs x `--seeds` seeds would train (steps only, no evaluation or FID).

    python benchmarks/width_costs.py --widths 1,0.5,0.25 --rounds 6
"""

from __future__ import annotations

import argparse

import torch

from fa_rules.benchmark.timing import example_order, interleave, ratio_clock, ratio_seconds, trainer_stepper
from fa_rules.core.config import TrainConfig
from fa_rules.core.trainer import Trainer
from fa_rules.runs import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="ae,vae,gan,vfa,vfa_gan")
    parser.add_argument("--widths", default="1,0.5,0.25")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per pair (after one warm-up round)")
    parser.add_argument("--epochs", type=int, default=20, help="for the time estimate")
    parser.add_argument("--seeds", type=int, default=3, help="for the time estimate")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    widths = [float(w) for w in args.widths.split(",")]
    trainers = {}
    for rule_name in rules:
        for width in widths:
            config = TrainConfig(rule=rule_name, dataset=args.dataset, model="paper_encoder",
                                 model_options={"width_multiplier": width}, latent_dim=args.latent_dim,
                                 batch_size=args.batch_size, device=args.device)
            rule, dataset, build_network = resolve(config)
            trainers[rule_name, width] = Trainer(config, rule, build_network, dataset, out_dir="unused", progress=False)
    first = next(iter(trainers.values()))
    n = first.data.train_x.shape[0]
    steps_per_epoch = -(-n // args.batch_size)
    order = example_order(first, 0)
    # round 0 warms up every pair
    times = interleave({key: trainer_stepper(t, order) for key, t in trainers.items()}, args.rounds, warmup=1)
    failed = [f"{key}: {m}" for key, m in times.items() if isinstance(m, str)]
    if failed:
        raise SystemExit("; ".join(failed))
    print(f"dataset={args.dataset} batch={args.batch_size} device={first.device} "
          f"threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"(ratio of {ratio_clock(first.device)}; hours from wall time)")
    print(f"{'rule':10s} {'width':>6s} {'params':>10s} {'CPU s':>8s} {'wall s':>8s} {'x width 1':>9s} "
          f"{'hours: ' + str(args.epochs) + ' ep x ' + str(args.seeds) + ' seeds':>24s}")
    for rule_name in rules:
        base = times[rule_name, widths[0]]
        for width in widths:
            trainer = trainers[rule_name, width]
            median = times[rule_name, width]
            params = sum(t.numel() for group in trainer.params.values() for t in group.values())
            hours = median.wall * steps_per_epoch * args.epochs * args.seeds / 3600  # what a run will take
            ratio = ratio_seconds(median, first.device) / ratio_seconds(base, first.device)
            print(f"{rule_name:10s} {width:6.3g} {params:10d} {median.cpu:8.3f} {median.wall:8.3f} {ratio:9.3f} "
                  f"{hours:24.2f}")


if __name__ == "__main__":
    main()
