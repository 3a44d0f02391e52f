"""The training configuration: every field a run is made of (what `config.json` holds), and
`check_config`, the one place that says which values a run accepts."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fa_rules.core.errors import UserError

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step")
MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds; the trainer also seeds with seed + 1
# Upper bounds of the sizes and counts a run accepts: generous, but finite, so that a typo (or a
# crafted config.json) is refused in one line instead of allocating or looping without end.
MAX_COUNT = 1_000_000  # epochs, eval_every
MAX_BATCH = 2**20  # batch sizes, and a rule's per-step sample counts
MAX_LATENT = 16_384  # latent sizes (a 64x64x3 image has 12,288 values)
MAX_RATE = 1e30  # learning rates: far beyond any that trains, short of float32's overflow (3.4e38)
MAX_FACTOR = 1e12  # weight decay, the divergence factor


@dataclass(frozen=True)
class Range:
    """The numbers a setting accepts, `low..high`; an open end excludes its bound. `note` says what
    a special value means ("-1: from the run's seed")."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, v: Any) -> bool:
        above = self.low < v if self.low_open else self.low <= v
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def describe(self, integer: bool) -> str:
        """`an integer in 1..10000`, `a number in (0, 1e+06]`."""
        note = f" ({self.note})" if self.note else ""
        if integer:
            return f"an integer in {self.low}..{self.high}{note}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}{note}"


@dataclass
class TrainConfig:
    rule: str = "backprop"
    dataset: str = "digits"
    model: str = "mlp"
    rule_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    latent_dim: int = 32
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=dict)
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    eval_batch_size: int = 1000
    # Evaluate on the test set after every this many epochs (and always after the last): a
    # generative rule's evaluation can cost more than its epoch (a GAN inverts every test image)
    eval_every: int = 1
    # The run counts as diverged when a step's training loss exceeds this factor times the run's
    # first step's, or an epoch's mean this factor times the first epoch's (a non-finite loss
    # always does); 0 turns these checks off.
    divergence_factor: float = 1000.0
    # torch.compile the rule's step (eager when it does not compile; see fa_rules.core.compiled)
    compile: bool = False
    # > 0: hold out this fraction of the training split (stratified by label, fixed by
    # validation_seed), train on the rest and evaluate on the held-out part only; the test split is
    # never read (see fa_rules.core.data.validation_split). Tuning selects settings this way.
    validation_fraction: float = 0.0
    validation_seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "configuration", registry=None) -> "TrainConfig":
        """A checked configuration from plain data (e.g. a parsed `config.json`); unknown keys are
        ignored, missing ones take their defaults. A bad value is a `UserError` naming `where`.
        Given the plugin `registry`, rule and model options are checked too (`check_config`)."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a table of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names})
        check_config(config, where, registry=registry)
        return config


def read_config(path: Path, registry=None) -> TrainConfig:
    """A run's `config.json`, checked (its rule and model options too, given the plugin `registry`):
    a file that is not JSON or holds a bad value is one line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{path} is not a readable JSON run configuration ({reason})") from None
    except RecursionError:  # `[[[[...]]]]`: no configuration nests deeper than a table of options
        raise UserError(f"{path} is not a readable JSON run configuration (nested too deeply)") from None
    return TrainConfig.from_dict(data, str(path), registry)


# -- validation ----------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int to Python, not to a user


