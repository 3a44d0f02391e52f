"""Peak training memory against depth: local feature alignment, feature alignment, backprop autoencoder.

For MLP encoders of depth 4, 8 and 16 (same width, same batch, asinh for all three rules, 28x28
inputs, a 32-d latent) the script runs one training step of each rule and measures

- `peak_saved_bytes`: the largest total of tensors saved for backward at once during the step (the
  engine's `SavedTensorsProbe`, the figure `summary.json` reports; parameters held by the graph
  count too), on any device;
- `peak_cuda_step_bytes` (CUDA only): the allocator's peak during the step minus what was allocated
  before it (parameters, optimiser state and the batch are resident either way).

`local_fa` differentiates one block at a time and frees each block's graph before the next, so its
peak should stay flat with depth, and be at most 2/L of the backprop autoencoder's at depth L (the
goal checked in the last column; InfoPro reports < 40 % of end-to-end memory for local learning).
`feature_alignment` differentiates through its inner gradient flow (second order) over the whole
encoder, so it keeps more than backprop. Prints the table and writes `memory_depth.png` (peak against
depth) and `memory_depth.json` into `--out`.

    python benchmarks/memory_depth.py --out runs/memory_depth   # about a minute on 2 CPU cores

`--model vgg` measures VGG-shaped convolutional encoders instead (`fa_rules.models.vgg`, asinh, no
batch norm, 2x2 max pooling closing each of its three stages, a Linear latent); `--depths` are then
convolutions per stage (2 = the zoo's `vgg`, 4 = twice as deep) and `--width` the first stage's
channels. The backprop autoencoder has no decoder for it, so only the two feature alignment rules run,
and the script prints local_fa's deepest / shallowest ratio:

    python benchmarks/memory_depth.py --model vgg --depths 2 4 --width 32 --out runs/memory_depth_vgg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fa_rules.core import Batch, SavedTensorsProbe
from fa_rules.models import mlp, vgg
from fa_rules.plugins.manager import get_registry

RULES = ("local_fa", "feature_alignment", "ae")
CONV_RULES = ("local_fa", "feature_alignment")  # (the autoencoder has no decoder for vgg)
MB = 2**20


def measure(rule_name: str, depth: int, width: int, batch_size: int, latent: int, device: torch.device,
            model: str = "mlp") -> dict:
    spec = get_registry().rule(rule_name)
    rule = spec.make()
    torch.manual_seed(0)
    if model == "vgg":
        network = vgg((1, 28, 28), (latent,), width=width, activation="asinh", batch_norm=False,
                      convs_per_stage=depth).to(device)
    else:
        network = mlp((1, 28, 28), (latent,), depth=depth, width=width, activation="asinh").to(device)
    params, state = rule.init(network, {"model": network.init_params()}, torch.Generator().manual_seed(1))
    x = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(2)).to(device)
    y = torch.zeros(batch_size, dtype=torch.int64, device=device)
    batch = Batch(x, y, seed=3)
    rule.step(network, params, state, batch)  # warm-up (lazy initialisation, allocator caches)
    with SavedTensorsProbe() as probe:
        rule.step(network, params, state, batch)
    row = {
        "rule": rule_name, "depth": depth, "width": width, "batch_size": batch_size,
        "param_bytes": sum(t.numel() * t.element_size() for g in params.values() for t in g.values()),
        "peak_saved_bytes": probe.peak,
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        rule.step(network, params, state, batch)
        torch.cuda.synchronize(device)
        row["peak_cuda_step_bytes"] = torch.cuda.max_memory_allocated(device) - before
    return row


def plot(rows: list[dict], depths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["peak_saved_bytes"] + (["peak_cuda_step_bytes"] if "peak_cuda_step_bytes" in rows[0] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for rule in RULES:
            ax.plot(depths, [r[key] / MB for r in rows if r["rule"] == rule], marker="o", label=rule)
        ae = [r[key] / MB for r in rows if r["rule"] == "ae"]
        ax.plot(depths, [2 / d * a for d, a in zip(depths, ae)], color="grey", linestyle=":", label="2/L x ae (goal)")
        ax.set(xlabel="depth (hidden blocks)", ylabel=f"{key} (MiB)", xticks=depths, ylim=(0, None))
        ax.legend(fontsize=8)
    fig.suptitle(f"peak memory of one training step (width {rows[0]['width']}, batch {rows[0]['batch_size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "vgg"), default="mlp")
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help="hidden blocks (mlp; default 4 8 16) or convolutions per stage (vgg; default 2 4)")
    parser.add_argument("--width", type=int, default=None, help="hidden units (mlp; default 256) or the first "
                        "stage's channels (vgg; default 32, the zoo's)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/memory_depth"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if args.model == "vgg":
        args.width = args.width or 32
        conv_depths(args, device)
        return
    args.depths, args.width = args.depths or [4, 8, 16], args.width or 256

    rows = [measure(rule, d, args.width, args.batch_size, args.latent_dim, device)
            for d in args.depths for rule in RULES]
    ae = {r["depth"]: r for r in rows if r["rule"] == "ae"}
    cuda = "peak_cuda_step_bytes" in rows[0]
    head = f"{'depth':>5} {'rule':<18}{'params MiB':>11}{'peak saved MiB':>16}{'/ ae':>8}{'2/L':>7}  goal"
    print(head + (f"{'cuda step MiB':>15}{'/ ae':>8}" if cuda else ""))
    for r in rows:
        ratio = r["peak_saved_bytes"] / ae[r["depth"]]["peak_saved_bytes"]
        r["ratio_to_ae"] = ratio
        line = (f"{r['depth']:>5} {r['rule']:<18}{r['param_bytes'] / MB:>11.2f}{r['peak_saved_bytes'] / MB:>16.2f}"
                f"{ratio:>8.3f}{2 / r['depth']:>7.3f}  "
                f"{('ok' if ratio <= 2 / r['depth'] else 'no') if r['rule'] == 'local_fa' else '  '}")
        if cuda:
            r["cuda_ratio_to_ae"] = r["peak_cuda_step_bytes"] / ae[r["depth"]]["peak_cuda_step_bytes"]
            line += f"{r['peak_cuda_step_bytes'] / MB:>15.2f}{r['cuda_ratio_to_ae']:>8.3f}"
        print(line)
    local = [r["peak_saved_bytes"] for r in rows if r["rule"] == "local_fa"]
    print(f"local_fa peak saved bytes, deepest / shallowest: {local[-1] / local[0]:.3f} (flat = 1)")
    plot(rows, args.depths, args.out / "memory_depth.png")
    (args.out / "memory_depth.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out / 'memory_depth.png'} and {args.out / 'memory_depth.json'}")


def conv_depths(args, device: torch.device) -> None:
    """The `--model vgg` table: local_fa and feature_alignment at each number of convs per stage."""
    depths = args.depths or [2, 4]
    rows = [measure(rule, d, args.width, args.batch_size, args.latent_dim, device, model="vgg")
            for d in depths for rule in CONV_RULES]
    print(f"{'convs/stage':>11} {'blocks':>6} {'rule':<18}{'params MiB':>11}{'peak saved MiB':>16}")
    for r in rows:
        r["blocks"] = 3 * r["depth"] + 1
        print(f"{r['depth']:>11} {r['blocks']:>6} {r['rule']:<18}{r['param_bytes'] / MB:>11.2f}"
              f"{r['peak_saved_bytes'] / MB:>16.2f}")
    for rule in CONV_RULES:
        peaks = [r["peak_saved_bytes"] for r in rows if r["rule"] == rule]
        print(f"{rule} peak saved bytes, deepest / shallowest: {peaks[-1] / peaks[0]:.3f}"
              + (" (flat = 1)" if rule == "local_fa" else ""))
    (args.out / "memory_depth_vgg.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out / 'memory_depth_vgg.json'}")


if __name__ == "__main__":
    main()
