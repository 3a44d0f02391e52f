"""Resume, per-process noise and forked processes with rules whose steps draw randomness.

The bit-identical resume tests elsewhere use rules whose step draws nothing, so a resumed run that
restarted its per-step seeds at 0 would pass them. Here `dtp` (noise on its decoders' inputs),
`vfa` (beta and epsilon) and `vfa_gan` (plus the generator's latents) train N epochs straight and
k epochs then resume to N; the final checkpoints must agree bit for bit, in one process and under
torchrun. The same torchrun launch records every step's seed and the first numbers of its
generator on each process (per-example noise must differ between shards, and rank 0 must draw
what a one-process run draws) and forks one process's parameters (the per-epoch checksum
comparison must stop the run with one line).
"""

import json
import subprocess

import pytest
import torch
from torch.utils import _pytree as pytree

from fa_rules.core.checkpoint import load_checkpoint
from fa_rules.core.config import TrainConfig
from fa_rules.core.trainer import Trainer
from fa_rules.runs import new_trainer, resume_trainer

from torchrun_launch import LAUNCH, launch_env, needs_torchrun

NOISY_RULES = ("dtp", "vfa", "vfa_gan")
EPOCHS, STOP = 2, 1
MODEL = {"width": 16, "depth": 1}


def _config(rule: str, epochs: int, batch_size: int) -> dict:
    # dtp's first target on the logits: with one hidden block, Lee et al.'s (the default) leaves
    # no decoder to train, so no noise to draw
    options = {"first_target": "output"} if rule == "dtp" else {}
    return dict(rule=rule, dataset="digits", epochs=epochs, batch_size=batch_size, device="cpu",
                model_options=dict(MODEL), rule_options=options, latent_dim=4, seed=3)


def _train_straight_and_resumed(root, rule, batch_size):
    """(straight, resumed) run directories: EPOCHS epochs at once, and STOP epochs then a resume."""
    straight, resumed = root / f"{rule}-straight", root / f"{rule}-resumed"
    new_trainer(TrainConfig(**_config(rule, EPOCHS, batch_size)), straight, progress=False).run()
    new_trainer(TrainConfig(**_config(rule, STOP, batch_size)), resumed, progress=False).run()
    resume_trainer(resumed, EPOCHS, progress=False).run()
    return straight, resumed


