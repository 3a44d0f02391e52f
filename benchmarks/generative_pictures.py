"""Pictures of a finished generative benchmark: for every rule's run of one seed, a grid of samples,
test images over their reconstructions, and an interpolation grid between the latents of four test
images (the feature alignment paper's Figures 8, 10 and 12), as PNGs; prints the Markdown table
that shows them.

    python benchmarks/generative_pictures.py runs/benchmark-fashion_mnist_generative_width \
        --out docs/img/generative-width --link-prefix ../img/generative-width

Every picture comes from the `fa-rules sample` and `fa-rules reconstruct` commands on the
benchmark's run directory (its last checkpoint); a rule that cannot make one (`ae` has no prior to
sample from; `gan` reconstructs and interpolates through its latent search) gets that command's
one-line reason in the table instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# picture -> the fa-rules command that draws it into OUT (the run directory is appended first)
PICTURES = {
    "samples": ["sample", "--num", "64"],
    "reconstructions": ["reconstruct", "--num", "16"],
    "interpolation": ["sample", "--interpolate", "--num", "64"],
}


def finished_runs(benchmark_dir: Path, seed: int) -> dict[str, Path]:
    """label -> run directory, for the runs of `seed` that finished (summary status ok)."""
    runs = {}
    for run in sorted((benchmark_dir / "runs").glob(f"*-seed{seed}")):
        summary = run / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "ok":
            runs[run.name[: -len(f"-seed{seed}")]] = run
    return runs


def draw(run: Path, picture: str, out: Path, seed: int) -> str | None:
    """Draw one picture into `out` with the fa-rules command (in this process); None on success,
    else the command's one-line reason."""
    from fa_rules.cli.app import app
    from fa_rules.core.errors import UserError

    command = [*PICTURES[picture][:1], str(run), *PICTURES[picture][1:], "--out", str(out), "--seed", str(seed)]
    try:
        app(command, standalone_mode=False)
    except UserError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_dir", type=Path, help="A finished `fa-rules benchmark` output directory.")
    parser.add_argument("--out", type=Path, required=True, help="Folder for the PNGs.")
    parser.add_argument("--seed", type=int, default=0, help="Which seed's runs to draw (default 0).")
    parser.add_argument("--link-prefix", default=None, help="Path from the Markdown page to --out (default --out).")
    args = parser.parse_args(argv)
    runs = finished_runs(args.benchmark_dir, args.seed)
    if not runs:
        print(f"error: no finished runs of seed {args.seed} under {args.benchmark_dir / 'runs'}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.link_prefix if args.link_prefix is not None else str(args.out)
    rows = ["| rule | " + " | ".join(PICTURES) + " |", "|---" * (len(PICTURES) + 1) + "|"]
    for label, run in runs.items():
        cells = []
        for picture in PICTURES:
            name = f"{label}_{picture}.png"
            reason = draw(run, picture, args.out / name, args.seed)
            cells.append(f"— ({reason})" if reason else f"![{label} {picture}]({prefix}/{name})")
        rows.append(f"| `{label}` | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
