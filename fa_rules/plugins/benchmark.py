"""Comparative benchmarks: run many rules on identical settings, collect one row per cell, report.

A *suite* (a TOML file, or the flags of `fa-rules benchmark`) names rules, shared training
settings, seeds and optionally settings to vary. Each *cell* is one (rule, seed, varied settings)
combination and trains in its own run directory `DIR/runs/<cell>/` through
`experiment.new_trainer`, so every rule of a seed starts from the same initial weights, sees the
same data order and meets the same optimiser (`TrainConfig.seed` fixes all three).

Suite format (every key but `rules` is optional):

    name = "fashion_mnist_lenet"          # default: the file name
    description = "one paragraph for the report"
    rules = ["backprop", "feedback_alignment",           # a name, or a table:
             { name = "dtp", label = "dtp_noise", options = { noise = 0.1 } }]
    seeds = 3                              # 3 means [0, 1, 2]; or a list [0, 5, 7]
    reference = "backprop"                 # label the ratios are taken against (default backprop)

    [settings]                             # TrainConfig fields shared by every cell
    dataset = "fashion_mnist"
    model = "mlp"
    depth = 5                              # a key that is no TrainConfig field is a model option
    epochs = 10

    [vary]                                 # optional grid: every combination is a cell
    depth = [4, 8, 16]

    [measure]                              # optional extra measurements
    probe = false                          # linear-probe accuracy on the trained features
    fid = true                             # FID of generative rules (default: true)
    fid_samples = 10000
    sample_batch = 1                       # time per sample: batches of this size ...
    sample_repeats = 20                    # ... timed this often (median)

    [anchors.test_error]                   # published numbers shown beside ours
    source = "where the numbers come from"
    backprop = 0.092                       # label = value, in the units of our metric

    [quick]                                # a partial suite merged over this one by --quick
    seeds = 1
    [quick.settings]
    epochs = 1

A rule table may hold `name`, `label` (unique; default the name), `options` (rule options) and
the per-rule settings `model`, `model_options`, `group_lr` (groups the rule owns, never `model`) and
`latent_dim`; the report lists such overrides. Optimiser settings of the model are never per rule.

Outputs in DIR, rewritten atomically after every cell: `results.json` (a list of rows, one per
rule and seed and varied setting), `results.csv`, `report.md`; the plots at the end (and on
Ctrl-C); `suite.json` (the resolved suite) and `machine.json` (the machines and dates that trained
cells, which the report names). A cell whose rule fails or diverges gets a row with `status` and `error`, and the suite
goes on. Rerunning the same command skips finished cells (`row.json` in the cell directory),
continues an interrupted cell from its last epoch checkpoint and retries failed ones.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import io
import itertools
import json
import math
import os
import platform
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fa_rules.core.checkpoint import atomic_write_text, write_json
from fa_rules.core.errors import UserError
from fa_rules.core.trainer import CONFIG_FILE, METRICS_FILE, Diverged, TrainConfig

RESULTS_JSON, RESULTS_CSV, REPORT_MD, SUITE_JSON = "results.json", "results.csv", "report.md", "suite.json"
RUNS_DIR, ROW_FILE, CELL_FILE, MACHINE_JSON = "runs", "row.json", "cell.json", "machine.json"

# TrainConfig fields a suite may set in [settings] (rule and seed come from the suite itself)
_SETTING_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"rule", "seed", "rule_options"}
_PER_RULE_KEYS = {"name", "label", "options", "model", "model_options", "group_lr", "latent_dim"}
_TOP_KEYS = {"name", "description", "rules", "seeds", "reference", "settings", "vary", "measure", "anchors", "quick"}
_QUICK_KEYS = {"rules", "seeds", "settings", "vary", "measure", "description"}
MEASURE_DEFAULTS = {"probe": False, "fid": True, "fid_samples": 10000, "sample_batch": 1, "sample_repeats": 20}
_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")

# row metrics that aggregate as mean +- std over seeds, in report order
METRICS = (
    "test_accuracy", "test_error", "test_loss", "test_recon_mse", "fid", "probe_accuracy",
    "alignment_angle_deg", "step_time_s", "step_time_ratio", "peak_saved_bytes", "peak_saved_ratio",
    "peak_cuda_bytes", "peak_cuda_ratio", "params", "params_total", "time_per_sample_s", "train_loss",
    "train_time_s",
)
# metrics a suite may give published anchors for (each has a column in the comparison)
ANCHORABLE = ("test_error", "test_recon_mse", "fid", "probe_accuracy", "alignment_angle_deg", "step_time_s",
              "peak_saved_bytes", "peak_cuda_bytes", "params", "params_total", "time_per_sample_s")
RATIOS = {"step_time_s": "step_time_ratio", "peak_saved_bytes": "peak_saved_ratio", "peak_cuda_bytes": "peak_cuda_ratio"}
_ROW_HEAD = ("rule", "rule_name", "seed")
_ROW_TAIL = ("status", "error", "notes", "task", "dataset", "model", "epochs", *METRICS,
             "alignment_angle_per_block_deg", "run_dir")


# -- suites --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleEntry:
    """One rule of a suite: registered name, unique label, rule options and per-rule settings."""

    name: str
    label: str
    options: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)  # model, model_options, group_lr, latent_dim


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
    if not path.is_file():
        raise UserError(f"suite file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise _err(str(path), f"not valid TOML ({e})") from None


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
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if len(set(value)) != len(value):
            raise _err(where, f"seeds repeat: {value}")
        return list(value)
    raise _err(where, f"seeds must be a count or a non-empty list of integers, got {value!r}")


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
        overrides = {k: item[k] for k in ("model", "model_options", "group_lr", "latent_dim") if k in item}
        entries.append(RuleEntry(item["name"], label, dict(item.get("options", {})), overrides))
    labels = [e.label for e in entries]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise _err(where, f"rule label '{dup[0]}' appears twice; give one of them a distinct 'label'")
    return entries


def _model_options(model: str) -> dict:
    from fa_rules.plugins.manager import get_registry

    return get_registry().model(model).options


def _check_type(key: str, value, where: str) -> None:
    default = getattr(TrainConfig(), key)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }
    if default is None:  # data_dir
        good = value is None or isinstance(value, str)
        kind = "a string"
    else:
        good = ok[type(default)](value)
        kind = {int: "an integer", float: "a number", str: "a string", dict: "a table", bool: "true or false"}[type(default)]
    if not good:
        raise _err(where, f"setting '{key}' must be {kind}, got {value!r}")


def _split_settings(raw: dict, where: str) -> dict:
    """[settings] -> TrainConfig keyword arguments; keys that are no field must be model options."""
    if not isinstance(raw, dict):
        raise _err(where, "[settings] must be a table")
    settings = {k: v for k, v in raw.items() if k in _SETTING_FIELDS}
    for k, v in settings.items():
        _check_type(k, v, where)
    extra = {k: v for k, v in raw.items() if k not in _SETTING_FIELDS}
    model = settings.get("model", TrainConfig().model)
    known = _model_options(model)
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
    known = _model_options(model)
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
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise _err(where, f"[anchors.{metric}] {label} must be a number, got {v!r}")
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
        if type(v) is not type(MEASURE_DEFAULTS[k]) or (isinstance(v, int) and not isinstance(v, bool) and v < 1):
            raise _err(where, f"[measure] {k} must be like {MEASURE_DEFAULTS[k]!r}, got {v!r}")
        out[k] = v
    return out


def suite_from_dict(data: dict, where: str = "suite", quick: bool = False, default_name: str = "suite") -> Suite:
    """Validate a parsed suite (see the module docstring); every mistake is one UserError line."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _err(where, f"unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(_TOP_KEYS))})")
    quick_part = data.get("quick", {})
    if not isinstance(quick_part, dict) or set(quick_part) - _QUICK_KEYS:
        raise _err(where, f"[quick] may only hold {', '.join(sorted(_QUICK_KEYS))}")
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
    return Suite(
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
    return suite


# -- cells ---------------------------------------------------------------------------------------
@dataclass
class Cell:
    entry: RuleEntry
    seed: int
    point: dict  # the varied settings of this cell
    config: TrainConfig

    @property
    def dirname(self) -> str:
        parts = [self.entry.label] + [f"{k}{_slug(v)}" for k, v in self.point.items()] + [f"seed{self.seed}"]
        return "-".join(parts)


def _slug(v) -> str:
    return re.sub(r"[^A-Za-z0-9_.+]", "_", str(v))


def plan_cells(suite: Suite) -> list[Cell]:
    """Every (varied settings, seed, rule) combination; the reference rule first in each group."""
    rules = sorted(suite.rules, key=lambda e: e.label != suite.reference)
    keys = list(suite.vary)
    cells = []
    for values in itertools.product(*(suite.vary[k] for k in keys)):
        point = dict(zip(keys, values))
        for seed in suite.seeds:
            for entry in rules:
                settings = copy.deepcopy(suite.settings)
                model_options = settings.pop("model_options", {})
                config = TrainConfig(rule=entry.name, rule_options=dict(entry.options), seed=seed,
                                     model_options=dict(model_options), **settings)
                for k, v in entry.overrides.items():
                    if k == "model_options":
                        config.model_options.update(v)
                    elif k == "group_lr":
                        config.group_lr = {**config.group_lr, **v}
                    else:
                        setattr(config, k, v)
                for k, v in point.items():
                    if k in _SETTING_FIELDS:
                        setattr(config, k, v)
                    else:
                        config.model_options[k] = v
                cells.append(Cell(entry, seed, point, config))
    return cells


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(e, (UserError, Diverged)) else f"{type(e).__name__}: {msg}".rstrip(": ")


def _base_row(cell: Cell, run_dir: Path, root: Path) -> dict:
    row = {"rule": cell.entry.label, "rule_name": cell.entry.name, "seed": cell.seed, **cell.point,
           "status": None, "error": None, "notes": None, "dataset": cell.config.dataset,
           "model": cell.config.model, "epochs": cell.config.epochs}
    row["run_dir"] = run_dir.relative_to(root).as_posix() if run_dir.is_relative_to(root) else str(run_dir)
    return row


def _from_summary(summary: dict) -> dict:
    out = {k: summary.get(k) for k in ("task", "test_accuracy", "test_loss", "test_recon_mse", "fid",
                                        "probe_accuracy", "step_time_s", "peak_saved_bytes", "peak_cuda_bytes",
                                        "params", "epochs")}
    out["model"] = summary.get("model")
    if out["test_accuracy"] is not None:
        out["test_error"] = 1.0 - out["test_accuracy"]
    out["params_total"] = sum(summary.get("params_by_group", {}).values()) or summary.get("params")
    angles = summary.get("alignment_angle_deg")
    if angles:
        out["alignment_angle_per_block_deg"] = list(angles)
        out["alignment_angle_deg"] = statistics.fmean(angles)
    out["train_loss"] = summary.get("train_loss")
    return {k: v for k, v in out.items() if v is not None}


def time_per_sample(trainer, batch: int, repeats: int) -> float | None:
    """Median seconds to draw `batch` samples from a generative rule, divided by `batch`."""
    import torch

    rule = trainer.rule
    if rule.sample is None:
        return None
    generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.seed)
    cuda = trainer.device.type == "cuda"
    times = []
    for i in range(repeats + 2):  # two warm-up draws
        if cuda:
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        out = rule.sample(trainer.network, trainer.params, trainer.state, batch, generator)
        if cuda:
            torch.cuda.synchronize(trainer.device)
        if i >= 2:
            times.append(time.perf_counter() - start)
        del out
    return statistics.median(times) / batch


