"""Buffers are engine state: batch norm's running statistics updated as torch updates them, used in
evaluation mode, saved and resumed bit for bit; dropout drawn from the step's seed; a module handed
to the Python API trained as it is and left untouched."""

import copy
import json

import pytest
import torch
from torch import nn

import fa_rules
from fa_rules.core.checkpoint import load_checkpoint, save_checkpoint
from fa_rules.core.errors import UserError
from fa_rules.core.network import as_network, recording_statistics, update_running_statistics
from fa_rules.core.rule import Batch
from fa_rules.plugins.manager import get_registry
from fa_rules.runs import load_run, resume_trainer


class SmallNet(nn.Module):
    """Conv, batch norm with running statistics (momentum 0.3), dropout, linear: what a user writes."""

    def __init__(self, momentum: float = 0.3):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6, momentum=momentum)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6 * 16, 10)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x)))
        h = torch.nn.functional.max_pool2d(h, 2).flatten(1)
        return self.head(self.drop(h))


def _network(model):
    return as_network(model, (1, 8, 8), (10,), "small")


@pytest.mark.parametrize("momentum", [0.3, None])  # None: torch's cumulative average
def test_running_statistics_after_steps_equal_torchs_own_training_forward(momentum):
    torch.manual_seed(0)
    model = SmallNet(momentum).double()
    reference = copy.deepcopy(model)
    network = _network(model)
    params = network.init_params()
    rule = get_registry().rule("feedback_alignment").make()
    params, state = rule.init(network, {"model": params}, torch.Generator().manual_seed(0))
    for step in range(3):
        x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
        batch = Batch(x, torch.arange(16) % 10, step)
        with recording_statistics(network) as stats:
            rule.step(network, params, state, batch)
        update_running_statistics(network, stats)
        reference.train()
        reference(x)  # torch's own update of the same module's buffers
    ours, theirs = dict(network.named_buffers()), dict(reference.named_buffers())
    assert int(theirs["norm.num_batches_tracked"]) == 3
    for name, value in theirs.items():
        key = next(k for k in ours if k.endswith(name))
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-12)
    # the step itself changed nothing: a step outside recording leaves the buffers as they are
    before = {k: v.clone() for k, v in ours.items()}
    rule.step(network, params, state, batch)
    assert all(torch.equal(before[k], v) for k, v in network.named_buffers())


def test_evaluation_mode_uses_the_running_statistics_and_training_mode_the_batchs():
    torch.manual_seed(1)
    model = SmallNet()
    network = _network(copy.deepcopy(model))
    with torch.no_grad():
        for m in (model.norm, dict(network.named_modules())[network.tracked_norms[0][0]]):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(4.0)
    params = network.init_params()
    x = torch.rand(8, 1, 8, 8)
    model.eval(), network.eval()
    torch.testing.assert_close(network.apply(params, x), model(x))
    model.train(), network.train()
    for m in (*model.modules(), *network.modules()):  # dropout off: compare the normalisation alone
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)
    ours = network.apply(params, x)
    torch.manual_seed(0)
    with torch.no_grad():
        model.norm.momentum = 0.0  # (torch's forward would move the buffers; the values are the batch's either way)
        theirs = model(x)
    torch.testing.assert_close(ours, theirs)


def _train(tmp_path, name, seed=0, epochs=2, **extra):
    out = tmp_path / name
    fa_rules.train(rule="feedback_alignment", dataset="digits", model=SmallNet, epochs=epochs, batch_size=128,
                   seed=seed, out_dir=out, progress=False, **extra)
    return out


def test_a_run_with_running_statistics_and_dropout_resumes_bit_identically(tmp_path):
    straight = _train(tmp_path, "straight", epochs=2)
    stopped = _train(tmp_path, "resumed", epochs=1)
    resume_trainer(stopped, 2, progress=False, model=SmallNet).run()
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(stopped / "checkpoint.pt")
    assert a["buffers"].keys() == b["buffers"].keys() and a["buffers"]
    for key in a["buffers"]:
        assert torch.equal(a["buffers"][key], b["buffers"][key]), key
    for key in a["params"]["model"]:
        assert torch.equal(a["params"]["model"][key], b["params"]["model"][key]), key
    steps = a["global_step"]
    tracked = [v for k, v in a["buffers"].items() if k.endswith("num_batches_tracked")]
    assert [int(t) for t in tracked] == [steps]  # one update per step
    assert json.loads((straight / "config.json").read_text())["model"] == "python:SmallNet"


