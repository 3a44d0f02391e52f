"""What a new user tripped on: a run trained with $FA_RULES_DATA_DIR found again without it,
`reconstruct` showing every class of a class-sorted split, the conformance suite's `learns` failure
saying what it required (and the suite taking rule options), and torch's `torch.jit.script`
FutureWarning on a third-party rule's first forward-mode step."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.cli.generative import pick_test_images
from fa_rules.core import UserError
from fa_rules.core.data import Dataset
from fa_rules.core.rule import Rule, RuleSpec, no_state_init
from fa_rules.testing import assert_conformant, run_check
from test_datasets import write_idx

TINY = ["--depth", "1", "--width", "32", "--latent-dim", "16", "--batch-size", "32", "--lr", "3e-3", "-q"]


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def write_class_sorted_mnist(folder, per_class_train=3, per_class_test=2):
    """MNIST-like IDX files whose splits are sorted by class (as some real splits are)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = torch.arange(10).repeat_interleave(per_class)
        images = torch.randint(0, 256, (len(labels), 28, 28), generator=g)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, True)


@pytest.fixture(scope="module")
def env_run(tmp_path_factory):
    """An ae run on MNIST-like files found through $FA_RULES_DATA_DIR alone, then the variable unset
    (and the default directory empty) for everything after training."""
    root = tmp_path_factory.mktemp("new_user")
    data = root / "data"
    write_class_sorted_mnist(data / "MNIST" / "raw")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FA_RULES_DATA_DIR", str(data))
        invoke("train", "--rule", "ae", "--dataset", "mnist", "--epochs", 1, "--out", root / "run", *TINY)
    return root / "run", data


