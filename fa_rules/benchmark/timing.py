"""The timing phase of a benchmark: step-time ratios measured with the rules interleaved.

Cells train one after another, minutes apart; on a shared machine their median step times drift
with the load (a rule can look twice as costly as it is). After training, the cells of one seed and
varied setting are built again, fresh, in one process and step in turn on the same batches; the
median of each is its `interleaved_step_time_s`, and its ratio to the reference rule's is the
report's primary `step × reference` column.

Every step is timed by two clocks (`StepTime`): the wall clock, and the CPU time of this process's
work. On a busy machine the wall clock also counts the time another process held the core (a
replay of dtp's matmuls read 6.5-9.8 x backprop's by the wall clock and 2.19 x by CPU time), so on
CPU the ratios use CPU time; on CUDA the CPU only queues kernels, so they use the wall clock, every
step synchronised (`ratio_seconds`).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

import torch

from fa_rules.benchmark.cells import Cell
from fa_rules.core.errors import error_line

K = TypeVar("K")

DEFAULT_STEPS, WARMUP = 20, 3

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache  # process-wide: once is enough
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a step frees for the next step instead of handing it
    back to the system, so that every stepper of an interleaved timing sees a warm heap.

    By default glibc maps blocks above a threshold (128 KiB, rising with use) straight from the
    system and unmaps them on free, and trims the heap's top. A step with large activations
    (LeNet's convolution maps, about 1 MiB each) then pays fresh page faults, how many depending on
    what stepped before it: on one CPU thread feedback alignment read 1.14-1.38 x backprop on LeNet
    in three interleaved runs with bidirectional FA in the loop, and 1.02-1.04 in seven with this
    setting (1.01 with the two alone). Blocks up to 32 MiB (glibc's largest setting) come from the
    heap and a freed gigabyte stays there. Process-wide and lasting, so it is for benchmark
    processes; False (nothing changed) off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
        return all([libc.mallopt(option, value) == 1 for option, value in settings])
    except (OSError, AttributeError):
        return False


class StepTime(NamedTuple):
    """Seconds of one step (or the medians of many) by the wall clock and by CPU time (`cpu_clock`)."""

    wall: float
    cpu: float


def cpu_clock() -> tuple[Callable[[], float], str]:
    """The CPU-time clock for a step, and its name. With one torch thread (`OMP_NUM_THREADS=1`, as
    the benchmark scripts run) all of a step's work is on the calling thread: its thread time counts
    that alone, not the other threads of this process. With more torch threads the intra-op work
    runs on other threads, which thread time would miss: then the whole process's CPU time."""
    if torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time"
    return time.process_time, "process CPU time"


def start_clocks() -> StepTime:
    """Both clocks now; `since(start)` gives the step's `StepTime`."""
    return StepTime(time.perf_counter(), cpu_clock()[0]())


def since(start: StepTime) -> StepTime:
    now = start_clocks()
    return StepTime(now.wall - start.wall, now.cpu - start.cpu)


def ratio_seconds(t: StepTime, device: torch.device | str) -> float:
    """The time a ratio uses: CPU time on CPU (a busy machine's other processes do not inflate it),
    the wall clock on CUDA (the CPU waits on the GPU there; steps synchronised)."""
    return t.wall if torch.device(device).type == "cuda" else t.cpu


def in_ratio_clock(medians: Mapping[K, StepTime | str], device: torch.device | str) -> dict[K, float | str]:
    """`interleave`'s medians in the time ratios use (`ratio_seconds`); error entries as they are."""
    return {k: ratio_seconds(m, device) if isinstance(m, StepTime) else m for k, m in medians.items()}


def ratio_clock(device: torch.device | str) -> str:
    """The name of the clock `ratio_seconds` uses on `device`, for a table's heading line."""
    return "wall time, steps synchronised" if torch.device(device).type == "cuda" else cpu_clock()[1]


def group_key(cell: Cell) -> tuple:
    """Cells timed together: one seed, varied point and network (a rule with its own model is
    timed beside the other cells on that model)."""
    config = cell.config
    return (cell.seed, *(repr(v) for v in cell.point.values()), config.model, repr(sorted(config.model_options.items())))


def interleave(steppers: Mapping[K, Callable[[int], StepTime]], steps: int, warmup: int,
               seed: int = 0) -> dict[K, StepTime | str]:
    """Median seconds per step of each stepper by each clock, all taking each step in turn (so every
    one sees the same machine state). Each round takes the steppers in a new order, shuffled from
    `seed`: in a fixed order the stepper after a heavy one always inherits the caches it left (on
    LeNet the rule after bidirectional FA read 1.10-1.13 x backprop in a fixed order, 1.08-1.09
    shuffled, and sign symmetry 1.04-1.06 against 1.02-1.03). A stepper takes the step number and
    returns its step's `StepTime` (`start_clocks` / `since` around the step alone); one that raises
    is dropped, its entry `"error: Type: first line"`. Freed memory is kept for reuse from then on
    (`keep_freed_memory`)."""
    keep_freed_memory()
    times: dict[K, list[StepTime]] = {key: [] for key in steppers}
    failed: dict[K, str] = {}
    keys = list(steppers)
    shuffler = random.Random(seed)
    for step in range(warmup + steps):
        for key in shuffler.sample(keys, len(keys)):
            if key in failed:
                continue
            try:
                elapsed = steppers[key](step)
            except Exception as e:  # one rule's failure should not cost the others their times
                failed[key] = f"error: {error_line(e)}"
                continue
            if step >= warmup:
                times[key].append(elapsed)
    return {key: failed.get(key) or median_time(times[key]) for key in steppers}


def median_time(times: list[StepTime]) -> StepTime:
    """The median of each clock (each on its own: the two medians may come from different steps)."""
    return StepTime(statistics.median(t.wall for t in times), statistics.median(t.cpu for t in times))


def batch_index(order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """The example indices of `step`: consecutive slices of a fixed random `order`, wrapping around."""
    n = order.shape[0]
    return order[(step * batch_size) % max(n - batch_size, 1):][:batch_size]


def example_order(trainer, seed: int) -> torch.Tensor:
    """A fixed random order of `trainer`'s training examples, shared by every stepper of a group."""
    n = trainer.data.train_x.shape[0]
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def trainer_stepper(trainer, order: torch.Tensor) -> Callable[[int], StepTime]:
    """A stepper (see `interleave`) taking `Trainer.train_step` on the batch of `order` for each step:
    the trainer's own (synchronised) wall time, and the CPU time of the call."""
    def step(step_number: int) -> StepTime:
        index = batch_index(order, step_number, trainer.config.batch_size).to(trainer.device)
        batch = trainer.make_batch(index, step_number)
        start = start_clocks()
        trainer.train_step(batch)
        return StepTime(trainer.step_times[-1], since(start).cpu)

    return step


def time_group(cells: list[Cell], steps: int = DEFAULT_STEPS, warmup: int = WARMUP) -> list[StepTime | None]:
    """Median `Trainer.train_step` seconds of each cell by both clocks, all stepping in turn on the
    same batches (those of the first cell's data); None for a cell that cannot be built or fails a step."""
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
    return [m if isinstance(m := medians.get(i), StepTime) else None for i in range(len(cells))]