def test_dropout_follows_the_seed(tmp_path):
    a, b, c = (_train(tmp_path, name, seed=seed, epochs=1) for name, seed in (("a", 0), ("b", 0), ("c", 5)))
    pa, pb, pc = (load_checkpoint(d / "checkpoint.pt")["params"]["model"] for d in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_load_run_gives_the_trained_buffers_in_evaluation_mode(tmp_path):
    run = _train(tmp_path, "run", epochs=2, lr=0.01)
    get_registry().named_models.pop("python:SmallNet")  # as in a new process
    with pytest.raises(UserError, match=r"^model 'python:SmallNet' was a module handed to fa_rules.train; hand it again"):
        load_run(run)
    config, rule, network, params, state, dataset = load_run(run, model=SmallNet)
    assert not network.training
    saved = load_checkpoint(run / "checkpoint.pt")["buffers"]
    assert all(torch.equal(v, saved[k]) for k, v in network.buffer_dict().items())
    summary = json.loads((run / "summary.json").read_text())
    with torch.no_grad():
        logits = network.apply(params["model"], dataset.test_x.float() / 255 if dataset.test_x.dtype == torch.uint8
                               else dataset.test_x)
    correct = int((logits.argmax(1) == dataset.test_y).sum())
    assert correct == round(summary["test_accuracy"] * len(dataset.test_y))  # evaluation used the running statistics
    assert summary["test_accuracy"] > 0.6


def test_a_module_instance_is_trained_as_a_copy_and_left_untouched(tmp_path):
    torch.manual_seed(3)
    model = SmallNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fa_rules.train(rule="backprop", dataset="digits", model=model, epochs=1, batch_size=256, out_dir=tmp_path / "r",
                   progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.norm.track_running_stats and not model.norm._forward_hooks
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    first = {k: v for k, v in ckpt["params"]["model"].items() if k.endswith("conv.weight")}
    assert first and not torch.equal(next(iter(first.values())), before["conv.weight"])  # it trained from those weights


def test_damaged_buffers_are_refused_in_one_line(tmp_path):
    run = _train(tmp_path, "run", epochs=1)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    key = next(k for k in ckpt["buffers"] if k.endswith("running_var"))
    ckpt["buffers"][key] = -ckpt["buffers"][key]
    save_checkpoint(run / "checkpoint.pt", ckpt)
    with pytest.raises(Exception, match=rf"is damaged: buffers/{key} holds negative values"):
        resume_trainer(run, 2, progress=False, model=SmallNet)
    del ckpt["buffers"]
    save_checkpoint(run / "checkpoint.pt", ckpt)
    with pytest.raises(Exception, match="it holds no buffers"):
        resume_trainer(run, 2, progress=False, model=SmallNet)


class MutatesABuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.register_buffer("average", torch.zeros(()))

    def forward(self, x):
        out = self.linear(x.flatten(1))
        self.average.mul_(0.9).add_(0.1 * out.mean())  # a statistic of its own, kept in place
        return out


def test_a_forward_that_changes_a_buffer_is_one_line_under_torch_func(tmp_path):
    from fa_rules.core.autodiff import functional_transforms

    with functional_transforms(), pytest.raises(UserError, match=r"^model 'python:MutatesABuffer' changes a tensor in place in its forward"):
        fa_rules.train(rule="backprop", dataset="digits", model=MutatesABuffer, epochs=1, out_dir=tmp_path / "r",
                       progress=False)


def test_a_3_channel_design_handed_grey_images_gets_the_input_adapter():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    network = as_network(copy.deepcopy(model), (1, 28, 28), (10,), "resnet18").eval()
    assert type(network.blocks[0].input_adapter).__name__ == "InputAdapter"
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(network.apply(network.init_params(), x), model(x.repeat(1, 3, 1, 1)),
                                   rtol=0, atol=1e-12)
    # a design that takes grey images as they are gets none
    assert not hasattr(_network(SmallNet()).blocks[0], "input_adapter")
    # the same design written as an nn.Sequential of its stages gets it in its first block
    r = copy.deepcopy(model)
    stages = nn.Sequential(nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool), r.layer1, r.layer2, r.layer3, r.layer4,
                           nn.Sequential(r.avgpool, nn.Flatten(), r.fc))
    sequential = as_network(stages, (1, 28, 28), (10,), "stages").eval()
    with torch.no_grad():
        torch.testing.assert_close(sequential.apply(sequential.init_params(), x), model(x.repeat(1, 3, 1, 1)),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", ["vgg", "resnet20"])
def test_zoo_models_with_running_statistics_start_untouched(model):
    """Building a model runs shape probes; none may move the running statistics before training."""
    network = get_registry().model(model).make((1, 8, 8), (10,), running_stats=True, width=4)
    assert network.tracked_norms
    for name, value in network.named_buffers():
        expected = torch.ones_like(value) if name.endswith("running_var") else torch.zeros_like(value)
        assert torch.equal(value, expected), name


def test_compile_runs_a_model_with_running_statistics_eager_and_says_so(tmp_path, capsys):
    run = _train(tmp_path, "run", epochs=1, compile=True)
    assert "keeps running statistics, which a compiled step cannot record; running eager" in capsys.readouterr().err
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert [int(v) for k, v in ckpt["buffers"].items() if k.endswith("num_batches_tracked")] == [ckpt["global_step"]]


def test_backprops_angle_to_itself_is_zero_with_dropout(tmp_path):
    """The alignment angle compares the rule's update and backprop's gradient under the same dropout masks."""
    summary = fa_rules.train(rule="backprop", dataset="digits", model=SmallNet, epochs=1, batch_size=256,
                             out_dir=tmp_path / "r", progress=False)
    assert summary["alignment_angle_deg"] and max(summary["alignment_angle_deg"]) < 1e-2
