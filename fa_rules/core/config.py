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
    # The run counts as diverged when an epoch's mean training loss exceeds this factor times the
    # first epoch's (a non-finite loss always does); 0 turns this check off.
    divergence_factor: float = 1000.0
    # torch.compile the rule's step (eager when it does not compile; see fa_rules.core.compiled)
    compile: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "configuration") -> "TrainConfig":
        """A checked configuration from plain data (e.g. a parsed `config.json`); unknown keys are
        ignored, missing ones take their defaults. A bad value is a `UserError` naming `where`."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: expected a table of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names})
        check_config(config, where)
        return config


def read_config(path: Path) -> TrainConfig:
    """A run's `config.json`, checked: a file that is not JSON or holds a bad value is one line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"{path} is not a readable JSON run configuration ({reason})") from None
    return TrainConfig.from_dict(data, str(path))


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
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_plain(v: Any) -> bool:
    return isinstance(v, (bool, str)) or _is_number(v)


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


# field -> (what its value must be, the test); message: "--lr must be a finite number > 0, got -1"
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rule": ("a name", _is_name),
    "dataset": ("a name", _is_name),
    "model": ("a name", _is_name),
    "latent_dim": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "epochs": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "eval_batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "eval_every": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "lr": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
    "optimizer": (" or ".join(OPTIMIZERS), lambda v: isinstance(v, str) and v in OPTIMIZERS),
    "momentum": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "weight_decay": ("a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    "lr_schedule": (" or ".join(LR_SCHEDULES), lambda v: isinstance(v, str) and v in LR_SCHEDULES),
    "seed": (f"an integer in 0..{MAX_SEED}", lambda v: _is_int(v) and 0 <= v <= MAX_SEED),
    "device": ("auto, cpu, cuda or cuda:N", _is_device),
    "data_dir": ("a path or nothing", lambda v: v is None or isinstance(v, str)),
    "divergence_factor": ("a finite number >= 0 (0: off)", lambda v: _is_number(v) and v >= 0),
    "compile": ("true or false", lambda v: isinstance(v, bool)),
}
# fields that map names to values: (what each value must be, the test)
_TABLES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rule_options": ("true/false, a finite number or a string", _is_plain),
    "model_options": ("true/false, a finite number or a string", _is_plain),
    "group_lr": ("a finite number > 0", lambda v: _is_number(v) and v > 0),
}
# how the command line spells a field, where that is not --field-name (eval_batch_size has no flag)
_FLAGS = {"eval_batch_size": "eval_batch_size"}
_TABLE_FLAGS = {"rule_options": "--opt {key}", "model_options": "--{key}", "group_lr": "--group-lr {key}"}


def _show(v: Any) -> str:
    if isinstance(v, float):
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text  # -1, not -1.0: as the user typed it
    return repr(v) if isinstance(v, str) else str(v)


def check_config(config: TrainConfig, where: str | None = None) -> None:
    """Check every field of `config` (type, range, finiteness); raise a one-line `UserError` naming
    the first bad one. Fields are spelled as command-line flags (`--lr`) when `where` is None, else
    as `where: lr` (a config.json, a suite cell). Names are looked up in the registry later."""

    def name(field_name: str, key: str | None = None) -> str:
        if where is not None:
            return f"{where}: {field_name}" + (f".{key}" if key is not None else "")
        if key is not None:
            return _TABLE_FLAGS[field_name].format(key=key)
        return _FLAGS.get(field_name, "--" + field_name.replace("_", "-"))

    for field_name, (must, test) in _FIELDS.items():
        value = getattr(config, field_name)
        if not test(value):
            raise UserError(f"{name(field_name)} must be {must}, got {_show(value)}")
    for field_name, (must, test) in _TABLES.items():
        table = getattr(config, field_name)
        if not isinstance(table, dict) or not all(isinstance(k, str) and k for k in table):
            raise UserError(f"{name(field_name)} must map names to values, got {_show(table)}")
        for key, value in table.items():
            if not test(value):
                raise UserError(f"{name(field_name, key)} must be {must}, got {_show(value)}")