_REAL_FEATURES: dict[tuple, Any] = {}  # Inception features of real images, shared by the cells of a process


def measure_fid(trainer, num_samples: int, batch: int = 100) -> float:
    """FID between `num_samples` samples of a generative rule and as many test images (the first
    ones; fewer if the split is smaller), with `fa_rules.core.fid`'s Inception network."""
    import torch

    from fa_rules.core.data import as_float
    from fa_rules.core.fid import frechet_distance, inception_features, load_inception

    model = load_inception(device=trainer.device)
    real_x = trainer.data.test_x[:num_samples]
    n = real_x.shape[0]
    key = (trainer.config.dataset, n, str(trainer.device))
    if key not in _REAL_FEATURES:
        _REAL_FEATURES[key] = inception_features((as_float(real_x[i : i + batch]) for i in range(0, n, batch)), model)
    generator = torch.Generator(device=trainer.device).manual_seed(trainer.config.seed)

    def samples():
        for i in range(0, n, batch):
            k = min(batch, n - i)
            yield trainer.rule.sample(trainer.network, trainer.params, trainer.state, k, generator).detach()

    return frechet_distance(inception_features(samples(), model), _REAL_FEATURES[key])


def measure_probe(trainer) -> float:
    """Linear-probe test accuracy on the trained model's latent (`fa_rules.core.probe`)."""
    from fa_rules.core.probe import linear_probe

    return linear_probe(trainer.network, trainer.params["model"], trainer.data).probe_accuracy