def assert_bit_identical_checkpoints(a_dir, b_dir):
    """Every tensor of the two final checkpoints (parameters, rule state, optimiser state) equal
    bit for bit, the same for every other value except timings."""
    a, b = load_checkpoint(a_dir / "checkpoint.pt"), load_checkpoint(b_dir / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS and a["global_step"] == b["global_step"]
    for part in ("params", "state", "optimizers"):
        la, sa = pytree.tree_flatten(a[part])
        lb, sb = pytree.tree_flatten(b[part])
        assert sa == sb, part
        tensors = 0
        for i, (x, y) in enumerate(zip(la, lb)):
            if isinstance(x, torch.Tensor):
                tensors += 1
                same = x.dtype == y.dtype and torch.equal(x, y)
                assert same, f"{part} leaf {i} differs (max |diff| {(x.double() - y.double()).abs().max():.3g})"
            else:
                assert x == y, (part, i)
        assert tensors > 0 or part == "state", part
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


@pytest.mark.parametrize("rule", NOISY_RULES)
def test_resume_of_a_rule_that_draws_noise_every_step_is_bit_identical(rule, tmp_path):
    straight, resumed = _train_straight_and_resumed(tmp_path, rule, batch_size=256)
    assert_bit_identical_checkpoints(straight, resumed)


# -- under torchrun (one launch, 2 processes on the CPU) -------------------------------------------
B = 128  # per process; the one-process reference takes 2 * B

# Runs the jobs in argv[2] (JSON) one after the other; records every step's seed and its
# generator's first numbers, the outcome of every job (None or the error), into argv[1].rank<R>.
# Job "fork" adds 1e-3 to one parameter of rank 1 after its second step.
DRIVER = """
import json, os, sys
import torch
from fa_rules.core.config import TrainConfig
from fa_rules.core.trainer import Trainer
from fa_rules.runs import new_trainer, resume_trainer

torch.set_num_threads(1)
records, outcomes, current = [], [], {"job": None}
make_batch, train_step = Trainer.make_batch, Trainer.train_step

def recording_make_batch(self, index, step):
    batch = make_batch(self, index, step)
    noise = torch.rand(4, generator=batch.generator()).tolist()
    records.append({"job": current["job"], "step": step, "seed": batch.seed, "noise": noise,
                    "examples": index.tolist()})
    return batch

def forking_train_step(self, batch, share=1.0):
    metrics = train_step(self, batch, share)
    if current["job"] == "fork" and self.dist.rank == 1 and self.global_step == 2:
        with torch.no_grad():
            next(iter(self.params["model"].values())).add_(1e-3)
    return metrics

Trainer.make_batch, Trainer.train_step = recording_make_batch, forking_train_step
for name, config, out, resume_to in json.loads(sys.argv[2]):
    current["job"] = name
    try:
        new_trainer(TrainConfig(**config), out, progress=False).run()
        if resume_to is not None:
            resume_trainer(out, resume_to, progress=False).run()
        outcomes.append(None)
    except Exception as e:
        outcomes.append(f"{type(e).__name__}: {e}")
with open(sys.argv[1] + ".rank" + os.environ["RANK"], "w") as f:
    json.dump({"outcomes": outcomes, "records": records}, f)
"""



@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One torchrun launch of 2 processes x batch B: each noisy rule straight and resumed, then a
    backprop run whose rank 1 forks."""
    root = tmp_path_factory.mktemp("noise-dist")
    (root / "driver.py").write_text(DRIVER)
    jobs = []
    for rule in NOISY_RULES:
        jobs.append([f"{rule}-straight", _config(rule, EPOCHS, B), str(root / f"{rule}-straight"), None])
        jobs.append([f"{rule}-resumed", _config(rule, STOP, B), str(root / f"{rule}-resumed"), EPOCHS])
    jobs.append(["fork", _config("backprop", 1, B), str(root / "fork"), None])
    proc = subprocess.run([*LAUNCH, str(root / "driver.py"), str(root / "out"), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=400, env=launch_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((root / f"out.rank{r}").read_text()) for r in range(2)]
    names = [job[0] for job in jobs]
    return {"root": root, "outcomes": [dict(zip(names, r["outcomes"])) for r in ranks],
            "records": [r["records"] for r in ranks]}


@needs_torchrun
@pytest.mark.parametrize("rule", NOISY_RULES)
def test_distributed_resume_of_a_rule_that_draws_noise_is_bit_identical(rule, launch):
    for outcomes in launch["outcomes"]:
        assert outcomes[f"{rule}-straight"] is None and outcomes[f"{rule}-resumed"] is None, outcomes
    root = launch["root"]
    assert_bit_identical_checkpoints(root / f"{rule}-straight", root / f"{rule}-resumed")


@needs_torchrun
def test_each_process_draws_its_own_noise_and_rank_0_draws_the_one_process_noise(launch, tmp_path, monkeypatch):
    rank0, rank1 = ([r for r in records if r["job"] == "dtp-straight"] for records in launch["records"])
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(len(rank0)))
    assert len(rank0) == EPOCHS * 6  # 1437 digits in global batches of 2 * B
    for a, b in zip(rank0, rank1):
        assert not set(a["examples"]) & set(b["examples"])  # two shards of one global batch
        assert a["seed"] != b["seed"] and a["noise"] != b["noise"], a["step"]  # per-example noise differs

    # the one-process reference with the global batch 2 * B takes the same global steps
    seen = []
    make_batch = Trainer.make_batch

    def recording_make_batch(self, index, step):
        batch = make_batch(self, index, step)
        seen.append({"step": step, "seed": batch.seed, "noise": torch.rand(4, generator=batch.generator()).tolist()})
        return batch

    monkeypatch.setattr(Trainer, "make_batch", recording_make_batch)
    new_trainer(TrainConfig(**_config("dtp", 1, 2 * B)), tmp_path / "single", progress=False).run()
    assert len(seen) == 6
    assert seen == [{k: r[k] for k in ("step", "seed", "noise")} for r in rank0[: len(seen)]]


@needs_torchrun
def test_a_forked_process_stops_the_run_with_one_line(launch):
    for rank, outcomes in enumerate(launch["outcomes"]):
        error = outcomes["fork"]
        assert error is not None, f"rank {rank}: a run with differing parameters finished"
        assert "\n" not in error
        assert error.startswith("DistributedError: parameters, rule state and buffers differ between processes"), error
        assert f"(process {rank} of 2)" in error
    # the forked epoch's checkpoint is not written
    assert not (launch["root"] / "fork" / "checkpoint.pt").exists()


# -- the fused optimiser kernels ------------------------------------------------------------------
def test_fused_optimisers_match_torchs_loop_and_survive_a_checkpoint_from_the_loop(tmp_path):
    """The engine steps with torch's fused Adam; its parameters follow the per-tensor loop to float
    rounding, and a checkpoint whose optimiser state says `fused: None` (written before the fused
    kernels) still resumes on them, as a straight run does."""
    from fa_rules.core.checkpoint import save_checkpoint
    from fa_rules.core.trainer import make_optimizers

    torch.manual_seed(0)
    weights = {"w": torch.randn(32, 16), "b": torch.randn(32)}
    fused_params = {"model": {k: v.clone().requires_grad_() for k, v in weights.items()}}
    loop_params = [v.clone().requires_grad_() for v in weights.values()]
    fused_opt = make_optimizers(TrainConfig(lr=1e-2), fused_params)["model"]
    loop_opt = torch.optim.Adam(loop_params, lr=1e-2, foreach=False)
    assert fused_opt.param_groups[0]["fused"] is True
    for _ in range(20):
        grads = [torch.randn_like(v) for v in weights.values()]
        for p, q, g in zip(fused_params["model"].values(), loop_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused_opt.step()
        loop_opt.step()
    for p, q in zip(fused_params["model"].values(), loop_params):
        assert not torch.equal(p, weights["w"] if p.dim() == 2 else weights["b"])  # it moved
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)

    run = tmp_path / "run"
    new_trainer(TrainConfig(**_config("backprop", STOP, 256)), run, progress=False).run()
    ckpt = load_checkpoint(run / "checkpoint.pt")
    for state in ckpt["optimizers"].values():
        for group in state["param_groups"]:
            group["fused"] = None
    save_checkpoint(run / "checkpoint.pt", ckpt)
    trainer = resume_trainer(run, EPOCHS, progress=False)
    assert all(g["fused"] is True for opt in trainer.optimizers.values() for g in opt.param_groups)
