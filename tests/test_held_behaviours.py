"""Behaviours that a one-line change used to leave every test green: each test here fails when the
behaviour it names is changed (the conv positions the weight mirror averages over, target
propagation's +1, DFC's decay sign, the fork check, the probe's standardisation and penalty, time
per sample, the benchmark's resume and report, `load_run`'s initial state, the loaders that must
never run a file's code)."""

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fa_rules import models as zoo
from fa_rules.core import Batch, Network, UserError
from fa_rules.core.feedback import mirror_gradients
from fa_rules.core.network import Block
from fa_rules.plugins.manager import get_registry
from test_cli_errors import run_main
from test_hardening_core import Payload


# -- the weight mirror on a convolution --------------------------------------------------------------
def test_weight_mirror_averages_a_conv_correlation_over_examples_and_output_positions():
    # a 2x2 kernel without padding: 3x3 inputs give 2x2 outputs, so input and output positions differ
    torch.manual_seed(0)
    net = Network([Block(nn.Conv2d(1, 2, 3), nn.Tanh(), in_shape=(1, 5, 5)), Block(nn.Conv2d(2, 3, 2))],
                  in_shape=(1, 5, 5), family="custom").double()
    model = net.init_params()
    xi = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    feedback = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = mirror_gradients(net, model, [1], {1: xi}, {1: feedback}, decay=0.25)
    w = model["blocks.1.layer.weight"]
    r = F.conv2d(xi, w)  # the linear response, no bias
    assert r.shape == (4, 3, 2, 2)
    # sum over examples and positions of r[n, o, p] * xi[n, c, p + k], then over 4 examples x 4 positions
    correlation = torch.zeros_like(w)
    for di in range(2):
        for dj in range(2):
            correlation[:, :, di, dj] = torch.einsum("nohw,nchw->oc", r, xi[:, :, di:di + 2, dj:dj + 2])
    expected = 0.25 * feedback - correlation / (4 * 4)
    assert torch.allclose(grads["blocks.1.layer.weight"], expected, rtol=1e-12, atol=1e-12)


# -- target propagation's normalised decoder step ------------------------------------------------------
def test_target_prop_divides_the_decoder_loss_by_its_input_norm_plus_one_for_the_bias():
    from fa_rules.rules import target_propagation as tp

    torch.manual_seed(0)
    net = Network([Block(nn.Linear(3, 3), nn.Identity(), in_shape=(3,)), Block(nn.Linear(3, 3), nn.Identity())],
                  in_shape=(3,), family="mlp").double()
    model = net.init_params()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], dtype=torch.float64)
    h1 = x @ model["blocks.0.layer.weight"].T + model["blocks.0.layer.bias"]
    h2 = h1 @ model["blocks.1.layer.weight"].T + model["blocks.1.layer.bias"]
    v = torch.tensor([[0.2, 0.1, -0.3], [0.0, 0.4, 0.1], [-0.2, 0.3, 0.5]], dtype=torch.float64)
    c = torch.tensor([0.1, -0.1, 0.2], dtype=torch.float64)
    s = tp.Settings(beta=0.5, space="post", feedback_lr=0.5, feedback_iters=1, feedback_noise=0.0,
                    feedback_objective="autoencoder", feedback_normalise=True).check()
    new = tp.train_feedback(net, model, {"1": {"weight": v, "bias": c}}, [x, h1, h2], s, torch.Generator())
    # decoder g(h2) = V h2 + c reconstructs h1; loss 0.5 mean_n |g - h1|^2 / (mean_n |h2|^2 + 1)
    scale = h2.pow(2).sum(1).mean() + 1.0
    err = h2 @ v.T + c - h1
    assert torch.allclose(new["1"]["weight"], v - 0.5 * (err.T @ h2) / (2 * scale), rtol=1e-12, atol=1e-14)
    assert torch.allclose(new["1"]["bias"], c - 0.5 * err.sum(0) / (2 * scale), rtol=1e-12, atol=1e-14)


# -- DFC's learned feedback decays towards zero ----------------------------------------------------------
def test_dfc_feedback_decay_adds_decay_times_q_to_the_descended_update():
    torch.manual_seed(0)
    net = zoo.mlp((1, 4, 4), (10,), depth=1, width=6).double()
    x, y = torch.rand(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 10, (5,))
    updates = {}
    for decay in (0.0, 0.5):
        rule = get_registry().rule("dfc").make(feedback="learned", feedback_init="random", feedback_decay=decay,
                                               feedback_steps=3, steps=3)
        params, state = rule.init(net, {"model": net.init_params()}, torch.Generator().manual_seed(1))
        updates[decay], _, _ = rule.step(net, params, state, Batch(x, y, seed=7))
    q = params["feedback"]
    for key, qi in q.items():
        assert qi.abs().sum() > 0
        # descended, +decay*Q shrinks Q (Eq. 13's -beta Q in Delta Q)
        assert torch.allclose(updates[0.5]["feedback"][key] - updates[0.0]["feedback"][key], 0.5 * qi,
                              rtol=1e-9, atol=1e-12), key


