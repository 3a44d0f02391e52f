"""Runs: from names in a configuration to a ready Trainer (the one place that resolves plugins),
and back from a run directory to what it trained (`load_run`), FID after training.

Under torchrun every process calls the same function here: they join the process group first,
rank 0 loads (downloads) the dataset before the others read it, and rank 0 alone picks and
prepares the run directory (its decision, or its error, reaches every process).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Callable

from fa_rules.core import distributed
from fa_rules.core.checkpoint import remove_stale_tmp_files, write_json, write_or_explain
from fa_rules.core.config import check_config
from fa_rules.core.data import check_dataset
from fa_rules.core.errors import UserError
from fa_rules.core.trainer import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    TrainConfig,
    Trainer,
    prepare_run_dir,
    read_run_config,
    resolve_device,
)
from fa_rules.plugins.manager import Registry, get_registry


def default_out_dir(config: TrainConfig, root: Path = Path("runs")) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{config.rule}-{config.dataset}-{config.model}-{stamp}"
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def resolve(config: TrainConfig, registry: Registry | None = None, dataset=None):
    """Check the configuration against the registry; return (rule, dataset, build_network). A
    `dataset` already loaded for this configuration is used as it is."""
    registry = registry or get_registry()
    rule_spec = registry.rule(config.rule)
    config.rule = rule_spec.name  # aliases resolve to the canonical name in the saved config
    dataset_spec = registry.dataset(config.dataset)
    model_spec = registry.model(config.model)
    rule_spec.check_model(config.model)
    rule = rule_spec.make(**config.rule_options)
    model_options = {
        k: v for k, v in rule_spec.model_defaults.items() if k in model_spec.options and k not in config.model_options
    }
    model_options.update(config.model_options)
    config.model_options = model_options
    if dataset is None:
        with distributed.current().main_first():  # one download, then every process reads the files
            dataset = dataset_spec.load(config.data_dir)
        check_dataset(dataset)
    if rule.task == "classify":
        out_shape = (dataset.num_classes,)
    else:
        out_shape = (config.latent_dim,)
    heads = rule.heads(config.latent_dim, dataset.num_classes) if rule.heads else None
    import torch

    # Built once, here, exactly as the trainer builds it (the global generator seeded with the run's
    # seed), so that a bad option or shape fails early and a large model is not built twice.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        seeded = torch.get_rng_state()
        network = model_spec.make(dataset.in_shape, out_shape, heads, **model_options)
        after_build = torch.get_rng_state()
    if network.out_shape is not None and tuple(network.out_shape) != tuple(out_shape):
        # a part of another rule's networks (an image-to-image generator) is not a model to train alone
        raise UserError(f"model '{config.model}' maps {dataset.name} inputs {tuple(dataset.in_shape)} to "
                        f"{tuple(network.out_shape)}; rule '{rule_spec.name}' needs outputs of shape {out_shape}")
    check_output_shape(network, dataset, out_shape, config.model, rule_spec.name)

    built = [network]

    def build_network():
        """The network; the one built above when the caller has just seeded the global generator
        with the run's seed (the trainer does): the generator then moves on as if it built it now."""
        if built and torch.equal(torch.get_rng_state(), seeded):
            torch.set_rng_state(after_build)
            return built.pop()
        built.clear()
        return model_spec.make(dataset.in_shape, out_shape, heads, **model_options)

    return rule, dataset, build_network


def check_output_shape(network, dataset, out_shape, model: str, rule: str) -> None:
    """One forward on two zero inputs: a model that fails on the data's shape, or whose output is
    not what the rule trains (1000 ImageNet logits for 10 classes), is one line now, not a traceback
    or a silently wrong loss later."""
    import torch

    with torch.no_grad():
        try:
            network.eval()
            like = next(iter(network.parameters()), torch.zeros(()))
            out = network(torch.zeros(2, *dataset.in_shape, dtype=like.dtype, device=like.device))
        except Exception as e:
            raise UserError(f"model '{model}' fails on {dataset.name} inputs {tuple(dataset.in_shape)}: "
                            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}") from None
        finally:
            network.train()
    if isinstance(out, torch.Tensor) and tuple(out.shape[1:]) != tuple(out_shape):
        raise UserError(f"model '{model}' maps {dataset.name} inputs {tuple(dataset.in_shape)} to "
                        f"{tuple(out.shape[1:])}; rule '{rule}' needs outputs of shape {tuple(out_shape)} "
                        "(build it with that many outputs, e.g. num_classes)")


# "0" skips every run's curves.png and alignment.png (thousands of benchmark cells or trials, tests)
RUN_PICTURES_ENV = "FA_RULES_RUN_PICTURES"


def _draw_pictures(trainer: Trainer) -> None:
    if os.environ.get(RUN_PICTURES_ENV, "1").strip() == "0":
        return
    try:
        from fa_rules.plots import draw_run_pictures
    except ImportError:  # matplotlib is a dependency, but a plot is never worth a failed run
        return
    draw_run_pictures(trainer)


