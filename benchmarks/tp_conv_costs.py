"""Matmul FLOPs of one training step of the target-propagation family on convolutional networks,
against each rule's own floor and against backprop's step; prints one Markdown table.

`measured`: what one `rule.step` runs, counted with `torch.utils.flop_counter`'s formulas
(convolutions, transposed convolutions and matrix products, forward and backward; elementwise work
is not counted). `floor`: the matmul FLOPs the algorithm cannot avoid, from the FLOPs `F_l` of each
block's forward and `D_l` of each decoder's forward (both counted the same way on the same batch):

- forward pass: `sum_l F_l`;
- decoder training, per iteration and decoder: the auto-encoder objective `F_l + 2 D_l` (the noisy
  forward `f_l(h + eps)`, the decoder on it, the gradient with respect to the decoder's weights);
  L-DRL `F_l + 6 D_l` (`f_l(h + eps)`, the decoder at `f(h)`, `f(h + eps)` and `f(h) + eta`, and
  their weight gradients); DDTP one partial forward from block i + 1 to the output per hidden block
  and its two small products with `Q_i` and their weight gradient;
- targets: `2 D_l` per decoder (`g(tau)` and `g(h)`; `target_prop` only `D_l`), plus
  `iterative_dtp`'s corrections (`2 input_iters (F_l + D_l)` and `output_iters (F_l + D_l)`);
- local updates: `F_l` per block, the gradient of its local loss with respect to its weights (its
  output `f_l(h_{l-1}) = h_l` is the forward pass's; no gradient with respect to its input).

Backprop's step: forward, input gradients (every block but the first) and weight gradients,
counted the same way. A ratio `measured / floor` above 1 is work the implementation adds: the
local-loss `grad` recomputes each block's forward `f_l(h_{l-1})`, which the forward pass already
had (`F` in all), and DDTP's feedback products.

With `--time`, each rule's step is also timed, interleaved with backprop's in one process on the
same batch (`fa_rules.benchmark.timing.interleave`; CPU time on CPU, run with one thread), and two
more columns follow: the step time against backprop's, and against the rule's **time floor**, its
floor FLOPs run at the matmul rate backprop's own step reaches on this machine (`floor / (backprop
FLOPs / backprop step time)`). Goal: every rule within 1.5x of its time floor.

    python benchmarks/tp_conv_costs.py [--model lenet|simple_vgg] [--batch 64] [--size 28]
    OMP_NUM_THREADS=1 python benchmarks/tp_conv_costs.py --model simple_vgg --size 32 --time
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fa_rules.core import Batch
from fa_rules.core.inverse import forward_pass
from fa_rules.plugins.manager import get_registry
from fa_rules.rules import target_propagation as tp

RULES = ("backprop", "target_prop", "dtp", "iterative_dtp", "l_drl", "ddtp")


class _MatmulFlops(TorchDispatchMode):
    """Adds up torch's own FLOP formulas (`torch.utils.flop_counter`) of every op that has one. A
    dispatch mode of its own: `FlopCounterMode`'s module tracking refuses some nested `grad` calls."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn) -> int:
    """Matmul FLOPs (convolutions and matrix products, forward and backward) that `fn()` runs."""
    with _MatmulFlops() as counter:
        fn()
    return counter.total


def block_and_decoder_flops(network, model, x, space="post", conv_decoder="reversed_block"):
    """`(F, D)`: per-block forward FLOPs `F[l]` and per-decoder forward FLOPs `D[l]` (0 for block
    0, which has no decoder) on the batch `x`."""
    values, indices = forward_pass(network, model, x, space)
    forward = [count_flops(lambda i=i: network.block_apply(i, model, values[i])) for i in range(network.num_blocks)]
    decs = tp.decoders(network, space, conv_decoder)
    decoder = [0]
    for i in range(1, network.num_blocks):
        params = decs[i].init(torch.Generator().manual_seed(i), dtype=x.dtype)
        decoder.append(count_flops(lambda i=i, p=params: decs[i](p, values[i + 1], indices[i + 1])))
    return forward, decoder