# -- the torchrun fork check --------------------------------------------------------------------------
def _fake_world(monkeypatch, others: list[list[torch.Tensor]]):
    """all_reduce(MAX) over this process's tensor and what `others` (the other ranks) would send."""
    from fa_rules.core import distributed

    def all_reduce(tensor, op=None, group=None):
        assert op == distributed.dist.ReduceOp.MAX
        for tensors in others:  # each rank sends its checksums (sum, sum of squares) and their negatives
            sums = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors])
            tensor.copy_(torch.maximum(tensor, torch.cat([sums.reshape(-1), -sums.reshape(-1)])))

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    return distributed.Context(rank=0, world_size=len(others) + 1)


def test_fork_check_fails_when_one_tensor_of_one_process_differs(monkeypatch):
    from fa_rules.core.distributed import DistributedError

    mine = [torch.ones(3), torch.arange(4.0), torch.full((2,), 0.5)]
    forked = [mine[0], mine[1] + torch.tensor([0.0, 0.0, 0.0, 1e-3]), mine[2]]  # one entry of one tensor
    ctx = _fake_world(monkeypatch, [list(mine), forked])
    with pytest.raises(DistributedError, match=r"parameters differ between processes \(process 0 of 3\)"):
        ctx.check_identical(mine, "parameters")
    _fake_world(monkeypatch, [list(mine), list(mine)]).check_identical(mine, "parameters")  # identical: silent


# -- loaders that must never run a file's code ---------------------------------------------------------
def test_fid_weights_file_never_runs_code(tmp_path):
    from fa_rules.measures.fid import load_inception

    marker = tmp_path / "ran"
    torch.save({"weight": Payload(marker)}, tmp_path / "inception.pth")
    with pytest.raises(UserError) as refused:
        load_inception(tmp_path / "inception.pth")
    assert not marker.exists()
    assert "not a torch state dict file" in str(refused.value)


def test_cached_64x64_dataset_never_runs_code(tmp_path):
    from fa_rules.plugins.datasets import _cached

    marker = tmp_path / "ran"
    torch.save({"name": Payload(marker)}, tmp_path / "stl10_64.pt")
    with pytest.raises(UserError, match="damaged cache of decoded images"):
        _cached(tmp_path / "stl10_64.pt", lambda: pytest.fail("a cache is there: nothing is built"), 10, 100)
    assert not marker.exists()


# -- the linear probe -------------------------------------------------------------------------------------
def test_probe_standardises_test_latents_with_the_training_statistics():
    from fa_rules.measures.probe import fit_linear_probe

    # training: class 0 around -1, class 1 around +1; the test split sits wholly on the class-1 side
    train_z = torch.tensor([[-1.2], [-1.0], [-0.8], [0.8], [1.0], [1.2]])
    train_y = torch.tensor([0, 0, 0, 1, 1, 1])
    test_z = torch.tensor([[2.0], [2.2], [3.8], [4.0]])
    test_y = torch.tensor([0, 0, 1, 1])
    result = fit_linear_probe(train_z, train_y, test_z, test_y, 2)
    assert result.probe_train_accuracy == 1.0
    # by the training statistics every test latent is class 1 (by their own, half would be class 0)
    assert result.probe_accuracy == 0.5


def test_probe_penalises_the_weights_not_the_bias():
    from fa_rules.measures.probe import fit_linear_probe

    # separable, 3 of 4 examples class 1: a heavy penalty leaves the bias alone to decide (the majority)
    z = torch.tensor([[-1.0], [1.0], [1.1], [0.9]])
    y = torch.tensor([0, 1, 1, 1])
    assert fit_linear_probe(z, y, z, y, 2, l2=1e-4).probe_accuracy == 1.0
    heavy = fit_linear_probe(z, y, z, y, 2, l2=1e3)
    assert heavy.probe_accuracy == 0.75 and heavy.probe_train_accuracy == 0.75


# -- time per sample --------------------------------------------------------------------------------------
def test_time_per_sample_is_the_median_timed_draw_over_the_batch_without_the_warmups(monkeypatch):
    from fa_rules.measures import run as measures

    clock = [0.0]
    durations = iter([10.0, 10.0, 1.0, 2.0, 3.0])  # two warm-up draws, then three timed ones

    def sample(network, params, state, n, generator):
        clock[0] += next(durations)
        return torch.zeros(n, 1)

    monkeypatch.setattr(measures.time, "perf_counter", lambda: clock[0])
    trainer = types.SimpleNamespace(rule=types.SimpleNamespace(sample=sample), device=torch.device("cpu"),
                                    config=types.SimpleNamespace(seed=0), network=None, params={}, state={})
    assert measures.time_per_sample(trainer, batch=4, repeats=3) == 2.0 / 4
    assert next(durations, None) is None  # exactly two warm-ups and three repeats drawn


# -- benchmark resume, report and timing phase -------------------------------------------------------
def _cells():
    from fa_rules.benchmark.cells import plan_cells
    from fa_rules.benchmark.suite import suite_from_dict

    suite = suite_from_dict({"rules": ["backprop", "feedback_alignment"], "seeds": 2,
                             "settings": {"epochs": 1, "width": 8, "batch_size": 256, "device": "cpu"},
                             "measure": {"fid": False}})
    return suite, plan_cells(suite)