def _extras(trainer, run_dir: Path, measure: dict, row: dict) -> None:
    """Measurements beyond the trainer's summary; a failing one leaves a note, not a failed cell."""
    notes = []

    def attempt(what, fn):
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except ImportError as e:
            notes.append(f"{what}: not available in this installation ({e.name or e})")
        except Exception as e:
            notes.append(f"{what}: {_first_line(e)}")
        return None

    generative = trainer.rule.sample is not None
    if generative:
        row["time_per_sample_s"] = attempt(
            "time per sample", lambda: time_per_sample(trainer, measure["sample_batch"], measure["sample_repeats"]))
    if measure["fid"] and generative and row.get("fid") is None:
        row["fid"] = attempt("fid", lambda: measure_fid(trainer, measure["fid_samples"]))
    if measure["probe"] and row.get("probe_accuracy") is None:
        row["probe_accuracy"] = attempt("probe", lambda: measure_probe(trainer))
    for key in ("time_per_sample_s", "fid", "probe_accuracy"):
        if row.get(key) is None:
            row.pop(key, None)
    row["notes"] = "; ".join(notes) or None


def run_cell(cell: Cell, run_dir: Path, root: Path, measure: dict, on_epoch: Callable | None = None) -> dict:
    """Train one cell (or continue its interrupted run) and return its row; never raises for a rule's
    failure or divergence (the row says why). KeyboardInterrupt passes through."""
    from fa_rules.plugins.experiment import new_trainer, resume_trainer

    row = _base_row(cell, run_dir, root)
    start = time.perf_counter()
    trainer, earlier = None, 0.0
    try:
        if (run_dir / CONFIG_FILE).is_file():  # interrupted earlier: continue from the last epoch
            trainer = resume_trainer(run_dir, cell.config.epochs, progress=False)
            earlier = sum(h.get("epoch_time_s") or 0.0 for h in trainer.history)  # time spent before
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            trainer = new_trainer(copy.deepcopy(cell.config), run_dir, progress=False)
        if on_epoch is not None:
            save = trainer.save

            def save_and_report():  # the trainer saves once per epoch: report progress there
                save()
                on_epoch(trainer.epoch, trainer.history[-1])

            trainer.save = save_and_report
        summary = trainer.run()
    except KeyboardInterrupt:
        raise
    except Diverged as e:
        row.update(status="diverged", error=_first_line(e))
        if trainer is not None and trainer.history:
            row["train_loss"] = trainer.history[-1].get("train_loss")
    except Exception as e:  # a broken or unknown rule must not stop the suite
        row.update(status="failed", error=_first_line(e))
    else:
        row.update(_from_summary(summary))
        row["status"] = "ok"
        _extras(trainer, run_dir, measure, row)
    row["train_time_s"] = earlier + time.perf_counter() - start
    return row


