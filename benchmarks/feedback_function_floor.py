"""The floor of eager feedback alignment's cost: a hand-written PyTorch loop whose linear layers
run through the engine's feedback `autograd.Function` (`fa_rules.core.feedback`, the form used
under plain autograd), against the same loop with `F.linear`. No engine, no rule: the ratio is
what routing the input gradient through `B` in a Python `Function` costs by itself, so the engine's
`feedback_alignment` / `backprop` ratio (`rule_costs.py`) cannot go below it in eager mode.

    OMP_NUM_THREADS=1 python benchmarks/feedback_function_floor.py [--width 256 --depth 3 --batch 64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from fa_rules.benchmark.timing import StepTime, interleave, ratio_clock, since, start_clocks
from fa_rules.core.feedback import _CLASSIC, _FeedbackLinear
from fa_rules.core.trainer import fused_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per loop and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    feedback_linear = _CLASSIC[_FeedbackLinear]
    generator = torch.Generator().manual_seed(0)
    dims = [784, *[args.width] * args.depth, 10]
    weights = [nn.Parameter(torch.randn(o, i, generator=generator) / i**0.5) for i, o in zip(dims, dims[1:])]
    biases = [nn.Parameter(torch.zeros(o)) for o in dims[1:]]
    feedback = [torch.randn(w.shape, generator=generator) / w.shape[1] ** 0.5 for w in weights]
    optimizer = torch.optim.Adam(weights + biases, lr=1e-3, fused=fused_kernels(weights + biases))
    x = torch.rand(args.batch, 784, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)

    def step(routed: bool) -> StepTime:
        start = start_clocks()
        optimizer.zero_grad(set_to_none=True)
        h = x
        for k, (w, b, fb) in enumerate(zip(weights, biases, feedback)):
            h = feedback_linear.apply(h, w, b, fb) if routed else F.linear(h, w, b)
            if k < len(weights) - 1:
                h = torch.tanh(h)
        F.cross_entropy(h, y).backward()
        optimizer.step()
        return since(start)

    print(f"MLP {'x'.join(map(str, dims))}, batch {args.batch}, {torch.get_num_threads()} thread(s); "
          f"medians of {args.steps} interleaved steps; ratio of {ratio_clock('cpu')} (wall time beside it)")
    steppers = {"plain": lambda _: step(False), "routed": lambda _: step(True)}
    for round_ in range(args.rounds):  # the first round also warms both loops up
        medians = interleave(steppers, args.steps, warmup=20 if round_ == 0 else 0)
        p, r = medians["plain"], medians["routed"]
        if isinstance(p, str) or isinstance(r, str):  # a loop raised: its entry is the error line
            raise SystemExit(f"plain: {p}; routed: {r}")
        print(f"round {round_ + 1}: F.linear {p.cpu * 1e3:.3f} ms CPU ({p.wall * 1e3:.3f} wall), feedback Function "
              f"{r.cpu * 1e3:.3f} ms CPU ({r.wall * 1e3:.3f} wall), ratio {r.cpu / p.cpu:.3f}")


if __name__ == "__main__":
    main()
