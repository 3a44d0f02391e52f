"""The credit-assignment rule interface: a small immutable record of pure functions.

Modelled on optax's `GradientTransformation(init, update)`:

- `init(network, params, generator) -> (params, state)`: `params` arrives as `{"model": {...}}`
  and leaves with any parameter groups the rule owns and wants the engine to optimise added
  (e.g. `"feedback"`, `"generator"`, `"discriminator"`). `state` holds everything else the rule
  owns (fixed random feedback matrices, counters). State may hold only tensors and plain Python
  values: None, bool, int, float, str, and lists, tuples and dicts (str or int keys) of these.
  Checkpoints are loaded with `torch.load(..., weights_only=True)`, which admits nothing else, so
  that loading a checkpoint never runs code; the engine checks this at the first step
  (`check_state`), as does `fa_rules.testing`. All randomness comes from `generator`.
- `step(network, params, state, batch) -> (updates, state, metrics)`: pure. `updates` maps group
  name -> `{key: pseudo-gradient}` with exactly the keys, shapes, dtypes and device of that group's
  parameters. A group missing from `updates` is not stepped. The engine applies updates with one
  ordinary `torch.optim` optimiser per group, so no optimiser logic lives in rules. Randomness
  inside a step comes from `batch.generator()`, which the engine seeds from (run seed, step, rank):
  a step is a deterministic function of its inputs, and resuming is exact.
- `metrics`: scalar tensors or floats. `loss` is required: it is shown on the progress bar, logged
  as `train_loss` and watched for divergence (a step without it is an error at the first step).
  Updates must be finite: a non-finite update is refused before it is applied.

A rule also says what it trains for (`task`), and, where its task needs them, how it reconstructs
inputs and draws samples. Parameter constraints are maps the engine applies after each optimiser
step: pure (parameters in, the constrained values out, which the engine copies back), or, for a
function with the attribute `in_place = True`, changing the parameters itself and returning None
(the weight clamp does this: `clamp_` costs no second copy of every parameter).

A rule whose pseudo-gradient carries an L2 term, `g + lambda p` for some parameters `p`, may leave
that term out of its updates and declare it as `weight_decay(network, params) -> {group: {key:
lambda}}` (computed once, after `init`). The engine adds `lambda p` to those updates when it steps:
inside the optimiser's fused Adam kernel where that runs (which reads `p` anyway, so the term costs
no pass of its own), otherwise as `update + lambda p` handed to the optimiser. It comes on top of
the optimiser's own `--weight-decay`, which applies to every parameter.

A rule that sends substitute feedback through some weights may say which with `credit(network,
params, state)`: the model keys trained with that feedback and those trained by their exact
gradient, which the engine records as the run's `credit_assignment`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fa_rules.core.config import Range, check_option, unknown_option
from fa_rules.core.errors import UserError
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

    def seed_global_generators(self) -> None:
        """Torch's global generator (and that of the batch's CUDA device) seeded with the step's seed:
        what random layers of a model (dropout) draw depends on the step alone. Not restored after
        (saving and restoring the state costs a visible part of a small step)."""
        torch.random.default_generator.manual_seed(self.seed)
        if self.x.device.type == "cuda":
            index = self.x.device.index if self.x.device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(self.seed)


InitFn = Callable[[Network, Groups, torch.Generator], "tuple[Groups, State]"]
StepFn = Callable[[Network, Groups, State, Batch], "tuple[Groups, State, Metrics]"]
Constraint = Callable[[Groups], "Groups | None"]  # None: an in_place constraint


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
    # (network, params) -> {group: {key: lambda}}: an L2 term `lambda p` the engine adds to those
    # parameters' updates (see the module docstring)
    weight_decay: Callable[[Network, Groups], dict[str, dict[str, float]]] | None = None
    # {"feedback": [model keys trained with substituted feedback], "exact_gradient": [the other model keys]}
    credit: Callable[[Network, Groups, State], dict[str, list[str]]] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")


PLAIN_TYPES = (type(None), bool, int, float, str)


def state_problem(state: Any, where: str = "state") -> str | None:
    """Where `state` holds something other than tensors and plain Python values, or None.

    Types are matched exactly: e.g. numpy.float64 subclasses float but pickles as a numpy object."""
    kind = type(state)
    if kind in PLAIN_TYPES or kind in (torch.Tensor, torch.nn.Parameter):
        return None
    if kind in (list, tuple):
        for i, item in enumerate(state):
            problem = state_problem(item, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if kind is dict:
        for key, item in state.items():
            if type(key) not in (str, int):
                return f"{where} has a key of type {type(key).__qualname__}"
            problem = state_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    return f"{where} is a {kind.__module__}.{kind.__qualname__}"


def check_state(rule_name: str, state: Any) -> None:
    """Raise a one-line RuleError if a rule's state would not load back from a checkpoint."""
    from fa_rules.core.errors import RuleError

    problem = state_problem(state)
    if problem:
        raise RuleError(
            f"rule '{rule_name}': {problem}; rule state may hold only tensors and plain Python values "
            f"(None, bool, int, float, str, and lists, tuples and dicts of these)"
        )