@pytest.fixture
def without_data_dir_variable(env_run, monkeypatch, tmp_path):
    monkeypatch.delenv("FA_RULES_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))  # the default data directory holds nothing either


def test_a_run_trained_with_the_data_dir_variable_records_the_directory(env_run):
    run, data = env_run
    assert json.loads((run / "config.json").read_text())["data_dir"] == str(data)


def test_probe_and_reconstruct_find_the_data_later_without_the_variable(env_run, without_data_dir_variable, tmp_path):
    run, _ = env_run
    probe = json.loads(invoke("probe", run, "--json").output)
    assert probe["dataset"] == "mnist" and 0.0 <= probe["probe_accuracy"] <= 1.0
    invoke("reconstruct", run, "--num", 4, "--out", tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").size == (4 * 30 + 2, 2 * 30 + 2)  # 4 28-px images, 2 px padding


def test_reconstruct_shows_every_class_of_a_class_sorted_split(env_run, without_data_dir_variable, tmp_path):
    from fa_rules.runs import load_run

    run, _ = env_run
    dataset = load_run(run)[-1]
    assert dataset.test_y.tolist() == sorted(dataset.test_y.tolist())  # class-sorted: 0, 0, 1, 1, ...
    picked = pick_test_images(dataset, 10)
    assert dataset.test_y[picked].tolist() == list(range(10))
    assert dataset.test_y[pick_test_images(dataset, 10, "first")].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # the grid's top row holds those images: one of each class, in class order
    invoke("reconstruct", run, "--num", 8, "--out", tmp_path / "grid.png")
    pixels = torch.tensor(np.asarray(Image.open(tmp_path / "grid.png").convert("L")), dtype=torch.float32)
    for column, index in enumerate(picked[:8].tolist()):
        shown = pixels[2:30, 2 + 30 * column: 30 + 30 * column]
        torch.testing.assert_close(shown, dataset.test_x[index, 0].float(), atol=1.0, rtol=0)


def test_picking_across_classes_takes_each_class_in_turn_in_order_of_first_appearance():
    labels = torch.tensor([2, 2, 2, 0, 0, 1])
    d = Dataset("toy", torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(6, 1, 2, 2), labels, 3)
    assert pick_test_images(d, 6).tolist() == [0, 3, 5, 1, 4, 2]
    assert pick_test_images(d, 4).tolist() == [0, 3, 5, 1]
    assert pick_test_images(d, 4, "first").tolist() == [0, 1, 2, 3]
    assert pick_test_images(d, 99, "first").tolist() == list(range(6))
    unlabelled = Dataset("toy", d.train_x, d.train_y, d.test_x, torch.zeros(6, dtype=torch.long), 0)
    assert pick_test_images(unlabelled, 3).tolist() == [0, 1, 2]


def test_an_unknown_pick_is_one_user_error(tmp_path):
    result = CliRunner().invoke(app, ["reconstruct", str(tmp_path), "--pick", "random"])
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == "--pick must be one of classes, first, got 'random'"


# -- the conformance suite ------------------------------------------------------------------------
def slow_rule():
    """A rule whose loss falls `fall` per step (read from the batch's seed, the step number in the
    `learns` check) and that changes nothing: every check but `learns` passes."""
    def build(fall):
        def step(network, params, state, batch):
            updates = {g: {k: torch.zeros_like(v) for k, v in t.items()} for g, t in params.items()}
            return updates, state, {"loss": torch.tensor(1.0 - fall * batch.seed)}

        return Rule(init=no_state_init, step=step)

    return RuleSpec("slow", build, "a rule whose loss falls slowly", {"fall": 3e-4}, models=("mlp",))


def test_learns_says_how_much_the_loss_fell_and_what_it_required():
    with pytest.raises(AssertionError) as e:
        assert_conformant(slow_rule())
    # first 5 steps: 1 - 3e-4 * 2 = 0.9994; last 5: 1 - 3e-4 * 97 = 0.9709; (0.9994 - 0.9709) / 0.9994
    assert str(e.value) == ("rule 'slow' is not conformant: learns [mlp]: loss fell 2.9% (mean of the first 5 "
                            "steps 0.9994, of the last 5 0.9709); the check requires a fall of 10% over 100 steps "
                            "at lr 0.003")


def test_learns_says_when_the_loss_rose_or_stayed():
    # first 5 steps 1 + 1e-4 * 2 = 1.0002, last 5 1 + 1e-4 * 97 = 1.0097: 0.95 % up
    with pytest.raises(AssertionError, match=r"^learns \[mlp\]: loss rose 0\.9% \(mean of the first 5 steps 1\.0002,"):
        run_check(slow_rule(), "learns", options={"fall": -1e-4})
    with pytest.raises(AssertionError, match=r"^learns \[mlp\]: loss did not change \(mean of the first 5 steps 1\.0"):
        run_check(slow_rule(), "learns", options={"fall": 0.0})


def test_the_suite_takes_rule_options():
    assert_conformant(slow_rule(), options={"fall": 2e-3})  # 19 % over 100 steps: conformant
    with pytest.raises(AssertionError) as e:
        assert_conformant(slow_rule(), options={"fall": 1e-4})
    assert str(e.value).startswith("rule 'slow' with options {'fall': 0.0001} is not conformant: learns [mlp]: "
                                   "loss fell 1.0%")
    unknown = r"^structure \[mlp\]: UserError: rule 'slow' has no option nope \(options: fall\)$"
    with pytest.raises(AssertionError, match=unknown):
        run_check(slow_rule(), "structure", options={"nope": 1})


# -- torch's FutureWarning on the first forward-mode step ------------------------------------------
JVP_RULE = textwrap.dedent("""
    import json, sys, tempfile
    import torch
    from fa_rules import models as zoo
    from fa_rules.core import trainer as engine
    from fa_rules.core.config import TrainConfig
    from fa_rules.core.metrics import classification_loss
    from fa_rules.core.rule import Rule, no_state_init
    from fa_rules.plugins.datasets import load_digits

    def step(network, params, state, batch):  # a third-party rule: forward mode straight from torch.func
        loss = lambda p: classification_loss(network.apply(p, batch.x), batch.y)
        ones = {k: torch.ones_like(v) for k, v in params["model"].items()}
        value, slope = torch.func.jvp(loss, (params["model"],), (ones,))
        return {"model": {k: slope * v for k, v in ones.items()}}, state, {"loss": value}

    if sys.argv[1:] == ["without-the-engine-warm-up"]:  # what a test run shows without the fix
        engine.load_forward_ad = lambda: None
    config = TrainConfig(rule="jvp_rule", epochs=1, batch_size=512, device="cpu")
    trainer = engine.Trainer(config, Rule(init=no_state_init, step=step),
                             lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), tempfile.mkdtemp(),
                             progress=False)
    print(json.dumps(trainer.run()["peak_saved_bytes"]))
""")


def test_a_rule_calling_torch_func_jvp_prints_no_torch_jit_script_warning():
    # a fresh process: torch warns on its first forward-mode use only (run the script with the
    # argument without-the-engine-warm-up to see the warning this test holds off)
    result = subprocess.run([sys.executable, "-c", JVP_RULE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.jit.script" not in result.stderr and "Warning" not in result.stderr, result.stderr
    # forward mode saves nothing for backward, and the memory probe can run it: 0, not empty
    assert json.loads(result.stdout) == 0


def test_a_rule_calling_torch_func_grad_leaves_peak_saved_bytes_empty(tmp_path):
    from fa_rules import models as zoo
    from fa_rules.core.config import TrainConfig
    from fa_rules.core.metrics import classification_loss
    from fa_rules.core.trainer import Trainer
    from fa_rules.plugins.datasets import load_digits

    def step(network, params, state, batch):
        loss = lambda p: classification_loss(network.apply(p, batch.x), batch.y)  # noqa: E731
        grads, value = torch.func.grad_and_value(loss)(params["model"])
        return {"model": grads}, state, {"loss": value}

    config = TrainConfig(rule="grad_rule", epochs=1, batch_size=512, device="cpu")
    trainer = Trainer(config, Rule(init=no_state_init, step=step), lambda: zoo.mlp((1, 8, 8), (10,), width=8),
                      load_digits(), tmp_path, progress=False)
    assert trainer.run()["peak_saved_bytes"] is None  # torch.func refuses the probe's hooks: not measured
