"""The credit-assignment rule interface: a small immutable record of pure functions.

Modelled on optax's `GradientTransformation(init, update)`:

- `init(network, params, generator) -> (params, state)`: `params` arrives as `{"model": {...}}`
  and leaves with any parameter groups the rule owns and wants the engine to optimise added
  (e.g. `"feedback"`, `"generator"`, `"discriminator"`). `state` holds everything else the rule
  owns (fixed random feedback matrices, counters): a pytree of tensors and plain Python values.
  All randomness comes from `generator`.
- `step(network, params, state, batch) -> (updates, state, metrics)`: pure. `updates` maps group
  name -> `{key: pseudo-gradient}` with exactly the keys, shapes, dtypes and device of that group's
  parameters. A group missing from `updates` is not stepped. The engine applies updates with one
  ordinary `torch.optim` optimiser per group, so no optimiser logic lives in rules. Randomness
  inside a step comes from `batch.generator()`, which the engine seeds from (run seed, step, rank):
  a step is a deterministic function of its inputs, and resuming is exact.
- `metrics`: scalar tensors or floats; `loss` is shown on the progress bar.

A rule also says what it trains for (`task`), and, where its task needs them, how it reconstructs
inputs and draws samples. Parameter constraints (e.g. the weight clamp) are pure maps the engine
applies after each optimiser step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fa_rules.core.network import Network

Groups = dict[str, dict[str, torch.Tensor]]
State = Any
Metrics = dict[str, Any]

TASKS = ("classify", "reconstruct", "generate")


@dataclass(frozen=True)
class Batch:
    """One training batch: inputs in [0, 1], integer labels (or None) and the step's seed."""

    x: torch.Tensor
    y: torch.Tensor | None
    seed: int = 0

    def generator(self) -> torch.Generator:
        """A fresh generator on the batch's device, seeded for this step only."""
        return torch.Generator(device=self.x.device).manual_seed(self.seed)


InitFn = Callable[[Network, Groups, torch.Generator], "tuple[Groups, State]"]
StepFn = Callable[[Network, Groups, State, Batch], "tuple[Groups, State, Metrics]"]
Constraint = Callable[[Groups], Groups]


@dataclass(frozen=True)
class Rule:
    """A credit-assignment rule (see the module docstring for the contract)."""

    init: InitFn
    step: StepFn
    task: str = "classify"
    # (network, params, state, x, generator) -> reconstruction of x in input space
    reconstruct: Callable | None = None
    # (network, params, state, num, generator, labels=None) -> samples in input space
    sample: Callable | None = None
    # (network, params, state, batch) -> extra test metrics (floats) logged every epoch
    evaluate: Callable | None = None
    constraints: tuple[Constraint, ...] = ()
    # (latent_dim, num_classes) -> {head name: width}; the body then ends in a hidden block
    heads: Callable[[int, int], dict[str, int]] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")


def no_state_init(network: Network, params: Groups, generator: torch.Generator):
    """`init` for rules that own nothing."""
    return params, {}


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: how to build it, its settings with defaults, and where it applies."""

    name: str
    build: Callable[..., Rule]
    summary: str
    options: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] | None = None  # None: every model family
    aliases: tuple[str, ...] = ()
    # model settings this rule prefers when the user sets none (e.g. {"activation": "asinh"})
    model_defaults: dict[str, Any] = field(default_factory=dict)

    def make(self, **overrides) -> Rule:
        unknown = set(overrides) - set(self.options)
        if unknown:
            from fa_rules.core.errors import UserError

            raise UserError(
                f"rule '{self.name}' has no option {', '.join(sorted(unknown))} "
                f"(options: {', '.join(sorted(self.options)) or 'none'})"
            )
        return self.build(**{**self.options, **overrides})

    @property
    def task(self) -> str:
        return self.make().task
