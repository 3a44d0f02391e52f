"""The trainer: one loop for every rule, writing one run directory.

Run directory layout:
  config.json      the resolved configuration (what `--resume` reads back)
  metrics.jsonl    one JSON object per finished epoch: train_loss, the epoch means of the rule's
                   other scalar step metrics as train_<name>, test metrics
  summary.json     final metrics and measurements; `status` is "ok", or "diverged" with the epoch
                   (`diverged_epoch`) and the reason (`error`)
  checkpoint.pt    written atomically after every epoch (after metrics.jsonl); verified before use
  curves.png       training loss and the task metric against epoch (drawn by `fa_rules.runs`)

Under torchrun (see `fa_rules.core.distributed`) every process runs this same loop data-parallel:
each step's global batch of `world_size * batch_size` examples (one seeded permutation per epoch,
as in a one-process run) is cut into contiguous shards, one per process; the pseudo-gradients,
the rule state the step changed and the scalar step metrics are averaged across processes
weighted by shard size; only rank 0 writes files and shows progress.

Buffers (batch norm's running statistics) are state the engine carries for the network: updated
after each step from the statistics its batch norms saw (`fa_rules.core.network`), saved in the
checkpoint, read in evaluation mode. Under torchrun each process updates its own from its shard, and
rank 0's are copied to the others before every evaluation and checkpoint, which is what DDP's
`broadcast_buffers` gives: training-mode forwards never read them. Random layers (dropout) draw from
the global generator, which the engine seeds with the step's seed before the step, so a seed fixes
a run and resuming is exact.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from fa_rules.core import checkpoint_contents, distributed
from fa_rules.core.config import DEVICE_TYPES, LR_SCHEDULES, OPTIMIZERS, TrainConfig, check_config, read_config
from fa_rules.core.autodiff import SavedTensorsProbe, load_forward_ad
from fa_rules.core.compiled import CompiledStep
from fa_rules.core.checkpoint import (
    CheckpointError,
    check_params,
    load_checkpoint,
    remove_stale_tmp_files,
    save_checkpoint,
    write_json,
    write_jsonl,
    write_or_explain,
)
from fa_rules.core.data import Dataset, as_float, epoch_order, validation_split
from fa_rules.core.errors import RuleError, UserError
from fa_rules.core.metrics import alignment_angles, evaluate_classifier, evaluate_reconstruction
from fa_rules.core.network import Network, count_params, recording_statistics, update_running_statistics
from fa_rules.core.rule import Batch, Groups, Rule, check_state

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "checkpoint.pt",
)
class Diverged(RuntimeError):
    """Training diverged: a non-finite loss or update, or a loss that grew past the divergence factor."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but CUDA is not available here")
    return device


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """Seed for one step's randomness: fixed by (run seed, global step, process rank).

    Rank 0 gets the one-process seed; the other processes of a distributed run draw their own
    noise for their own examples (per-example noise must not repeat across shards)."""
    return hash((seed, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of every group's learning rate at a global step. A function of the step alone,
    so a resumed run follows the schedule exactly. "cosine" decays to 0 over the whole run; "step"
    divides by 10 at half and at three quarters of the run (BioTorch's epochs 50 and 75 of 100)."""
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "step":
        return 0.1 ** sum(step >= total_steps * m for m in (0.5, 0.75))
    raise UserError(f"unknown lr schedule '{schedule}' (use {' or '.join(LR_SCHEDULES)})")


def fused_kernels(tensors) -> bool | None:
    """True where torch's fused optimiser kernels run (floating-point tensors on CPU or CUDA): one
    kernel over each tensor instead of a dozen elementwise ops, 2.5x faster on a CPU, the same
    arithmetic to float rounding. None (torch's default choice) elsewhere."""
    tensors = list(tensors)
    ok = tensors and all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)
    return True if ok else None


def make_optimizers(config: TrainConfig, params: Groups) -> dict[str, torch.optim.Optimizer]:
    """One optimiser per parameter group, all of the configured kind."""
    unknown = set(config.group_lr) - set(params)
    if unknown:
        raise UserError(
            f"--group-lr names group(s) {', '.join(sorted(unknown))}; this rule's groups are "
            f"{', '.join(sorted(params))}"
        )
    optimizers = {}
    for group, tensors in params.items():
        if not tensors:  # e.g. kolen_pollack's feedback on a one-layer mlp: no optimiser takes an empty group
            settings = ", ".join(f"{k}={v}" for k, v in config.model_options.items())
            deeper = "a larger --depth" if "depth" in config.model_options else "a model with more layers"
            raise UserError(
                f"rule '{config.rule}' has nothing to train in its parameter group '{group}' on model "
                f"'{config.model}'{f' ({settings})' if settings else ''}: the rule reaches no layer of this model; "
                f"give {deeper} or another rule"
            )
        lr = config.group_lr.get(group, config.lr)
        fused = fused_kernels(tensors.values())
        if config.optimizer == "adam":
            opt = torch.optim.Adam(tensors.values(), lr=lr, weight_decay=config.weight_decay, fused=fused)
        elif config.optimizer == "sgd":
            opt = torch.optim.SGD(
                tensors.values(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, fused=fused
            )
        else:
            raise UserError(f"unknown optimizer '{config.optimizer}' (use {' or '.join(OPTIMIZERS)})")
        optimizers[group] = opt
    return optimizers


def check_updates(rule_name: str, updates: Groups, params: Groups) -> None:
    """Fail with one line naming the rule, group and key when updates do not mirror the parameters."""
    if not isinstance(updates, dict):
        raise RuleError(f"rule '{rule_name}': updates must be a dict of groups, got {type(updates).__name__}")
    for group, tensors in updates.items():
        if group not in params:
            raise RuleError(
                f"rule '{rule_name}' returned updates for unknown group '{group}' "
                f"(its groups: {', '.join(sorted(params))})"
            )
        if not isinstance(tensors, dict):
            raise RuleError(f"rule '{rule_name}': updates of group '{group}' must be a dict, got {type(tensors).__name__}")
        missing = sorted(set(params[group]) - set(tensors))
        if missing:
            raise RuleError(f"rule '{rule_name}': updates of group '{group}' lack key(s) {', '.join(missing)}")
        extra = sorted(map(str, set(tensors) - set(params[group])))
        if extra:
            raise RuleError(f"rule '{rule_name}': updates of group '{group}' have unknown key(s) {', '.join(extra)}")
        for key, u in tensors.items():
            p = params[group][key]
            if not isinstance(u, torch.Tensor):
                raise RuleError(f"rule '{rule_name}': update {group}/{key} is a {type(u).__name__}, not a tensor")
            if u.shape != p.shape or u.dtype != p.dtype or u.device != p.device:
                raise RuleError(
                    f"rule '{rule_name}': update {group}/{key} is {tuple(u.shape)} {u.dtype} on {u.device}, "
                    f"parameter is {tuple(p.shape)} {p.dtype} on {p.device}"
                )


def declared_weight_decay(rule_name: str, rule: Rule, network: Network, params: Groups) -> Groups:
    """The rule's `weight_decay` declaration, checked: `{group: {key: lambda}}` with the nonzero
    entries only ({} for a rule that declares none). A one-line RuleError names a bad entry."""
    if rule.weight_decay is None:
        return {}
    declared = rule.weight_decay(network, params)
    out: dict[str, dict[str, float]] = {}
    for group, decays in (declared or {}).items():
        for key, value in decays.items():
            if group not in params or key not in params[group]:
                raise RuleError(f"rule '{rule_name}' declares weight decay for {group}/{key}, which is not a parameter")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RuleError(f"rule '{rule_name}': weight decay of {group}/{key} must be a finite number, "
                                f"got {value!r}")
            if value:
                out.setdefault(group, {})[key] = float(value)
    return out


@torch.no_grad()
def nonfinite_update(updates: Groups) -> tuple[str, str] | None:
    """(group, key) of the first update holding NaN or inf, else None (one device sync in all).
    A tensor given for several parameters (a rule's shared update) is read once."""
    first: dict[int, tuple[str, str]] = {}
    for g, tensors in updates.items():
        for k, t in tensors.items():
            first.setdefault(id(t), (g, k))
    keys = list(first.values())
    if not keys:
        return None
    # a sum is finite unless an entry is NaN or inf, or the sum overflows (the exact check below
    # then clears it): one read-only reduction per tensor and one sync, where a stack of
    # per-tensor isfinite().all() writes a mask per tensor and costs several times more
    tensors = [updates[g][k] for g, k in keys]
    if math.isfinite(torch.stack([t.sum() for t in tensors]).sum().item()):
        return None
    finite = torch.stack([torch.isfinite(t).all() for t in tensors])
    if bool(finite.all()):
        return None
    return keys[int((~finite).nonzero()[0])]


# kernel settings (device, dtype, lr, beta1, beta2, eps, weight decay) -> [params, grads, exp_avgs, exp_avg_sqs, steps]
AdamCalls = dict[tuple, list[list[torch.Tensor]]]


def _direct_adam_calls(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                       updates: dict[str, torch.Tensor], decay: dict[str, float]) -> AdamCalls | None:
    """The tensor lists of one step of a fused `torch.optim.Adam` by its kernel, read from the
    optimiser's own state, with `updates` as the gradients and each parameter's declared `decay`
    added to the group's weight decay (the kernel adds `weight_decay * p` to the gradient). None,
    having changed nothing, where the direct step does not apply: any other optimiser or setting,
    step hooks, a parameter without state yet (the first step makes it) or without an update,
    mixed devices or dtypes; the caller then steps the usual way (`_direct_adam_step` says why
    this pays)."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1 or not hasattr(torch, "_fused_adam_"):
        return None
    if (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _global_step_hooks()
            or getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None):
        return None
    group = opt.param_groups[0]
    if (not group.get("fused") or any(group.get(k) for k in ("amsgrad", "capturable", "differentiable",
                                                              "decoupled_weight_decay", "maximize"))
            or not isinstance(group["lr"], float)):
        return None
    ps = group["params"]
    if len(ps) != len(params) or len({(p.device, p.dtype) for p in ps}) != 1 or ps[0].is_complex():
        return None
    weight_decay = group["weight_decay"]
    by_decay: dict[float, list[list[torch.Tensor]]] = {}  # the group's own weight decay, or it plus a declared one
    for p, (key, own) in zip(ps, params.items()):
        state, u = opt.state.get(p), updates.get(key)
        if p is not own or not state or u is None or "step" not in state:
            return None
        total = weight_decay if key not in decay else weight_decay + decay[key]
        lists = by_decay.get(total) or by_decay.setdefault(total, [[], [], [], [], []])
        lists[0].append(p)
        lists[1].append(u.detach())
        lists[2].append(state["exp_avg"])
        lists[3].append(state["exp_avg_sq"])
        lists[4].append(state["step"])
    settings = (ps[0].device, ps[0].dtype, group["lr"], *group["betas"], group["eps"])
    return {(*settings, total): lists for total, lists in by_decay.items()}


def _direct_adam_step(calls: AdamCalls) -> None:
    """The fused Adam kernel called directly on the optimisers' state tensors, one call per device,
    dtype and setting across all groups: the arithmetic of `opt.step()` bit for bit (tested),
    without torch.optim's per-step Python (step hooks, profiling, per-parameter state checks:
    ~0.1 ms per optimiser, a few percent of a small step on a CPU)."""
    for (_, _, lr, beta1, beta2, eps, weight_decay), (ps, grads, exp_avgs, exp_avg_sqs, steps) in calls.items():
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(ps, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr, beta1=beta1,
                           beta2=beta2, weight_decay=weight_decay, eps=eps, maximize=False)


def _global_step_hooks() -> bool:
    from torch.optim import optimizer as torch_optimizer

    return bool(getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
                or getattr(torch_optimizer, "_global_optimizer_post_hooks", None))


@torch.no_grad()
def apply_updates(
    rule: Rule, params: Groups, updates: Groups, optimizers: dict[str, torch.optim.Optimizer],
    decay: Groups | None = None,
) -> None:
    """Hand pseudo-gradients to the optimisers, step, then apply the rule's constraints. `decay`
    is the rule's declared weight decay (`declared_weight_decay`), which a rule declaring one must
    pass: `lambda p` joins those updates (in the fused Adam kernel where it runs)."""
    if decay is None:
        if rule.weight_decay is not None:
            raise ValueError("this rule declares weight decay: pass decay=declared_weight_decay(...)")
        decay = {}
    direct: AdamCalls = {}
    for group, tensors in updates.items():
        tensors = {key: _laid_out_like(params[group][key], u) for key, u in tensors.items()}
        group_decay = decay.get(group, {})
        calls = _direct_adam_calls(optimizers[group], params[group], tensors, group_decay)
        if calls is not None:
            for settings, lists in calls.items():
                merged = direct.setdefault(settings, lists)
                if merged is not lists:  # a second group with the same settings joins the call
                    for into, more in zip(merged, lists):
                        into += more
            continue
        for key, u in tensors.items():
            p, lam = params[group][key], group_decay.get(key)
            p.grad = u.detach() if lam is None else torch.add(u.detach(), p, alpha=lam)
        optimizers[group].step()
        for p in params[group].values():
            p.grad = None
    _direct_adam_step(direct)
    for constraint in rule.constraints:
        if getattr(constraint, "in_place", False):
            constraint(params)  # changes the parameters itself
            continue
        for group, tensors in constraint(params).items():
            for key, value in tensors.items():
                params[group][key].copy_(value)


def _laid_out_like(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`u` with `p`'s strides. A second-order pass can return a conv weight's update transposed in
    memory, and torch's fused optimiser kernels (and the direct Adam call) read a gradient as if laid
    out like its parameter: such an update would scramble the weights."""
    if u.stride() == p.stride() or u.shape != p.shape:
        return u
    return torch.empty_like(p, dtype=u.dtype).copy_(u)


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


def _metric_tensor(v, device) -> torch.Tensor:
    t = torch.as_tensor(v, device=device).detach().reshape(())
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


# steps between two looks at the step metrics (the one host-device synchronisation they cost)
LOG_EVERY = 20


class StepMetricsLog:
    """One epoch's scalar step metrics: kept as device tensors when added, turned into Python
    floats together by `flush` (one synchronisation for every value since the last flush)."""

    def __init__(self):
        self.losses: list[float] = []
        self.others: dict[str, list[float]] = {}  # e.g. a GAN's g_loss / d_loss, a VAE's kl
        self._pending: list[tuple[str, torch.Tensor]] = []

    def add(self, metrics: dict, device: torch.device) -> None:
        for name, value in metrics.items():
            if _is_scalar(value):
                self._pending.append((name, _metric_tensor(value, device)))

    def flush(self) -> tuple[int, list[float]]:
        """Bring the pending values to the host; return the index of the first step they cover
        and their losses."""
        first = len(self.losses)
        if not self._pending:
            return first, []
        # float64 holds any float32/16 value exactly: the floats equal float(tensor) per value
        values = torch.stack([t.to(torch.float64) for _, t in self._pending]).tolist()
        for (name, _), value in zip(self._pending, values):
            (self.losses if name == "loss" else self.others.setdefault(name, [])).append(value)
        self._pending = []
        return first, self.losses[first:]


@contextlib.contextmanager
def evaluation_mode(network: Network):
    """The network in evaluation mode for the block (running statistics, no dropout), then training mode."""
    network.eval()
    try:
        yield
    finally:
        network.train()


class Trainer:
    """Trains `rule` on `dataset` with the network `build_network()` makes; see module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        rule: Rule,
        build_network: Callable[[], Network],
        dataset: Dataset,
        out_dir: Path,
        progress: bool = True,
    ):
        self.config = config
        self.rule = rule
        self.out_dir = Path(out_dir)
        # one process unless launched by torchrun; then this process's rank and device
        self.dist = distributed.setup(resolve_device(config.device))
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device
        check_config(config, "TrainConfig")
        lr_factor(config.lr_schedule, 0, 1)  # an unknown schedule is a user error before any work
        if rule.task == "classify" and dataset.num_classes < 2:
            raise UserError(f"dataset '{dataset.name}' has no class labels; rule '{config.rule}' classifies")
        if rule.task != "classify" and rule.reconstruct is None:
            raise ValueError(f"rule '{config.rule}' trains for {rule.task} but has no reconstruct function")
        # a validation split: trained on the rest, evaluated on it alone (the test split is never read)
        self.validation_split: dict | None = None
        if config.validation_fraction > 0:
            dataset, self.validation_split = validation_split(dataset, config.validation_fraction,
                                                              config.validation_seed)
        self.data = dataset.to(self.device)

        torch.manual_seed(config.seed)  # model initialisation depends on the seed only
        self.network = build_network().to(self.device)
        params = {"model": self.network.init_params()}
        generator = torch.Generator().manual_seed(config.seed + 1)
        self.params, self.state = rule.init(self.network, params, generator)
        self.decay = declared_weight_decay(config.rule, rule, self.network, self.params)
        self.optimizers = make_optimizers(config, self.params)
        self.step_fn = rule.step
        if config.compile and self.network.tracked_norms:
            # the batch statistics a step records would leave the compiled graph as functorch wrappers
            print(f"warning: model '{config.model}' keeps running statistics, which a compiled step cannot record; "
                  "running eager", file=sys.stderr)
        elif config.compile:
            self.step_fn = CompiledStep(config.rule, rule.step)
        load_forward_ad()  # torch's own warning on a rule's first forward-mode step, silenced for every rule
        self.base_lr = {g: config.group_lr.get(g, config.lr) for g in self.optimizers}
        self.total_steps = self.steps_per_epoch(self.data.train_x.shape[0]) * config.epochs
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        # the loss of the run's first step (the untrained model's): what losses within an epoch are
        # measured against for divergence; saved in the checkpoint, so a resumed run keeps it
        self.first_step_loss: float | None = None
        self.epoch_start_step = 0  # global step at which the current epoch began (for messages)
        self.step_times: list[float] = []
        self.peak_saved_bytes: int | None = None
        self.peak_cuda_bytes: int | None = None
        self._updates_checked = False
        # called with the trainer after the summary is written (e.g. to draw the run's pictures)
        self.on_finish: list[Callable[["Trainer"], None]] = []

    # -- persistence ---------------------------------------------------------------------------
    def checkpoint_payload(self) -> dict:
        return {
            "format": 1,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "params": self.params,
            "buffers": self.network.buffer_dict(),
            "state": self.state,
            "optimizers": {g: o.state_dict() for g, o in self.optimizers.items()},
            "history": self.history,
            "first_step_loss": self.first_step_loss,
            "step_times": self.step_times,
            "peak_saved_bytes": self.peak_saved_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "world_size": self.dist.world_size,
        }

    @property
    def is_main(self) -> bool:
        """True in the process that writes the run directory (the only one, without torchrun)."""
        return self.dist.is_main

    def load(self, path: Path) -> None:
        """Continue from the checkpoint at `path`. Every entry is checked against what this
        configuration builds (shapes, dtypes, finite values, ranges) before any of it is used: a
        damaged optimiser moment would otherwise reach the fused kernels' raw memory."""
        limit = checkpoint_contents.size_limit(self.params, self.state, self.network.buffer_dict())
        ckpt = load_checkpoint(path, map_location=self.device, max_bytes=limit)  # verified, never runs code
        check_params(path, ckpt.get("params"), self.params)
        buffers = self.network.buffer_dict()
        checkpoint_contents.check_buffers(path, ckpt.get("buffers", {} if not buffers else None), buffers)
        checkpoint_contents.check_progress(path, ckpt)
        if "state" not in ckpt or not isinstance(ckpt.get("optimizers"), dict):
            raise CheckpointError(f"{path} is not a checkpoint of this run (it holds no rule or optimiser state)")
        checkpoint_contents.check_rule_state(path, ckpt["state"], self.state)
        if set(ckpt["optimizers"]) != set(self.optimizers):
            raise CheckpointError(
                f"{path} does not match the run's configuration: optimisers for "
                f"{', '.join(sorted(map(str, ckpt['optimizers'])))}, the configuration builds "
                f"{', '.join(sorted(self.optimizers))}"
            )
        optimizer_states = {
            group: checkpoint_contents.check_optimizer_state(path, group, ckpt["optimizers"][group], opt,
                                                             ckpt["global_step"])
            for group, opt in self.optimizers.items()
        }
        with torch.no_grad():
            for group, tensors in ckpt["params"].items():
                for key, value in tensors.items():
                    self.params[group][key].copy_(value)
            for key, value in ckpt.get("buffers", {}).items():
                buffers[key].copy_(value)
        for group, opt in self.optimizers.items():
            opt.load_state_dict(optimizer_states[group])
        self.state = ckpt["state"]
        self.epoch = ckpt["epoch"]
        self.global_step = ckpt["global_step"]
        self.history = list(ckpt["history"])
        self.step_times = list(ckpt["step_times"])
        self.peak_saved_bytes = ckpt.get("peak_saved_bytes")
        self.peak_cuda_bytes = ckpt.get("peak_cuda_bytes")
        self.first_step_loss = ckpt.get("first_step_loss")  # absent in checkpoints of older versions
        if self.is_main:  # a process that died between the checkpoint and metrics writes lost no line
            write_jsonl(self.out_dir / METRICS_FILE, self.history)
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.dist.world_size and self.is_main:
            print(
                f"warning: {path} was trained by {saved_world} process(es), this run has "
                f"{self.dist.world_size}: the global batch changes from {saved_world * self.config.batch_size} "
                f"to {self.dist.world_size * self.config.batch_size} examples",
                file=sys.stderr,
            )

    def save(self) -> None:
        if not self.is_main:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # the checkpoint first: it is the record (its history included), so a failed save leaves
            # every file at the last good epoch; a death between the two writes loses nothing either,
            # since `load` rewrites metrics.jsonl from the checkpoint's history
            save_checkpoint(self.out_dir / CHECKPOINT_FILE, self.checkpoint_payload())
            write_jsonl(self.out_dir / METRICS_FILE, self.history)
        except OSError as e:  # e.g. [Errno 28] disk full; the atomic write removed its temporary file
            kept = (
                f"the checkpoint of epoch {self.epoch - 1} is kept" if self.epoch > 1 else "no epoch was saved yet"
            )
            raise UserError(
                f"cannot save epoch {self.epoch} in {self.out_dir} ({e.strerror or e}); {kept}: "
                f"fix this and continue with --resume {self.out_dir}"
            ) from None

    # -- one step ------------------------------------------------------------------------------
    def make_batch(self, index: torch.Tensor, step: int) -> Batch:
        x = as_float(self.data.train_x[index])
        y = self.data.train_y[index]
        return Batch(x, y, step_seed(self.config.seed, step, self.dist.rank))

    def steps_per_epoch(self, n: int) -> int:
        """Global batches per epoch. A last global batch with fewer examples than processes
        would leave a process without data: distributed runs drop it (one process: ceil)."""
        size = self.dist.world_size * self.config.batch_size
        return n // size + (1 if n % size >= self.dist.world_size else 0)

    def shard(self, order: torch.Tensor, i: int) -> tuple[torch.Tensor, float]:
        """This process's examples of global batch `i` and its share of that batch. The global
        batch is the one a single process with batch `world_size * batch_size` would take; process
        r takes its r-th contiguous part (parts differ by at most one example)."""
        if not self.dist.enabled:
            b = self.config.batch_size
            return order[i * b : (i + 1) * b], 1.0
        size = self.dist.world_size * self.config.batch_size
        index = order[i * size : (i + 1) * size]
        mine = index.tensor_split(self.dist.world_size)[self.dist.rank]
        return mine, mine.numel() / index.numel()

    def probe_memory(self, batch: Batch) -> None:
        """One throw-away step under the saved-tensor probe (training never sees its results)."""
        try:
            with SavedTensorsProbe() as probe:
                self.run_step(self.rule.step, batch, record=False)
        except RuntimeError as e:
            if "saved tensor hooks" not in str(e):
                raise
            return  # a rule calling torch.func directly cannot be probed; leave the figure empty
        self.peak_saved_bytes = max(self.peak_saved_bytes or 0, probe.peak)

    def train_step(self, batch: Batch, share: float = 1.0) -> dict:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        old_state = self.state
        self.dist.share = share
        updates, self.state, metrics = self.run_step(self.step_fn, batch)
        if not self._updates_checked:  # once per process: cheap, and names the rule at fault
            check_updates(self.config.rule, updates, self.params)
            if not isinstance(metrics, dict) or not _is_scalar(metrics.get("loss")):
                raise RuleError(
                    f"rule '{self.config.rule}' returned no scalar 'loss' metric (the contract requires one; "
                    f"metrics: {', '.join(map(str, metrics)) if isinstance(metrics, dict) else type(metrics).__name__})"
                )
            check_state(self.config.rule, self.state)  # or the checkpoint would not load back
            self._updates_checked = True
        if self.dist.enabled:
            updates, metrics = self.average_across_processes(updates, old_state, metrics, share)
        bad = nonfinite_update(updates)  # (after averaging: every process sees the same)
        if bad is not None:
            raise self.diverged(
                f"rule '{self.config.rule}' returned a non-finite update for {bad[0]}/{bad[1]} at "
                f"{self.step_name(self.global_step - self.epoch_start_step + 1)} (not applied)"
            )
        self.set_learning_rates()
        apply_updates(self.rule, self.params, updates, self.optimizers, self.decay)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.step_times.append(time.perf_counter() - start)
        self.global_step += 1
        return metrics

    def run_step(self, step_fn, batch: Batch, record: bool = True):
        """`step_fn(network, params, state, batch)` with the global generators seeded from the
        batch; with `record`, the running statistics of batch norms updated after it. A model whose
        forward changes a tensor in place (a buffer other than batch norm's running statistics) is
        torch.func's refusal, said in one line as the model's limit."""
        batch.seed_global_generators()
        try:
            if not (record and self.network.tracked_norms):
                return step_fn(self.network, self.params, self.state, batch)
            with recording_statistics(self.network) as statistics:
                result = step_fn(self.network, self.params, self.state, batch)
            update_running_statistics(self.network, statistics)
            return result
        except RuntimeError as e:
            if "would mutate a captured Tensor" not in str(e):
                raise
            raise UserError(f"model '{self.config.model}' changes a tensor in place in its forward (a buffer?), "
                            f"which rule '{self.config.rule}' cannot differentiate through; the engine carries "
                            "batch norm's running statistics itself, other buffers must stay constant") from None

    def set_learning_rates(self) -> None:
        if self.config.lr_schedule == "constant":
            return
        factor = lr_factor(self.config.lr_schedule, self.global_step, self.total_steps)
        for group, opt in self.optimizers.items():
            for param_group in opt.param_groups:
                param_group["lr"] = self.base_lr[group] * factor

    def average_across_processes(self, updates: Groups, old_state, metrics: dict, share: float):
        """One weighted all_reduce for the step: every group's pseudo-gradients, the floating
        tensors of rule state that the step replaced, and the scalar metrics (the loss and the
        rest). Shares are shard size over global batch size, so for mean-reduced quantities the
        result is the global batch's mean."""
        keys = [(g, k) for g, tensors in updates.items() for k in tensors]
        tensors = [updates[g][k] for g, k in keys]
        leaves, spec, positions = distributed.changed_floating_leaves(old_state, self.state)
        tensors += [leaves[i] for i in positions]
        names = [name for name, value in metrics.items() if _is_scalar(value)]  # same order everywhere
        tensors += [_metric_tensor(metrics[name], self.device) for name in names]
        averaged = self.dist.average(tensors, share)
        out: Groups = {g: {} for g in updates}
        for (g, k), value in zip(keys, averaged):
            out[g][k] = value
        if positions:
            for i, value in zip(positions, averaged[len(keys) : len(keys) + len(positions)]):
                leaves[i] = value
            self.state = distributed.unflatten(leaves, spec)
        if names:
            metrics = {**metrics, **dict(zip(names, averaged[len(keys) + len(positions) :]))}
        return out, metrics

    def synchronised_tensors(self) -> list[torch.Tensor]:
        """What must be identical on every process: all parameters, floating rule state and buffers
        (after `share_buffers`)."""
        params = [t for group in self.params.values() for t in group.values()]
        return params + distributed.floating_leaves(self.state) + list(self.network.buffer_dict().values())

    def share_buffers(self) -> None:
        """Rank 0's buffers on every process (see the module docstring); nothing with one process."""
        self.dist.broadcast_(list(self.network.buffer_dict().values()))

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        x, y = self.data.test_x, self.data.test_y
        self.dist.share = 1.0 / self.dist.world_size  # every process evaluates the same batches below
        self.share_buffers()
        if self.rule.task == "classify":
            with evaluation_mode(self.network):
                out = self.evaluate_classifier(x, y)
            # (training mode: the angle compares the updates training makes)
            out["alignment_angle_deg"] = alignment_angles(
                self.rule, self.network, self.params, self.state, self.alignment_batch()
            )
        else:
            with evaluation_mode(self.network):
                out = evaluate_reconstruction(self.rule, self.network, self.params, self.state, x, self.config.seed,
                                              self.config.eval_batch_size)
        if self.rule.evaluate is not None:
            n = min(self.config.eval_batch_size, x.shape[0])
            batch = Batch(as_float(x[:n]), y[:n], self.config.seed)
            with evaluation_mode(self.network):
                out.update({k: v for k, v in self.rule.evaluate(self.network, self.params, self.state, batch).items()})
        if self.validation_split is not None:  # what was evaluated is the validation part: named so
            out = {("validation_" + k[len("test_"):] if k.startswith("test_") else k): v for k, v in out.items()}
        return out

    def evaluate_classifier(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Accuracy and loss over the whole test split; with several processes each evaluates a
        contiguous part and the counts and loss sums are added up."""
        if not self.dist.enabled:
            return evaluate_classifier(self.network, self.params, x, y, self.config.eval_batch_size)
        xs, ys = x.tensor_split(self.dist.world_size)[self.dist.rank], y.tensor_split(self.dist.world_size)[self.dist.rank]
        n = xs.shape[0]
        correct, loss_sum = 0.0, 0.0
        if n:
            part = evaluate_classifier(self.network, self.params, xs, ys, self.config.eval_batch_size)
            correct, loss_sum = round(part["test_accuracy"] * n), part["test_loss"] * n
        correct, loss_sum = self.dist.sum_floats([correct, loss_sum])
        return {"test_accuracy": round(correct) / x.shape[0], "test_loss": loss_sum / x.shape[0]}

    def alignment_batch(self) -> Batch:
        """A fixed training batch (the first examples) on which updates are compared to backprop
        (the global batch's size, so that a distributed run measures what one process would)."""
        n = min(self.config.batch_size * self.dist.world_size, self.data.train_x.shape[0])
        return Batch(as_float(self.data.train_x[:n]), self.data.train_y[:n], step_seed(self.config.seed, -1))

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        steps_per_epoch = self.steps_per_epoch(self.data.train_x.shape[0])
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # identical start everywhere, whatever a rule's init did (no-op with one process)
        self.dist.broadcast_(self.synchronised_tensors())
        try:
            return self._run(steps_per_epoch)
        except distributed.DistributedError as e:
            raise distributed.DistributedError(
                f"{e}. Checkpoints of finished epochs in {self.out_dir} are intact: continue with "
                f"--resume {self.out_dir}"
            ) from e.__cause__

    def _run(self, steps_per_epoch: int) -> dict:
        from fa_rules.core.progress import TrainingProgress

        cfg = self.config
        n = self.data.train_x.shape[0]
        with TrainingProgress(cfg.epochs, steps_per_epoch, enabled=self.progress) as bar:
            bar.resume_at(self.epoch)
            while self.epoch < cfg.epochs:
                self.epoch_start_step = self.global_step
                order = epoch_order(n, cfg.seed, self.epoch).to(self.device)
                # the step metrics stay on the device and come to the host once per logging
                # interval (one synchronisation, not one per step on a GPU)
                metrics_log = StepMetricsLog()
                epoch_start = time.perf_counter()
                for i in range(steps_per_epoch):
                    index, share = self.shard(order, i)
                    batch = self.make_batch(index, self.global_step)
                    if i == 0:
                        self.dist.share = share
                        self.probe_memory(batch)
                    metrics_log.add(self.train_step(batch, share), self.device)
                    if (i + 1) % LOG_EVERY == 0 or i + 1 == steps_per_epoch:
                        first, new_losses = metrics_log.flush()
                        self.check_step_losses(first, new_losses)
                        bar.show_loss(metrics_log.losses[-1])
                    bar.advance()
                losses, others = metrics_log.losses, metrics_log.others
                mean_loss = statistics.fmean(losses) if losses else None
                self.check_loss_growth(mean_loss)
                self.epoch += 1
                record = {"epoch": self.epoch, "train_loss": mean_loss}
                record.update({f"train_{name}": statistics.fmean(v) for name, v in others.items()})
                if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                    record.update(self.evaluate())
                record["epoch_time_s"] = time.perf_counter() - epoch_start
                self.history.append(record)
                if self.device.type == "cuda":
                    self.peak_cuda_bytes = max(self.peak_cuda_bytes or 0, torch.cuda.max_memory_allocated(self.device))
                self.share_buffers()
                self.dist.check_identical(self.synchronised_tensors(), "parameters, rule state and buffers")
                self.save()
                bar.end_epoch(record)
        return self.finish()

    def step_name(self, step: int) -> str:
        """How every message names a step: its epoch and its place in that epoch, counted from 1."""
        return f"epoch {self.epoch + 1}, step {step}"

    def growth_limit(self, reference: float | None) -> float | None:
        """The largest loss magnitude short of divergence: `config.divergence_factor` times the
        reference's, compared in magnitude since losses may be negative. None (no check) for a
        factor of 0 or a reference that is missing, 0 or not finite."""
        factor = self.config.divergence_factor
        if not factor or not isinstance(reference, (int, float)) or not math.isfinite(reference) or reference == 0:
            return None
        return factor * abs(reference)

    def check_step_losses(self, first_step: int, losses: list[float]) -> None:
        """Divergence within an epoch: the first loss of `losses` (those of this epoch's steps from
        `first_step` on, 0-based) that is not finite, or that exceeds `config.divergence_factor`
        times the run's first step's; named by its epoch and step, as if checked when it occurred.

        The reference is one step, the untrained model's loss: with a huge learning rate the loss
        can grow 10^5-fold by the second step, which would spoil a mean over the first steps."""
        if self.first_step_loss is None and self.epoch == 0 and first_step == 0 and losses \
                and math.isfinite(losses[0]):
            self.first_step_loss = losses[0]
        limit = self.growth_limit(self.first_step_loss)
        for step, loss in enumerate(losses, start=first_step + 1):
            if not math.isfinite(loss):
                raise self.diverged(f"rule '{self.config.rule}' diverged at {self.step_name(step)} (loss={loss})")
            if limit is not None and abs(loss) > limit:
                raise self.diverged(
                    f"rule '{self.config.rule}' diverged at {self.step_name(step)}: training loss {loss:.4g} "
                    f"exceeds {self.config.divergence_factor:g} times the first step's ({self.first_step_loss:.4g})"
                )

    def check_loss_growth(self, mean_loss: float | None) -> None:
        """Divergence across epochs: the epoch's mean loss exceeds `config.divergence_factor` times
        the first epoch's (a loss that first fell and then grew back stays under the first step's
        limit longer). No check in the first epoch itself."""
        first = self.history[0].get("train_loss") if self.history else None
        limit = self.growth_limit(first)
        if limit is not None and mean_loss is not None and abs(mean_loss) > limit:
            raise self.diverged(
                f"rule '{self.config.rule}' diverged at epoch {self.epoch + 1}: mean training loss {mean_loss:.4g} "
                f"exceeds {self.config.divergence_factor:g} times the first epoch's ({first:.4g})"
            )

    def diverged(self, message: str) -> Diverged:
        """Record a divergence in summary.json (the last good checkpoint stays as it is) and return
        the exception to raise."""
        message = f"{message}; the checkpoint of epoch {self.epoch} is kept" if self.epoch else message
        if self.is_main:
            summary = self.summary()
            summary.update(status="diverged", diverged_epoch=self.epoch + 1, error=message)
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_json(self.out_dir / SUMMARY_FILE, summary)
            except OSError:
                pass  # the divergence itself is what the user must hear about
        return Diverged(message)

    def finish(self) -> dict:
        summary = self.summary()
        summary["status"] = "ok"
        if not self.is_main:
            return summary
        write_or_explain(write_json, self.out_dir / SUMMARY_FILE, summary,
                         f"continue with --resume {self.out_dir} (it writes the summary again)")
        for callback in self.on_finish:
            callback(self)
        return summary

    def summary(self) -> dict:
        """The run's summary after the epochs finished so far (the last epoch's metrics)."""
        cfg = self.config
        final = dict(self.history[-1]) if self.history else {}
        final.pop("epoch", None)
        final.pop("epoch_time_s", None)
        summary = {
            "rule": cfg.rule,
            "dataset": cfg.dataset,
            "model": cfg.model,
            "seed": cfg.seed,
            "epochs": self.epoch,
            "task": self.rule.task,
            "device": str(self.device),
            "params": count_params(self.params["model"]),
            "params_by_group": {g: count_params(t) for g, t in self.params.items()},
            "step_time_s": statistics.median(self.step_times) if self.step_times else None,
            "peak_saved_bytes": self.peak_saved_bytes,
            **final,
        }
        if self.validation_split is not None:
            summary["validation_split"] = dict(self.validation_split)
        if self.rule.credit is not None:  # which parameters trained by substituted feedback, which by their gradient
            summary["credit_assignment"] = self.rule.credit(self.network, self.params, self.state)
        if isinstance(self.step_fn, CompiledStep):  # this process's first step: compiling and its check
            summary["compile_time_s"] = self.step_fn.compile_time_s
            summary["compiled"] = self.step_fn.compiled
        if self.device.type == "cuda":
            summary["peak_cuda_bytes"] = self.peak_cuda_bytes
        if self.dist.enabled:
            summary["world_size"] = self.dist.world_size
            summary["global_batch_size"] = self.dist.world_size * cfg.batch_size
        return summary


def prepare_run_dir(out_dir: Path, config: TrainConfig) -> None:
    """A new run directory: refuse to overwrite an earlier run (nothing a user had is lost). The
    temporary files of a run killed here before its config.json was in place (`.config.json.tmp-PID`)
    are removed: no `--resume` will ever see them."""
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT_FILE).exists() or (out_dir / CONFIG_FILE).exists():
        raise UserError(f"{out_dir} already holds a run; continue it with --resume {out_dir} or pick a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp_files(out_dir)
    write_json(out_dir / CONFIG_FILE, config.to_dict())


def read_run_config(run_dir: Path, registry=None) -> TrainConfig:
    """The run's checked config.json (see `read_config`)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"no run in {run_dir} (missing {CONFIG_FILE})")
    return read_config(path, registry)
