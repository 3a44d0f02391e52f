"""Data-parallel training over `torch.distributed`: one mechanism for every rule.

Launch the ordinary command under `torchrun --nproc_per_node N`; torchrun sets `RANK`, `WORLD_SIZE`,
`LOCAL_RANK` and the rendezvous address, and `setup` joins the process group (`nccl` on CUDA,
`gloo` on CPU). Without those variables (or with `WORLD_SIZE=1`) nothing here does anything and no
process group exists: a one-process run is exactly what it was.

What the trainer does with it (see `fa_rules.core.trainer`):

- every process builds the same model and rule state from the same seeds, then takes rank 0's
  values (`broadcast_`) so a rule with a careless `init` still starts identical everywhere;
- each step, every process runs `rule.step` on its shard of the global batch and the pseudo-
  gradients of every group, the rule state the step changed and the scalar metrics are averaged in
  one collective (`average`), weighted by shard size, so the optimisers of all processes take the
  same step;
- after every epoch `check_identical` compares checksums of the parameters and state, and a
  disagreement is an error rather than a silently forked run.

A collective that fails (a peer died, the network broke, a peer stopped answering for longer
than the timeout) raises `DistributedError` with one clear line instead of hanging. The timeout is
`FA_RULES_DIST_TIMEOUT` seconds (default 600).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from fa_rules.core.errors import UserError

TIMEOUT_ENV = "FA_RULES_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# barriers around slow one-process work (a dataset download) wait this long on the control group
CONTROL_TIMEOUT = datetime.timedelta(hours=4)


class DistributedError(RuntimeError):
    """A collective operation failed: another process died, hung or disagreed."""


@dataclass
class Context:
    """Where this process stands: its rank among `world_size` processes and the device it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    control: Any = None  # a gloo group for objects and long barriers
    # this process's share of the batch being processed (shard size / global batch size);
    # the trainer sets it before every `rule.step`
    share: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (all no-ops in a one-process run) ----------------------------------------
    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:  # DistBackendError, DistNetworkError, timeouts
            raise DistributedError(
                f"process {self.rank} of {self.world_size} lost the others while {what}: another process "
                f"has died (see its messages and torchrun's summary) or stopped answering for longer than "
                f"the collective timeout ({self.timeout_s:g} s, {TIMEOUT_ENV})"
            ) from e

    def average(self, tensors: Sequence[torch.Tensor], weight: float) -> list[torch.Tensor]:
        """sum over processes of `weight * t` for each tensor, `weight` being this process's share
        (its shard size over the global batch size; the shares sum to 1). One all_reduce per
        (dtype, device) bucket; returns new tensors, the inputs are untouched."""
        if not self.enabled or not tensors:
            return list(tensors)
        out: list[torch.Tensor | None] = [None] * len(tensors)
        with self._collective("averaging updates"):
            for idx in _buckets(tensors).values():
                flat = torch.cat([tensors[i].detach().reshape(-1) * weight for i in idx])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for i in idx:
                    n = tensors[i].numel()
                    out[i] = flat[offset : offset + n].view_as(tensors[i])
                    offset += n
        return out  # type: ignore[return-value]

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Python floats summed over processes (in float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._reduce_device())
        with self._collective("summing test metrics"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values."""
        if not self.enabled or not tensors:
            return
        with self._collective("copying rank 0's parameters"), torch.no_grad():
            for idx in _buckets(tensors).values():
                flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
                dist.broadcast(flat, src=0)
                offset = 0
                for i in idx:
                    n = tensors[i].numel()
                    tensors[i].copy_(flat[offset : offset + n].view_as(tensors[i]))
                    offset += n

    def check_identical(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Raise `DistributedError` on every process when `tensors` differ between processes
        (compared through per-tensor checksums: sum and sum of squares in float64)."""
        if not self.enabled or not tensors:
            return
        sums = torch.stack(
            [torch.stack([t.detach().double().sum(), t.detach().double().square().sum()]) for t in tensors]
        ).reshape(-1).to(self._reduce_device())
        both = torch.cat([sums, -sums])  # one all_reduce(MAX) gives the maximum and the minimum
        with self._collective(f"comparing {what}"):
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
        hi, lo = both[: sums.numel()], -both[sums.numel() :]
        # NaN != NaN: a diverged run is reported by the loss check, not here
        differ = (hi != lo) & ~(hi.isnan() | lo.isnan())
        if bool(differ.any()):
            raise DistributedError(
                f"{what} differ between processes (process {self.rank} of {self.world_size}); a rule "
                f"changed its state in place or drew per-process randomness outside batch.generator()"
            )

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (any picklable value) on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        with self._collective("receiving a value from rank 0"):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            with self._collective("waiting for the other processes"):
                dist.barrier(group=self.control)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. downloads a dataset), then the others do."""
        if not self.enabled:
            yield
            return
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def on_main(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run `fn` on rank 0 only and return its result everywhere; a `UserError` it raises is
        raised on every process (so all exit with the same one-line message)."""
        if not self.enabled:
            return fn(*args, **kwargs)
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except UserError as e:
                error = ("user", str(e))
            except BaseException as e:  # tell the others, then fail here with the real traceback
                self.broadcast_object((None, ("crash", f"rank 0 failed: {type(e).__name__}: {e}")))
                raise
        result, error = self.broadcast_object((result, error))
        if error is not None:
            kind, message = error
            raise UserError(message) if kind == "user" else DistributedError(message)
        return result

    def _reduce_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def average_across_processes(tree: Any) -> Any:
    """For use inside `rule.step`: `tree` with every floating tensor replaced by its average over
    the processes of a distributed run, weighted by each process's share of the global batch
    (identity in a one-process run). A rule that trains something inside its step, e.g. several
    SGD iterations on feedback weights, calls this on each iteration's gradient (computed from a
    mean-reduced loss) so that every process takes the step a single process would take on the
    whole global batch. Every process must make the same calls in the same order."""
    ctx = current()
    if not ctx.enabled:
        return tree
    leaves, spec = pytree.tree_flatten(tree)
    positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    for i, value in zip(positions, ctx.average([leaves[i] for i in positions], ctx.share)):
        leaves[i] = value
    return pytree.tree_unflatten(leaves, spec)