def no_state_init(network: Network, params: Groups, generator: torch.Generator):
    """`init` for rules that own nothing."""
    return params, {}


# Declared ranges the built-in rules share. Bounds are generous but finite: a typo or a crafted
# config (`decay=1e308`, `steps=10**9`) is refused in one line, before it overflows or a step never ends.
MAX_ITERATIONS = 10_000  # iterations inside one training step (flow steps, feedback iterations)
MAX_SCALE = 1e6  # rates, weights, scales and time constants of a rule
ITERATIONS = Range(0, MAX_ITERATIONS)
POSITIVE = Range(0.0, MAX_SCALE, low_open=True)
NON_NEGATIVE = Range(0.0, MAX_SCALE)


@dataclass(frozen=True)
class RuleSpec:
    """A registered rule: how to build it, its settings with defaults, and where it applies."""

    name: str
    build: Callable[..., Rule]
    summary: str
    options: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] | None = None  # None: every model family
    # why `models` is all it takes, said when any other model is refused (e.g. what the paper defines)
    models_note: str = ""
    aliases: tuple[str, ...] = ()
    # model settings this rule prefers when the user sets none (e.g. {"activation": "asinh"})
    model_defaults: dict[str, Any] = field(default_factory=dict)
    # option -> the values it accepts beyond its default's type: a Range of numbers (`Range(1,
    # 10000)`) or a tuple of names (`("dense", "conv")`); checked with the type by `check_options`
    ranges: dict[str, Range | tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self):
        stray = sorted(set(self.ranges) - set(self.options))
        if stray:
            raise ValueError(f"rule '{self.name}' declares ranges for {', '.join(stray)}, which are not its options")

    def check_options(self, values: dict, syntax: str | None = None, where: str | None = None) -> None:
        """Raise a one-line UserError for an option this rule does not have, or a value of the wrong
        type or outside its declared range: the one place rule options are checked (a suite or a
        hand-edited config.json holds any JSON). `syntax` and `where` say how the message writes the
        fix (`fa_rules.core.config.example`) and what it names first."""
        owner = f"rule '{self.name}'"
        for key, value in values.items():
            if key not in self.options:
                raise unknown_option(owner, key, self.options, where)
            check_option(owner, "rule_options", key, self.options[key], value, self.ranges.get(key), syntax, where)

    def check_model(self, model: str) -> None:
        """A one-line UserError when this rule names the model families it supports and `model` is
        not one of them (with `models_note`, the reason)."""
        if self.models is not None and model not in self.models:
            raise UserError(f"rule '{self.name}' does not support model '{model}' "
                            f"(supported: {', '.join(self.models)})" + (f": {self.models_note}" if self.models_note else ""))

    def make(self, **overrides) -> Rule:
        self.check_options(overrides)
        return self.build(**{**self.options, **overrides})

    @property
    def task(self) -> str:
        return self.make().task