# a default's type -> (what a value must be to take its place, the test); an integer may stand for a number
_KINDS: dict[type, tuple[str, Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", _is_int),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("a table", lambda v: isinstance(v, dict)),
}


def kind_mismatch(default: Any, value: Any) -> str | None:
    """What `value` must be to stand where `default` stands ("an integer", ...), or None where it
    has the default's type or that type says nothing (None, a plugin's own class)."""
    kind = _KINDS.get(type(default))
    return None if kind is None or kind[1](value) else kind[0]


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float (`lr: 10**400` in a config.json)
        return False


def show(v: Any) -> str:
    """A value in a message as the user wrote it: -1 for -1.0, 'x' for a string, a huge integer by
    its number of digits."""
    if isinstance(v, float):
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text  # -1, not -1.0: as the user typed it
    if _is_int(v) and abs(v) >= 10**30:  # `lr: 10**400`: the size, not 400 digits
        return f"{'-' if v < 0 else ''}an integer of {len(str(abs(v)))} digits"
    return repr(v) if isinstance(v, str) else str(v)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_plain(v: Any) -> bool:
    return isinstance(v, (bool, str)) or _is_number(v)


def value_problem(default: Any, value: Any, allowed: Range | tuple[str, ...] | None = None) -> str | None:
    """What `value` must be to stand where `default` stands, within `allowed` (a `Range` of numbers
    or a tuple of names): "an integer in 1..10000", "one of zeros, uniform"; None where it may. A
    default of no plain type (None, a plugin's own class) takes any single plain value."""
    if isinstance(allowed, tuple):
        return None if isinstance(value, str) and value in allowed else f"one of {', '.join(allowed)}"
    kind = type(default)
    if kind is int:
        ok = _is_int(value) and (allowed is None or value in allowed)
        return None if ok else allowed.describe(integer=True) if allowed else "an integer"
    if kind is float:  # an integer may stand for a number
        ok = _is_number(value) and (allowed is None or value in allowed)
        return None if ok else allowed.describe(integer=False) if allowed else "a finite number"
    if kind in _KINDS:
        return kind_mismatch(default, value)
    return None if _is_plain(value) else "true/false, a finite number or a string"


# model options that `fa-rules train` takes as flags of their own; the others are --model-opt KEY=VALUE
MODEL_FLAGS = ("depth", "width", "activation")


def example(table: str, key: str, value: Any, syntax: str | None) -> str:
    """How `key = value` of `table` ("rule_options" or "model_options") is written in `syntax`: on
    the command line ("flags": `--opt steps=1`, `--width 256`, `--model-opt width_multiplier=1`),
    in a config.json ("json"), in a suite file ("toml"); `steps=1` for any other (None)."""
    if syntax in ("json", "toml"):
        text = json.dumps(value)  # TOML writes booleans, numbers and quoted strings as JSON does
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = value if isinstance(value, str) else show(value)
    if syntax == "flags":
        if table == "model_options":
            return f"--{key} {text}" if key in MODEL_FLAGS else f"--model-opt {key}={text}"
        return f"--opt {key}={text}"
    if syntax == "json":
        return f'"{table}": {{"{key}": {text}}}'
    if syntax == "toml":  # rule options sit in a rule's `options` table, model options in [settings]
        return f"options = {{ {key} = {text} }}" if table == "rule_options" else f"{key} = {text}"
    return f"{key}={text}"


def check_option(owner: str, table: str, key: str, default: Any, value: Any,
                 allowed: Range | tuple[str, ...] | None = None, syntax: str | None = None,
                 where: str | None = None) -> None:
    """Raise a one-line `UserError` if `value` cannot stand for option `key` of `owner` ("rule
    'dfa'", "model 'mlp'"): what it must be, and the default written in `syntax` (see `example`)."""
    must = value_problem(default, value, allowed)
    if must:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}{owner}: option '{key}' must be {must}, got {show(value)}; "
                        f"e.g. {example(table, key, default, syntax)}")


def unknown_option(owner: str, key: str, options: dict, where: str | None = None) -> UserError:
    """`rule 'dtp' has no option noise (did you mean feedback_noise? options: ...)`."""
    import difflib

    close = difflib.get_close_matches(key, list(options), n=3) or sorted(o for o in options if key in o)[:3]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UserError(f"{where + ': ' if where else ''}{owner} has no option {key} "
                     f"({hint}options: {', '.join(sorted(options)) or 'none'})")


# the engine runs on these; torch also parses others (mps, meta, xla) that it cannot train on
DEVICE_TYPES = ("cpu", "cuda")


def _is_device(v: Any) -> bool:
    if not _is_name(v):
        return False
    if v == "auto":
        return True
    import torch

    try:
        device = torch.device(v)  # whether CUDA is present is checked when the run starts (resolve_device)
    except RuntimeError:
        return False
    return device.type in DEVICE_TYPES


def _in(allowed: Range, integer: bool) -> tuple[str, Callable[[Any], bool]]:
    """A numeric field's (description, test) from its range."""
    kind = _is_int if integer else _is_number
    return allowed.describe(integer), lambda v: kind(v) and v in allowed