def check_cell_dir(run_dir: Path, cell: Cell) -> None:
    """A cell directory from an earlier run must hold this cell's settings (else a one-line error)."""
    cell_file = run_dir / CELL_FILE
    if not cell_file.is_file():
        return
    stored = json.loads(cell_file.read_text())
    wanted = cell.config.to_dict()
    for k in sorted(set(stored) | set(wanted)):
        if k != "data_dir" and stored.get(k) != wanted.get(k):
            raise UserError(
                f"{run_dir} was run with {k}={stored.get(k)!r}, this suite asks for {wanted.get(k)!r}; "
                f"use another --out (or delete {run_dir})")


def _load_cell(run_dir: Path, cell: Cell, root: Path) -> dict | None:
    """The finished row of a cell; None if it must run, continue, or be retried after a failure."""
    row_file = run_dir / ROW_FILE
    if not row_file.is_file():
        return None
    row = json.loads(row_file.read_text())
    if row.get("status") == "failed":  # retried: the rule may have been installed or fixed since
        shutil.rmtree(run_dir)
        return None
    row["run_dir"] = run_dir.relative_to(root).as_posix()
    return row


Event = Callable[[str, int, dict], None]  # (kind, cell index, payload)


def run_suite(suite: Suite, out_dir: Path, on_event: Event | None = None, command: str | None = None) -> list[dict]:
    """Run (or finish) every cell of `suite` into `out_dir`; write results, report and plots.

    Events: ("skip", i, row), ("start", i, {}), ("epoch", i, record), ("done", i, row).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(suite)
    write_json(out_dir / SUITE_JSON, {**suite.to_dict(), "cells": len(cells)})
    emit = on_event or (lambda *a: None)
    rows: dict[int, dict] = {}
    recorded = False

    def save_all(plots: bool) -> None:
        ordered = [rows[i] for i in sorted(rows)]
        write_outputs(suite, out_dir, ordered, plots=plots, command=command)

    for cell in cells:  # before anything runs or is rewritten
        check_cell_dir(out_dir / RUNS_DIR / cell.dirname, cell)
    try:
        for i, cell in enumerate(cells):
            run_dir = out_dir / RUNS_DIR / cell.dirname
            row = _load_cell(run_dir, cell, out_dir)
            if row is not None:
                rows[i] = row
                emit("skip", i, row)
                continue
            if not recorded:  # the report names the machine(s) that trained the cells, not the renderer
                record_machine(out_dir)
                recorded = True
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / CELL_FILE, cell.config.to_dict())
            emit("start", i, {})
            row = run_cell(cell, run_dir, out_dir, suite.measure,
                           on_epoch=lambda epoch, record, _i=i: emit("epoch", _i, record))
            write_json(run_dir / ROW_FILE, row)
            rows[i] = row
            emit("done", i, row)
            save_all(plots=False)
    finally:  # also on Ctrl-C: every finished row is kept, plots drawn
        if rows:
            save_all(plots=True)
    return [rows[i] for i in sorted(rows)]


# -- aggregation ---------------------------------------------------------------------------------
def add_ratios(rows: list[dict], reference: str | None, vkeys=()) -> list[dict]:
    """Copies of `rows` with step time and memory divided by the reference row of the same seed and
    varied settings `vkeys` (left out where that row is missing or failed)."""
    if reference is None:
        return [dict(r) for r in rows]

    def context(r):
        return (r["seed"], *(repr(r.get(k)) for k in vkeys))

    refs = {context(r): r for r in rows if r["rule"] == reference and r.get("status") == "ok"}
    out = []
    for r in rows:
        r = dict(r)
        ref = refs.get(context(r))
        for metric, ratio in RATIOS.items():
            a, b = r.get(metric), (ref or {}).get(metric)
            if r.get("status") == "ok" and a is not None and b:
                r[ratio] = a / b
        out.append(r)
    return out


def aggregate(rows: list[dict], vkeys=()) -> list[dict]:
    """Mean and std over seeds per (rule, varied settings `vkeys`), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rule"], *(repr(r.get(k)) for k in vkeys)), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        ok = [r for r in members if r.get("status") == "ok"]
        agg = {"rule": first["rule"], "rule_name": first.get("rule_name"), **{k: first.get(k) for k in vkeys},
               "seeds": len(members), "ok": len(ok), "task": next((r.get("task") for r in ok), None),
               "errors": sorted({f"{r.get('status')}: {r.get('error')}" for r in members if r.get("status") != "ok"})}
        for m in METRICS:
            values = [r[m] for r in ok if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
            if values:
                agg[m] = statistics.fmean(values)
                agg[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                agg[m + "_n"] = len(values)
        out.append(agg)
    return out


# -- outputs -------------------------------------------------------------------------------------
def _csv_text(rows: list[dict], vkeys) -> str:
    columns = [*_ROW_HEAD, *vkeys, *(c for c in _ROW_TAIL if c not in vkeys)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ";".join(f"{x:.4g}" for x in v) if isinstance(v, list) else v
                         for k, v in r.items() if v is not None})
    return buffer.getvalue()


def machine_description() -> str:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cores} CPU cores ({cpu})", f"torch {torch.__version__}", f"torch threads: {torch.get_num_threads()}",
             f"python {platform.python_version()}", platform.system()]
    if torch.cuda.is_available():
        parts.insert(1, f"GPU {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


def record_machine(out_dir: Path) -> None:
    """Add this machine and today's date to DIR/machine.json (kept across resumed runs)."""
    path = Path(out_dir) / MACHINE_JSON
    info = json.loads(path.read_text()) if path.is_file() else {"machines": [], "first_run": None}
    desc = machine_description()
    if desc not in info["machines"]:
        info["machines"].append(desc)
    today = datetime.date.today().isoformat()
    info["first_run"] = info["first_run"] or today
    info["last_run"] = today
    write_json(path, info)


def _machine_info(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MACHINE_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def write_outputs(suite: Suite, out_dir: Path, rows: list[dict], plots: bool = True,
                  command: str | None = None) -> list[str]:
    """results.json, results.csv, report.md (and the plots) from `rows`; returns plot file names."""
    vkeys = list(suite.vary)
    rows = add_ratios(rows, suite.reference, vkeys)
    write_json(out_dir / RESULTS_JSON, rows)
    atomic_write_text(out_dir / RESULTS_CSV, _csv_text(rows, vkeys))
    plot_files = []
    if plots:
        try:
            plot_files = make_plots(out_dir, rows, vkeys)
        except ImportError:  # matplotlib is a dependency; a missing plot never loses results
            plot_files = []
    else:  # keep the names of plots drawn earlier, so the report mentions them
        plot_files = sorted(p.name for p in out_dir.glob("*.png"))
    report = render_report(suite, rows, plot_files, command=command, machine=_machine_info(out_dir))
    atomic_write_text(out_dir / REPORT_MD, report)
    return plot_files


def write_report_copy(suite: Suite, out_dir: Path, path: Path, command: str | None = None) -> None:
    """The report of `out_dir` written to `path` too (plots listed by name, not embedded)."""
    rows = json.loads((Path(out_dir) / RESULTS_JSON).read_text())
    plots = sorted(p.name for p in Path(out_dir).glob("*.png"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_report(suite, rows, plots, command=command, machine=_machine_info(out_dir),
                                          embed_plots=False))


def _pm(mean, std, n, fmt) -> str:
    if mean is None:
        return ""
    text = fmt(mean)
    return f"{text} ± {fmt(std)}" if n and n > 1 else text


def _column_specs(aggs: list[dict], suite: Suite) -> list[tuple[str, str, Callable]]:
    """(metric, heading, formatter) for the metrics some group has."""
    mib = 1024 ** 2
    ref = suite.reference or "reference"
    specs = [
        ("test_error", "test error %", lambda v: f"{100 * v:.2f}"),
        ("test_recon_mse", "recon MSE", lambda v: f"{v:.4g}"),
        ("fid", "FID", lambda v: f"{v:.2f}"),
        ("probe_accuracy", "probe acc %", lambda v: f"{100 * v:.2f}"),
        ("alignment_angle_deg", "angle to BP °", lambda v: f"{v:.1f}"),
        ("step_time_s", "step ms", lambda v: f"{1e3 * v:.2f}"),
        ("step_time_ratio", f"step × {ref}", lambda v: f"{v:.2f}"),
        ("peak_saved_bytes", "saved MiB", lambda v: f"{v / mib:.2f}"),
        ("peak_saved_ratio", f"saved × {ref}", lambda v: f"{v:.2f}"),
        ("peak_cuda_bytes", "CUDA MiB", lambda v: f"{v / mib:.1f}"),
        ("peak_cuda_ratio", f"CUDA × {ref}", lambda v: f"{v:.2f}"),
        ("params", "params", lambda v: f"{v:,.0f}"),
        ("params_total", "params, all groups", lambda v: f"{v:,.0f}"),
        ("time_per_sample_s", "ms / sample", lambda v: f"{1e3 * v:.3f}"),
    ]
    shown = [s for s in specs if any(a.get(s[0]) is not None for a in aggs) or s[0] in suite.anchors]
    if "params_total" not in suite.anchors and all(a.get("params_total") == a.get("params") for a in aggs):
        shown = [s for s in shown if s[0] != "params_total"]  # no rule owns extra parameter groups
    return shown


def comparison_cells(suite: Suite, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Heading and text cells of the comparison: mean ± std over seeds, anchors beside our numbers."""
    vkeys = list(suite.vary)
    rows = add_ratios(rows, suite.reference, vkeys)
    aggs = aggregate(rows, vkeys)
    specs = _column_specs(aggs, suite)
    head = ["rule", *vkeys]
    for metric, heading, _ in specs:
        head.append(heading)
        if metric in suite.anchors:
            head.append(f"{heading} (anchor)")
    head += ["seeds ok", "notes"]
    body = []
    by_label = {e.label: e for e in suite.rules}
    for a in aggs:
        cells = [a["rule"], *(str(a.get(k)) for k in vkeys)]
        for metric, _, fmt in specs:
            exact = metric in ("params", "params_total")  # the same for every seed
            cells.append(_pm(a.get(metric), a.get(metric + "_std"), 1 if exact else a.get(metric + "_n"), fmt))
            if metric in suite.anchors:
                v = suite.anchors[metric]["values"].get(a["rule"])
                cells.append(fmt(v) if v is not None else "")
        notes = list(a["errors"])
        entry = by_label.get(a["rule"])
        if entry is not None and (entry.options or entry.overrides or entry.name != entry.label):
            bits = [f"rule {entry.name}"] if entry.name != entry.label else []
            bits += [f"{k}={v}" for k, v in {**entry.options, **entry.overrides}.items()]
            notes.insert(0, ", ".join(bits))
        cells += [f"{a['ok']}/{a['seeds']}", "; ".join(notes)]
        body.append(cells)
    return head, body


def comparison_table(suite: Suite, rows: list[dict]) -> str:
    """The comparison as a markdown table."""
    head, body = comparison_cells(suite, rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def comparison_rich(suite: Suite, rows: list[dict]):
    """The comparison as a Rich table (for the terminal)."""
    from rich.table import Table

    head, body = comparison_cells(suite, rows)
    table = Table(title=f"benchmark {suite.name}")
    for h in head:
        table.add_column(h, no_wrap=h == "rule")
    for cells in body:
        table.add_row(*cells)
    return table


def _settings_line(suite: Suite) -> str:
    s = {**TrainConfig().to_dict(), **suite.settings}
    model_options = ", ".join(f"{k}={v}" for k, v in s.get("model_options", {}).items())
    opt = f"{s['optimizer']} lr {s['lr']}" + (f" momentum {s['momentum']}" if s["optimizer"] == "sgd" else "")
    if s["weight_decay"]:
        opt += f" weight decay {s['weight_decay']}"
    text = (f"dataset `{s['dataset']}`, model `{s['model']}`" + (f" ({model_options})" if model_options else "")
            + f", epochs {s['epochs']}, batch size {s['batch_size']}, {opt}, "
            f"seeds {', '.join(map(str, suite.seeds))}, device {s['device']}")
    if suite.vary:
        text += "; varied: " + "; ".join(f"{k} in {v}" for k, v in suite.vary.items())
    return text


def render_report(suite: Suite, rows: list[dict], plot_files: list[str], command: str | None = None,
                  machine: dict | None = None, embed_plots: bool = True) -> str:
    total = sum(r.get("train_time_s") or 0.0 for r in rows)
    if machine is None:
        today = datetime.date.today().isoformat()
        machine = {"machines": [machine_description()], "first_run": today, "last_run": today}
    dates = machine["first_run"] if machine["first_run"] == machine["last_run"] else \
        f"{machine['first_run']} to {machine['last_run']}"
    out = [f"# Benchmark: {suite.name}", ""]
    if suite.description:
        out += [suite.description, ""]
    out += [
        f"- machine{'s' if len(machine['machines']) > 1 else ''}: {'; '.join(machine['machines'])}",
        f"- run: {dates}; cells finished: {len(rows)} of {len(plan_cells(suite))}; "
        f"time in cells: {total / 60:.1f} min",
        f"- settings: {_settings_line(suite)}",
        "- every rule of a seed starts from the same initial weights, sees the same data order and "
        "uses the same optimiser settings",
    ]
    if suite.source:
        out.append(f"- suite file: `{suite.source}`" + (" (quick form)" if suite.quick else ""))
    if command:
        out.append(f"- command: `{command}`")
    if suite.reference:
        out.append(f"- ratios (×): per seed against `{suite.reference}` with the same seed and settings, "
                   "then mean ± std over seeds")
    else:
        out.append("- ratios: none (the suite has no reference rule)")
    out += ["", "Mean ± std over seeds. Test error = 1 − test accuracy; the angle is the mean over blocks of "
            "the angle between the rule's update and the backprop gradient on a fixed batch; step time is the "
            "median per training step; saved MiB is the peak of tensors saved for backward in one step.", ""]
    out += [comparison_table(suite, rows), ""]
    for metric, anchor in suite.anchors.items():
        note = f" {anchor['note']}" if anchor.get("note") else ""
        out.append(f"Anchors for {metric}: {anchor['source']}.{note}")
    if suite.anchors:
        out.append("")
    problems = [r for r in rows if r.get("status") != "ok"]
    noted = [r for r in rows if r.get("notes")]
    if problems or noted:
        out += ["## Failures and notes", ""]
        for r in problems:
            out.append(f"- `{r['rule']}` seed {r['seed']}{_point_text(r, suite)}: {r['status']}: {r['error']}")
        for r in noted:
            out.append(f"- `{r['rule']}` seed {r['seed']}{_point_text(r, suite)}: {r['notes']}")
        out.append("")
    if plot_files:
        out += ["## Plots", ""]
        for name in plot_files:
            out.append(f"![{name}]({name})" if embed_plots else f"- `{name}` (in the output directory)")
        out.append("")
    out += ["Every row (one per rule, seed and setting) is in `results.json` and `results.csv`; each cell's run "
            "directory is under `runs/`.", ""]
    return "\n".join(out)


def _point_text(r: dict, suite: Suite) -> str:
    extra = [f"{k}={r.get(k)}" for k in suite.vary]
    return f" ({', '.join(extra)})" if extra else ""


# -- plots (matplotlib, file-only backend) -------------------------------------------------------------
_CURVE_METRICS = (("test_accuracy", "test accuracy"), ("test_recon_mse", "test recon MSE"), ("fid", "FID"))


def _series_label(r: dict, vkeys: list[str]) -> str:
    return r["rule"] + "".join(f" {k}={r.get(k)}" for k in vkeys)


def _read_history(out_dir: Path, row: dict) -> list[dict]:
    path = out_dir / row.get("run_dir", "") / METRICS_FILE
    if not row.get("run_dir") or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_plots(out_dir: Path, rows: list[dict], vkeys=()) -> list[str]:
    """Learning curves, final metric against step time, memory against each numeric varied setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("learning_curves.png", plot_learning_curves), ("metric_vs_step_time.png", plot_metric_vs_time)):
        fig = draw(out_dir, rows, vkeys, plt)
        if fig is not None:
            fig.savefig(out_dir / name, dpi=100)
            plt.close(fig)
            written.append(name)
    for key in vkeys:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            fig = plot_memory_against(rows, key, vkeys, plt)
            if fig is not None:
                fig.savefig(out_dir / f"memory_vs_{key}.png", dpi=100)
                plt.close(fig)
                written.append(f"memory_vs_{key}.png")
    return written


def plot_learning_curves(out_dir: Path, rows: list[dict], vkeys, plt):
    """Task metric per epoch, mean over seeds, one line per rule (and varied setting)."""
    series: dict[str, dict[str, dict[int, list[float]]]] = {}  # metric -> label -> epoch -> values
    for r in rows:
        for record in _read_history(out_dir, r):
            for metric, _ in _CURVE_METRICS:
                v = record.get(metric)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    by_epoch = series.setdefault(metric, {}).setdefault(_series_label(r, vkeys), {})
                    by_epoch.setdefault(record["epoch"], []).append(v)
                    break
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.8), squeeze=False)
    headings = dict(_CURVE_METRICS)
    for ax, (metric, lines) in zip(axes[0], series.items()):
        for label, by_epoch in lines.items():
            epochs = sorted(by_epoch)
            ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", markersize=3, label=label)
        ax.set(xlabel="epoch", ylabel=headings[metric] + " (mean over seeds)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    fig.suptitle("learning curves")
    fig.tight_layout()
    return fig


def plot_metric_vs_time(out_dir: Path, rows: list[dict], vkeys, plt):
    """Final task metric against median step time, one point per rule (error bars: std over seeds)."""
    aggs = [a for a in aggregate(rows, vkeys) if a.get("step_time_s") is not None]
    metrics = [(m, h) for m, h in (("test_error", "test error"), ("test_recon_mse", "test recon MSE"), ("fid", "FID"))
               if any(a.get(m) is not None for a in aggs)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, (metric, heading) in zip(axes[0], metrics):
        for a in aggs:
            if a.get(metric) is None:
                continue
            x, y = 1e3 * a["step_time_s"], a[metric]
            ax.errorbar(x, y, xerr=1e3 * a["step_time_s_std"], yerr=a[metric + "_std"], fmt="o", capsize=3)
            ax.annotate(_series_label(a, vkeys), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="median step time (ms)", ylabel=f"final {heading}")
    fig.suptitle("final metric against step time")
    fig.tight_layout()
    return fig


def plot_memory_against(rows: list[dict], key: str, vkeys, plt):
    """Peak saved-for-backward memory (and CUDA memory, on GPU) against one varied setting."""
    aggs = aggregate(rows, vkeys)
    kinds = [(m, h) for m, h in (("peak_saved_bytes", "peak saved for backward (MiB)"),
                                 ("peak_cuda_bytes", "peak CUDA memory (MiB)")) if any(a.get(m) for a in aggs)]
    if not kinds:
        return None
    others = [k for k in vkeys if k != key]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), squeeze=False)
    for ax, (metric, heading) in zip(axes[0], kinds):
        lines: dict[str, list[tuple]] = {}
        for a in aggs:
            if a.get(metric):
                lines.setdefault(_series_label(a, others), []).append((a[key], a[metric] / 1024**2))
        for n, (label, points) in enumerate(lines.items()):
            points.sort()  # rules that save the same bytes overlap: tell them apart by marker and line
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^vDP*X"[n % 8],
                    linestyle=("-", "--", ":", "-.")[n % 4], label=label)
        ax.set(xlabel=key, ylabel=heading)
        ax.legend(fontsize=7)
    fig.suptitle(f"memory against {key}")
    fig.tight_layout()
    return fig


