"""Where sign symmetry's and Kolen-Pollack's step time goes: the routing they share with feedback
alignment, and the arithmetic of their own.

Both rules route the error as feedback alignment does, and each does work of its own every step
over tensors the size of the routed weights: sign symmetry builds `B = mean|W| sign(W)`,
Kolen-Pollack's optimiser steps `B` (a second Adam, with the same gradient as `W`). Two stand-ins
time that work without the routing: backprop that also builds sign symmetry's feedback tensors
(and drops them), and backprop that also trains a copy of the routed weights the way Kolen-Pollack
trains `B`. A third runs backprop by the loop feedback alignment runs (its arithmetic written
out, no graph): what that loop saves against autograd's backward pass, which the engine's backprop
(the reference) uses. All trainers step in turn on the same batches in one process
(`interleave`); the table gives each one's median over backprop's, and the last column adds FA's
routing cost to each stand-in's, to compare with the rule's own ratio. Sign symmetry with `magnitude=unit` (the paper's
uSF, `B = sign(W)`: one pass over `W` where `mean|W| sign(W)` makes three) runs beside them.

    OMP_NUM_THREADS=1 python benchmarks/own_arithmetic.py --steps 300 --warmup 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from rule_costs import MODELS, make_trainer, setting_line  # noqa: E402

from fa_rules.benchmark.timing import example_order, in_ratio_clock, interleave, trainer_stepper  # noqa: E402
from fa_rules.core import Rule  # noqa: E402
from fa_rules.core.feedback import chained_feedback_gradients, feedback_weight_keys  # noqa: E402
from fa_rules.rules.backprop import backprop  # noqa: E402
from fa_rules.rules.feedback_alignment import kolen_pollack, sign_feedback  # noqa: E402
from fa_rules.runs import get_registry  # noqa: E402


def backprop_building_sign_feedback(scale: float = 1.0) -> Rule:
    """Backprop's step plus sign symmetry's feedback tensors, built and unused."""
    bp = backprop()

    def step(network, params, state, batch):
        for key in feedback_weight_keys(network):
            sign_feedback(params["model"][key], scale)
        return bp.step(network, params, state, batch)

    return Rule(init=bp.init, step=step, task="classify")


def backprop_training_a_copy(decay: float = 1e-3) -> Rule:
    """Backprop's step plus Kolen-Pollack's `feedback` group (its own init and declared decay),
    given the routed weights' gradients as Kolen-Pollack gives its `B`: its optimiser work without
    its routing."""
    bp, kp = backprop(), kolen_pollack(decay=decay)

    def step(network, params, state, batch):
        updates, state, metrics = bp.step(network, {"model": params["model"]}, state, batch)
        grads = updates["model"]
        return {"model": grads, "feedback": {k: grads[k] for k in params["feedback"]}}, state, metrics

    return Rule(init=kp.init, step=step, task="classify", weight_decay=kp.weight_decay)


def backprop_written_out() -> Rule:
    """Backprop by the feedback-alignment family's hand-written loop (no feedback tensors: every
    layer sends the signal through its own weight), for a model the loop takes: what the loop
    alone saves against autograd's backward pass, which the engine's backprop uses."""
    bp = backprop()

    def step(network, params, state, batch):
        model = params["model"]
        grads, loss = chained_feedback_gradients(network, model, batch.x, batch.y, {})
        return {"model": {k: grads[k] for k in model}}, state, {"loss": loss}

    return Rule(init=bp.init, step=step, task="classify")


WRITTEN_OUT = "backprop, written out (FA's loop, B = W)"
UNIT_SIGN = "sign_symmetry (magnitude=unit)"
STAND_INS = {"sign_symmetry": ("backprop + sign feedback", backprop_building_sign_feedback),
             "kolen_pollack": ("backprop + trained copy", backprop_training_a_copy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--models", default="mlp3x256,lenet")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    registry = get_registry()
    dataset = registry.dataset(args.dataset).load(None)
    start = time.perf_counter()
    print(setting_line("cpu", args.dataset, args.steps, args.warmup) + "\n")
    print("| model | trainer | CPU ms/step | wall ms/step | × backprop (CPU) | FA's routing + stand-in |")
    print("|---|---|---:|---:|---:|---:|")
    for model_name in args.models.split(","):
        trainers = {name: make_trainer(registry, name, model_name, dataset, args.dataset, False)
                    for name in ("backprop", "feedback_alignment", *STAND_INS)}
        for rule_name, (label, build) in STAND_INS.items():
            trainers[label] = make_trainer(registry, "backprop", model_name, dataset, args.dataset, False,
                                           rule=build())
        trainers[WRITTEN_OUT] = make_trainer(registry, "backprop", model_name, dataset, args.dataset, False,
                                             rule=backprop_written_out())
        # the paper's uSF: one pass over W (the sign) where mean|W| sign(W) makes three
        trainers[UNIT_SIGN] = make_trainer(registry, "sign_symmetry", model_name, dataset, args.dataset, False,
                                           rule_options={"magnitude": "unit"})
        order = example_order(trainers["backprop"], 0)
        times = interleave({k: trainer_stepper(t, order) for k, t in trainers.items()}, args.steps, args.warmup)
        medians = in_ratio_clock(times, "cpu")  # CPU time: a busy machine's other processes do not count
        ratio = {k: v / medians["backprop"] for k, v in medians.items()}
        routing = ratio["feedback_alignment"] - 1.0
        for name, median in medians.items():
            predicted = f"{ratio[name] + routing:.2f}" if name.startswith("backprop +") else ""
            print(f"| {model_name} | {name} | {median * 1e3:.2f} | {times[name].wall * 1e3:.2f} | {ratio[name]:.2f} | "
                  f"{predicted} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s in all; batch {MODELS['mlp3x256'][2]})")


if __name__ == "__main__":
    main()
