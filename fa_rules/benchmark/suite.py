"""Suites: parse and check a TOML suite (or the flags of `fa-rules benchmark`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import math

from fa_rules.core.errors import UserError
from fa_rules.core.config import MAX_BATCH, MAX_SEED, Range, TrainConfig, kind_mismatch, show, value_problem

RESULTS_JSON, RESULTS_CSV, REPORT_MD, SUITE_JSON = "results.json", "results.csv", "report.md", "suite.json"
RUNS_DIR, ROW_FILE, CELL_FILE, MACHINE_JSON = "runs", "row.json", "cell.json", "machine.json"
LOCK_FILE = ".benchmark.lock"  # held (with the pid) by the process running a suite in a directory
# A suite is refused beyond this many cells (rules x seeds x [vary] product), before any list is built.
MAX_CELLS = 10_000

# TrainConfig fields a suite may set in [settings] (rule and seed come from the suite itself)
_SETTING_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"rule", "seed", "rule_options"}
_PER_RULE_KEYS = {"name", "label", "options", "model", "model_options", "group_lr", "latent_dim", "eval_every"}
_TOP_KEYS = {"name", "description", "rules", "seeds", "reference", "settings", "vary", "measure", "anchors", "quick",
             "tune"}
_QUICK_KEYS = {"rules", "seeds", "settings", "vary", "measure", "description", "tune"}
MEASURE_DEFAULTS = {"probe": False, "fid": True, "fid_samples": 10000, "sample_batch": 1, "sample_repeats": 20,
                    "timing": True, "timing_steps": 20}
# the counts' ranges: generous, but a mistyped count must not make a measurement run for days
MEASURE_RANGES = {"fid_samples": Range(1, 1_000_000), "sample_batch": Range(1, MAX_BATCH),
                  "sample_repeats": Range(1, 10_000), "timing_steps": Range(1, 10_000)}
_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")

# row metrics that aggregate as mean +- std over seeds, in report order
METRICS = (
    "test_accuracy", "test_error", "test_loss", "test_recon_mse", "fid", "probe_accuracy",
    "validation_accuracy", "validation_error", "validation_loss",  # cells with validation_fraction in [settings]
    "alignment_angle_deg", "interleaved_step_time_s", "interleaved_step_ratio", "interleaved_step_cpu_s",
    "interleaved_step_wall_s", "step_time_s", "step_time_ratio",
    "peak_saved_bytes", "peak_saved_ratio",
    "peak_cuda_bytes", "peak_cuda_ratio", "params", "params_total", "time_per_sample_s", "train_loss",
    "train_time_s",
)
# metrics a suite may give published anchors for (each has a column in the comparison)
ANCHORABLE = ("test_error", "test_recon_mse", "fid", "probe_accuracy", "alignment_angle_deg", "step_time_s",
              "peak_saved_bytes", "peak_cuda_bytes", "params", "params_total", "time_per_sample_s")
RATIOS = {"interleaved_step_time_s": "interleaved_step_ratio", "step_time_s": "step_time_ratio", "peak_saved_bytes": "peak_saved_ratio", "peak_cuda_bytes": "peak_cuda_ratio"}
_ROW_HEAD = ("rule", "rule_name", "seed")
_ROW_TAIL = ("status", "error", "notes", "task", "dataset", "model", "epochs", *METRICS,
             "alignment_angle_per_block_deg", "run_dir")


@dataclass(frozen=True)
class RuleEntry:
    """One rule of a suite: registered name, unique label, rule options and per-rule settings."""

    name: str
    label: str
    options: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # model, model_options, group_lr, latent_dim, eval_every
    tuning: dict = field(default_factory=dict)  # a tuned suite's final cells: how the settings were found


@dataclass
class Suite:
    name: str
    rules: list[RuleEntry]
    seeds: list[int]
    settings: dict
    vary: dict[str, list] = field(default_factory=dict)
    reference: str | None = "backprop"
    measure: dict = field(default_factory=lambda: dict(MEASURE_DEFAULTS))
    anchors: dict[str, dict] = field(default_factory=dict)  # metric -> {"source": str, "values": {label: v}}
    description: str = ""
    source: str | None = None  # the suite file, if any
    quick: bool = False
    tune: dict = field(default_factory=dict)  # the [tune] table, checked (`_tune`); {}: no tuning

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _err(where: str, message: str) -> UserError:
    return UserError(f"{where}: {message}")


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UserError("reading suite files needs python >= 3.11 or the 'tomli' package") from None
    text = _read_suite_text(path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _err(str(path), f"not valid TOML ({e}); fix the file at that place") from None
    except RecursionError:  # the parser recurses once per level of [ or {
        raise _err(str(path), "not a suite: its arrays or tables are nested too deeply for the TOML reader "
                              "(a suite nests a few levels)") from None


MAX_SUITE_BYTES = 1 << 20  # a suite is a few kilobytes; more is not a suite file


def _read_suite_text(path: Path) -> str:
    """The text of the suite file `path`. Only a regular file is read, and at most MAX_SUITE_BYTES of
    it: a FIFO would wait for a writer forever and /dev/zero never ends. It is opened without
    blocking and checked through the open descriptor, so what is read is what was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"suite file {path} does not exist") from None
    except OSError as e:  # no permission, a name too long, a link loop
        raise _err(str(path), f"cannot read the suite file: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            hint = (" (a benchmark's output; rerun it with its suite file and --out)"
                    if (path / SUITE_JSON).is_file() else "")
            raise UserError(f"{path} is a directory{hint}; give a suite file (TOML), e.g. "
                            "benchmarks/fashion_mnist_mlp.toml")
        if not stat.S_ISREG(mode):
            raise _err(str(path), "not a regular file (a pipe, a device or a socket); give a suite file (TOML), "
                                  "e.g. benchmarks/fashion_mnist_mlp.toml")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_SUITE_BYTES + 1)
    except OSError as e:
        raise _err(str(path), f"cannot read the suite file: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SUITE_BYTES:
        raise _err(str(path), f"more than {MAX_SUITE_BYTES >> 20} MiB, too large for a suite file (a suite is a "
                              "few kilobytes of TOML)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(str(path), f"not a text file (byte {e.start} is not UTF-8); a suite file is TOML text") from None


def _merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, tables recursively."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _seeds(value, where: str) -> list[int]:
    if isinstance(value, bool):
        raise _err(where, "seeds must be a count or a list of integers")
    if isinstance(value, int):
        if value < 1:
            raise _err(where, f"seeds must be >= 1, got {value}")
        if value > MAX_CELLS:  # checked before range() is listed: `seeds = 1000000000` must not allocate
            raise _err(where, f"seeds = {value} is more than the {MAX_CELLS} cells a suite may have")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        bad = [s for s in value if not 0 <= s <= MAX_SEED]
        if bad:
            raise _err(where, f"seed {bad[0]} is out of range (seeds are integers 0..2**63-1)")
        if len(set(value)) != len(value):
            raise _err(where, f"seeds repeat: {value}")
        return list(value)
    raise _err(where, f"seeds must be a count or a non-empty list of integers, got {value!r}")


def cell_count(suite: "Suite") -> int:
    """Cells of `suite` (rules x seeds x every [vary] combination), computed without listing them."""
    return len(suite.rules) * len(suite.seeds) * math.prod(len(v) for v in suite.vary.values())


def check_size(suite: "Suite", where: str | None = None) -> None:
    n = cell_count(suite)
    if n > MAX_CELLS:
        sizes = " x ".join([f"{len(suite.rules)} rule(s)", f"{len(suite.seeds)} seed(s)",
                            *(f"{len(v)} values of {k}" for k, v in suite.vary.items())])
        raise _err(where or suite.source or "suite", f"{sizes} is {n} cells, more than the {MAX_CELLS} a suite may have")


def _rule_entries(value, where: str) -> list[RuleEntry]:
    if not isinstance(value, list) or not value:
        raise _err(where, "'rules' must be a non-empty list of rule names or tables")
    entries = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise _err(where, f"a rule must be a name or a table with 'name', got {item!r}")
        unknown = set(item) - _PER_RULE_KEYS
        if unknown:
            key = sorted(unknown)[0]
            why = (" (optimiser settings are shared by every rule; set it in [settings])"
                   if key in _SETTING_FIELDS else "")
            raise _err(where, f"rule '{item['name']}' has unknown key '{key}'{why}; "
                              f"allowed: {', '.join(sorted(_PER_RULE_KEYS))}")
        label = item.get("label", item["name"])
        if not isinstance(label, str) or not _LABEL.match(label):
            raise _err(where, f"rule label {label!r} must be letters, digits and _ . + - only")
        for key in ("options", "model_options", "group_lr"):
            if key in item and not isinstance(item[key], dict):
                raise _err(where, f"rule '{label}': '{key}' must be a table")
        if "model" in item.get("group_lr", {}):
            raise _err(where, f"rule '{label}': group_lr may not set the 'model' group (shared by every rule)")
        overrides = {k: item[k] for k in ("model", "model_options", "group_lr", "latent_dim", "eval_every") if k in item}
        entries.append(RuleEntry(item["name"], label, dict(item.get("options", {})), overrides))
    labels = [e.label for e in entries]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise _err(where, f"rule label '{dup[0]}' appears twice; give one of them a distinct 'label'")
    return entries


def _model_options(model: str, where: str) -> dict:
    from fa_rules.plugins.manager import get_registry

    try:
        return get_registry().model(model).options
    except UserError as e:  # an unknown model: say which file names it
        raise _err(where, str(e)) from None


def _check_type(key: str, value, where: str) -> None:
    default = getattr(TrainConfig(), key)
    if default is None:  # data_dir
        must_be = None if value is None or isinstance(value, str) else "a string"
    else:
        must_be = kind_mismatch(default, value)
    if must_be:
        raise _err(where, f"setting '{key}' must be {must_be}, got {value!r}")


def _split_settings(raw: dict, where: str) -> dict:
    """[settings] -> TrainConfig keyword arguments; keys that are no field must be model options."""
    if not isinstance(raw, dict):
        raise _err(where, "[settings] must be a table")
    settings = {k: v for k, v in raw.items() if k in _SETTING_FIELDS}
    for k, v in settings.items():
        _check_type(k, v, where)
    extra = {k: v for k, v in raw.items() if k not in _SETTING_FIELDS}
    model = settings.get("model", TrainConfig().model)
    known = _model_options(model, where)
    for k in extra:
        if k not in known:
            raise _err(where, f"unknown setting '{k}' (neither a training setting nor an option of model "
                              f"'{model}': {', '.join(sorted(known)) or 'none'})")
    if extra:
        settings["model_options"] = {**settings.get("model_options", {}), **extra}
    return settings


def _vary(raw: dict, settings: dict, where: str) -> dict[str, list]:
    if not isinstance(raw, dict):
        raise _err(where, "[vary] must be a table of lists")
    model = settings.get("model", TrainConfig().model)
    known = _model_options(model, where)
    out = {}
    for k, values in raw.items():
        if not isinstance(values, list) or not values:
            raise _err(where, f"[vary] {k} must be a non-empty list")
        if k in _SETTING_FIELDS and k not in ("model_options", "group_lr"):
            for v in values:
                _check_type(k, v, where)
        elif k not in known:
            raise _err(where, f"[vary] '{k}' is neither a training setting nor an option of model '{model}'")
        if len(set(map(repr, values))) != len(values):
            raise _err(where, f"[vary] {k} repeats a value: {values}")
        out[k] = list(values)
    return out


def _anchors(raw: dict, labels: list[str], where: str) -> dict[str, dict]:
    if not isinstance(raw, dict):
        raise _err(where, "[anchors] must hold tables [anchors.<metric>]")
    out = {}
    for metric, table in raw.items():
        if metric not in ANCHORABLE:
            raise _err(where, f"[anchors.{metric}]: unknown metric (use one of {', '.join(ANCHORABLE)})")
        if not isinstance(table, dict):
            raise _err(where, f"[anchors.{metric}] must be a table of label = value")
        values = {}
        for label, v in table.items():
            if label in ("source", "note"):
                continue
            if label not in labels:
                raise _err(where, f"[anchors.{metric}] names '{label}', which is no rule label of the suite")
            must = value_problem(0.0, v)
            if must:
                raise _err(where, f"[anchors.{metric}] {label} must be {must}, got {show(v)}")
            values[label] = float(v)
        out[metric] = {"source": str(table.get("source", "")), "note": str(table.get("note", "")), "values": values}
    return out


def _measure(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise _err(where, "[measure] must be a table")
    out = dict(MEASURE_DEFAULTS)
    for k, v in raw.items():
        if k not in MEASURE_DEFAULTS:
            raise _err(where, f"[measure] has no setting '{k}' (known: {', '.join(MEASURE_DEFAULTS)})")
        must = value_problem(MEASURE_DEFAULTS[k], v, MEASURE_RANGES.get(k))
        if must:
            default = json.dumps(MEASURE_DEFAULTS[k])  # as TOML writes it: true, 20
            raise _err(where, f"[measure] {k} must be {must}, got {show(v)}; e.g. {k} = {default}")
        out[k] = v
    return out


# [tune]: what a suite may say about tuning, and its defaults (see fa_rules.benchmark.tune)
TUNE_METRICS = {"validation_error": "minimize", "validation_loss": "minimize", "validation_accuracy": "maximize"}
TUNE_DEFAULTS = {"trials": 20, "epochs": None, "metric": "validation_error", "validation_fraction": 0.1,
                 "validation_seed": 0, "sampler_seed": 0, "pruner": "median", "untuned": True}
_TUNE_RANGES = {"trials": Range(1, 10_000), "epochs": Range(1, 1_000_000),
                "validation_fraction": Range(0, 1, low_open=True, high_open=True),
                "validation_seed": Range(0, MAX_SEED), "sampler_seed": Range(0, 2**32 - 1),
                "metric": tuple(TUNE_METRICS), "pruner": ("median", "none")}
_TUNE_EXAMPLES = {"trials": 12, "epochs": 3, "metric": "validation_error", "validation_fraction": 0.1,
                  "validation_seed": 0, "sampler_seed": 0, "pruner": "median", "untuned": True}
# training settings a search space may hold (the others fix what a cell is, or how it is run)
TUNABLE_FIELDS = ("lr", "weight_decay", "momentum", "batch_size", "optimizer", "lr_schedule", "latent_dim")
# prefixes of the other search-space keys: `options.decay`, `group_lr.feedback`, `model_options.width`
TUNABLE_TABLES = ("options", "group_lr", "model_options")
_SPEC_KEYS = {"low", "high", "log", "step", "choices"}


def _tune(raw, suite: "Suite", where: str) -> dict:
    """[tune] -> its settings over TUNE_DEFAULTS and `space`: {rule label: {key: distribution}}, the
    shared space ([tune.space]'s own keys) for each rule without a table of its own. A distribution
    is {low, high[, log][, step]} (integers when low and high are) or {choices}. What a key names is
    checked here against the rule's options and the training settings; group names need the rule
    built on its network (`fa_rules.benchmark.tune.check_tune`, before anything runs)."""
    if not isinstance(raw, dict):
        raise _err(where, "[tune] must be a table")
    if suite.vary:
        raise _err(where, "[tune] and [vary] together are not supported: tuning picks one setting per rule")
    out = dict(TUNE_DEFAULTS)
    for key, value in raw.items():
        if key == "space":
            continue
        if key not in TUNE_DEFAULTS:
            raise _err(where, f"[tune] has no setting '{key}' (known: {', '.join([*TUNE_DEFAULTS, 'space'])})")
        default = TUNE_DEFAULTS[key] if TUNE_DEFAULTS[key] is not None else 1
        must = value_problem(default, value, _TUNE_RANGES.get(key))
        if must:
            raise _err(where, f"[tune] {key} must be {must}, got {show(value)}; e.g. {key} = "
                              f"{json.dumps(_TUNE_EXAMPLES[key])}")
        out[key] = value
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise _err(where, "[tune] needs a [tune.space] table, e.g. lr = { low = 1e-4, high = 1e-2, log = true }")
    labels = [e.label for e in suite.rules]
    shared = {k: v for k, v in space.items() if k not in labels}
    out["space"] = {}
    for entry in suite.rules:
        own = space.get(entry.label)
        if own is not None and not isinstance(own, dict):
            raise _err(where, f"[tune.space.{entry.label}] must be a table of distributions")
        table = own if own is not None else shared
        if not table:
            raise _err(where, f"[tune.space] gives rule '{entry.label}' nothing to tune; add keys to [tune.space] "
                              f"or a table [tune.space.{entry.label}]")
        out["space"][entry.label] = {k: _distribution(k, v, entry, f"{where}: [tune.space"
                                                      f"{'.' + entry.label if own is not None else ''}] {k}")
                                     for k, v in table.items()}
    return out


def _distribution(key: str, spec, entry: RuleEntry, where: str) -> dict:
    """One search-space entry, checked: what it names and the values it may take."""
    from fa_rules.plugins.manager import get_registry

    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a distribution, e.g. {{ low = 1e-4, high = 1e-2, log = true }} or "
                        f"{{ choices = [...] }} (or is '{key}' a rule label? rule labels: {entry.label}, ...)")
    table, _, name = key.partition(".")
    if name and table in TUNABLE_TABLES:
        if table == "options":
            options = get_registry().rule(entry.name).options
            if name not in options:
                raise UserError(f"{where}: rule '{entry.label}' ({entry.name}) has no option '{name}' "
                                f"(options: {', '.join(sorted(options)) or 'none'})")
        elif table == "group_lr" and name == "model":
            raise UserError(f"{where}: the 'model' group's rate is 'lr'; group_lr names the rule's own groups")
    elif key not in TUNABLE_FIELDS:
        raise UserError(f"{where}: unknown key; tune a training setting ({', '.join(TUNABLE_FIELDS)}) or "
                        f"options.NAME, group_lr.GROUP, model_options.NAME")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise UserError(f"{where} has unknown key '{sorted(unknown)[0]}' (a distribution has low, high, log, step, "
                        "or choices)")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise UserError(f"{where}: choices take no low, high, log or step")
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, (str, bool, int, float)) for c in choices):
            raise UserError(f"{where}: choices must be a non-empty list of strings, numbers or booleans")
        if len(set(map(repr, choices))) != len(choices):
            raise UserError(f"{where}: choices repeat a value: {choices}")
        return {"choices": list(choices)}
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where} needs low and high (or choices)")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name_, v in (("low", low), ("high", high)):
        if value_problem(0.0, v):
            raise UserError(f"{where}: {name_} must be a finite number, got {show(v)}")
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {show(log)}")
    if not low < high:
        raise UserError(f"{where}: low must be below high, got low = {show(low)}, high = {show(high)}")
    if log and low <= 0:
        raise UserError(f"{where}: a log distribution needs low > 0, got {show(low)}")
    if step is not None and (value_problem(0.0, step) or step <= 0 or log):
        raise UserError(f"{where}: step must be a positive number, and not with log = true")
    integer = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) and \
        (step is None or isinstance(step, int))
    return {"low": low, "high": high, "log": log, "step": step, "integer": integer}


