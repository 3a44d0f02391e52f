"""Every built-in rule's training step time against backprop (reconstruct/generate rules against
`ae`), and the engine's backprop against a hand-written PyTorch loop; prints one Markdown table.

The trainers of one model step in turn on the same batches in one process (interleaved, so every
rule sees the same machine state: only the ratios are meant to travel between machines). A step is
`Trainer.train_step`: the rule's step, the checks and the optimiser. With `--compile` every rule
also runs with `compile=True` (the first, compiling step falls in the warm-up) and the table gains
compiled step times; a rule that does not compile runs eager there and says so.

Every step is timed by the wall clock and by CPU time (`fa_rules.benchmark.timing`); the table
shows both, and on CPU its ratios are of CPU time, which another process on a busy machine does not
inflate (run with one torch thread, `OMP_NUM_THREADS=1`: the thread's own CPU time then counts the
whole step; with more threads the process's CPU time is used). On CUDA the ratios are of wall time,
every step synchronised. The engine/plain rows compare against an independent hand-written
`nn.Sequential` loop (`engine_overhead.plain_stepper`).

    OMP_NUM_THREADS=1 python benchmarks/rule_costs.py --steps 10 --warmup 2 [--compile]
    python benchmarks/rule_costs.py --device cuda --compile      # on a GPU (steps synchronised)
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch
import torch.nn.functional as F

from engine_overhead import plain_stepper
from fa_rules.benchmark.timing import (
    StepTime, batch_index, example_order, interleave, ratio_clock, ratio_seconds, since, start_clocks, trainer_stepper,
)
from fa_rules.core.config import TrainConfig
from fa_rules.core.trainer import Trainer, fused_kernels
from fa_rules.runs import get_registry

# name -> (model, model options, batch size); the first two are the rule comparison's models
MODELS = {
    "mlp3x256": ("mlp", {"depth": 3, "width": 256}, 64),
    "lenet": ("lenet", {}, 64),
    "tiny_mlp": ("mlp", {"depth": 1, "width": 64}, 8),  # 784-64-10: where Python overhead dominates
}
REFERENCE = {"classify": "backprop", "reconstruct": "ae", "generate": "ae"}


def make_trainer(registry, rule_name: str, model_name: str, dataset, data_name: str, compile: bool,
                 device: str = "cpu", rule_options: dict | None = None, rule=None) -> Trainer | None:
    """A trainer of `rule_name` (with `rule_options`; `rule`, when given, in place of the registered
    rule's) on a model of MODELS, sharing `dataset`; None where the rule does not take that model."""
    model, model_options, batch_size = MODELS[model_name]
    rule_spec, model_spec = registry.rule(rule_name), registry.model(model)
    if rule_spec.models is not None and model not in rule_spec.models:
        return None
    rule_options = dict(rule_options or {})
    config = TrainConfig(rule=rule_name, dataset=data_name, model=model, model_options=dict(model_options),
                         rule_options=rule_options, batch_size=batch_size, device=device, compile=compile)
    rule = rule or rule_spec.make(**rule_options)
    options = {k: v for k, v in rule_spec.model_defaults.items() if k in model_spec.options}
    options.update(model_options)
    out_shape = (dataset.num_classes,) if rule.task == "classify" else (config.latent_dim,)
    heads = rule.heads(config.latent_dim, dataset.num_classes) if rule.heads else None
    return Trainer(config, rule, lambda: model_spec.make(dataset.in_shape, out_shape, heads, **options),
                   dataset, out_dir="/dev/null", progress=False)


def plain_loop(trainer: Trainer, order: torch.Tensor, convert=None, forward=None):
    """A hand-written loop: the trainer's network as an ordinary nn.Module, the same initial
    weights, Adam, cross-entropy; returns a stepper (`interleave`) timing one step on the batch of
    `order` that the trainer would get. `convert(module)` may swap its layers (another library's
    rule) and `forward(module, x, y)` replace the plain call."""
    module = copy.deepcopy(trainer.network)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(trainer.params["model"][name])
    if convert is not None:
        module = convert(module)
    forward = forward or (lambda m, x, y: m(x))
    # the engine's Adam kernels (fused where torch has them), so the ratio is the engine's overhead alone
    optimizer = torch.optim.Adam(module.parameters(), lr=trainer.config.lr, fused=fused_kernels(module.parameters()))

    # on a GPU the clock waits for the queued kernels, as Trainer.train_step's does
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    def step(step_number: int) -> StepTime:
        index = batch_index(order, step_number, trainer.config.batch_size).to(trainer.device)
        batch = trainer.make_batch(index, step_number)
        sync()
        start = start_clocks()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(module, batch.x, batch.y), batch.y).backward()
        optimizer.step()
        sync()
        return since(start)

    return step


