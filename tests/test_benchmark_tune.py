"""Fair tuning: the validation split (stratified, disjoint, fixed by its seed, the test split never
read) and a suite's [tune] table: checked in one line before anything is written, Optuna studies per
rule whose best setting the final cells train with beside the untuned one, the same budget through
`--workers 2`, and a tuning that resumes instead of restarting. Tiny MLPs on digits, one thread."""

import hashlib
import json
import pickle
from pathlib import Path

import optuna
import pytest
import torch
from test_benchmark_workers import benchmark_cli, one_thread  # noqa: F401  (one_thread: autouse)
from test_cli_errors import run_main

from fa_rules import benchmark as bench
from fa_rules.benchmark import tune as tuning
from fa_rules.core import UserError
from fa_rules.core.checkpoint import load_checkpoint
from fa_rules.core.config import TrainConfig
from fa_rules.core.data import Dataset, DatasetSpec, validation_split
from fa_rules.plugins.datasets import load_digits
from fa_rules.plugins.manager import get_registry
from fa_rules.runs import new_trainer, resume_trainer

# The untuned setting (lr 1e-5, one epoch) leaves the MLP near chance; the search range holds rates
# that train it to > 80 % in one epoch, so tuning must show in the test error.
SUITE = """\
name = "tuned"
rules = ["backprop", "feedback_alignment"]
seeds = 1

[settings]
dataset = "digits"
model = "mlp"
depth = 1
width = 16
epochs = 1
batch_size = 64
lr = 1e-5
device = "cpu"

[measure]
timing = false
fid = false

[tune]
trials = 3
epochs = 1
validation_fraction = 0.2
[tune.space]
lr = { low = 3e-3, high = 5e-2, log = true }
[tune.space.feedback_alignment]
lr = { low = 3e-3, high = 5e-2, log = true }
"options.scale" = { choices = [0.5, 1.0] }
"""


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "tuned.toml"
    path.write_text(SUITE)
    return path


def _study(out: Path, label: str):
    return optuna.load_study(study_name=label, storage=tuning._storage(out, label))


def _finished(study) -> list:
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


# -- the validation split ------------------------------------------------------------------------

def _labelled(counts: list[int]) -> Dataset:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(3))]
    x = torch.arange(y.numel(), dtype=torch.float32).reshape(-1, 1, 1, 1)  # x = index: where each came from
    return Dataset("toy", x, y, torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.long), len(counts))


def test_the_validation_split_is_stratified_disjoint_and_fixed_by_its_seed():
    data = _labelled([10, 25, 41, 3])
    split, record = validation_split(data, 0.2, seed=7)
    held = split.test_x.flatten().long()
    kept = split.train_x.flatten().long()
    # each class holds out round(0.2 * n), at least one: 2, 5, 8, 1 (0.6 rounds to 1)
    assert [int((split.test_y == c).sum()) for c in range(4)] == [2, 5, 8, 1]
    assert [int((split.train_y == c).sum()) for c in range(4)] == [8, 20, 33, 2]
    assert set(held.tolist()).isdisjoint(kept.tolist()) and sorted(held.tolist() + kept.tolist()) == list(range(79))
    assert torch.equal(data.train_y[held], split.test_y) and torch.equal(data.train_y[kept], split.train_y)
    again, same = validation_split(data, 0.2, seed=7)
    assert torch.equal(again.test_x, split.test_x) and same == record
    other, moved = validation_split(data, 0.2, seed=8)
    assert not torch.equal(other.test_x, split.test_x) and moved["indices_sha256"] != record["indices_sha256"]
    text = ",".join(str(i) for i in sorted(held.tolist()))
    assert record == {"fraction": 0.2, "seed": 7, "n_train": 63, "n_validation": 16,
                      "indices_sha256": hashlib.sha256(text.encode()).hexdigest()}
    # unlabelled data: one seeded cut of all examples
    plain, info = validation_split(Dataset("gen", data.train_x, data.train_y, data.test_x, data.test_y, 0), 0.1, 0)
    assert info["n_validation"] == 8 and plain.train_x.shape[0] == 71