def _buckets(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    return buckets


def floating_leaves(tree: Any) -> list[torch.Tensor]:
    """The floating-point tensors in a pytree (dicts, lists, tuples, named tuples), in order."""
    leaves, _ = pytree.tree_flatten(tree)
    return [x for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]


def changed_floating_leaves(old: Any, new: Any) -> tuple[list, Any, list[int]]:
    """(leaves, spec, positions) of `new`: the positions of floating tensors that are not the very
    tensor found at the same place in `old` (a pure rule returns unchanged state as the same
    object, and those are identical on every process already)."""
    new_leaves, spec = pytree.tree_flatten(new)
    old_leaves, old_spec = pytree.tree_flatten(old)
    same_layout = old_spec == spec
    positions = [
        i for i, x in enumerate(new_leaves)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not (same_layout and x is old_leaves[i])
    ]
    return new_leaves, spec, positions


def unflatten(leaves: list, spec: Any) -> Any:
    return pytree.tree_unflatten(leaves, spec)


# -- joining and leaving the process group ---------------------------------------------------------
_current: Context | None = None


_LAUNCH_HINT = "launch with torchrun (e.g. torchrun --nproc_per_node 2 -m fa_rules train ...), which sets them all"


def _env_int(name: str, low: int, high: int | None = None, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or value < low or (high is not None and value > high):
        must = f"in {low}..{high}" if high is not None else f">= {low}"
        raise UserError(f"{name} must be an integer {must}, got '{text}': {_LAUNCH_HINT}")
    return value


def launch_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the variables torchrun sets; (1, 0, 0) without them. A
    partial or inconsistent set (WORLD_SIZE without MASTER_ADDR, RANK without WORLD_SIZE, a rank
    beyond the world) is one line before any work, not a traceback from the rendezvous nor a
    process waiting for peers that never come."""
    world = _env_int("WORLD_SIZE", 1, default="1")
    if world == 1:
        rank = os.environ.get("RANK", "")
        if rank not in ("", "0"):
            raise UserError(f"RANK={rank} is set but WORLD_SIZE is not (or is 1): {_LAUNCH_HINT}; or unset RANK to "
                            "train in one process")
        return 1, 0, 0
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                        f"set: {_LAUNCH_HINT}; or set RANK, MASTER_ADDR and MASTER_PORT as it does; or unset "
                        "WORLD_SIZE to train in one process")
    rank = _env_int("RANK", 0, world - 1)
    _env_int("MASTER_PORT", 1, 65535)
    return world, rank, _env_int("LOCAL_RANK", 0, default=str(rank))


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds, got '{text}'")
    return value


def current() -> Context:
    """This process's context: the joined process group, or a one-process context."""
    return _current if _current is not None else Context()


def setup(device: torch.device) -> Context:
    """Join the process group torchrun describes (once per process) and pick this process's
    device: `cuda` (or `auto` on a CUDA machine) becomes `cuda:LOCAL_RANK`. Without torchrun's
    variables, or with one process, returns a one-process context and starts nothing."""
    global _current
    if _current is not None:
        return _current
    already = dist.is_available() and dist.is_initialized()
    if already:  # joined by the caller
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    else:
        world, rank, local_rank = launch_env()
    if world <= 1:
        return Context(device=device)
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(
                f"--device {device} with {world} processes: use --device cuda (or auto); "
                f"each process takes cuda:LOCAL_RANK (select GPUs with CUDA_VISIBLE_DEVICES)"
            )
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"process with LOCAL_RANK {local_rank} has no GPU (this machine shows {count})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"multi-process training runs on cpu or cuda, not {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout_s = _timeout_s()
    if not already:
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        atexit.register(teardown)
    else:
        backend = dist.get_backend()
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _current = Context(rank, world, local_rank, device, backend, timeout_s, control)
    return _current


def teardown() -> None:
    """Leave the process group (registered with atexit by `setup`)."""
    global _current
    _current = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
