"""Data-parallel training under torchrun (CPU, gloo, 2 processes on this machine).

The claim under test: 2 processes with batch B end where 1 process with batch 2B ends (same
parameters within float tolerance, same metrics), for every rule family, and a distributed run
that loses a process stops at once with its last checkpoint intact and resumes exactly.

Every torchrun launch costs two process start-ups (imports dominate), so there are two: one whose
rank 1 dies mid-run, and one that resumes it and trains every rule in turn through the CLI app
(`DRIVER`). The one-process references train in this process.
"""

import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from fa_rules.cli.app import app
from fa_rules.core.checkpoint import load_checkpoint
from fa_rules.core.distributed import floating_leaves
from fa_rules.plugins.manager import get_registry

from torchrun_launch import LAUNCH, launch_env, needs_torchrun

B = 32  # per process; the one-process reference uses 2 * B
EPOCHS = 3
COMMON = ["--dataset", "digits", "--width", "32", "--epochs", str(EPOCHS), "--device", "cpu", "-q"]
# Per-example noise is drawn per process (it must differ between shards), so rules with noise are
# compared with it off; everything else runs with its defaults.
RULES = {
    "backprop": [],
    "feedback_alignment": [],
    "dtp": ["--opt", "feedback_noise=0"],
    "local_fa": [],
}
# dtp trains its decoders inside its step; it matches the one-process run because it averages each
# decoder gradient and its batch normaliser with `average_across_processes` (see docs/distributed.md).
# 1 s between torchrun's health checks leaves the survivor time to report a lost peer itself

# Trains each argument list in turn through the CLI app; records per run whether it raised.
DRIVER = """
import json, os, sys, traceback
from fa_rules.cli.app import app
outcomes = []
for args in json.loads(sys.argv[2]):
    try:
        app(args, standalone_mode=False)
        outcomes.append(None)
    except Exception:
        outcomes.append(traceback.format_exc())
with open(sys.argv[1] + "." + os.environ["RANK"], "w") as f:
    json.dump(outcomes, f)
"""

# rank 1 dies by SIGKILL in the middle of the second epoch (steps 23-45 with 23 per epoch)
DIE = """
import os, signal, sys
from fa_rules.core import trainer
from fa_rules.cli.app import app

original = trainer.Trainer.train_step

def train_step(self, batch, share=1.0):
    if self.dist.rank == 1 and self.global_step == 30:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, batch, share)

trainer.Trainer.train_step = train_step
app(sys.argv[1:], standalone_mode=False)
"""

pytestmark = needs_torchrun


def _launch(args, timeout=300, monitor_interval_s=None):
    """Run torchrun; a hang fails the test through the timeout instead of blocking the suite.
    `monitor_interval_s`: how often torchrun looks at its processes (LAUNCH's 1 s if None)."""
    launch = list(LAUNCH)
    if monitor_interval_s is not None:
        launch[launch.index("--monitor-interval") + 1] = str(monitor_interval_s)
    return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=timeout, env=launch_env())


def _train_args(rule, batch_size, out):
    return ["train", "--rule", rule, *RULES[rule], *COMMON, "--batch-size", str(batch_size), "--out", str(out)]


@pytest.fixture(scope="module")
def registered():
    return set(get_registry().rules)