def _trainer(config, rule, build_network, dataset, out_dir, progress: bool) -> Trainer:
    trainer = Trainer(config, rule, build_network, dataset, out_dir, progress=progress)
    trainer.on_finish.append(_draw_pictures)
    return trainer


def nearest_existing(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists: where creating `path` starts."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return path


def check_out_dir(out_dir: Path) -> None:
    """Before any work: `out_dir` can become a new run directory (cheap checks; creating it is the
    last step of `new_trainer`, so a run that fails a check leaves nothing behind)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory; pick a new --out")
    if (out_dir / CHECKPOINT_FILE).exists() or (out_dir / CONFIG_FILE).exists():
        raise UserError(f"{out_dir} already holds a run; continue it with --resume {out_dir} or pick a new --out")
    parent = nearest_existing(out_dir)  # it must take new entries
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot create run directory {out_dir}: {parent} is not a writable directory")


def make_run_dir(out_dir: Path, config: TrainConfig) -> None:
    """Create the run directory with its config.json; an OS refusal (a read-only or virtual
    filesystem, a full disk) is one line, and a directory made here is removed again."""
    existed = Path(out_dir).exists()
    try:
        prepare_run_dir(out_dir, config)
    except OSError as e:
        if not existed:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
        raise UserError(f"cannot create run directory {out_dir}: {e.strerror or e}") from None


def record_data_dir(config: TrainConfig) -> None:
    """The data directory the run reads, as config.json will record it: $FA_RULES_DATA_DIR, when
    set and no --data-dir is given, is written down (absolute), so that `probe`, `sample` and
    `reconstruct` find the data later without the variable. Without either, null stays: the
    default directory."""
    from fa_rules.plugins.datasets import DATA_DIR_ENV

    if config.data_dir is None and os.environ.get(DATA_DIR_ENV):
        config.data_dir = os.path.abspath(os.environ[DATA_DIR_ENV])
    elif config.data_dir:  # a relative --data-dir means the same place from any later directory
        config.data_dir = os.path.abspath(config.data_dir)


def new_trainer(config: TrainConfig, out_dir: Path | None = None, progress: bool = True,
                check: Callable[[Trainer], None] | None = None) -> Trainer:
    """A trainer for a fresh run; the run directory must not hold an earlier run.

    Every check (the configuration, names in the registry, the dataset, the model, then `check`
    with the ready trainer, e.g. a FID request) passes before the run directory is created."""
    check_config(config, "TrainConfig", registry=get_registry())
    if out_dir is not None:
        check_out_dir(out_dir)
    ctx = distributed.setup(resolve_device(config.device))
    rule, dataset, build_network = resolve(config)
    record_data_dir(config)  # after loading: the data is read exactly as without the record
    out_dir = ctx.on_main(lambda: Path(out_dir) if out_dir else default_out_dir(config))
    trainer = _trainer(config, rule, build_network, dataset, out_dir, progress)
    if check is not None:
        check(trainer)
    ctx.on_main(make_run_dir, out_dir, config)
    return trainer


def train(config: TrainConfig | None = None, out_dir: Path | None = None, progress: bool = True, **fields) -> dict:
    """Train one run and return its summary: `train(rule="local_fa", dataset="fashion_mnist")`.

    Takes a `TrainConfig`, or its fields as keywords (not both); writes the run directory `out_dir`
    (default: a new one under runs/), as `fa-rules train` does. `model` is a registered name
    (`mlp`, `torchvision:resnet18`), or your own `nn.Module` or a factory returning one: it runs as
    it is (see "Your own model" in the docs), recorded in config.json as `python:<its name>`."""
    if config is not None and fields:
        raise TypeError("give a TrainConfig or its fields as keywords, not both")
    config = config or TrainConfig(**fields)
    config.model = model_name(config.model)
    return new_trainer(config, out_dir, progress=progress).run()


def model_name(model) -> str:
    """A model's registered name; a module or factory is made a model of this process first."""
    return model if isinstance(model, str) else get_registry().add_python_model(model)


def check_run_dir(run_dir: Path) -> Path:
    """`run_dir` names a directory (else one line saying what it is instead)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory")
    return run_dir


def resume_trainer(run_dir: Path, epochs: int | None = None, progress: bool = True,
                   check: Callable[[Trainer], None] | None = None, model=None) -> Trainer:
    """A trainer continuing the run in `run_dir` (to `epochs` in total, if given); `check` is
    called with the ready trainer before anything is written. `model`: the module or factory a
    run of `train(model=...)` was given, handed again."""
    run_dir = check_run_dir(run_dir)
    if model is not None:
        model_name(model)
    config = read_run_config(run_dir, get_registry())  # its rule and model options too
    if epochs is not None:
        check_config(dataclasses.replace(config, epochs=epochs))  # spelled --epochs: the user's flag
        config.epochs = epochs
    # every process reads the run directory (on several machines: a shared filesystem)
    ctx = distributed.setup(resolve_device(config.device))
    rule, dataset, build_network = resolve(config)
    trainer = _trainer(config, rule, build_network, dataset, run_dir, progress)
    # temporary files of writes a killed process never finished: debris (on a full disk, in the way)
    ctx.on_main(remove_stale_tmp_files, run_dir)
    # anything named checkpoint.pt is read (a FIFO or a link loop is an error, not "no epoch yet")
    if os.path.lexists(run_dir / CHECKPOINT_FILE):
        trainer.load(run_dir / CHECKPOINT_FILE)
    if trainer.epoch > config.epochs:
        raise UserError(f"{run_dir} has already trained {trainer.epoch} epochs; ask for --epochs >= {trainer.epoch}")
    if check is not None:
        check(trainer)
    ctx.on_main(write_json, run_dir / "config.json", config.to_dict())
    return trainer


def load_run(run_dir: Path, trained: bool = True, device: str = "cpu", model=None):
    """A finished (or interrupted) run, rebuilt from its directory for inspection.

    Returns `(config, rule, network, params, state, dataset)`: the network and rule are rebuilt from
    `config.json` exactly as the trainer built them (same seed, so `trained=False` gives the run's
    untrained initial encoder, the floor for probes), then parameters and rule state are loaded from
    `checkpoint.pt` unless `trained` is False. Everything is placed on `device`, the network in
    evaluation mode. `model`: the module or factory a run of `train(model=...)` was given.
    """
    import torch

    from fa_rules.core import checkpoint_contents
    from fa_rules.core.checkpoint import CheckpointError, check_params, load_checkpoint

    run_dir = check_run_dir(run_dir)
    if model is not None:
        model_name(model)
    config = read_run_config(run_dir, get_registry())  # its rule and model options too
    checkpoint = run_dir / CHECKPOINT_FILE
    if trained and not os.path.lexists(checkpoint):  # a FIFO or a dangling link is there: load says what
        raise UserError(f"{run_dir} has no {CHECKPOINT_FILE} (no epoch has finished yet)")
    rule, dataset, build_network = resolve(config)
    torch.manual_seed(config.seed)  # as the trainer does: initialisation depends on the seed only
    network = build_network().to(device)
    params, state = rule.init(
        network, {"model": network.init_params()}, torch.Generator().manual_seed(config.seed + 1)
    )
    buffers = network.buffer_dict()
    if trained:
        limit = checkpoint_contents.size_limit(params, state, buffers)
        ckpt = load_checkpoint(checkpoint, map_location=device, max_bytes=limit)  # verified, never runs code
        check_params(checkpoint, ckpt.get("params"), params)  # trained with this config.json
        if "state" not in ckpt:
            raise CheckpointError(f"{checkpoint} is not a checkpoint of this run (it holds no rule state)")
        checkpoint_contents.check_rule_state(checkpoint, ckpt["state"], state)
        checkpoint_contents.check_buffers(checkpoint, ckpt.get("buffers", {} if not buffers else None), buffers)
        params, state = ckpt["params"], ckpt["state"]
        with torch.no_grad():
            for key, value in ckpt.get("buffers", {}).items():
                buffers[key].copy_(value)
    params = {g: {k: v.to(device) for k, v in t.items()} for g, t in params.items()}
    network.eval()  # for inspection: running statistics, no dropout
    return config, rule, network, params, state, dataset


def add_fid(trainer: Trainer, num: int, weights: str | Path | None = None, batch_size: int = 100) -> dict:
    """After training: FID of `num` samples against `num` test images, added to summary.json.

    Returns the updated summary (`fid`, `fid_num`, `time_per_sample_s` added); only the main process
    computes and writes it."""
    import json

    from fa_rules.measures.fid import rule_fid
    from fa_rules.core.trainer import SUMMARY_FILE

    path = Path(trainer.out_dir) / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if not trainer.is_main:
        return summary
    result = rule_fid(trainer.rule, trainer.network, trainer.params, trainer.state, trainer.data.test_x, num,
                      weights, seed=trainer.config.seed, batch_size=batch_size)
    summary.update(result)
    write_or_explain(write_json, path, summary, f"measure it again with fa-rules fid {trainer.out_dir}")
    return summary


def check_fid_request(trainer: Trainer, num: int, weights: str | Path | None = None) -> None:
    """Before training: fail now (one line), not after the last epoch, if `--fid` cannot be computed."""
    from fa_rules.measures.fid import load_inception

    if trainer.rule.sample is None:
        raise UserError(f"--fid needs a rule that draws samples; '{trainer.config.rule}' does not")
    if not 2 <= num <= trainer.data.test_x.shape[0]:
        raise UserError(f"--fid needs 2 <= N <= {trainer.data.test_x.shape[0]} (the test split), got {num}")
    load_inception(weights)  # found and readable (a damaged file is one line now, not after training); kept loaded
