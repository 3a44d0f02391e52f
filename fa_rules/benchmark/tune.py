"""Fair tuning: a suite's `[tune]` table searches each rule's settings on a validation split with
Optuna, then the suite's cells train every rule with its best setting.

Selection never reads the test split. A trial is a training run of the rule's cell (the suite's
first seed, `[tune] epochs` epochs) with `validation_fraction` set: the trainer holds out a
stratified part of the training split (fixed by `validation_seed`, see
`fa_rules.core.data.validation_split`), trains on the rest and evaluates on the held-out part
after every epoch. The metric (`validation_error`, `validation_loss`: minimised;
`validation_accuracy`: maximised) is reported to Optuna each epoch, where the median pruner may
stop a trial whose curve is below the median of earlier trials at the same epoch; the sampler is
TPE. A diverged trial is a finished trial with the worst value (error 1, accuracy 0, loss inf).

One study per rule label lives in `DIR/tune/<label>.journal` (Optuna's JournalStorage on a file,
safe for several processes on one filesystem), its trials' run directories in
`DIR/tune/<label>/trial-<n>/`. The budget (`trials`) counts finished trials (complete or pruned):
a job claims a trial under a file lock (`DIR/tune/<label>.lock`) only while finished plus running
trials are below it, so parallel jobs never overshoot. A rerun resumes: trials that a killed
process left RUNNING are marked failed and their parameters queued again, and the jobs run until
the budget is reached. Trials run in this process, in `--workers N` processes (N jobs per rule,
each claiming trials from the shared journal) or as Ray tasks (`--cluster`, through
`fa_rules.benchmark.cluster.run_remote`; every node must see DIR).

Each ask draws from a TPE sampler seeded by (`sampler_seed`, trial number), so a sequential tuning
is reproducible and parallel jobs do not repeat each other's draws. The final cells are the suite's
cells with each rule's best parameters (label `<label>`) and, with `untuned = true`, the suite's own
settings beside them (label `<label>-untuned`); their rows record the tuning (`tuning`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from pathlib import Path
from typing import Callable

from fa_rules.benchmark.suite import TUNE_METRICS, RuleEntry, Suite
from fa_rules.core.config import TrainConfig
from fa_rules.core.errors import UserError, error_line

TUNE_DIR = "tune"
SUMMARY_FILE = "summary.json"  # DIR/tune/summary.json: each rule's best setting and history, for the report
UNTUNED_SUFFIX = "-untuned"
INSTALL = 'pip install -e ".[tune]" in a checkout, or pip install "fa-rules[tune]"'
# trials per job on a Ray cluster: a rule's study runs as ceil(trials / this) tasks at once
TRIALS_PER_CLUSTER_JOB = 4
_WORST = {"validation_error": 1.0, "validation_accuracy": 0.0, "validation_loss": float("inf")}

Say = Callable[[str], None]


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"[tune] needs Optuna, which is not installed: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines would tear the live table
    return optuna


def study_file(out_dir: Path, label: str) -> Path:
    return Path(out_dir) / TUNE_DIR / f"{label}.journal"


def trial_dir(out_dir: Path, label: str, number: int) -> Path:
    return Path(out_dir) / TUNE_DIR / label / f"trial-{number}"


def _storage(out_dir: Path, label: str):
    optuna = require_optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(study_file(out_dir, label))))


# -- settings -------------------------------------------------------------------------------------

def apply_params(config: TrainConfig, params: dict) -> TrainConfig:
    """`config` with a trial's parameters in place: `lr`, `options.NAME`, `group_lr.GROUP`,
    `model_options.NAME` (the keys `[tune.space]` may hold)."""
    config = copy.deepcopy(config)
    for key, value in params.items():
        table, _, name = key.partition(".")
        if table == "options" and name:
            config.rule_options[name] = value
        elif table == "group_lr" and name:
            config.group_lr = {**config.group_lr, name: value}
        elif table == "model_options" and name:
            config.model_options[name] = value
        else:
            setattr(config, key, value)
    return config


def trial_config(cell_config: TrainConfig, tune: dict, params: dict) -> TrainConfig:
    """What a trial trains: the rule's cell with the trial's parameters, `[tune] epochs`, evaluated
    every epoch on the validation split."""
    config = apply_params(cell_config, params)
    config.epochs = tune["epochs"] or cell_config.epochs
    config.eval_every = 1
    config.validation_fraction = tune["validation_fraction"]
    config.validation_seed = tune["validation_seed"]
    return config


def tuning_cells(suite: Suite) -> dict[str, TrainConfig]:
    """Each rule label's cell configuration at the suite's first seed: what its trials start from."""
    from fa_rules.benchmark.cells import plan_cells

    seed = suite.seeds[0]
    untuned = copy.deepcopy(suite)
    untuned.tune = {}
    return {c.entry.label: c.config for c in plan_cells(untuned) if c.seed == seed}


def _extremes(space: dict) -> list[dict]:
    """Parameter sets that together hold every bound and every choice of `space` once."""
    values = {k: d["choices"] if "choices" in d else [d["low"], d["high"]] for k, d in space.items()}
    return [{k: v[min(i, len(v) - 1)] for k, v in values.items()} for i in range(max(map(len, values.values())))]


def check_tune(suite: Suite) -> None:
    """Before anything is written: Optuna installed, and every rule's search space valid at each of
    its bounds and choices: values its options and the training settings accept, groups the rule
    trains (built on the cell's network), a classifying rule (the metrics are a classifier's)."""
    from fa_rules.benchmark.cells import Cell, check_cell_settings, check_cells
    from fa_rules.core.config import check_config
    from fa_rules.plugins.manager import get_registry

    require_optuna()
    where = suite.source or "suite"
    registry = get_registry()
    entries = {e.label: e for e in suite.rules}
    probes = []
    for label, config in tuning_cells(suite).items():
        spec = registry.rule(config.rule)
        if spec.make(**config.rule_options).task != "classify":
            raise UserError(f"{where}: [tune] scores classifiers on validation error, loss or accuracy; rule "
                            f"'{label}' trains for {spec.make(**config.rule_options).task}")
        for params in _extremes(suite.tune["space"][label]):
            probe = trial_config(config, suite.tune, params)
            shown = ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items())
            check_config(probe, f"{where}: [tune.space] rule '{label}' at {shown}", "toml", registry)
            probes.append(Cell(entries[label], probe.seed, {}, probe))
    check_cell_settings(probes, f"{where}: [tune.space]")  # names and options: no data, no model
    # groups, model options and sizes need the rule set up on the cell's network (data and a model)
    built = [p for p in probes if any(k.partition(".")[0] in ("group_lr", "model_options") or k in
                                      ("batch_size", "latent_dim") for k in suite.tune["space"][p.entry.label])]
    if built:
        check_cells(built, f"{where}: [tune.space]")


# -- one rule's study -----------------------------------------------------------------------------

def _direction(tune: dict) -> str:
    return TUNE_METRICS[tune["metric"]]


def _study_settings(tune: dict, label: str, config: TrainConfig) -> dict:
    """What a study was made for: a rerun with other settings must not add trials to it."""
    return {"metric": tune["metric"], "epochs": config.epochs, "validation_fraction": tune["validation_fraction"],
            "validation_seed": tune["validation_seed"], "sampler_seed": tune["sampler_seed"],
            "pruner": tune["pruner"], "space": tune["space"][label],
            # the rule's cell, less what is listed above or does not change what a trial trains
            "config": {k: v for k, v in config.to_dict().items()
                       if k not in ("data_dir", "eval_every", "device", "epochs", "validation_fraction",
                                    "validation_seed")}}


def prepare_study(out_dir: Path, label: str, tune: dict, cell_config: TrainConfig, say: Say | None = None):
    """Create (or open) the rule's study; one made for other settings is one line. Trials a killed
    process left RUNNING are marked failed and their parameters queued again. Call while holding
    the benchmark's lock, before any job runs: then no trial is really running."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    path = study_file(out_dir, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = _storage(out_dir, label)
    study = optuna.create_study(study_name=label, storage=storage, direction=_direction(tune), load_if_exists=True)
    wanted = json.loads(json.dumps(_study_settings(tune, label, trial_config(cell_config, tune, {}))))
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", wanted)
    elif stored != wanted:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise UserError(f"{path} was tuned with other settings ({', '.join(changed)} differ); use another --out "
                        f"(or delete {path} and {path.with_suffix('')} to tune again)")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "error", "interrupted (its process ended); queued again")
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        if say:
            say(f"tune {label}: trial {trial.number} was interrupted; its parameters are queued again")
    return study