def test_a_stored_row_is_reused_only_for_its_own_seed(tmp_path):
    import json

    from fa_rules.benchmark.runner import _load_cell
    from fa_rules.benchmark.suite import ROW_FILE

    _, cells = _cells()
    cell = next(c for c in cells if c.seed == 1)
    run_dir = tmp_path / "runs" / cell.dirname
    run_dir.mkdir(parents=True)
    row = {"rule": cell.entry.label, "seed": 1, "status": "ok", "test_accuracy": 0.9}
    (run_dir / ROW_FILE).write_text(json.dumps(row))
    assert _load_cell(run_dir, cell, tmp_path)["test_accuracy"] == 0.9
    (run_dir / ROW_FILE).write_text(json.dumps({**row, "seed": 0}))  # another seed's row
    assert _load_cell(run_dir, cell, tmp_path) is None


def test_diverged_cells_are_listed_among_the_reports_failures():
    from fa_rules.benchmark.report import render_report

    suite, _ = _cells()
    rows = [{"rule": "backprop", "seed": 0, "status": "ok", "error": None, "train_time_s": 1.0},
            {"rule": "feedback_alignment", "seed": 0, "status": "diverged",
             "error": "diverged at epoch 1, step 3 (loss=nan)", "train_time_s": 1.0}]
    machine = {"machines": ["test"], "first_run": "2026-01-01", "last_run": "2026-01-01"}
    report = render_report(suite, rows, [], machine=machine)
    assert "## Failures and notes" in report
    assert "- `feedback_alignment` seed 0: diverged: diverged at epoch 1, step 3 (loss=nan)" in report.splitlines()


class _Median(float):
    """A timed median that reads the same by either clock (wall and CPU time)."""

    wall = cpu = property(float)


def test_timing_phase_times_a_group_again_unless_every_member_was_timed(tmp_path, monkeypatch):
    from fa_rules.benchmark import runner
    from fa_rules.benchmark.suite import ROW_FILE, RUNS_DIR

    _, cells = _cells()
    timed = []
    monkeypatch.setattr(runner, "time_group", lambda group, steps: timed.append([c.seed for c in group])
                        or [_Median(0.5)] * len(group))
    for cell in cells:  # where the timed rows are written back
        (tmp_path / RUNS_DIR / cell.dirname).mkdir(parents=True)
    seed0 = [i for i, c in enumerate(cells) if c.seed == 0]
    seed1 = [i for i, c in enumerate(cells) if c.seed == 1]
    rows = {i: {"status": "ok"} for i in range(len(cells))}
    rows[seed0[0]]["interleaved_step_time_s"] = 0.1  # seed 0: one of two timed (interrupted)
    for i in seed1:  # seed 1: both timed
        rows[i]["interleaved_step_time_s"] = 0.2
    runner.time_interleaved(cells, rows, tmp_path, steps=2)
    assert timed == [[0, 0]]
    assert [rows[i]["interleaved_step_time_s"] for i in seed0] == [0.5, 0.5]
    assert [rows[i]["interleaved_step_time_s"] for i in seed1] == [0.2, 0.2]
    written = sorted(p.parent.name for p in (tmp_path / RUNS_DIR).glob(f"*/{ROW_FILE}"))
    assert written == sorted(cells[i].dirname for i in seed0)


# -- load_run rebuilds the run's initial state as the trainer built it ---------------------------------
def test_load_run_untrained_gives_the_trainers_initial_parameters_and_rule_state(tmp_path):
    from fa_rules.core.config import TrainConfig
    from fa_rules.runs import load_run, new_trainer

    config = TrainConfig(rule="direct_feedback_alignment", epochs=1, batch_size=256, model_options={"width": 8},
                         device="cpu", seed=5)
    trainer = new_trainer(config, tmp_path / "run", progress=False)
    trainer.save()  # config.json and the first checkpoint, as after an epoch
    _, _, _, params, state, _ = load_run(tmp_path / "run", trained=False)
    assert state["projections"]  # drawn from the run's generator at init
    for group in trainer.params:
        for k, v in trainer.params[group].items():
            assert torch.equal(params[group][k], v), k
    for k, v in trainer.state["projections"].items():
        assert torch.equal(state["projections"][k], v), k


# -- the command line: an empty KEY is a mistake ----------------------------------------------------------
@pytest.mark.parametrize("flag, item", [("--opt", "=1"), ("--opt", " =1"), ("--model-opt", "=3"),
                                        ("--group-lr", " = 0.1")])
def test_an_empty_key_is_refused_in_one_line(flag, item, tmp_path, monkeypatch, capsys):
    code, stderr = run_main(["train", flag, item, "--epochs", "1", "--out", str(tmp_path / "run")], tmp_path,
                             monkeypatch, capsys)
    assert (code, stderr) == (2, f"error: {flag} expects KEY=VALUE, got '{item}'\n")
    assert not (tmp_path / "run").exists()