# field -> (what its value must be, the test); message: "--lr must be a number in (0, 1e+30], got -1"
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rule": ("a name", _is_name),
    "dataset": ("a name", _is_name),
    "model": ("a name", _is_name),
    "latent_dim": _in(Range(1, MAX_LATENT), integer=True),
    "epochs": _in(Range(0, MAX_COUNT), integer=True),
    "batch_size": _in(Range(1, MAX_BATCH), integer=True),
    "eval_batch_size": _in(Range(1, MAX_BATCH), integer=True),
    "eval_every": _in(Range(1, MAX_COUNT), integer=True),
    "lr": _in(Range(0, MAX_RATE, low_open=True), integer=False),
    "optimizer": (" or ".join(OPTIMIZERS), lambda v: isinstance(v, str) and v in OPTIMIZERS),
    "momentum": _in(Range(0, 1, high_open=True), integer=False),
    "weight_decay": _in(Range(0, MAX_FACTOR), integer=False),
    "lr_schedule": (" or ".join(LR_SCHEDULES), lambda v: isinstance(v, str) and v in LR_SCHEDULES),
    "seed": _in(Range(0, MAX_SEED), integer=True),
    "device": ("auto, cpu, cuda or cuda:N", _is_device),
    "data_dir": ("a path or nothing", lambda v: v is None or isinstance(v, str)),
    "divergence_factor": _in(Range(0, MAX_FACTOR, note="0: off"), integer=False),
    "compile": ("true or false", lambda v: isinstance(v, bool)),
    "validation_fraction": _in(Range(0, 1, high_open=True, note="0: no validation split"), integer=False),
    "validation_seed": _in(Range(0, MAX_SEED), integer=True),
}
_GROUP_LR = _in(Range(0, MAX_RATE, low_open=True), integer=False)
# how the command line spells a field, where that is not --field-name (eval_batch_size has no flag)
_FLAGS = {"eval_batch_size": "eval_batch_size", "rule_options": "--opt", "model_options": "--model-opt"}


def check_config(config: TrainConfig, where: str | None = None, syntax: str | None = None, registry=None) -> None:
    """Check every field of `config` (type, range, finiteness); raise a one-line `UserError` naming
    the first bad one. Fields are spelled as command-line flags (`--lr`) when `where` is None, else
    as `where: lr` (a config.json, a suite cell; `syntax` "json" or "toml" says how the fixes that
    messages suggest are written). Given the plugin `registry`, rule and model options are checked
    against what their rule declares (`RuleSpec.check_options`: type, range or choices) and against
    the types of their model's defaults; without it they are checked when the rule is built
    (`RuleSpec.make`). Names the registry does not know are left to `fa_rules.runs.resolve`, which
    refuses them with suggestions."""
    syntax = syntax or ("flags" if where is None else "json")

    def name(field_name: str, key: str | None = None) -> str:
        if where is not None:
            return f"{where}: {field_name}" + (f".{key}" if key is not None else "")
        flag = _FLAGS.get(field_name, "--" + field_name.replace("_", "-"))
        return flag if key is None else f"{flag} {key}"

    for field_name, (must, test) in _FIELDS.items():
        value = getattr(config, field_name)
        if not test(value):
            raise UserError(f"{name(field_name)} must be {must}, got {show(value)}")
    for field_name in ("rule_options", "model_options", "group_lr"):
        table = getattr(config, field_name)
        if not isinstance(table, dict) or not all(isinstance(k, str) and k for k in table):
            raise UserError(f"{name(field_name)} must map names to values, got {show(table)}")
    must, test = _GROUP_LR
    for key, value in config.group_lr.items():
        if not test(value):
            raise UserError(f"{name('group_lr', key)} must be {must}, got {show(value)}")
    rule = _lookup(registry, "rule", config.rule)
    model = _lookup(registry, "model", config.model)
    if rule is not None:
        rule.check_options(config.rule_options, syntax, where)
    if model is not None:
        owner = f"model '{model.name}'"
        for key, value in config.model_options.items():
            if key not in model.options:
                raise unknown_option(owner, key, model.options, where)
            check_option(owner, "model_options", key, model.options[key], value, None, syntax, where)


def _lookup(registry, kind: str, name: str):
    """The registered rule or model spec called `name`, or None (no registry given, or a name it
    does not know: that is refused, with suggestions, when the run resolves its names)."""
    if registry is None:
        return None
    try:
        return getattr(registry, kind)(name)
    except UserError:
        return None
