"""Engine overhead: median step time of the engine's backprop against a hand-written PyTorch loop.

Same model, batch, optimiser (Adam) and data; steps of the two are interleaved so that both see
the same machine state. Prints both medians and the ratio (goal: <= 1.10 on CPU).

    python benchmarks/engine_overhead.py --model lenet --dataset fashion_mnist --batch-size 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from fa_rules.benchmark.timing import keep_freed_memory
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
    keep_freed_memory()  # freed blocks reused, not page-faulted in again each step

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

    n = trainer.data.train_x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    engine_times, plain_times = [], []
    for step in range(args.warmup + args.steps):
        index = order[(step * args.batch_size) % (n - args.batch_size):][: args.batch_size]
        batch = trainer.make_batch(index, step)
        trainer.train_step(batch)
        t_engine = trainer.step_times[-1]
        t_plain = plain_step(batch.x, batch.y)
        if step >= args.warmup:
            engine_times.append(t_engine)
            plain_times.append(t_plain)
    engine, plain = statistics.median(engine_times), statistics.median(plain_times)
    print(f"model={args.model} dataset={args.dataset} batch={args.batch_size} device={device} "
          f"threads={torch.get_num_threads()} steps={args.steps}")
    print(f"engine backprop step   {engine * 1e3:8.3f} ms (median)")
    print(f"hand-written loop step {plain * 1e3:8.3f} ms (median)")
    print(f"ratio engine / plain   {engine / plain:8.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