def suite_from_dict(data: dict, where: str = "suite", quick: bool = False, default_name: str = "suite",
                    check_other_form: bool = True) -> Suite:
    """Validate a parsed suite (see the module docstring); every mistake is one UserError line. A
    suite with a [quick] table is checked in both forms, with and without it (`_check_other_form`)."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _err(where, f"unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(_TOP_KEYS))})")
    quick_part = data.get("quick", {})
    if not isinstance(quick_part, dict) or set(quick_part) - _QUICK_KEYS:
        raise _err(where, f"[quick] may only hold {', '.join(sorted(_QUICK_KEYS))}")
    original = data
    if quick:
        data = _merge({k: v for k, v in data.items() if k != "quick"}, quick_part)
    if "rules" not in data:
        raise _err(where, "no 'rules' given")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not _LABEL.match(name):
        raise _err(where, f"suite name {name!r} must be letters, digits and _ . + - only")
    rules = _rule_entries(data["rules"], where)
    settings = _split_settings(data.get("settings", {}), where)
    labels = [e.label for e in rules]
    reference = data.get("reference", "backprop")
    if not isinstance(reference, str):
        raise _err(where, "reference must be a rule label")
    if reference not in labels:
        if "reference" in data:
            raise _err(where, f"reference '{reference}' is no rule label of the suite ({', '.join(labels)})")
        reference = None  # no backprop in the suite: ratios stay empty
    suite = Suite(
        name=name + ("-quick" if quick else ""),
        rules=rules,
        seeds=_seeds(data.get("seeds", 1), where),
        settings=settings,
        vary=_vary(data.get("vary", {}), settings, where),
        reference=reference,
        measure=_measure(data.get("measure", {}), where),
        anchors=_anchors(data.get("anchors", {}), labels, where),
        description=str(data.get("description", "")).strip(),
        quick=quick,
    )
    if "tune" in data:
        suite.tune = _tune(data["tune"], suite, where)
    check_size(suite, where)
    if check_other_form and quick_part:
        _check_other_form(original, where, not quick, default_name)
    return suite


def _check_other_form(data: dict, where: str, quick: bool, default_name: str) -> None:
    """Check the form of a suite that is not run now (its [quick] form without --quick, its full
    form with it) as far as that needs no data and no machine: every cell's settings, names and
    options. A mistake in either table is found on the first run, not on the run that needs it."""
    from fa_rules.benchmark.cells import check_cell_settings, plan_cells

    where = f"{where} ({'with' if quick else 'without'} --quick)"
    other = suite_from_dict(data, where, quick=quick, default_name=default_name, check_other_form=False)
    other.source = where
    check_cell_settings(plan_cells(other), where)


def safe_name(text: str) -> str:
    """`text` with every character a suite name or label may not hold replaced by `_`."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def load_suite(path: Path, quick: bool = False) -> Suite:
    path = Path(path)
    suite = suite_from_dict(_read_toml(path), str(path), quick=quick, default_name=path.stem)
    suite.source = path.as_posix()
    return suite


def select_rules(suite: Suite, labels: list[str]) -> Suite:
    """The suite restricted to some of its rule labels (in the suite's order)."""
    known = [e.label for e in suite.rules]
    for lab in labels:
        if lab not in known:
            raise UserError(f"--rules names '{lab}', which is not in suite '{suite.name}' ({', '.join(known)})")
    suite = copy.deepcopy(suite)
    suite.rules = [e for e in suite.rules if e.label in labels]
    if suite.reference not in labels:
        suite.reference = None
    suite.anchors = {m: {**a, "values": {k: v for k, v in a["values"].items() if k in labels}}
                     for m, a in suite.anchors.items()}
    return suite


def override_settings(suite: Suite, settings: dict, seeds: list[int] | None = None) -> Suite:
    """Command-line settings (flat: training settings and model options) over a suite's."""
    suite = copy.deepcopy(suite)
    flat = {k: v for k, v in suite.settings.items() if k != "model_options"}
    flat.update(suite.settings.get("model_options", {}))
    flat.update(settings)
    suite.settings = _split_settings(flat, "command line")
    if seeds is not None:
        suite.seeds = _seeds(seeds, "command line")
        check_size(suite, "command line")
    return suite
