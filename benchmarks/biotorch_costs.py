"""The feedback-alignment family's step cost against BioTorch's implementation of the same rules.

BioTorch (Sanfiz & Akrout 2021, `pip install biotorch`, not a dependency of fa-rules) swaps a
network's `nn.Linear` / `nn.Conv2d` for layers whose autograd Functions send the error back through
feedback weights. Both libraries train the same network (our MLP 3x256 or LeNet, the same initial
forward weights) on the same batches with the same fused Adam; every stepper runs in turn in one
process, so the ratios share the machine's state:

- ours × BP: `Trainer.train_step` of the rule over the engine's backprop step;
- BioTorch × BP: a hand-written loop over BioTorch's converted network over the same loop on the
  plain network (what a BioTorch user runs);
- ours / BioTorch: the two rules' step times.

    OMP_NUM_THREADS=1 python benchmarks/biotorch_costs.py --steps 60 --warmup 5

Rule pairs: feedback_alignment / fa, direct_feedback_alignment / dfa, sign_symmetry with
`magnitude=xavier` / usf (the same rule), brsf / brsf, frsf / frsf. BioTorch has no Kolen-Pollack
or IFA.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rule_costs import MODELS, make_trainer, plain_loop, setting_line  # noqa: E402

from fa_rules.benchmark.timing import example_order, in_ratio_clock, interleave, trainer_stepper  # noqa: E402
from fa_rules.runs import get_registry  # noqa: E402

# our rule (name, options) -> BioTorch mode
PAIRS = {
    ("feedback_alignment", ()): "fa",
    ("direct_feedback_alignment", ()): "dfa",
    ("sign_symmetry", (("magnitude", "xavier"),)): "usf",
    ("brsf", ()): "brsf",
    ("frsf", ()): "frsf",
}


def biotorch_converter(mode: str, classes: int):
    from biotorch.module.biomodule import BioModule

    def convert(module):
        with contextlib.redirect_stdout(io.StringIO()):  # BioTorch prints a conversion summary
            return BioModule(module, mode=mode, output_dim=classes if mode == "dfa" else None)

    return convert


def biotorch_forward(mode: str):
    if mode == "dfa":  # BioTorch's DFA takes the targets and loss to broadcast the output error
        return lambda m, x, y: m(x, targets=y, loss_function=F.cross_entropy)
    return None


def rows_for(registry, model_name: str, dataset, data_name: str, args) -> list[str]:
    reference = make_trainer(registry, "backprop", model_name, dataset, data_name, False)
    order = example_order(reference, 0)
    steppers = {"ours backprop": trainer_stepper(reference, order),
                "plain backprop": plain_loop(reference, order)}
    labels = {}
    for (rule, options), mode in PAIRS.items():
        trainer = make_trainer(registry, rule, model_name, dataset, data_name, False, rule_options=dict(options))
        label = rule + "".join(f" {k}={v}" for k, v in options)
        labels[label] = mode
        steppers["ours " + label] = trainer_stepper(trainer, order)
        steppers["biotorch " + mode] = plain_loop(reference, order, biotorch_converter(mode, dataset.num_classes),
                                                  biotorch_forward(mode))
    # CPU time (`in_ratio_clock`): a busy machine's other processes do not count
    medians = in_ratio_clock(interleave(steppers, args.steps, args.warmup), "cpu")
    ours_bp, plain_bp = medians["ours backprop"], medians["plain backprop"]
    rows = [f"| {model_name} | backprop | {ours_bp * 1e3:.2f} | 1.00 | (plain loop) | {plain_bp * 1e3:.2f} | 1.00 | "
            f"{ours_bp / plain_bp:.2f} |"]
    for label, mode in labels.items():
        ours, theirs = medians["ours " + label], medians["biotorch " + mode]
        if isinstance(ours, str) or isinstance(theirs, str):
            rows.append(f"| {model_name} | {label} | {ours} | | {mode} | {theirs} | | |")
            continue
        rows.append(f"| {model_name} | {label} | {ours * 1e3:.2f} | {ours / ours_bp:.2f} | {mode} | "
                    f"{theirs * 1e3:.2f} | {theirs / plain_bp:.2f} | {ours / theirs:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per stepper")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per stepper")
    parser.add_argument("--models", default="mlp3x256,lenet")
    args = parser.parse_args()
    try:
        import biotorch  # noqa: F401
    except ImportError:
        parser.error("BioTorch is not installed (pip install biotorch --no-deps)")
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))} (use {', '.join(MODELS)})")

    registry = get_registry()
    dataset = registry.dataset(args.dataset).load(None)
    print(setting_line("cpu", args.dataset, args.steps, args.warmup) + "\n")
    print("| model | rule | ours CPU ms/step | ours × BP | BioTorch mode | BioTorch CPU ms/step | BioTorch × BP | "
          "ours / BioTorch |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for model_name in args.models.split(","):
        for row in rows_for(registry, model_name, dataset, args.dataset, args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
