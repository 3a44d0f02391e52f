"""`fa-rules benchmark`: compare rules on identical settings (thin; the work is in fa_rules.benchmark)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from fa_rules.cli.common import Interrupted, out, registry
from fa_rules.core.errors import UserError


def benchmark(
    suite_file: Optional[Path] = typer.Argument(None, metavar="SUITE", help="Suite file (TOML), e.g. benchmarks/fashion_mnist_lenet.toml."),
    rules: Optional[str] = typer.Option(None, "--rules", help="Comma-separated rules (with a SUITE: a subset of its labels)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset (default digits)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model family (default mlp)."),
    depth: Optional[int] = typer.Option(None, help="mlp: number of hidden blocks."),
    width: Optional[int] = typer.Option(None, help="mlp: units per hidden block."),
    activation: Optional[str] = typer.Option(None, help="tanh, relu, leaky_relu or asinh."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per cell (default 20)."),
    seeds: Optional[int] = typer.Option(None, help="Number of seeds (0..N-1; default 1)."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per training step."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of every parameter group."),
    optimizer: Optional[str] = typer.Option(None, help="adam or sgd."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present), cpu, cuda or cuda:N."),
    data_dir: Optional[str] = typer.Option(None, help="Where datasets live."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile every rule's step (eager where it does not compile)."),
    quick: bool = typer.Option(False, "--quick", help="The suite's quick form (its \\[quick] table; runs in minutes)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output directory (default runs/benchmark-NAME); rerun to resume."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report here (e.g. benchmarks/reports/NAME.md)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live table."),
    workers: str = typer.Option("1", "--workers", metavar="N", show_default=True,
                                help="Train up to N cells at once (1..64), each in its own process; the CPU "
                                     "threads are split between them, on CUDA worker k takes GPU k mod count."),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", metavar="ADDRESS",
        help="Train the cells as tasks on a Ray cluster: ray (RAY_ADDRESS, a `ray start` cluster here, or a new "
             "local one), auto (RAY_ADDRESS) or ray://HOST:PORT, e.g. --cluster ray://head:10001; --out must be "
             "on a filesystem every node shares. Needs pip install \"fa-rules\\[ray]\"."),
    tune_only: bool = typer.Option(
        False, "--tune-only", help="A suite with \\[tune]: tune (or finish tuning) every rule, train no final cells; "
        "e.g. fa-rules benchmark benchmarks/fashion_mnist_lenet_tuned.toml --tune-only --workers 2."),
    skip_tune: bool = typer.Option(
        False, "--skip-tune", help="A suite with \\[tune]: no new trials; the final cells use the best settings of "
        "the studies already in --out."),
):
    """Run rules side by side on identical weights, data and optimiser; write results, report, plots.

    A suite with a [tune] table first tunes each rule on a validation split (Optuna), then trains it
    with its best setting beside the untuned one, e.g.
    fa-rules benchmark benchmarks/fashion_mnist_lenet_tuned.toml --workers 2
    """
    from fa_rules import benchmark as bench
    from fa_rules.benchmark.cluster import check_cluster
    from fa_rules.benchmark.runner import check_workers
    from fa_rules.benchmark.tune import final_suite, planned_suite, read_summary
    from fa_rules.core.distributed import launch_env

    worker_count = check_workers(workers)  # before anything is read or written
    if tune_only and skip_tune:
        raise UserError("--tune-only and --skip-tune exclude each other: give one")
    cluster = check_cluster(cluster, worker_count)
    launch_env()  # a partial torchrun environment is one line here, not a failed row per cell
    registry()  # report plugins that failed to load, once
    flags = {"dataset": dataset, "model": model, "depth": depth, "width": width, "activation": activation,
             "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "device": device,
             "data_dir": data_dir, "compile": compile or None}
    flags = {k: v for k, v in flags.items() if v is not None}
    labels = [r.strip() for r in rules.split(",") if r.strip()] if rules else None
    if suite_file is not None:
        if suite_file.is_dir():
            raise UserError(f"{suite_file} is a directory, not a suite file (a .toml; to continue a benchmark, "
                            "rerun its command)")
        suite = bench.load_suite(suite_file, quick=quick)
        if labels:
            suite = bench.select_rules(suite, labels)
    else:
        if not labels:
            raise UserError("give a suite file or --rules a,b,c")
        if quick:
            raise UserError("--quick needs a suite file")
        name = "-".join([*labels, flags.get("dataset", "digits"), flags.get("model", "mlp")])
        suite = bench.suite_from_dict({"name": bench.safe_name(name), "rules": labels,
                                       "settings": {"dataset": "digits", "model": "mlp", "epochs": 20}},
                                      "command line")
    if flags or seeds is not None:
        suite = bench.override_settings(suite, flags, seeds)
    if report is not None:
        check_report_path(report)
    target = out_dir or Path("runs") / f"benchmark-{suite.name}"
    command = None
    if len(sys.argv) > 1 and sys.argv[1] == "benchmark":  # recorded in the report (not under test runners)
        command = "fa-rules " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    try:
        with bench.LiveTable(planned_suite(suite), enabled=not quiet) as live:
            rows = bench.run_suite(suite, target, on_event=live, command=command, workers=worker_count,
                                   cluster=cluster, tune="only" if tune_only else "skip" if skip_tune else "run",
                                   say=None if quiet else lambda text: print(text, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; finished cells are kept in {target} (run the same command again to "
                          "continue; the interrupted cell resumes from its last finished epoch)") from None
    if suite.tune:  # the tuned suite's cells: each rule tuned, and untuned beside it
        summary = read_summary(target)
        if tune_only:
            print_tuning(suite, summary, target)
            return
        suite = final_suite(suite, summary)
    if report is not None:
        try:
            bench.write_report_copy(suite, target, report, command=command)
        except OSError as e:  # (checked before the run; the OS has the last word)
            raise UserError(f"cannot write the report copy {report}: {e.strerror or e}; the results are in "
                            f"{target}") from None
    failed = [r for r in rows if r.get("status") != "ok"]
    bench.print_whole(out, bench.comparison_rich(suite, rows))
    out.print(f"{len(rows)} rows ({len(failed)} failed or diverged) -> {target}/results.json, results.csv, "
              f"report.md" + (f"; report copied to {report}" if report else ""), markup=False, highlight=False)
    if failed:  # every output is written; a script (or CI) must still see that the suite is not clean
        print(f"{len(failed)} of {len(rows)} cells failed or diverged (see {target}/report.md): exit status 1",
              file=sys.stderr)
        raise typer.Exit(1)


def check_report_path(report: Path) -> None:
    """Before any cell trains: `--report` names a file that can be created where it points (a
    probe file made and removed in the nearest existing folder)."""
    import tempfile

    from fa_rules.runs import nearest_existing

    if report.is_dir():
        raise UserError(f"--report {report} is a directory; name a file, e.g. {report / 'report.md'}")
    folder = nearest_existing(report.parent)
    if not folder.is_dir():
        raise UserError(f"cannot write the report to {report}: {folder} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".report-check-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write the report to {report}: {e.strerror or e}") from None


def print_tuning(suite, summary: dict | None, target: Path) -> None:
    """--tune-only: each rule's best setting so far, one line per rule."""
    for entry in suite.rules:
        record = (summary or {}).get("rules", {}).get(entry.label) or {}
        params = record.get("params")
        best = "no finished trial" if params is None else ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        value = record.get("value")
        score = f"{record.get('metric')} {value:.4f}" if isinstance(value, (int, float)) else ""
        out.print(f"{entry.label}: {best}" + (f" ({score}" if score else " (") +
                  f"{', ' if score else ''}{record.get('trials_complete', 0)} complete, "
                  f"{record.get('trials_pruned', 0)} pruned of {record.get('budget')})", markup=False, highlight=False)
    out.print(f"studies in {target}/tune/; run without --tune-only for the final cells", markup=False, highlight=False)
