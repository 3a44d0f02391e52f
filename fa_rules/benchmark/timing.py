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

import torch

from fa_rules.benchmark.cells import Cell

DEFAULT_STEPS, WARMUP = 20, 3


def group_key(cell: Cell) -> tuple:
    return (cell.seed, *(repr(v) for v in cell.point.values()))


def time_group(cells: list[Cell], steps: int = DEFAULT_STEPS, warmup: int = WARMUP) -> list[float | None]:
    """Median `Trainer.train_step` seconds of each cell, all stepping in turn on the same batches
    (those of the first cell's data); None for a cell that cannot be built or fails a step."""
    from fa_rules.core.trainer import Trainer
    from fa_rules.runs import resolve

    trainers: list[Trainer | None] = []
    for cell in cells:
        try:
            config = copy.deepcopy(cell.config)
            rule, dataset, build_network = resolve(config)
            trainers.append(Trainer(config, rule, build_network, dataset, out_dir="/dev/null", progress=False))
        except Exception:  # the cell's own row already says why it failed
            trainers.append(None)
    first = next((t for t in trainers if t is not None), None)
    if first is None:
        return [None] * len(cells)
    n = first.data.train_x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cells[0].seed))
    times: list[list[float]] = [[] for _ in cells]
    for step in range(warmup + steps):
        for i, trainer in enumerate(trainers):
            if trainer is None:
                continue
            size = trainer.config.batch_size
            index = order[(step * size) % max(n - size, 1):][:size]
            try:
                trainer.train_step(trainer.make_batch(index.to(trainer.device), step))
            except Exception:
                trainers[i] = None
                times[i] = []
                continue
            if step >= warmup:
                times[i].append(trainer.step_times[-1])
    return [statistics.median(t) if t and trainers[i] is not None else None for i, t in enumerate(times)]
