"""What a checkpoint may hold, checked entry by entry against what the run's configuration builds,
before any of it reaches a kernel.

A checkpoint passes `load_checkpoint` (a verified zip of tensors and plain values) and `check_params`
and can still be damaged or crafted: an optimiser moment one element short makes the fused Adam
kernel read and write past its buffer (a crash, or silent heap corruption), a NaN moment or a
negative learning rate poisons every later step, a history nested a million deep overflows the
stack when written out. Each check here compares a saved entry with the one the configuration
builds fresh (same tree, keys, shapes, dtypes), then checks its values (finite, in range), and
raises one `CheckpointError` line naming the file and the entry (`optimizers/model/state/3/exp_avg`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from fa_rules.core.checkpoint import CheckpointError

# headroom over the tensors a configuration builds: history, step times and pickling overhead
SIZE_MARGIN_BYTES = 256 * 2**20
# Adam keeps two moments per parameter; a checkpoint holds parameters, moments and rule state
SIZE_FACTOR = 4
# settings of a parameter group that may differ from the configuration's: the schedule sets lr,
# and the kernel choices change how, not what, a step computes (the configuration's are kept)
SCHEDULED = ("lr",)
KERNEL_CHOICES = ("fused", "foreach", "capturable", "differentiable")


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a tree of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def size_limit(*trees: Any) -> int:
    """The largest checkpoint a configuration that builds `trees` (parameters, rule state) can
    write: a larger file is refused before it is read into memory."""
    return SIZE_FACTOR * sum(tensor_bytes(t) for t in trees) + SIZE_MARGIN_BYTES


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def mismatch(self, entry: str, saved: Any, expected: Any) -> CheckpointError:
        return CheckpointError(
            f"{self.path} does not match the run's configuration: {entry} is {_describe(saved)} there, "
            f"the configuration builds {_describe(expected)}"
        )

    def damaged(self, entry: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is damaged: {entry} {what}; resume from an intact checkpoint or retrain")

    def tensor(self, entry: str, saved: Any, expected: torch.Tensor) -> None:
        if not isinstance(saved, torch.Tensor) or saved.shape != expected.shape or saved.dtype != expected.dtype:
            raise self.mismatch(entry, saved, expected)
        if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
            raise self.damaged(entry, "holds values that are not finite")

    def tree(self, entry: str, saved: Any, expected: Any) -> None:
        """`saved` has the structure, types, shapes and dtypes of `expected`, and finite numbers."""
        if isinstance(expected, torch.Tensor):
            return self.tensor(entry, saved, expected)
        if type(saved) is not type(expected):  # exact: e.g. 8.0 where a shape wants 8 fails later
            raise self.mismatch(entry, saved, expected)
        if isinstance(expected, dict):
            if set(saved) != set(expected):
                missing = ", ".join(map(str, sorted(set(expected) - set(saved), key=str))) or "nothing"
                extra = ", ".join(map(str, sorted(set(saved) - set(expected), key=str))) or "nothing"
                raise CheckpointError(
                    f"{self.path} does not match the run's configuration: {entry} lacks {missing} and has extra {extra}"
                )
            for key, item in expected.items():
                self.tree(f"{entry}/{key}", saved[key], item)
        elif isinstance(expected, (list, tuple)):
            if len(saved) != len(expected):
                raise self.mismatch(entry, saved, expected)
            for i, item in enumerate(expected):
                self.tree(f"{entry}/{i}", saved[i], item)
        elif isinstance(saved, float) and not math.isfinite(saved) and math.isfinite(expected):
            raise self.damaged(entry, f"is {saved}")

    def integer(self, entry: str, value: Any, low: int, high: int | None = None) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
            shown = repr(value) if _is_number(value) or value is None else type(value).__name__
            raise self.damaged(entry, f"is {shown}, not {bound}")
        return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_rule_state(path: Path, saved: Any, expected: Any) -> None:
    """The rule's saved state has the tree, types, shapes and dtypes of the state its `init` builds
    for this configuration (a rule's state keeps its structure from step to step), and finite numbers."""
    _Checker(path).tree("state", saved, expected)


def check_buffers(path: Path, saved: Any, expected: dict[str, torch.Tensor]) -> None:
    """The network's saved buffers have the names, shapes and dtypes of the ones it builds, finite
    values, variances >= 0 and batch counts >= 0 (a negative running variance is a NaN at the first
    evaluation)."""
    checker = _Checker(path)
    if saved is None:
        raise CheckpointError(f"{path} does not match the run's configuration: it holds no buffers, the network "
                              f"has {', '.join(sorted(expected)[:3])}{'...' if len(expected) > 3 else ''}")
    checker.tree("buffers", saved, expected)
    for key, value in saved.items():
        if (key.endswith("running_var") or key.endswith("num_batches_tracked")) and bool((value < 0).any()):
            raise checker.damaged(f"buffers/{key}", "holds negative values")


# -- optimiser state --------------------------------------------------------------------------------
def fresh_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The state dict `optimizer` would have after one step: the same optimiser class and settings
    stepped once on zero tensors shaped like its parameters. Every key, shape, dtype and device it
    creates is what a checkpoint of this configuration holds (whatever the optimiser and torch
    version), so no optimiser's layout is written out here."""
    groups = []
    with torch.no_grad():
        for group in optimizer.param_groups:
            twins = []
            for p in group["params"]:
                twin = torch.zeros_like(p)
                twin.grad = torch.zeros_like(p)
                twins.append(twin)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": twins})
        twin_optimizer = type(optimizer)(groups)
        twin_optimizer.step()
    return twin_optimizer.state_dict()


def check_optimizer_state(path: Path, group: str, saved: Any, optimizer: torch.optim.Optimizer,
                          steps_taken: int) -> dict:
    """The state dict to load into `optimizer` from the checkpoint's `saved` one, once every entry
    is checked: per-parameter state with exactly the fresh state's keys, shapes and dtypes, finite,
    second moments >= 0, step counts whole numbers in 1..`steps_taken`; each parameter group's
    settings equal to the configuration's, and its learning rate finite and >= 0 (the schedule
    sets it). The returned dict holds the configuration's own parameter groups."""
    check = _Checker(path)
    entry = f"optimizers/{group}"
    own = optimizer.state_dict()
    fresh = fresh_state_dict(optimizer)
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise check.mismatch(entry, saved, own)
    saved_groups, saved_state = saved["param_groups"], saved["state"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(own["param_groups"]):
        raise check.mismatch(f"{entry}/param_groups", saved_groups, own["param_groups"])
    for i, (got, want) in enumerate(zip(saved_groups, own["param_groups"])):
        where = f"{entry}/param_groups/{i}"
        if not isinstance(got, dict) or set(got) != set(want):
            raise check.mismatch(where, got, want)
        for key, value in want.items():
            if key in SCHEDULED:
                if not _is_number(got[key]) or not math.isfinite(got[key]) or got[key] < 0:
                    raise check.damaged(f"{where}/{key}", f"is {got[key]!r}, not a finite number >= 0")
            elif key in KERNEL_CHOICES:
                if got[key] is not None and not isinstance(got[key], bool):
                    raise check.damaged(f"{where}/{key}", f"is {got[key]!r}, not true, false or none")
            elif got[key] != value or type(got[key]) is not type(value):
                raise CheckpointError(
                    f"{path} does not match the run's configuration: {where}/{key} is {got[key]!r} there, "
                    f"the configuration builds {value!r}"
                )
    if not isinstance(saved_state, dict):
        raise check.mismatch(f"{entry}/state", saved_state, fresh["state"])
    for index, state in saved_state.items():
        where = f"{entry}/state/{index}"
        if not _is_int(index) or index not in fresh["state"]:
            raise CheckpointError(f"{path} does not match the run's configuration: {where} names no parameter")
        check.tree(where, state, fresh["state"][index])
        for key, value in state.items():
            if key == "step":
                step = value.item() if isinstance(value, torch.Tensor) else value
                if step != int(step) or not 1 <= step <= steps_taken:
                    raise check.damaged(f"{where}/step", f"is {step!r}, not a whole number of steps in 1..{steps_taken}")
            elif key.endswith("exp_avg_sq") and bool((value < 0).any()):
                raise check.damaged(f"{where}/{key}", "holds negative second moments")
    return {"state": saved_state, "param_groups": own["param_groups"]}


# -- the trainer's progress -------------------------------------------------------------------------
HISTORY_VALUE_TYPES = (type(None), bool, int, float, str)


def check_progress(path: Path, ckpt: dict) -> None:
    """The epoch, step count, history, timings and divergence reference: whole numbers in range,
    finite numbers, one history record per epoch holding plain values (a record's lists one level
    deep, e.g. per-block angles)."""
    check = _Checker(path)
    if ckpt.get("format") != 1:
        raise check.damaged("format", f"is {ckpt.get('format')!r}, this version reads format 1")
    epoch = check.integer("epoch", ckpt.get("epoch"), 0)
    global_step = check.integer("global_step", ckpt.get("global_step"), epoch)  # every epoch takes a step
    check.integer("world_size", ckpt.get("world_size", 1), 1)
    first_loss = ckpt.get("first_step_loss")  # the divergence reference; absent in older checkpoints
    if first_loss is not None and not (_is_number(first_loss) and math.isfinite(first_loss)):
        raise check.damaged("first_step_loss", f"is {first_loss!r}, not a finite number")
    for key in ("peak_saved_bytes", "peak_cuda_bytes"):
        if ckpt.get(key) is not None:
            check.integer(key, ckpt[key], 0)
    history = ckpt.get("history")
    if not isinstance(history, list) or len(history) != epoch:
        shown = f"a list of {len(history)}" if isinstance(history, list) else type(history).__name__
        raise check.damaged("history", f"is {shown}, not one record for each of the {epoch} epochs")
    for i, record in enumerate(history):
        where = f"history/{i}"
        if not isinstance(record, dict) or record.get("epoch") != i + 1:
            raise check.damaged(where, f"is not the record of epoch {i + 1}")
        for key, value in record.items():
            items = value if isinstance(value, list) else [value]
            if not isinstance(key, str) or not all(type(v) in HISTORY_VALUE_TYPES for v in items):
                raise check.damaged(f"{where}/{key}", "holds something other than numbers, text or a list of them")
    step_times = ckpt.get("step_times")
    if not isinstance(step_times, list) or len(step_times) > global_step:
        raise check.damaged("step_times", f"is not a list of at most {global_step} step times")
    if not all(_is_number(t) and math.isfinite(t) and t >= 0 for t in step_times):
        raise check.damaged("step_times", "holds a value that is not a finite time >= 0")
