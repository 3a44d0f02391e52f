"""Engine overhead: median step time of the engine's backprop against a plain PyTorch loop.

The plain loop is what a user would write without the engine: an `nn.Sequential` of the same shape
(its own modules, not the engine's `Network`), `torch.optim.Adam` with its defaults, and
`zero_grad`, forward, `cross_entropy`, `backward`, `step`. Both start from the same weights and
take the same batches, their steps interleaved in one process so that both see the same machine
state. Every step is timed by the wall clock and by CPU time (`fa_rules.benchmark.timing`); on CPU
the ratio is of CPU time (run with one torch thread, `OMP_NUM_THREADS=1`, so that the thread's own
CPU time counts the whole step; with more threads it is the process's), on CUDA of wall time with
every step synchronised. Goal: <= 1.10 on the tiny MLP (784-64-10, batch 8), where the engine's
Python overhead weighs most; <= 1.05 on torchvision's ResNet-18 as it is (batch norm with running
statistics, which the engine records in the step and updates after it; the plain loop is the same
torchvision module behind the same input adapter, whose batch norms update in their kernels).

    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py                 # tiny MLP
    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --model lenet --batch-size 64
    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --model torchvision:resnet18 --batch-size 32 --steps 30 --warmup 3
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch import nn

from fa_rules.benchmark.timing import (
    StepTime, batch_index, example_order, interleave, ratio_clock, ratio_seconds, since, start_clocks, trainer_stepper,
)
from fa_rules.core.trainer import TrainConfig, Trainer, fused_kernels
from fa_rules.runs import resolve


def plain_module(model: str, in_shape: tuple, num_classes: int, depth: int = 1, width: int = 64) -> nn.Module:
    """The engine's `mlp` (tanh) or `lenet` (relu) written as a user would write it; a torchvision
    model as torchvision builds it, behind the input adapter the engine gives it."""
    if model.startswith("torchvision:"):
        import torchvision

        from fa_rules.plugins.torchvision_models import InputAdapter

        net = torchvision.models.get_model(model.split(":", 1)[1], weights=None, num_classes=num_classes)
        return nn.Sequential(InputAdapter(in_shape[0]), net) if in_shape[0] == 1 else net
    if model == "mlp":
        widths = [in_shape[0] * in_shape[1] * in_shape[2]] + [width] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))
    if model == "lenet":
        side = in_shape[1] // 4
        return nn.Sequential(
            nn.Conv2d(in_shape[0], 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
        )
    raise SystemExit(f"--model {model}: the plain loop is written for mlp, lenet and torchvision:NAME")


def plain_copy(trainer: Trainer) -> nn.Module:
    """`plain_module` of the trainer's model, holding the trainer's current weights."""
    config = trainer.config
    module = plain_module(config.model, trainer.data.in_shape, trainer.data.num_classes,
                          **config.model_options).to(trainer.device)
    engine_weights = list(trainer.params["model"].values())
    if [p.shape for p in module.parameters()] != [w.shape for w in engine_weights]:
        raise SystemExit(f"the plain {config.model} does not have the engine's parameter shapes")
    with torch.no_grad():  # both start from the same weights (the engine's, in the same order)
        for p, w in zip(module.parameters(), engine_weights):
            p.copy_(w)
    return module


def plain_stepper(trainer: Trainer, order: torch.Tensor):
    """A stepper (`interleave`) of the plain loop on the batches the trainer takes, from its initial weights."""
    config = trainer.config
    module = plain_copy(trainer)
    # the Adam kernel the engine picks (fused on CPU and CUDA in torch 2.x): the default for-loop
    # kernel is slower on small tensors, and the ratio is to measure the engine, not the kernel
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, fused=fused_kernels(module.parameters()))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    def step(step_number: int) -> StepTime:
        index = batch_index(order, step_number, config.batch_size).to(trainer.device)
        batch = trainer.make_batch(index, step_number)
        sync()
        start = start_clocks()
        optimizer.zero_grad()
        loss = F.cross_entropy(module(batch.x), batch.y)
        loss.backward()
        optimizer.step()
        sync()
        return since(start)

    step.module = module  # for a test to compare with the engine
    return step


def engine_against_plain(config: TrainConfig, steps: int, warmup: int) -> tuple[StepTime, StepTime, float]:
    """The engine's and the plain loop's median `StepTime`, and the ratio (`ratio_seconds`)."""
    rule, dataset, build_network = resolve(config)
    trainer = Trainer(config, rule, build_network, dataset, out_dir="/dev/null", progress=False)
    order = example_order(trainer, 0)
    medians = interleave({"engine": trainer_stepper(trainer, order), "plain": plain_stepper(trainer, order)},
                         steps, warmup)
    if any(isinstance(m, str) for m in medians.values()):  # a stepper raised: its entry is the error line
        raise SystemExit(f"engine: {medians['engine']}; plain: {medians['plain']}")
    engine, plain = medians["engine"], medians["plain"]
    return engine, plain, ratio_seconds(engine, trainer.device) / ratio_seconds(plain, trainer.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", help="mlp, lenet or torchvision:NAME")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    options = {"depth": 1, "width": 64} if args.model == "mlp" else {}
    config = TrainConfig(rule="backprop", dataset=args.dataset, model=args.model, model_options=options,
                         batch_size=args.batch_size, device=args.device)
    engine, plain, ratio = engine_against_plain(config, args.steps, args.warmup)
    print(f"model={args.model} {options} dataset={args.dataset} batch={args.batch_size} device={args.device} "
          f"threads={torch.get_num_threads()} steps={args.steps} (+{args.warmup} warm-up), torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print("                        wall ms   CPU ms  (medians)")
    print(f"engine backprop step   {engine.wall * 1e3:8.3f} {engine.cpu * 1e3:8.3f}")
    print(f"plain loop step        {plain.wall * 1e3:8.3f} {plain.cpu * 1e3:8.3f}")
    print(f"engine / plain         {engine.wall / plain.wall:8.3f} {engine.cpu / plain.cpu:8.3f}")
    goal = 1.05 if args.model.startswith("torchvision:") else 1.10
    print(f"ratio by {ratio_clock(args.device)}: {ratio:.3f}  (goal <= {goal:.2f})")


if __name__ == "__main__":
    main()
