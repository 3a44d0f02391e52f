"""Commands that look inside a trained run: `reconstruct` (image grid), `probe` (linear probe),
`sample` (sample or interpolation grid) and `fid` (Frechet Inception Distance of samples).

Thin: each rebuilds the run with `fa_rules.runs.load_run` and calls core. A missing or
broken run directory is a `UserError` (one line, exit code 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import typer

from fa_rules.cli.common import check_seed, out
from fa_rules.core.errors import UserError

RUN_DIR = typer.Argument(..., help="A run directory written by `fa-rules train`.", show_default=False)
DEVICE = typer.Option("cpu", help="cpu, cuda or cuda:N.")
MIN_PIXELS = 28  # small images (8x8 digits) are enlarged so the grid is readable


def _load(run_dir: Path, device: str, trained: bool = True):
    from fa_rules.core.trainer import resolve_device
    from fa_rules.runs import load_run

    return load_run(run_dir, trained=trained, device=str(resolve_device(device)))


def check_out_file(path: Path | None) -> None:
    """Before any work: `--out` can name a new or replaceable image file of a known extension (the
    OS has the last word when writing, see `_save_grid`)."""
    if path is None:
        return
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; name an image file, e.g. {path / 'grid.png'}")
    from fa_rules.runs import nearest_existing

    parent = nearest_existing(path.parent)  # it must take new entries
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a directory")
    _image_format(path)


def _image_format(path: Path) -> str:
    """PIL's name of the image format that `path`'s extension asks for (e.g. PNG)."""
    from PIL import Image

    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        known = f"unknown image extension '{path.suffix}'" if path.suffix else "no image extension"
        raise UserError(f"cannot write {path}: {known}; name a .png file (e.g. {path.with_suffix('.png')})")
    return image_format


def _save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    """`images` as one grid picture at `path` (its format from the extension), written atomically and
    never through a symlink (`atomic_write_with`); the OS refusing (a read-only or virtual filesystem,
    a full disk) or an unknown image extension is one line."""
    from torchvision.utils import save_image

    from fa_rules.core.checkpoint import atomic_write_with

    image_format = _image_format(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda f: save_image(images, f, format=image_format, nrow=per_row, padding=2,
                                                     pad_value=1.0))
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot write {path}: {reason}") from None


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json (None when it has none yet); a damaged one is one line, read before
    the measurement so that nothing is computed for nothing."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); move it away to measure this run again") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} is not a run summary (a JSON object)")
    return summary


def write_summary(run_dir: Path, summary: dict) -> None:
    """A measurement added to the run's summary.json, written atomically: the OS refusing (a full
    disk) keeps the earlier file whole and is one line."""
    from fa_rules.core.checkpoint import write_json, write_or_explain

    write_or_explain(write_json, Path(run_dir) / "summary.json", summary, "measure again")


def save_pairs_grid(x: torch.Tensor, x_hat: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """Rows of originals, each followed by the row of their reconstructions, as one PNG."""
    import torch.nn.functional as F

    x, x_hat = x.detach().float().cpu(), x_hat.detach().float().cpu().clamp(0, 1)
    scale = max(1, -(-MIN_PIXELS // x.shape[-1]))
    if scale > 1:
        x, x_hat = (F.interpolate(t, scale_factor=scale, mode="nearest") for t in (x, x_hat))
    rows = [t for i in range(0, x.shape[0], per_row) for t in (x[i : i + per_row], x_hat[i : i + per_row])]
    _save_grid(torch.cat(rows), path, min(per_row, x.shape[0]))


PICKS = ("classes", "first")


def pick_test_images(dataset, num: int, pick: str = "classes") -> torch.Tensor:
    """Indices of (at most) `num` test images. "classes": each class in turn (its first image, then
    its second, ...), classes in the order they first appear, so a class-sorted split still shows
    every class and the first image shown is the split's first; "first" (and unlabelled data): the
    first `num`."""
    n = dataset.test_x.shape[0]
    if pick == "first" or dataset.num_classes == 0:
        return torch.arange(min(num, n))
    class_order, seen_in_class, keys = {}, {}, []
    for i, label in enumerate(dataset.test_y[:n].tolist()):
        order = class_order.setdefault(label, len(class_order))
        seen_in_class[label] = seen_in_class.get(label, -1) + 1
        keys.append((seen_in_class[label], order, i))
    return torch.tensor([i for _, _, i in sorted(keys)[:num]], dtype=torch.long)


def reconstruct(
    run_dir: Path = RUN_DIR,
    out_file: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN_DIR/reconstructions.png)."),
    num: int = typer.Option(32, help="How many test images."),
    pick: str = typer.Option("classes", help="Which test images: 'classes' (each class in turn, so every class "
                                             "shows) or 'first' (the first ones of the test split)."),
    seed: int = typer.Option(0, help="Seed of the rule's randomness (e.g. a random start of the flow)."),
    device: str = DEVICE,
):
    """Reconstruct test images with a trained run's rule; writes originals above reconstructions."""
    from fa_rules.core.data import as_float

    check_seed(seed)
    if pick not in PICKS:
        raise UserError(f"--pick must be one of {', '.join(PICKS)}, got '{pick}'")
    check_out_file(out_file)
    config, rule, network, params, state, dataset = _load(run_dir, device)
    if rule.reconstruct is None:
        raise UserError(f"rule '{config.rule}' of {run_dir} does not reconstruct inputs")
    if num < 1:
        raise UserError("--num must be >= 1")
    device_ = next(iter(params["model"].values())).device
    x = as_float(dataset.test_x[pick_test_images(dataset, num, pick)].to(device_))
    generator = torch.Generator(device=device_).manual_seed(seed)
    with torch.enable_grad():  # reconstruction may run a gradient flow
        x_hat = rule.reconstruct(network, params, state, x, generator).detach()
    mse = (x_hat - x).pow(2).mean().item()
    path = out_file or Path(run_dir) / "reconstructions.png"
    save_pairs_grid(x, x_hat, path)
    out.print(f"wrote {path}: {x.shape[0]} test images of {config.dataset}, recon mse {mse:.5f}")