# -- live progress table ------------------------------------------------------------------------------
class LiveTable:
    """A Rich live table of every cell: status, epoch, task metric, step time (an `Event` callable)."""

    def __init__(self, suite: Suite, enabled: bool = True):
        from rich.console import Console
        from rich.live import Live

        self.cells = plan_cells(suite)
        self.state = [{"status": "waiting"} for _ in self.cells]
        self.enabled = enabled
        self.started: dict[int, float] = {}
        self.live = Live(self._table(), console=Console(stderr=True), refresh_per_second=2,
                         transient=False) if enabled else None

    def __enter__(self):
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
            self.live.__exit__(*exc)
        return False

    def __call__(self, kind: str, index: int, payload: dict) -> None:
        s = self.state[index]
        if kind == "start":
            s.update(status="running", epoch=0)
            self.started[index] = time.perf_counter()
        elif kind == "epoch":
            s["epoch"] = payload.get("epoch")
            s["metric"] = _metric_text(payload)
        elif kind in ("done", "skip"):
            s.update(status=payload.get("status", "?") + (" (earlier)" if kind == "skip" else ""),
                     epoch=payload.get("epochs"), metric=_metric_text(payload),
                     step=payload.get("step_time_s"), time=payload.get("train_time_s"),
                     error=payload.get("error"))
        if self.live is not None:
            self.live.update(self._table())

    def _table(self):
        from rich.table import Table

        table = Table(title="benchmark", expand=False)
        varied = any(c.point for c in self.cells)
        for col in ("rule", "settings", "seed", "status", "epoch", "metric", "step ms", "time s"):
            if col != "settings" or varied:
                table.add_column(col, no_wrap=col in ("rule", "metric"))
        colors = {"ok": "green", "failed": "red", "diverged": "yellow", "running": "cyan"}
        for i, (cell, s) in enumerate(zip(self.cells, self.state)):
            status = s["status"]
            color = colors.get(status.split()[0], "")
            elapsed = s.get("time")
            if status == "running":
                elapsed = time.perf_counter() - self.started.get(i, time.perf_counter())
            epochs = f"{s.get('epoch') or 0}/{cell.config.epochs}" if status != "waiting" else ""
            text = status if not s.get("error") else f"{status}: {s['error'][:60]}"
            settings = [" ".join(f"{k}={v}" for k, v in cell.point.items())] if varied else []
            table.add_row(cell.entry.label, *settings, str(cell.seed),
                          f"[{color}]{text}[/]" if color else text, epochs, s.get("metric", ""),
                          f"{1e3 * s['step']:.2f}" if s.get("step") else "",
                          f"{elapsed:.0f}" if elapsed is not None else "")
        return table


def _metric_text(record: dict) -> str:
    for key, fmt in (("test_accuracy", "acc {:.4f}"), ("test_recon_mse", "mse {:.4g}"), ("fid", "fid {:.2f}")):
        if isinstance(record.get(key), (int, float)):
            return fmt.format(record[key])
    return ""
