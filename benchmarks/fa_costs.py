"""Step time of the feedback-alignment family against backprop, old mechanism against new.

The old mechanism (kept here, `additive_chained_feedback_gradients`, as it was before the layer
Functions) ran each block under its own `torch.func.vjp` with the feedback entering through
`layer(x; W, b) + layer(x - stop(x); B, 0)`, an extra matmul / conv per layer. The new one
(`fa_rules.core.feedback.feedback_call`) routes each layer through an autograd Function whose
backward sends the input gradient through `B`, under one gradient of the whole forward pass.

Rules step in turn on the same batches in one process (interleaved, so all see the same machine
state); prints median step times (`rule.step`: the updates, no optimiser) and ratios to backprop.

    OMP_NUM_THREADS=1 python benchmarks/fa_costs.py --steps 30
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.func import functional_call

import fa_rules.rules.feedback_alignment as fa
import fa_rules.rules.learned_feedback as learned
from fa_rules.benchmark.timing import StepTime, interleave, ratio_clock, since, start_clocks
from fa_rules.core.autodiff import vjp
from fa_rules.core.feedback import _globalize, _nonlinearity, _reshape, _sub, output_error
from fa_rules.core.rule import Batch
from fa_rules.plugins.manager import build_registry


# -- the old mechanism ---------------------------------------------------------------------------
def _substituted_block(block, local, x_in, x_const, feedback):
    """The block's output, whose derivative with respect to `x_in` goes through `feedback`."""
    layer = _sub(local, "layer")
    x_const = _reshape(block, x_const)
    a = functional_call(block.layer, layer, (x_const,))
    shadow = {k: feedback if k == "weight" else torch.zeros_like(v) for k, v in layer.items()}
    a = a + functional_call(block.layer, shadow, (_reshape(block, x_in) - x_const,))
    return _nonlinearity(block, local, a)


def additive_chained_feedback_gradients(network, model_params, x, y, feedback):
    """`(grads, loss)` of the old mechanism: one `vjp` per layered block, feedback keyed by block
    index or by `blocks.i.layer.weight`."""
    feedback = {k if isinstance(k, int) else network.block_of(k): b for k, b in feedback.items()}
    pullbacks, h = [], x
    for i in range(network.num_blocks):
        local, block, x_i = network.block_params(i, model_params), network.blocks[i], h
        if i == 0:
            h, fn = vjp(lambda p, _i=i, _x=x_i: network.block_apply_local(_i, p, _x), local)
            fn0 = fn
            pullbacks.append(lambda g, _fn=fn0, _i=i: (_globalize(network, _i, _fn(g)[0]), None))
            continue
        if i in feedback:
            h, fn = vjp(lambda p, xin, _b=block, _x=x_i, _f=feedback[i]: _substituted_block(_b, p, xin, _x, _f), local, x_i)
        else:
            h, fn = vjp(lambda p, xin, _i=i: network.block_apply_local(_i, p, xin), local, x_i)
        pullbacks.append(lambda g, _fn=fn, _i=i: (lambda r: (_globalize(network, _i, r[0]), r[1]))(_fn(g)))
    e, loss = output_error(h, y)
    grads, g = {}, e
    for pb in reversed(pullbacks):
        block_grads, g = pb(g)
        grads.update(block_grads)
    return grads, loss


@contextlib.contextmanager
def old_mechanism():
    """The feedback-alignment rules (and the learned-feedback ones) with the old chained gradients swapped in."""
    new = fa.chained_feedback_gradients
    for module in (fa, learned):
        module.chained_feedback_gradients = additive_chained_feedback_gradients
    try:
        yield
    finally:
        for module in (fa, learned):
            module.chained_feedback_gradients = new


# -- timing ---------------------------------------------------------------------------------------
CASES = {  # name: (model, options, input shape, batch size)
    "lenet": ("lenet", {}, (1, 28, 28), 64),
    "mlp3x256": ("mlp", {"depth": 3, "width": 256}, (1, 28, 28), 64),
    "resnet20": ("resnet20", {}, (3, 32, 32), 32),
}
RULES = ("backprop", "feedback_alignment", "sign_symmetry", "kolen_pollack", "indirect_feedback_alignment",
         "direct_feedback_alignment")
CHAINED = ("feedback_alignment", "sign_symmetry", "kolen_pollack")


def time_case(case: str, steps: int, warmup: int) -> dict[str, float]:
    registry = build_registry(autoload=False)
    model, options, shape, batch = CASES[case]
    torch.manual_seed(0)
    network = registry.model(model).make(shape, (10,), **options)
    layered = model != "resnet20"
    variants = []  # (label, rule, params, state, old)
    for name in RULES:
        if name == "indirect_feedback_alignment" and not layered:
            continue
        rule = registry.rule(name).make()
        params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
        variants.append((name, rule, params, state, False))
        if name in CHAINED and layered:
            variants.append((f"{name} (old)", rule, params, state, True))
    data = torch.Generator().manual_seed(2)
    batches = [Batch(torch.rand(batch, *shape, generator=data), torch.randint(0, 10, (batch,), generator=data), step)
               for step in range(warmup + steps)]

    def stepper(rule, params, state, old):
        def step(step_number: int) -> StepTime:
            with old_mechanism() if old else contextlib.nullcontext():
                start = start_clocks()
                rule.step(network, params, state, batches[step_number])
                return since(start)

        return step

    medians = interleave({label: stepper(*variant) for label, *variant in variants}, steps, warmup)
    failed = [f"{label}: {m}" for label, m in medians.items() if isinstance(m, str)]
    if failed:
        raise SystemExit("; ".join(failed))
    return medians

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {args.steps} interleaved steps; "
          f"ratios of {ratio_clock('cpu')}")
    print(f"{'model':<10} {'rule':<34} {'CPU ms':>9} {'wall ms':>9} {'x backprop':>11}")
    for case in args.cases.split(","):
        medians = time_case(case, args.steps, args.warmup)
        base = medians["backprop"]
        for label, t in medians.items():
            print(f"{case:<10} {label:<34} {t.cpu * 1e3:>9.2f} {t.wall * 1e3:>9.2f} {t.cpu / base.cpu:>11.3f}")


if __name__ == "__main__":
    main()