def floor_flops(rule_name: str, options: dict, network, forward, decoder) -> int:
    """The matmul-FLOP floor of one step of `rule_name` (module docstring)."""
    L = network.num_blocks
    total = sum(forward) + sum(forward)  # forward pass, then every block's weight gradient
    if rule_name == "ddtp":
        iters = options.get("feedback_iters", 1)
        for i in range(L - 1):  # a partial forward from block i + 1; the products with Q_i are small
            total += iters * sum(forward[i + 1:])
        return total
    s = options
    first = s.get("first_target", "penultimate" if rule_name == "dtp" else "output")
    top = L - (2 if first == "penultimate" else 1)
    iters = s.get("feedback_iters", 1)
    ldrl = rule_name == "l_drl" or s.get("feedback_objective") == "ldrl"
    input_iters = s.get("input_iters", 1 if rule_name == "iterative_dtp" else 0)
    output_iters = s.get("output_iters", 2 if rule_name == "iterative_dtp" else 0)
    for l in range(1, top + 1):
        total += iters * (forward[l] + (6 if ldrl else 2) * decoder[l])
        total += (1 if rule_name == "target_prop" else 2) * decoder[l]
        total += (2 * input_iters + output_iters) * (forward[l] + decoder[l])
    return total


def step_flops(rule_name: str, network, x, y, options: dict | None = None) -> int:
    """Measured matmul FLOPs of one step of `rule_name` (its `init` is not counted)."""
    rule = get_registry().rule(rule_name).make(**(options or {}))
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))
    return count_flops(lambda: rule.step(network, params, state, Batch(x, y, seed=1)))


def step_times(network, x, y, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of one step of every rule (its ratio clock), the steps interleaved."""
    from fa_rules.benchmark.timing import interleave, ratio_seconds, since, start_clocks

    def stepper(rule_name):
        rule = get_registry().rule(rule_name).make()
        params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(0))

        def step(n):
            start = start_clocks()
            rule.step(network, params, state, Batch(x, y, seed=n))
            return since(start)
        return step

    medians = interleave({name: stepper(name) for name in RULES}, steps=steps, warmup=warmup)
    return {name: ratio_seconds(m, "cpu") if not isinstance(m, str) else float("nan") for name, m in medians.items()}


def table(model_name: str, batch: int, size: int, model_options: dict, time_steps: int = 0) -> str:
    registry = get_registry()
    torch.manual_seed(0)
    channels = 3 if model_name == "simple_vgg" else 1
    network = registry.model(model_name).make((channels, size, size), (10,), **model_options)
    x, y = torch.rand(batch, channels, size, size), torch.arange(batch) % 10
    forward, decoder = block_and_decoder_flops(network, network.init_params(), x)
    backprop = step_flops("backprop", network, x, y)
    times = step_times(network, x, y, time_steps, warmup=2) if time_steps else None
    head = "| rule | measured MFLOP | floor MFLOP | measured / floor | measured / backprop |"
    rows = [head + (" step time / backprop | step time / time floor |" if times else ""),
            "|---|---|---|---|---|" + ("---|---|" if times else "")]
    for name in RULES:
        measured = step_flops(name, network, x, y) if name != "backprop" else backprop
        floor = 3 * sum(forward) - forward[0] if name == "backprop" else floor_flops(name, {}, network, forward, decoder)
        row = f"| {name} | {measured / 1e6:.1f} | {floor / 1e6:.1f} | {measured / floor:.2f} | {measured / backprop:.2f} |"
        if times:  # the floor's FLOPs at the matmul rate backprop's step reaches here
            floor_seconds = floor * times["backprop"] / backprop
            row += f" {times[name] / times['backprop']:.2f} | {times[name] / floor_seconds:.2f} |"
        rows.append(row)
    head = (f"{model_name} {model_options or ''} on {channels}x{size}x{size}, batch {batch}: block forwards "
            f"{[round(f / 1e6, 2) for f in forward]} MFLOP, decoders {[round(d / 1e6, 2) for d in decoder]} MFLOP")
    return head + "\n\n" + "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet", choices=("lenet", "simple_vgg"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--width-multiplier", type=float, default=0.125, help="simple_vgg only")
    parser.add_argument("--time", action="store_true", help="also time each step against backprop's and its time floor")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per rule with --time")
    args = parser.parse_args(argv)
    options = {"activation": "tanh"}
    if args.model == "simple_vgg":
        options = {"activation": "elu", "width_multiplier": args.width_multiplier}
    print(table(args.model, args.batch, args.size, options, time_steps=args.steps if args.time else 0))
    if args.time:
        from fa_rules.benchmark.timing import ratio_clock
        print(f"\nstep times: median of {args.steps} interleaved steps by {ratio_clock('cpu')}, "
              f"{torch.get_num_threads()} torch thread(s)")


if __name__ == "__main__":
    main()