def probe(
    run_dir: Path = RUN_DIR,
    untrained: bool = typer.Option(False, "--untrained", help="Probe the run's encoder at initialisation (the floor)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    device: str = DEVICE,
):
    """Linear probe: logistic regression on the frozen latent; reports `probe_accuracy`.

    The result is also added to RUN_DIR/summary.json (`probe_accuracy`, or
    `probe_accuracy_untrained` with --untrained)."""
    from fa_rules.measures.probe import linear_probe

    config, rule, network, params, state, dataset = _load(run_dir, device, trained=not untrained)
    summary = read_summary(run_dir)
    result = linear_probe(network, params["model"], dataset).to_dict()
    key = "probe_accuracy_untrained" if untrained else "probe_accuracy"
    if summary is not None:
        summary[key] = result["probe_accuracy"]
        write_summary(run_dir, summary)
    report = {"run": str(run_dir), "rule": config.rule, "dataset": config.dataset, "untrained": untrained, **result}
    if as_json:
        print(json.dumps(report))
    else:
        which = "untrained encoder" if untrained else "trained encoder"
        out.print(f"{key} {result['probe_accuracy']:.4f} ({which} of {config.rule} on {config.dataset}, "
                  f"{result['latent_dim']}-d latent; train accuracy {result['probe_train_accuracy']:.4f})")


# -- sample / fid: generative runs (vfa, vfa_gan, vae, gan) -----------------------------------------
# Rules may extend the contract (see fa_rules.rules.generative_baselines): `reconstruct(...,
# stages=True)` returns a dict with the `latent` of each input, and `sample(..., latents=z)` decodes
# given latents; `--interpolate` needs both.


def _accepts(fn, keyword: str) -> bool:
    import inspect

    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def save_image_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    """Images in [0, 1] as one PNG grid, small images enlarged (nearest) to at least MIN_PIXELS."""
    import torch.nn.functional as F

    images = images.detach().float().cpu().clamp(0, 1)
    scale = max(1, -(-MIN_PIXELS // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    _save_grid(images, path, per_row)


def interpolation_latents(corners: torch.Tensor, side: int) -> torch.Tensor:
    """side x side latents blending four corner latents bilinearly (row-major; corners 0, 1 on top)."""
    t = torch.linspace(0.0, 1.0, side, device=corners.device, dtype=corners.dtype)
    a, b = t.view(side, 1, 1), t.view(1, side, 1)  # a: down the rows, b: across the columns
    z0, z1, z2, z3 = (c.view(1, 1, -1) for c in corners[:4])
    grid = (1 - a) * (1 - b) * z0 + (1 - a) * b * z1 + a * (1 - b) * z2 + a * b * z3
    return grid.reshape(side * side, -1)


MAX_GRID = 10_000  # samples in one picture: a 100 x 100 grid


def sample(
    run_dir: Path = RUN_DIR,
    num: int = typer.Option(64, help="How many samples (with --interpolate: a grid of about this many)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default RUN_DIR/samples.png)."),
    label: Optional[int] = typer.Option(None, help="Class of every sample (class-conditional runs only)."),
    label_scale: Optional[float] = typer.Option(None, help="Scale of the one-hot class target (else the run's label_scale)."),
    interpolate: bool = typer.Option(False, help="Blend the latents of four test images instead of drawing them."),
    seed: int = typer.Option(0, help="Seed of the latents (and of which test images --interpolate blends)."),
    device: str = DEVICE,
):
    """Draw samples from a generative run (latent -> gradient flow -> generator) as a PNG grid."""
    import math
    import time

    from fa_rules.core.data import as_float

    if not 1 <= num <= MAX_GRID:  # one picture; FID (`fa-rules fid`) draws as many as it needs in batches
        raise UserError(f"--num must be in 1..{MAX_GRID} (one picture grid; for many samples use fa-rules fid)")
    if label_scale is not None and not math.isfinite(label_scale):
        raise UserError(f"--label-scale must be a finite number, got {label_scale}")
    check_seed(seed)
    check_out_file(out_file)
    config, rule, network, params, state, dataset = _load(run_dir, device)
    if rule.sample is None:
        raise UserError(f"rule '{config.rule}' of {run_dir} does not draw samples")
    if label_scale is not None:  # the same rule with one sampling setting changed (training is untouched)
        from fa_rules.plugins.manager import get_registry

        spec = get_registry().rule(config.rule)
        if "label_scale" not in spec.options:
            raise UserError(f"rule '{config.rule}' has no label_scale setting")
        rule = spec.make(**{**config.rule_options, "label_scale": label_scale})
    if label is not None and not 0 <= label < max(dataset.num_classes, 1):
        raise UserError(f"--label must lie in 0..{dataset.num_classes - 1} for {config.dataset}")
    device_ = next(iter(params["model"].values())).device
    generator = torch.Generator(device=device_).manual_seed(seed)
    kwargs = {}
    if interpolate:
        if not (_accepts(rule.reconstruct, "stages") and _accepts(rule.sample, "latents")):
            raise UserError(f"rule '{config.rule}' cannot encode and decode latents, so it cannot --interpolate")
        side = max(2, round(math.sqrt(num)))
        pick = torch.randperm(dataset.test_x.shape[0], generator=torch.Generator().manual_seed(seed))[:4]
        x = as_float(dataset.test_x[pick].to(device_))
        with torch.enable_grad():  # encoding may run a gradient flow or a latent search
            corners = rule.reconstruct(network, params, state, x, generator, stages=True)["latent"].detach()
        kwargs["latents"] = interpolation_latents(corners, side)
        num, per_row = side * side, side
    else:
        per_row = math.ceil(math.sqrt(num))
    labels = None if label is None else torch.full((num,), label, dtype=torch.long)
    with torch.enable_grad():  # warm-up (first-call costs of torch.func), so the timing is per sample
        rule.sample(network, params, state, 1, torch.Generator(device=device_).manual_seed(seed + 1),
                    labels=None if labels is None else labels[:1])
    start = time.perf_counter()
    with torch.enable_grad():  # sampling may run a gradient flow
        images = rule.sample(network, params, state, num, generator, labels=labels, **kwargs)
    seconds = time.perf_counter() - start
    path = out_file or Path(run_dir) / ("interpolation.png" if interpolate else "samples.png")
    save_image_grid(images, path, per_row)
    what = "interpolated images" if interpolate else "samples"
    out.print(f"wrote {path}: {num} {what} of {config.rule} on {config.dataset} "
              f"({seconds / num * 1e3:.3f} ms per sample)")


def fid(
    run_dir: Path = RUN_DIR,
    num: int = typer.Option(1000, help="Samples, compared with the same number of test images."),
    fid_weights: Optional[Path] = typer.Option(
        None, "--fid-weights", help="pytorch-fid Inception weights (else $FA_RULES_FID_WEIGHTS, else torch hub's cache)."
    ),
    batch_size: int = typer.Option(100, help="Samples drawn per call."),
    seed: int = typer.Option(0, help="Seed of the samples' latents."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    device: str = DEVICE,
):
    """FID (pytorch-fid Inception pool3 features) of N samples against N test images.

    The result is also added to RUN_DIR/summary.json (`fid`, `fid_num`, `time_per_sample_s`)."""
    from fa_rules.measures.fid import load_inception, rule_fid

    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    check_seed(seed)
    config, rule, network, params, state, dataset = _load(run_dir, device)
    if rule.sample is None:
        raise UserError(f"rule '{config.rule}' of {run_dir} does not draw samples")
    summary = read_summary(run_dir)
    load_inception(fid_weights, next(iter(params["model"].values())).device)  # weights first: fail before sampling
    result = rule_fid(rule, network, params, state, dataset.test_x, num, fid_weights, seed, batch_size)
    if summary is not None:
        summary.update(result)
        write_summary(run_dir, summary)
    report = {"run": str(run_dir), "rule": config.rule, "dataset": config.dataset, **result}
    if as_json:
        print(json.dumps(report))
    else:
        out.print(f"fid {result['fid']:.2f} ({num} samples of {config.rule} vs {num} test images of "
                  f"{config.dataset}; {result['time_per_sample_s'] * 1e3:.3f} ms per sample)")