@pytest.fixture(scope="module")
def launches(tmp_path_factory, registered):
    """Two torchrun launches of 2 processes x batch B. The first trains backprop until its rank 1
    dies; the second resumes that run and trains every registered rule of RULES from scratch."""
    root = tmp_path_factory.mktemp("dist")
    (root / "die.py").write_text(DIE)
    (root / "driver.py").write_text(DRIVER)
    killed = root / "killed"
    # torchrun stops the survivor once it sees the death: looking every 10 s (not 1 s) leaves the
    # survivor, slow on a busy machine, the time to meet the dead peer in its collective and say so
    died = _launch([str(root / "die.py"), *_train_args("backprop", B, killed)], timeout=240, monitor_interval_s=10)
    killed_checkpoint = load_checkpoint(killed / "checkpoint.pt") if (killed / "checkpoint.pt").exists() else None
    metrics_lines = len((killed / "metrics.jsonl").read_text().splitlines()) if (killed / "metrics.jsonl").exists() else 0
    runs = {rule: root / rule for rule in RULES if rule in registered}
    jobs = [["train", "--resume", str(killed), "--epochs", str(EPOCHS), "-q"]]
    jobs += [_train_args(rule, B, out) for rule, out in runs.items()]
    # batch norm with running statistics: buffers each process updates from its own shard
    running = root / "running_stats"
    jobs.append(["train", "--rule", "backprop", "--model", "vgg", "--model-opt", "running_stats=true", *COMMON[:2],
                 "--width", "4", "--epochs", "1", "--device", "cpu", "-q", "--batch-size", str(B),
                 "--out", str(running)])
    proc = _launch([str(root / "driver.py"), str(root / "outcomes"), json.dumps(jobs)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    outcomes = json.loads((root / "outcomes.0").read_text())
    assert outcomes == json.loads((root / "outcomes.1").read_text())
    return {
        "died": died, "killed": killed, "killed_checkpoint": killed_checkpoint, "killed_metrics_lines": metrics_lines,
        "resumed": outcomes[0], "runs": runs, "outcomes": dict(zip(runs, outcomes[1:-1])),
        "running_stats": (running, outcomes[-1]),
    }


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: one process (no process group) with batch 2B, trained in this process."""
    root = tmp_path_factory.mktemp("single")
    done = {}

    def run(rule):
        if rule not in done:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                result = CliRunner().invoke(app, _train_args(rule, 2 * B, root / rule))
            finally:
                torch.set_num_threads(threads)
            assert result.exit_code == 0, result.output + repr(result.exception)
            done[rule] = root / rule
        return done[rule]

    return run


def _load(run):
    ckpt = load_checkpoint(run / "checkpoint.pt")
    history = [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in ckpt["history"]]
    return ckpt, history


def _assert_close_runs(single, double):
    a, ha = _load(single)
    b, hb = _load(double)
    assert a["epoch"] == b["epoch"] == EPOCHS and a["global_step"] == b["global_step"]
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["params"].keys() == b["params"].keys()
    for group in a["params"]:
        for key, value in a["params"][group].items():
            other = b["params"][group][key]
            assert torch.allclose(value, other, rtol=1e-4, atol=1e-6), (group, key, (value - other).abs().max())
    sa, sb = floating_leaves(a["state"]), floating_leaves(b["state"])
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (x - y).abs().max()
    for ra, rb in zip(ha, hb):  # per-epoch training loss and test metrics
        assert ra.keys() == rb.keys()
        for key in ra:
            if key == "test_accuracy":
                assert ra[key] == rb[key]
            elif isinstance(ra[key], float):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
            elif isinstance(ra[key], list):  # alignment angles (degrees), per block
                assert ra[key] == pytest.approx(rb[key], abs=1e-2), key
    summary_a = json.loads((single / "summary.json").read_text())
    summary_b = json.loads((double / "summary.json").read_text())
    assert summary_b["world_size"] == 2 and summary_b["global_batch_size"] == 2 * B and "world_size" not in summary_a
    for key in ("test_accuracy", "test_recon_mse"):
        if key in summary_a:
            assert summary_a[key] == pytest.approx(summary_b[key], rel=1e-4), key


@pytest.mark.parametrize("rule", RULES)
def test_two_processes_with_batch_b_end_like_one_process_with_batch_2b(rule, registered, launches, one_process_run):
    if rule not in registered:
        pytest.fail(f"rule '{rule}' is not registered, so its distributed equivalence cannot be checked")
    assert launches["outcomes"][rule] is None, launches["outcomes"][rule]
    run = launches["runs"][rule]
    _assert_close_runs(one_process_run(rule), run)
    # only rank 0 wrote: no stray temporary files of a second writer
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_a_dead_process_ends_the_run_with_a_clear_message_and_an_intact_checkpoint(launches):
    proc, run = launches["died"], launches["killed"]
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    # the survivor says what happened and where to continue; torchrun names the dead process
    assert "lost the others while averaging updates" in output, output[-3000:]
    assert f"--resume {run}" in output
    assert "Signal 9 (SIGKILL)" in output
    ckpt = launches["killed_checkpoint"]  # the last checkpoint is whole: the first epoch's
    assert ckpt is not None and ckpt["epoch"] == 1 and ckpt["global_step"] == 23
    assert launches["killed_metrics_lines"] == 1


def test_a_distributed_run_resumes_to_exactly_the_uninterrupted_run(launches):
    assert launches["resumed"] is None, launches["resumed"]
    resumed, hr = _load(launches["killed"])
    uninterrupted, hu = _load(launches["runs"]["backprop"])
    assert resumed["epoch"] == EPOCHS and hr == hu
    for key, value in uninterrupted["params"]["model"].items():
        assert torch.equal(value, resumed["params"]["model"][key]), key
    for pid, st in uninterrupted["optimizers"]["model"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], resumed["optimizers"]["model"]["state"][pid]["exp_avg_sq"])


def test_running_statistics_are_rank_0s_on_every_process(launches):
    """Each process updates its batch norms' running buffers from its own shard; rank 0's are copied
    to the others before each evaluation and checkpoint, and the per-epoch check (parameters, rule
    state and buffers identical everywhere) let the run finish."""
    run, outcome = launches["running_stats"]
    assert outcome is None, outcome
    ckpt = load_checkpoint(run / "checkpoint.pt")
    buffers = ckpt["buffers"]
    counts = [v for k, v in buffers.items() if k.endswith("num_batches_tracked")]
    assert counts and all(int(c) == ckpt["global_step"] for c in counts)
    variances = [v for k, v in buffers.items() if k.endswith("running_var")]
    assert variances and all(bool((v > 0).all()) and not torch.equal(v, torch.ones_like(v)) for v in variances)


def test_shards_of_all_processes_are_the_one_process_batches(tmp_path):
    """The sampler arithmetic, without a process group: rank r's part of global batch i."""
    from fa_rules import models as zoo
    from fa_rules.core.distributed import Context
    from fa_rules.core.trainer import TrainConfig, Trainer
    from fa_rules.plugins.datasets import load_digits

    rule = get_registry().rule("backprop").make()
    data = load_digits()
    n = data.train_x.shape[0]  # 1437 = 22 * 64 + 29
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))

    def trainer(batch_size, rank=0, world=1):
        t = Trainer(TrainConfig(batch_size=batch_size, device="cpu"), rule,
                    lambda: zoo.mlp((1, 8, 8), (10,), width=8), data, tmp_path, progress=False)
        t.dist = Context(rank=rank, world_size=world)
        return t

    single = trainer(64)
    parts = [trainer(32, rank, 2) for rank in range(2)]
    assert single.steps_per_epoch(n) == parts[0].steps_per_epoch(n) == 23
    for i in range(23):
        whole, share = single.shard(order, i)
        (a, wa), (b, wb) = (p.shard(order, i) for p in parts)
        assert share == 1.0 and torch.equal(torch.cat([a, b]), whole)
        assert wa + wb == 1.0 and wa == a.numel() / whole.numel()
    assert (a.numel(), b.numel()) == (15, 14)  # the ragged last batch, split as evenly as possible
    # a last global batch smaller than the number of processes is dropped
    assert trainer(32, 0, 2).steps_per_epoch(2 * 64 + 1) == 2 and trainer(64).steps_per_epoch(129) == 3
    assert trainer(32, 0, 2).steps_per_epoch(2 * 64 + 2) == 3


def test_in_step_average_is_the_identity_in_one_process():
    from fa_rules.core.distributed import average_across_processes

    tree = {"w": torch.randn(3, 2), "n": torch.tensor([1, 2]), "k": [torch.ones(2)], "name": "x"}
    out = average_across_processes(tree)
    assert out is tree