class _Untouchable(torch.Tensor):
    """A test split whose values raise when read: only its shape, dtype and device may be asked."""

    _META = (torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in cls._META:
            raise AssertionError(f"the test split was read ({getattr(func, '__name__', func)})")
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.fixture
def guarded_digits(monkeypatch):
    """Dataset `guarded_digits`: the digits with a test split that raises when read."""
    def load(data_dir=None):
        d = load_digits(data_dir)
        return Dataset("guarded_digits", d.train_x, d.train_y, d.test_x.as_subclass(_Untouchable),
                       d.test_y.as_subclass(_Untouchable), d.num_classes)

    spec = DatasetSpec("guarded_digits", load, "digits whose test split must not be read", (1, 8, 8), 10)
    monkeypatch.setitem(get_registry().datasets, "guarded_digits", spec)


def test_a_validation_run_trains_and_evaluates_without_reading_the_test_split(guarded_digits, tmp_path):
    def run(out: Path, **fields) -> dict:
        trainer = new_trainer(TrainConfig(dataset="guarded_digits", model_options={"depth": 1, "width": 32},
                                          batch_size=64, lr=1e-2, device="cpu", **fields), out, progress=False)
        trainer.on_finish.clear()  # no pictures: they would cost more than the run
        return trainer.run()

    summary = run(tmp_path / "run", epochs=2, validation_fraction=0.1, validation_seed=0)
    assert summary["validation_accuracy"] > 0.8 and summary["validation_loss"] < 1.0
    assert not any(k.startswith("test_") for k in summary)
    assert summary["validation_split"]["n_validation"] == 145 and summary["validation_split"]["n_train"] == 1292
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [("validation_accuracy" in h, "test_accuracy" in h) for h in history] == [(True, False)] * 2
    # a resumed run keeps its split (it is in config.json) and still never reads the test split
    resumed = resume_trainer(tmp_path / "run", 3, progress=False)
    resumed.on_finish.clear()
    assert resumed.run()["validation_split"] == summary["validation_split"]
    with pytest.raises(AssertionError, match="test split was read"):  # the guard does guard
        run(tmp_path / "plain", epochs=1)


def test_validation_fraction_is_checked_with_every_field(tmp_path, monkeypatch, capsys):
    code, err = run_main(["train", "--validation-fraction", "1", "--out", str(tmp_path / "r")], tmp_path,
                         monkeypatch, capsys)
    assert code == 2 and "--validation-fraction must be a number in [0, 1)" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()


# -- [tune] in a suite ----------------------------------------------------------------------------

@pytest.mark.parametrize("table, message", [
    ('[tune]\ntrials = 0\n[tune.space]\nlr = { low = 1e-4, high = 1e-2 }', "[tune] trials must be an integer in 1..10000"),
    ('[tune]\nmetric = "test_error"\n[tune.space]\nlr = { low = 1e-4, high = 1e-2 }', "[tune] metric must be one of"),
    ('[tune]\nbudget = 3\n[tune.space]\nlr = { low = 1e-4, high = 1e-2 }', "[tune] has no setting 'budget'"),
    ('[tune]\ntrials = 2', "[tune] needs a [tune.space] table"),
    ('[tune.space]\nlr = { low = 1e-2, high = 1e-4 }', "low must be below high"),
    ('[tune.space]\nlr = { low = 0.0, high = 1e-2, log = true }', "a log distribution needs low > 0"),
    ('[tune.space]\nepochs = { low = 1, high = 5 }', "[tune.space] epochs: unknown key"),
    ('[tune.space]\n"options.decay" = { low = 0.0, high = 0.5 }', "rule 'backprop' (backprop) has no option 'decay'"),
    ('[tune.space]\nlr = { low = 1e-4, high = 1e40, log = true }', "lr must be a number in (0, 1e+30]"),
    ('[tune.space]\nlr = { low = 1e-4, high = 1e-2 }\n"group_lr.feedback" = { low = 1e-4, high = 1e-2 }',
     "group_lr names group 'feedback', which rule 'backprop' does not train"),
    ('[tune.space]\nlr = { low = 1e-4, high = 1e-2 }\n[vary]\nwidth = [8, 16]', "[tune] and [vary] together"),
])
def test_a_mistake_in_tune_is_one_line_and_exit_2_before_anything_is_written(table, message, tmp_path,
                                                                           monkeypatch, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('rules = ["backprop"]\n[settings]\nepochs = 1\ndepth = 1\nwidth = 8\n' + table + "\n")
    code, err = run_main(["benchmark", str(path), "--out", str(tmp_path / "bench"), "-q"], tmp_path, monkeypatch,
                         capsys)
    assert code == 2 and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "bench").exists()


def test_skip_tune_without_a_study_and_tune_flags_without_tune_are_one_line(suite_file, tmp_path, monkeypatch,
                                                                            capsys):
    code, err = run_main(["benchmark", str(suite_file), "--out", str(tmp_path / "bench"), "--skip-tune", "-q"],
                         tmp_path, monkeypatch, capsys)
    assert code == 2 and "--skip-tune: no tuning study for rule 'backprop'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "bench").exists()
    plain = tmp_path / "plain.toml"
    plain.write_text('rules = ["backprop"]\n[settings]\nepochs = 1\n')
    code, err = run_main(["benchmark", str(plain), "--out", str(tmp_path / "bench"), "--tune-only", "-q"],
                         tmp_path, monkeypatch, capsys)
    assert code == 2 and "--tune-only needs a suite with a [tune] table" in err and not (tmp_path / "bench").exists()


@pytest.fixture(scope="module")
def sequential(suite_file, tmp_path_factory) -> Path:
    """The tuned suite through the CLI in this process: tuning, then the final cells."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sequential") / "bench"
    result = benchmark_cli(suite_file, out)
    torch.set_num_threads(before)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())


def test_the_final_cells_train_with_each_rules_best_setting_beside_the_untuned_one(sequential):
    rows = {r["rule"]: r for r in _rows(sequential)}
    assert list(rows) == ["backprop", "backprop-untuned", "feedback_alignment", "feedback_alignment-untuned"]
    for label in ("backprop", "feedback_alignment"):
        study = _study(sequential, label)
        assert len(_finished(study)) == 3 and study.direction.name == "MINIMIZE"
        best = study.best_trial
        config = json.loads((sequential / rows[label]["run_dir"] / "config.json").read_text())
        assert config["lr"] == best.params["lr"] and 3e-3 <= config["lr"] <= 5e-2
        assert config["validation_fraction"] == 0.0 and config["epochs"] == 1  # whole training split, suite's epochs
        untuned = json.loads((sequential / rows[label + "-untuned"]["run_dir"] / "config.json").read_text())
        assert untuned["lr"] == 1e-5
        record = rows[label]["tuning"]
        assert record["params"] == best.params and record["value"] == pytest.approx(best.value)
        assert record["trials_complete"] + record["trials_pruned"] == 3 and record["sampler_seed"] == 0
        per_class = torch.bincount(load_digits().train_y).tolist()  # 20 % of each class, rounded
        assert record["study"] == f"tune/{label}.journal"
        assert record["validation_split"]["n_validation"] == sum(int(0.2 * n + 0.5) for n in per_class) == 285
        assert rows[label + "-untuned"]["tuning"] == {"tuned": False, "tuned_label": label}
        # the trials were scored on validation: a trial's run holds validation metrics and no test metric
        trial_summary = json.loads((tuning.trial_dir(sequential, label, best.number) / "summary.json").read_text())
        assert 1 - trial_summary["validation_accuracy"] == pytest.approx(best.value)
        assert "test_accuracy" not in trial_summary
        # tuning pays: lr 1e-5 for one epoch stays near chance, the tuned rate learns
        assert rows[label]["test_error"] < 0.3 < 0.7 < rows[label + "-untuned"]["test_error"]
    fa = json.loads((sequential / rows["feedback_alignment"]["run_dir"] / "config.json").read_text())
    assert fa["rule_options"]["scale"] == _study(sequential, "feedback_alignment").best_params["options.scale"]
    report = (sequential / "report.md").read_text()
    assert "## Tuning" in report and "| backprop | lr=" in report and "(tuning_history.png)" in report
    assert "rank untuned → tuned" in report
    from fa_rules.benchmark.report import _ranks
    assert _ranks({"a": 0.2, "b": None, "c": 0.1}) == {"c": 1, "a": 2, "b": 3}  # no result: last
    assert (sequential / "tuning_history.png").stat().st_size > 1000


def test_two_workers_keep_the_budget_and_the_final_cells_match_the_sequential_run(suite_file, sequential, tmp_path):
    out = tmp_path / "bench"
    result = benchmark_cli(suite_file, out, "--workers", "2", "--tune-only", "--rules", "backprop")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not (out / "results.json").exists()  # --tune-only: no final cell
    study = _study(out, "backprop")
    assert len(_finished(study)) == 3 and len(study.trials) == 3  # the budget, not one trial more
    # the final cells from the study's best (no new trial): where the chosen setting is the sequential
    # run's, the rows are the sequential run's
    again = benchmark_cli(suite_file, out, "--skip-tune", "--rules", "backprop")
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert len(_study(out, "backprop").trials) == 3
    ours = {r["rule"]: r for r in _rows(out)}
    theirs = {r["rule"]: r for r in _rows(sequential) if r["rule"] in ours}
    assert list(ours) == list(theirs) == ["backprop", "backprop-untuned"]
    assert ours["backprop"]["tuning"]["params"] == study.best_params
    for label in ours:
        same_setting = ours[label].get("tuning", {}).get("params") == theirs[label].get("tuning", {}).get("params")
        if same_setting:
            assert ours[label]["test_accuracy"] == theirs[label]["test_accuracy"], label
            assert ours[label]["test_loss"] == theirs[label]["test_loss"], label


def test_an_interrupted_tuning_resumes_up_to_the_budget(suite_file, tmp_path):
    small = tmp_path / "small.toml"
    small.write_text(SUITE.replace("trials = 3", "trials = 1"))
    out = tmp_path / "bench"
    result = benchmark_cli(small, out, "--tune-only", "--rules", "backprop")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert len(_finished(_study(out, "backprop"))) == 1
    # a process killed mid-trial leaves its trial RUNNING in the journal
    study = _study(out, "backprop")
    killed = study.ask()
    killed.suggest_float("lr", 3e-3, 5e-2, log=True)
    result = benchmark_cli(suite_file, out, "--tune-only", "--rules", "backprop")  # the budget is now 3
    assert result.exit_code == 0, result.output + repr(result.exception)
    trials = _study(out, "backprop").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert (trials[0].params, trials[0].value) == (study.trials[0].params, study.trials[0].value)  # kept
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == 1  # its setting, retried
    # a budget already spent: a rerun trains no trial
    result = benchmark_cli(suite_file, out, "--tune-only", "--rules", "backprop")
    assert result.exit_code == 0 and len(_study(out, "backprop").trials) == 4


def test_a_trial_below_the_median_is_pruned_and_a_diverged_one_scores_the_worst_value(tmp_path):
    suite = bench.suite_from_dict({
        "rules": ["backprop"], "measure": {"timing": False},
        "settings": {"epochs": 1, "depth": 1, "width": 16, "batch_size": 64, "device": "cpu"},
        "tune": {"trials": 4, "epochs": 2, "space": {"lr": {"low": 1e-7, "high": 1e4, "log": True}}}})
    out = tmp_path / "bench"
    (out / "tune").mkdir(parents=True)
    study = optuna.create_study(study_name="backprop", storage=tuning._storage(out, "backprop"))
    for lr in (1e-2, 2e-2, 1e4, 1e-7):  # two that learn, one that diverges, one that learns nothing
        study.enqueue_trial({"lr": lr})
    assert bench.run_suite(suite, out, tune="only") == []
    trials = _study(out, "backprop").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert all(t.value < 0.5 for t in trials[:2])
    assert trials[2].value == 1.0 and "diverged" in trials[2].user_attrs["diverged"]  # error 1: the worst
    # pruned after its first epoch: its error there is above the median of the two that learn
    assert list(trials[3].intermediate_values) == [1] and trials[3].intermediate_values[1] > 0.5
    assert not (tuning.trial_dir(out, "backprop", 3) / "checkpoint.pt").exists() or \
        load_checkpoint(tuning.trial_dir(out, "backprop", 3) / "checkpoint.pt")["epoch"] == 1
    summary = tuning.read_summary(out)["rules"]["backprop"]
    assert (summary["trials_complete"], summary["trials_pruned"], summary["best_trial"]) == \
        (3, 1, min((0, 1), key=lambda n: (trials[n].value, n)))
    assert [h["best"] for h in summary["history"]][:2] == [trials[0].value, min(trials[0].value, trials[1].value)]


def test_on_a_cluster_each_rules_trials_go_to_run_remote_as_picklable_jobs(suite_file, tmp_path, monkeypatch):
    from fa_rules.benchmark import cluster

    calls = []

    def run_remote(fn, argument_tuples, resources, address, on_result, retries=3, poll=None):
        """Ray's part played here: each job shipped as Ray would (pickled), run, its result handed back."""
        calls.append((fn, len(argument_tuples), resources, address))
        for index, arguments in enumerate(argument_tuples):
            shipped, shipped_arguments = pickle.loads(pickle.dumps((fn, arguments)))
            on_result(index, shipped(*shipped_arguments), None)

    monkeypatch.setattr(cluster, "check_cluster", lambda value, workers=1: value)  # Ray itself is not needed
    monkeypatch.setattr(cluster, "run_remote", run_remote)
    out = tmp_path / "bench"
    suite = bench.select_rules(bench.load_suite(suite_file), ["backprop"])
    assert bench.run_suite(suite, out, cluster="ray", tune="only") == []
    assert calls == [(tuning.tune_job, 1, {"num_cpus": 1}, "ray")]  # ceil(3 trials / 4) = one task per rule
    assert len(_finished(_study(out, "backprop"))) == 3


def test_a_study_made_for_other_settings_is_one_line(suite_file, tmp_path):
    out = tmp_path / "bench"
    small = tmp_path / "small.toml"
    small.write_text(SUITE.replace("trials = 3", "trials = 1"))
    assert benchmark_cli(small, out, "--tune-only", "--rules", "backprop").exit_code == 0
    other = tmp_path / "other.toml"
    other.write_text(SUITE.replace("validation_fraction = 0.2", "validation_fraction = 0.3"))
    with pytest.raises(UserError, match=r"was tuned with other settings \(validation_fraction differ\)"):
        bench.run_suite(bench.select_rules(bench.load_suite(other), ["backprop"]), out, tune="only")


def test_the_fashion_mnist_suite_and_its_quick_form_are_valid():
    full = bench.load_suite(Path(__file__).parents[1] / "benchmarks" / "fashion_mnist_lenet_tuned.toml")
    quick = bench.load_suite(Path(__file__).parents[1] / "benchmarks" / "fashion_mnist_lenet_tuned.toml", quick=True)
    labels = ["backprop", "feedback_alignment", "direct_feedback_alignment", "sign_symmetry", "kolen_pollack", "frsf",
              "direct_random_target_projection", "dtp"]
    assert [e.label for e in full.rules] == labels and full.settings["dataset"] == "fashion_mnist"
    assert len(full.seeds) == 3 and all("lr" in full.tune["space"][label] for label in labels)
    assert quick.settings["dataset"] == "digits" and (quick.tune["trials"], full.tune["trials"]) == (2, 5)
    tuning.check_tune(quick)  # every bound and choice of every rule's space, on the quick form's data


def test_a_validation_run_shows_its_validation_metric_in_the_progress_lines_and_the_live_table():
    from fa_rules.benchmark.live import _metric_text
    from fa_rules.core.progress import TrainingProgress

    assert _metric_text({"validation_accuracy": 0.5, "train_loss": 1.0}) == "val acc 0.5000"
    progress = TrainingProgress(epochs=1, steps_per_epoch=1, enabled=True)
    with progress.console.capture() as captured:
        with progress:
            progress.resume_at(0)
            progress.end_epoch({"epoch": 1, "train_loss": 1.0, "validation_accuracy": 0.5})
    assert "validation_accuracy 0.5000" in captured.get()
