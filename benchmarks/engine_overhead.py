"""Engine overhead: median step time of the engine's backprop against a hand-written PyTorch loop.

Same model, batch, optimiser (Adam) and data; steps of the two are interleaved so that both see
the same machine state. Prints both medians and the ratio (goal: <= 1.10 on CPU).

    python benchmarks/engine_overhead.py --model lenet --dataset fashion_mnist --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from fa_rules.benchmark.timing import batch_index, example_order, interleave, trainer_stepper
from fa_rules.core.trainer import TrainConfig, Trainer, fused_kernels
from fa_rules.runs import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    config = TrainConfig(rule="backprop", dataset=args.dataset, model=args.model,
                         batch_size=args.batch_size, device=args.device)
    rule, dataset, build_network = resolve(config)
    trainer = Trainer(config, rule, build_network, dataset, out_dir="/dev/null", progress=False)
    device = trainer.device
    cuda = device.type == "cuda"

    # the hand-written loop: an ordinary nn.Module with identical initial weights
    module = copy.deepcopy(trainer.network)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(trainer.params["model"][name])
    # the engine's Adam kernels (fused where torch has them), so the ratio is the engine's overhead alone
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, fused=fused_kernels(module.parameters()))

    def plain_step(x, y):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    order = example_order(trainer, 0)

    def plain_stepper(step: int) -> float:
        batch = trainer.make_batch(batch_index(order, step, args.batch_size).to(device), step)
        return plain_step(batch.x, batch.y)

    medians = interleave({"engine": trainer_stepper(trainer, order), "plain": plain_stepper}, args.steps, args.warmup)
    if any(isinstance(m, str) for m in medians.values()):  # a stepper raised: its entry is the error line
        raise SystemExit(f"engine: {medians['engine']}; plain: {medians['plain']}")
    engine, plain = medians["engine"], medians["plain"]
    print(f"model={args.model} dataset={args.dataset} batch={args.batch_size} device={device} "
          f"threads={torch.get_num_threads()} steps={args.steps}")
    print(f"engine backprop step   {engine * 1e3:8.3f} ms (median)")
    print(f"hand-written loop step {plain * 1e3:8.3f} ms (median)")
    print(f"ratio engine / plain   {engine / plain:8.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
