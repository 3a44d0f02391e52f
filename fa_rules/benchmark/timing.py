"""The timing phase of a benchmark: step-time ratios measured with the rules interleaved.

Cells train one after another, minutes apart; on a shared machine their median step times drift
with the load (a rule can look twice as costly as it is). After training, the cells of one seed and
varied setting are built again, fresh, in one process and step in turn on the same batches; the
median of each is its `interleaved_step_time_s`, and its ratio to the reference rule's is the
report's primary `step × reference` column.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from fa_rules.benchmark.cells import Cell
from fa_rules.core.errors import error_line

K = TypeVar("K")

DEFAULT_STEPS, WARMUP = 20, 3


def group_key(cell: Cell) -> tuple:
    return (cell.seed, *(repr(v) for v in cell.point.values()))


def interleave(steppers: Mapping[K, Callable[[int], float]], steps: int, warmup: int) -> dict[K, float | str]:
    """Median seconds per step of each stepper, all stepping in turn, step after step (so every one
    sees the same machine state). A stepper takes the step number and returns its step's seconds;
    one that raises is dropped, its entry `"error: Type: first line"`."""
    times: dict[K, list[float]] = {key: [] for key in steppers}
    failed: dict[K, str] = {}
    for step in range(warmup + steps):
        for key, stepper in steppers.items():
            if key in failed:
                continue
            try:
                elapsed = stepper(step)
            except Exception as e:  # one rule's failure should not cost the others their times
                failed[key] = f"error: {error_line(e)}"
                continue
            if step >= warmup:
                times[key].append(elapsed)
    return {key: failed.get(key) or statistics.median(times[key]) for key in steppers}


def batch_index(order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """The example indices of `step`: consecutive slices of a fixed random `order`, wrapping around."""
    n = order.shape[0]
    return order[(step * batch_size) % max(n - batch_size, 1):][:batch_size]


def example_order(trainer, seed: int) -> torch.Tensor:
    """A fixed random order of `trainer`'s training examples, shared by every stepper of a group."""
    n = trainer.data.train_x.shape[0]
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def trainer_stepper(trainer, order: torch.Tensor) -> Callable[[int], float]:
    """A stepper (see `interleave`) taking `Trainer.train_step` on the batch of `order` for each step."""
    def step(step_number: int) -> float:
        index = batch_index(order, step_number, trainer.config.batch_size).to(trainer.device)
        trainer.train_step(trainer.make_batch(index, step_number))
        return trainer.step_times[-1]

    return step


def time_group(cells: list[Cell], steps: int = DEFAULT_STEPS, warmup: int = WARMUP) -> list[float | None]:
    """Median `Trainer.train_step` seconds of each cell, all stepping in turn on the same batches
    (those of the first cell's data); None for a cell that cannot be built or fails a step."""
    from fa_rules.core.trainer import Trainer
    from fa_rules.runs import resolve

    trainers: dict[int, Trainer] = {}
    for i, cell in enumerate(cells):
        try:
            config = copy.deepcopy(cell.config)
            rule, dataset, build_network = resolve(config)
            trainers[i] = Trainer(config, rule, build_network, dataset, out_dir="/dev/null", progress=False)
        except Exception:  # the cell's own row already says why it failed
            pass
    if not trainers:
        return [None] * len(cells)
    order = example_order(next(iter(trainers.values())), cells[0].seed)
    medians = interleave({i: trainer_stepper(t, order) for i, t in trainers.items()}, steps, warmup)
    return [m if isinstance(m := medians.get(i), float) else None for i in range(len(cells))]
