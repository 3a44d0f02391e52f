"""Throughput of `fa-rules benchmark --workers N` against one process, on a suite of small cells.

The same suite (by default 8 cells: 4 rules x 2 seeds, MLP on the 8x8 digits, a few epochs, no
timing phase) runs twice into fresh directories: once in this process with one torch thread
(`--workers 1`), once with N worker processes (each gets `threads // N` torch threads, at least
one; on CUDA worker k takes GPU k mod count). It prints both wall times, their ratio (the speed-up;
N on N idle cores would be perfect, less the start-up of the worker processes, which import torch),
and checks that every cell's test metrics and final weights are identical in both runs.

    python benchmarks/worker_throughput.py                      # 2 workers with 1 thread each vs 1 with 1
    python benchmarks/worker_throughput.py --workers 4 --epochs 5
    python benchmarks/worker_throughput.py --device cuda --workers 8 --model lenet --dataset fashion_mnist
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from fa_rules.benchmark import run_suite, suite_from_dict
from fa_rules.core.checkpoint import load_checkpoint

RULES = ["backprop", "feedback_alignment", "direct_feedback_alignment", "sign_symmetry"]


def run_once(suite, out: Path, workers: int) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    rows = run_suite(suite, out, workers=workers)
    return time.perf_counter() - start, rows


def same_results(rows_a: list[dict], rows_b: list[dict], out_a: Path, out_b: Path) -> list[str]:
    """The cells whose test metrics or final weights differ between the two runs."""
    differ = []
    for a, b in zip(rows_a, rows_b):
        name = f"{a['rule']} seed {a['seed']}"
        if a.get("status") != "ok" or b.get("status") != "ok":
            differ.append(f"{name}: {a.get('status')} / {b.get('status')}")
            continue
        if (a.get("test_accuracy"), a.get("test_loss")) != (b.get("test_accuracy"), b.get("test_loss")):
            differ.append(f"{name}: test metrics")
            continue
        pa = load_checkpoint(out_a / a["run_dir"] / "checkpoint.pt")["params"]
        pb = load_checkpoint(out_b / b["run_dir"] / "checkpoint.pt")["params"]
        if any(not torch.equal(pa[g][k], pb[g][k]) for g in pa for k in pa[g]):
            differ.append(f"{name}: final weights")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads shared by the workers (default: one per worker)")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    suite = suite_from_dict({
        "name": "worker_throughput", "rules": args.rules.split(","), "seeds": args.seeds,
        "settings": {"dataset": args.dataset, "model": args.model, "epochs": args.epochs,
                     "batch_size": args.batch_size, "device": args.device},
        "measure": {"timing": False},
    }, "worker_throughput")
    cells = len(args.rules.split(",")) * args.seeds
    with tempfile.TemporaryDirectory(prefix="worker-throughput-") as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        torch.set_num_threads(1)  # the single process: one thread
        one_s, one_rows = run_once(suite, one, 1)
        torch.set_num_threads(args.threads or args.workers)  # split between the workers
        many_s, many_rows = run_once(suite, many, args.workers)
        differ = same_results(one_rows, many_rows, one, many)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads given to "
          f"{args.workers} workers, device {args.device}, torch {torch.__version__}")
    print(f"{cells} cells ({args.rules}; {args.seeds} seeds; {args.model} on {args.dataset}, {args.epochs} epochs)")
    print(f"1 process x 1 thread: {one_s:.1f} s;  {args.workers} workers: {many_s:.1f} s;  "
          f"throughput ratio {one_s / many_s:.2f}")
    print("every cell identical in both runs" if not differ else "DIFFERENT: " + "; ".join(differ))
    if differ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