def _counts(study) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {state: sum(t.state == s for t in trials) for state, s in
             (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED), ("running", TrialState.RUNNING),
              ("failed", TrialState.FAIL), ("waiting", TrialState.WAITING))}
    count["trials"] = len(trials)
    return count


@contextlib.contextmanager
def _budget_lock(out_dir: Path, label: str):
    """An exclusive lock per study while a job counts its trials and claims one (POSIX flock;
    without it, parallel jobs may run a few trials past the budget)."""
    path = study_file(out_dir, label).with_suffix(".lock")
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield  # closing the file releases the lock


def _sampler(tune: dict, number: int):
    optuna = require_optuna()
    trials = tune["trials"]
    # TPE models the trials once a few have finished: with small budgets, half of them, at most 10
    startup = max(1, min(10, trials // 2))
    return optuna.samplers.TPESampler(seed=(tune["sampler_seed"] * 1_000_003 + number) % 2**32,
                                      n_startup_trials=startup)


def _pruner(tune: dict):
    optuna = require_optuna()
    if tune["pruner"] == "none":
        return optuna.pruners.NopPruner()
    # the median of too few curves prunes by chance: wait for a third of the budget (2..5 trials)
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, tune["trials"] // 3)), n_warmup_steps=0)


def _suggest(trial, key: str, dist: dict):
    if "choices" in dist:
        return trial.suggest_categorical(key, dist["choices"])
    if dist["integer"]:
        return trial.suggest_int(key, dist["low"], dist["high"], step=dist["step"] or 1, log=dist["log"])
    return trial.suggest_float(key, float(dist["low"]), float(dist["high"]), step=dist["step"], log=dist["log"])


def metric_value(record: dict, metric: str) -> float | None:
    if metric == "validation_error":
        accuracy = record.get("validation_accuracy")
        return None if accuracy is None else 1.0 - accuracy
    value = record.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _claim(out_dir: Path, label: str, tune: dict):
    """(study, trial, params) of a new trial, or None when the budget is spent: under the study's
    lock, finished plus running trials are counted and a trial asked for below the budget."""
    optuna = require_optuna()
    storage = _storage(out_dir, label)
    with _budget_lock(out_dir, label):
        counts = _counts(optuna.load_study(study_name=label, storage=storage))
        if counts["complete"] + counts["pruned"] + counts["running"] >= tune["trials"]:
            return None
        study = optuna.load_study(study_name=label, storage=storage, sampler=_sampler(tune, counts["trials"]),
                                  pruner=_pruner(tune))
        trial = study.ask()
        params = {k: _suggest(trial, k, d) for k, d in tune["space"][label].items()}
    return study, trial, params


def run_trial(out_dir: Path, label: str, tune: dict, cell_config: TrainConfig, study, trial, params: dict) -> str:
    """Train one trial and tell the study how it ended; returns a line for the log. A trial that
    raises (not a divergence) is marked failed and the error re-raised as a UserError line."""
    optuna = require_optuna()
    from fa_rules.core.trainer import Diverged
    from fa_rules.runs import new_trainer

    metric = tune["metric"]
    config = trial_config(cell_config, tune, params)
    run_dir = trial_dir(out_dir, label, trial.number)
    if run_dir.exists():  # a trial number the study reuses (its journal was deleted): the old run is stale
        shutil.rmtree(run_dir)
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    try:
        trainer = new_trainer(config, run_dir, progress=False)
        trainer.on_finish.clear()  # a trial's run needs no pictures (drawing them costs more than a small trial)
        save = trainer.save

        def save_and_report() -> None:  # once per epoch, after the evaluation on the validation split
            save()
            value = metric_value(trainer.history[-1], metric)
            if value is not None:
                trial.report(value, trainer.epoch)
                if trainer.epoch < config.epochs and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {trainer.epoch}")

        trainer.save = save_and_report
        summary = trainer.run()
    except optuna.TrialPruned as e:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return f"tune {label}: trial {trial.number} ({shown}) {e}"
    except Diverged as e:
        trial.set_user_attr("diverged", str(e).splitlines()[0])
        study.tell(trial, _WORST[metric])
        return f"tune {label}: trial {trial.number} ({shown}) diverged"
    except KeyboardInterrupt:  # left RUNNING: the next run queues its parameters again (`prepare_study`)
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", (str(e).splitlines() or [type(e).__name__])[0])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if isinstance(e, UserError):
            raise
        raise UserError(f"tuning rule '{label}': trial {trial.number} failed: {error_line(e)}") from None
    value = metric_value(summary, metric)
    trial.set_user_attr("validation_split", summary.get("validation_split"))
    trial.set_user_attr("epochs", summary.get("epochs"))
    study.tell(trial, value if value is not None else _WORST[metric])
    return f"tune {label}: trial {trial.number} ({shown}) {metric} {value:.4f}"


def tune_job(out_dir: str, label: str, tune: dict, config: dict, threads: int = 0, log=None) -> dict:
    """One job of a rule's tuning: claim and run trials until the budget is spent (in this process,
    a worker process or a Ray task: all share the study's journal). `log(text)` gets a line per
    trial; in a `--workers` process the lines go to the benchmark process. Returns the counts."""
    out_dir = Path(out_dir)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if log is None:
        from fa_rules.benchmark import runner

        queue = runner._to_parent  # in a worker process: the benchmark's event queue
        log = (lambda text: queue.put(("log", -1, {"text": text}))) if queue is not None else (lambda text: None)
    cell_config = TrainConfig.from_dict(config)
    while True:
        claimed = _claim(out_dir, label, tune)
        if claimed is None:
            break
        log(run_trial(out_dir, label, tune, cell_config, *claimed))
    optuna = require_optuna()
    return _counts(optuna.load_study(study_name=label, storage=_storage(out_dir, label)))


# -- every rule -----------------------------------------------------------------------------------

def run_tuning(suite: Suite, out_dir: Path, workers: int = 1, cluster: str | None = None,
               say: Say | None = None) -> dict:
    """Tune (or finish tuning) every rule of `suite` into `out_dir`/tune; returns `summarise`'s
    record, also written to `out_dir`/tune/summary.json. Call holding the benchmark's lock."""
    say = say or (lambda text: None)
    tune = suite.tune
    configs = tuning_cells(suite)
    for label, config in configs.items():
        prepare_study(out_dir, label, tune, config, say)
    jobs = [(label, config) for label, config in configs.items()]
    errors: dict[str, str] = {}
    if cluster:
        _tune_on_ray(out_dir, jobs, tune, cluster, say, errors)
    elif workers > 1:
        _tune_in_workers(out_dir, jobs, tune, workers, say, errors)
    else:
        for label, config in jobs:
            try:
                tune_job(str(out_dir), label, tune, config.to_dict(), log=say)
            except UserError as e:
                errors[label] = str(e)
                say(str(e))
    return write_summary(suite, out_dir, errors)


def _tune_in_workers(out_dir: Path, jobs: list, tune: dict, workers: int, say: Say, errors: dict) -> None:
    """`workers` worker processes take the rules' jobs in turn (`workers` jobs per rule, each
    claiming trials until the rule's budget is spent); their trial lines come back through a queue."""
    from concurrent.futures import FIRST_COMPLETED, wait

    import torch

    from fa_rules.benchmark.runner import _stop_workers, waiting_events, worker_pool

    cuda = torch.cuda.is_available() and any(c.device in ("auto", "cuda") for _, c in jobs)
    executor, events = worker_pool(workers, cuda)

    def relay() -> None:
        for _, _, payload in waiting_events(events):
            say(payload.get("text", ""))

    try:
        futures = {executor.submit(tune_job, str(out_dir), label, tune, config.to_dict()): label
                   for label, config in jobs for _ in range(min(workers, tune["trials"]))}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            relay()
            for future in done:
                error = future.exception()
                if error is not None and futures[future] not in errors:
                    errors[futures[future]] = _job_error("a tuning job", error)
                    say(errors[futures[future]])
        relay()
    except BaseException:
        _stop_workers(executor)
        raise
    executor.shutdown(wait=True)
    events.close()


def _tune_on_ray(out_dir: Path, jobs: list, tune: dict, cluster: str, say: Say, errors: dict) -> None:
    """Each rule's study as ceil(trials / TRIALS_PER_CLUSTER_JOB) Ray tasks of one CPU each, all
    rules at once; the tasks share the journal files in `out_dir` (a filesystem every node sees)."""
    from fa_rules.benchmark import cluster as ray_cluster

    per_rule = max(1, math.ceil(tune["trials"] / TRIALS_PER_CLUSTER_JOB))
    labels = [label for label, _ in jobs for _ in range(per_rule)]
    arguments = [(str(Path(out_dir).resolve()), label, tune, config.to_dict(), 1, _quiet)
                 for label, config in jobs for _ in range(per_rule)]

    def on_result(index: int, result, error) -> None:
        label = labels[index]
        if error is not None and label not in errors:
            errors[label] = _job_error("a tuning task", error)
            say(errors[label])
        elif result is not None:
            say(f"tune {label}: a task ended ({result['complete']} complete, {result['pruned']} pruned)")

    ray_cluster.run_remote(tune_job, arguments, {"num_cpus": 1}, cluster, on_result)


def _job_error(what: str, error: BaseException) -> str:
    """A tuning job's error as the one line the rule's summary and the report show."""
    if isinstance(error, UserError):  # written for the user: its first line alone
        return (str(error).strip().splitlines() or [""])[0]
    return f"{what} failed: {error_line(error)}"


def _quiet(text: str) -> None:
    """The log of a Ray task (importable, so Ray pickles it by reference): its lines stay there."""


# -- results --------------------------------------------------------------------------------------

def best_trial(study, direction: str):
    """The best finished trial with a finite value, or None."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    return (min if direction == "minimize" else max)(done, key=lambda t: (t.value, t.number))


def write_summary(suite: Suite, out_dir: Path, errors: dict | None = None) -> dict:
    """Each rule's tuning from its study (best parameters and value, trial counts, best-so-far
    history), written to DIR/tune/summary.json for the report. A missing study is one line."""
    optuna = require_optuna()
    from optuna.trial import TrialState

    tune = suite.tune
    direction = _direction(tune)
    rules = {}
    for entry in suite.rules:
        label = entry.label
        path = study_file(out_dir, label)
        if not path.is_file():
            raise UserError(f"no tuning study for rule '{label}' ({path} is missing); run without --skip-tune "
                            "(or with --tune-only) first")
        study = optuna.load_study(study_name=label, storage=_storage(out_dir, label))
        best = best_trial(study, direction)
        history, best_so_far = [], None
        for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
                better = best_so_far is None or (t.value < best_so_far if direction == "minimize"
                                                 else t.value > best_so_far)
                best_so_far = t.value if better else best_so_far
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                history.append({"trial": t.number, "state": t.state.name.lower(), "value": _finite(t.value),
                                "best": best_so_far, "params": t.params})
        counts = _counts(study)
        rules[label] = {
            "tuned": True, "metric": tune["metric"], "direction": direction,
            "params": dict(best.params) if best else None, "value": best.value if best else None,
            "best_trial": best.number if best else None,
            "trials_complete": counts["complete"], "trials_pruned": counts["pruned"],
            "trials_failed": counts["failed"], "budget": tune["trials"],
            "study": path.relative_to(out_dir).as_posix(), "sampler": "TPE", "sampler_seed": tune["sampler_seed"],
            "pruner": tune["pruner"], "epochs_per_trial": tune["epochs"],
            "validation_split": best.user_attrs.get("validation_split") if best else None,
            "error": (errors or {}).get(label), "history": history,
        }
    summary = {"metric": tune["metric"], "direction": direction, "untuned": tune["untuned"], "rules": rules}
    from fa_rules.benchmark.runner import _write_json

    _write_json(Path(out_dir) / TUNE_DIR / SUMMARY_FILE, summary)
    return summary


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def check_studies(suite: Suite, out_dir: Path) -> None:
    """--skip-tune: every rule's study is in place (else one line, before anything is written)."""
    for entry in suite.rules:
        path = study_file(out_dir, entry.label)
        if not path.is_file():
            raise UserError(f"--skip-tune: no tuning study for rule '{entry.label}' ({path} is missing); run "
                            "without --skip-tune (or with --tune-only) first")


def planned_suite(suite: Suite) -> Suite:
    """The suite whose cells `run_suite` trains (the final cells of a tuned suite), for the live table."""
    return final_suite(suite) if suite.tune else suite


def read_summary(out_dir: Path) -> dict | None:
    try:
        data = json.loads((Path(out_dir) / TUNE_DIR / SUMMARY_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("rules"), dict) else None


def final_suite(suite: Suite, summary: dict | None = None) -> Suite:
    """The suite of final cells: each rule with its best parameters (its own label; the row's
    `tuning` says how they were found) and, with `untuned`, as the suite wrote it (`<label>-untuned`),
    next to each other. Without `summary`, the same cells with the suite's settings (their names
    and order, for the live table, do not depend on the tuning). A rule whose tuning finished no
    trial is one line."""
    final = copy.deepcopy(suite)  # (its `tune` stays: the report's Tuning section reads it)
    rules = []
    for entry in suite.rules:
        record = (summary or {}).get("rules", {}).get(entry.label)
        params = {}
        tuning = {"tuned": True}
        if summary is not None:
            if not record or record.get("params") is None:
                why = (record or {}).get("error") or "no trial finished"
                raise UserError(f"tuning rule '{entry.label}' found no setting ({why}); the trials are in "
                                f"{TUNE_DIR}/{entry.label}/ of the output directory")
            params = record["params"]
            tuning = {k: record[k] for k in ("tuned", "params", "metric", "value", "best_trial", "trials_complete",
                                             "trials_pruned", "budget", "study", "sampler", "sampler_seed", "pruner",
                                             "epochs_per_trial", "validation_split")}
        options, overrides = dict(entry.options), copy.deepcopy(entry.overrides)
        for key, value in params.items():
            table, _, name = key.partition(".")
            if table == "options" and name:
                options[name] = value
            elif table in ("group_lr", "model_options") and name:
                overrides[table] = {**overrides.get(table, {}), name: value}
            else:
                overrides[key] = value
        rules.append(RuleEntry(entry.name, entry.label, options, overrides, tuning=tuning))
        if suite.tune["untuned"]:
            rules.append(RuleEntry(entry.name, entry.label + UNTUNED_SUFFIX, dict(entry.options),
                                   copy.deepcopy(entry.overrides), tuning={"tuned": False, "tuned_label": entry.label}))
    final.rules = rules
    return final