def rule_rows(registry, model_name: str, rules: list[str], dataset, data_name: str, args) -> list[str]:
    trainers: dict[str, Trainer] = {}
    skipped = []
    for name in rules:
        for compiled in (False, True) if args.compile else (False,):
            try:
                trainer = make_trainer(registry, name, model_name, dataset, data_name, compiled, args.device)
            except Exception as e:
                print(f"{model_name}: {name} not built ({type(e).__name__}: {e})", file=sys.stderr)
                trainer = None
            if trainer is None:
                skipped.append(name)
                break
            trainers[name + (" compiled" if compiled else "")] = trainer
    if not trainers:
        return []
    order = example_order(next(iter(trainers.values())), 0)
    medians = interleave({label: trainer_stepper(t, order) for label, t in trainers.items()}, args.steps, args.warmup)
    rows = []
    for name in rules:
        if name not in trainers:
            continue
        eager = medians[name]
        task = trainers[name].rule.task
        ref = medians.get(REFERENCE[task])
        cells = [model_name, name, task]
        if isinstance(eager, str):
            rows.append("| " + " | ".join(cells + [eager, "", "", "", ""][: 5 + 2 * args.compile - 2]) + " |")
            continue
        seconds = lambda t: ratio_seconds(t, args.device)  # noqa: E731  (CPU time on CPU, wall on CUDA)
        ratio = f"{seconds(eager) / seconds(ref):.2f}" if isinstance(ref, StepTime) else "—"
        cells += [f"{eager.cpu * 1e3:.2f}", f"{eager.wall * 1e3:.2f}", ratio]
        if args.compile:
            c = medians.get(name + " compiled")
            if isinstance(c, StepTime):
                step_fn = trainers[name + " compiled"].step_fn
                note = "" if step_fn.compiled else " (eager: does not compile)"
                cells += [f"{seconds(c) * 1e3:.2f}{note}", f"{seconds(c) / seconds(eager):.2f}"]
            else:
                cells += [str(c), ""]
        rows.append("| " + " | ".join(cells) + " |")
    if skipped:
        print(f"{model_name}: not run (the rule does not take this model): {', '.join(skipped)}", file=sys.stderr)
    return rows


def engine_rows(registry, dataset, data_name: str, args) -> list[str]:
    """The engine's backprop against an independent hand-written loop (`engine_overhead.plain_stepper`)."""
    rows = []
    for model_name in ("tiny_mlp", "lenet"):
        trainer = make_trainer(registry, "backprop", model_name, dataset, data_name, False, args.device)
        order = example_order(trainer, 0)
        medians = interleave({"engine": trainer_stepper(trainer, order), "plain": plain_stepper(trainer, order)},
                             args.steps * 5, args.warmup * 5)
        engine, plain = medians["engine"], medians["plain"]
        if isinstance(engine, str) or isinstance(plain, str):
            rows.append(f"| {model_name} | {engine} | {plain} | | | |")
            continue
        ratio = ratio_seconds(engine, args.device) / ratio_seconds(plain, args.device)
        rows.append(f"| {model_name} (batch {MODELS[model_name][2]}) | {engine.cpu * 1e3:.3f} | {plain.cpu * 1e3:.3f} | "
                    f"{engine.wall * 1e3:.3f} | {plain.wall * 1e3:.3f} | {ratio:.2f} |")
    return rows


def setting_line(device: str, dataset: str, steps: int, warmup: int) -> str:
    """The machine and measurement a table was taken with, for its first line."""
    where = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.platform()}, "
            f"{platform.processor() or platform.machine()}, {where}; {dataset}, medians of {steps} "
            f"interleaved steps after {warmup} warm-up; ratios of {ratio_clock(device)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per rule (engine/plain: 5x)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per rule (compiling, recompiling: >= 3)")
    parser.add_argument("--models", default="mlp3x256,lenet")
    parser.add_argument("--rules", default="", help="comma-separated rules (default: every built-in rule)")
    parser.add_argument("--compile", action="store_true", help="also time each rule with compile=True")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device on this machine")

    registry = get_registry()
    if args.rules:
        builtin = sorted({registry.rule(name).name for name in args.rules.split(",")})
    else:  # the rules this package ships (not a plugin's)
        builtin = sorted(n for n in registry.rules if registry.source("rules", n).distribution == "fa-rules")
    # references first: their trainers also decide the batches
    rules = sorted(builtin, key=lambda r: (r not in REFERENCE.values(), r))
    dataset = registry.dataset(args.dataset).load(None)
    start = time.perf_counter()
    print(setting_line(args.device, args.dataset, args.steps, args.warmup) + "\n")
    clock = "CPU" if torch.device(args.device).type == "cpu" else "wall"
    compiled_cols = f" compiled {clock} ms/step | compiled / eager |" if args.compile else ""
    print(f"| model | rule | task | CPU ms/step | wall ms/step | × reference ({clock}) |{compiled_cols}")
    print("|---|---|---|---:|---:|---:|" + ("---:|---:|" if args.compile else ""))
    for model_name in args.models.split(","):
        for row in rule_rows(registry, model_name, rules, dataset, args.dataset, args):
            print(row, flush=True)
    print("\nEngine backprop against a hand-written loop (an independent nn.Sequential of the same shape, the same "
          "weights, Adam kernel and batches; interleaved):\n")
    print(f"| model | engine CPU ms/step | plain CPU ms/step | engine wall ms/step | plain wall ms/step | "
          f"engine / plain ({clock}) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in engine_rows(registry, dataset, args.dataset, args):
        print(row, flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
