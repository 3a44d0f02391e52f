"""Outputs: results.json / .csv, the Markdown report, the comparison tables, the machine record."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

from fa_rules.core.checkpoint import atomic_write_text, write_json, write_or_explain
from fa_rules.core.config import TrainConfig
from fa_rules.core.errors import UserError
from fa_rules.benchmark.aggregate import add_ratios, aggregate
from fa_rules.benchmark.plots import make_plots
from fa_rules.benchmark.suite import (
    _ROW_HEAD, _ROW_TAIL, MACHINE_JSON, REPORT_MD, RESULTS_CSV, RESULTS_JSON, Suite, cell_count,
)

def _csv_text(rows: list[dict], vkeys) -> str:
    columns = [*_ROW_HEAD, *vkeys, *(c for c in _ROW_TAIL if c not in vkeys)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ";".join(f"{x:.4g}" for x in v) if isinstance(v, list) else v
                         for k, v in r.items() if v is not None})
    return buffer.getvalue()


def _write_output(write: Callable[[Path, Any], None], path: Path, content: Any) -> None:
    """One file of DIR (see `write_or_explain`): finished cells stay, rerunning continues."""
    write_or_explain(write, path, content, f"run the same command again to continue (finished cells are kept in "
                                           f"{path.parent})")


def machine_description() -> str:
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cores} CPU cores ({cpu})", f"torch {torch.__version__}", f"torch threads: {torch.get_num_threads()}",
             f"python {platform.python_version()}", platform.system()]
    if torch.cuda.is_available():
        parts.insert(1, f"GPU {torch.cuda.get_device_name(0)}")
    return ", ".join(parts)


def record_machine(out_dir: Path) -> None:
    """Add this machine and today's date to DIR/machine.json (kept across resumed runs)."""
    path = Path(out_dir) / MACHINE_JSON
    info = _machine_info(out_dir) or {"machines": [], "first_run": None}  # missing or damaged: rebuilt
    desc = machine_description()
    if desc not in info["machines"]:
        info["machines"].append(desc)
    today = datetime.date.today().isoformat()
    info["first_run"] = info["first_run"] or today
    info["last_run"] = today
    _write_output(write_json, path, info)


def _machine_info(out_dir: Path) -> dict | None:
    """DIR/machine.json, or None when missing or damaged (the report then names this machine)."""
    try:
        info = json.loads((Path(out_dir) / MACHINE_JSON).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = (isinstance(info, dict) and isinstance(info.get("machines"), list)
          and all(isinstance(m, str) for m in info["machines"])
          and all(isinstance(info.get(k), str) for k in ("first_run", "last_run")))
    return info if ok else None


def write_outputs(suite: Suite, out_dir: Path, rows: list[dict], plots: bool = True,
                  command: str | None = None) -> list[str]:
    """results.json, results.csv, report.md (and the plots) from `rows`; returns plot file names."""
    vkeys = list(suite.vary)
    rows = add_ratios(rows, suite.reference, vkeys)
    _write_output(write_json, out_dir / RESULTS_JSON, rows)
    _write_output(atomic_write_text, out_dir / RESULTS_CSV, _csv_text(rows, vkeys))
    plot_files = []
    if plots:
        try:
            plot_files = make_plots(out_dir, rows, vkeys)
        except ImportError:  # matplotlib is a dependency; a missing plot never loses results
            plot_files = []
    else:  # keep the names of plots drawn earlier, so the report mentions them
        plot_files = sorted(p.name for p in out_dir.glob("*.png"))
    report = render_report(suite, rows, plot_files, command=command, machine=_machine_info(out_dir),
                           tuning=_tuning(suite, out_dir))
    _write_output(atomic_write_text, out_dir / REPORT_MD, report)
    return plot_files


def write_report_copy(suite: Suite, out_dir: Path, path: Path, command: str | None = None) -> None:
    """The report of `out_dir` written to `path` too (plots listed by name, not embedded)."""
    rows = json.loads((Path(out_dir) / RESULTS_JSON).read_text())
    plots = sorted(p.name for p in Path(out_dir).glob("*.png"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_report(suite, rows, plots, command=command, machine=_machine_info(out_dir),
                                          embed_plots=False, tuning=_tuning(suite, out_dir)))


def _tuning(suite: Suite, out_dir: Path) -> dict | None:
    """A tuned suite's DIR/tune/summary.json (see fa_rules.benchmark.tune), else None."""
    if not suite.tune:
        return None
    from fa_rules.benchmark.tune import read_summary

    return read_summary(out_dir)


def _pm(mean, std, n, fmt) -> str:
    if mean is None:
        return ""
    text = fmt(mean)
    return f"{text} ± {fmt(std)}" if n and n > 1 else text


def _column_specs(aggs: list[dict], suite: Suite) -> list[tuple[str, str, Callable]]:
    """(metric, heading, formatter) for the metrics some group has."""
    mib = 1024 ** 2
    ref = suite.reference or "reference"
    specs = [
        ("test_error", "test error %", lambda v: f"{100 * v:.2f}"),
        ("validation_error", "validation error %", lambda v: f"{100 * v:.2f}"),
        ("test_recon_mse", "recon MSE", lambda v: f"{v:.4g}"),
        ("fid", "FID", lambda v: f"{v:.2f}"),
        ("probe_accuracy", "probe acc %", lambda v: f"{100 * v:.2f}"),
        ("alignment_angle_deg", "angle to BP °", lambda v: f"{v:.1f}"),
        # primary: rules of one seed and setting stepping in turn in one process (timing phase)
        ("interleaved_step_ratio", f"step × {ref}", lambda v: f"{v:.2f}"),
        # its medians by both clocks: the ratio is of CPU time on CPU, of wall time on CUDA
        ("interleaved_step_cpu_s", "step CPU ms", lambda v: f"{1e3 * v:.2f}"),
        ("interleaved_step_wall_s", "step wall ms", lambda v: f"{1e3 * v:.2f}"),
        ("step_time_s", "step ms", lambda v: f"{1e3 * v:.2f}"),
        # secondary: each cell's own median, cells timed minutes apart
        ("step_time_ratio", f"step × {ref} (cells)", lambda v: f"{v:.2f}"),
        ("peak_saved_bytes", "saved MiB", lambda v: f"{v / mib:.2f}"),
        ("peak_saved_ratio", f"saved × {ref}", lambda v: f"{v:.2f}"),
        ("peak_cuda_bytes", "CUDA MiB", lambda v: f"{v / mib:.1f}"),
        ("peak_cuda_ratio", f"CUDA × {ref}", lambda v: f"{v:.2f}"),
        ("params", "params", lambda v: f"{v:,.0f}"),
        ("params_total", "params, all groups", lambda v: f"{v:,.0f}"),
        ("time_per_sample_s", "ms / sample", lambda v: f"{1e3 * v:.3f}"),
    ]
    shown = [s for s in specs if any(a.get(s[0]) is not None for a in aggs) or s[0] in suite.anchors]
    if "params_total" not in suite.anchors and all(a.get("params_total") == a.get("params") for a in aggs):
        shown = [s for s in shown if s[0] != "params_total"]  # no rule owns extra parameter groups
    return shown


def comparison_cells(suite: Suite, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Heading and text cells of the comparison: mean ± std over seeds, anchors beside our numbers."""
    vkeys = list(suite.vary)
    rows = add_ratios(rows, suite.reference, vkeys)
    aggs = aggregate(rows, vkeys)
    specs = _column_specs(aggs, suite)
    head = ["rule", *vkeys]
    for metric, heading, _ in specs:
        head.append(heading)
        if metric in suite.anchors:
            head.append(f"{heading} (anchor)")
    head += ["seeds ok", "notes"]
    body = []
    by_label = {e.label: e for e in suite.rules}
    for a in aggs:
        cells = [a["rule"], *(str(a.get(k)) for k in vkeys)]
        for metric, _, fmt in specs:
            exact = metric in ("params", "params_total")  # the same for every seed
            cells.append(_pm(a.get(metric), a.get(metric + "_std"), 1 if exact else a.get(metric + "_n"), fmt))
            if metric in suite.anchors:
                v = suite.anchors[metric]["values"].get(a["rule"])
                cells.append(fmt(v) if v is not None else "")
        notes = list(a["errors"])
        entry = by_label.get(a["rule"])
        if entry is not None and (entry.options or entry.overrides or entry.name != entry.label):
            bits = [f"rule {entry.name}"] if entry.name != entry.label else []
            bits += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"  # a tuned rate: 4 digits, not 17
                     for k, v in {**entry.options, **entry.overrides}.items()]
            notes.insert(0, ", ".join(bits))
        cells += [f"{a['ok']}/{a['seeds']}", "; ".join(notes)]
        body.append(cells)
    return head, body


def comparison_table(suite: Suite, rows: list[dict]) -> str:
    """The comparison as a markdown table."""
    head, body = comparison_cells(suite, rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def comparison_rich(suite: Suite, rows: list[dict]):
    """The comparison as a Rich table (for the terminal)."""
    from rich.table import Table

    head, body = comparison_cells(suite, rows)
    table = Table(title=f"benchmark {suite.name}")
    for h in head:
        table.add_column(h, no_wrap=h == "rule")
    for cells in body:
        table.add_row(*cells)
    return table


def print_whole(console, table) -> None:
    """Print a Rich table on `console`; off a terminal (a file, a pipe) at its natural width: Rich
    would fit it to 80 columns and cut names ("direct_feedb…") and numbers, which cannot be undone."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.console import Console
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    Console(file=console.file, width=max(width, 1), soft_wrap=True, no_color=console.no_color,
            color_system=None).print(table)


def _settings_line(suite: Suite) -> str:
    s = {**TrainConfig().to_dict(), **suite.settings}
    model_options = ", ".join(f"{k}={v}" for k, v in s.get("model_options", {}).items())
    opt = f"{s['optimizer']} lr {s['lr']}" + (f" momentum {s['momentum']}" if s["optimizer"] == "sgd" else "")
    if s["weight_decay"]:
        opt += f" weight decay {s['weight_decay']}"
    model = "varied" if "model" in suite.vary else f"`{s['model']}`"
    text = (f"dataset `{s['dataset']}`, model {model}" + (f" ({model_options})" if model_options else "")
            + f", epochs {s['epochs']}, batch size {s['batch_size']}, {opt}, "
            f"seeds {', '.join(map(str, suite.seeds))}, device {s['device']}")
    if suite.vary:
        text += "; varied: " + "; ".join(f"{k} in {v}" for k, v in suite.vary.items())
    return text


def render_report(suite: Suite, rows: list[dict], plot_files: list[str], command: str | None = None,
                  machine: dict | None = None, embed_plots: bool = True, tuning: dict | None = None) -> str:
    total = sum(r.get("train_time_s") or 0.0 for r in rows)
    if machine is None:
        today = datetime.date.today().isoformat()
        machine = {"machines": [machine_description()], "first_run": today, "last_run": today}
    dates = machine["first_run"] if machine["first_run"] == machine["last_run"] else \
        f"{machine['first_run']} to {machine['last_run']}"
    out = [f"# Benchmark: {suite.name}", ""]
    if suite.description:
        out += [suite.description, ""]
    out += [
        f"- machine{'s' if len(machine['machines']) > 1 else ''}: {'; '.join(machine['machines'])}",
        f"- run: {dates}; cells finished: {len(rows)} of {cell_count(suite)}; "
        f"time in cells: {total / 60:.1f} min",
        f"- settings: {_settings_line(suite)}",
        "- every rule of a seed starts from the same initial weights, sees the same data order and "
        "uses the same optimiser settings",
    ]
    if suite.source:
        out.append(f"- suite file: `{suite.source}`" + (" (quick form)" if suite.quick else ""))
    if command:
        out.append(f"- command: `{command}`")
    if suite.reference:
        out.append(f"- ratios (×): per seed against `{suite.reference}` with the same seed, settings and model "
                   f"(a rule with a model of its own against `{suite.reference}`'s rule on that model; none where "
                   "there is no such cell), then mean ± std over seeds")
    else:
        out.append("- ratios: none (the suite has no reference rule)")
    out += ["", "Mean ± std over seeds. Test error = 1 − test accuracy; the angle is the mean over blocks of "
            "the angle between the rule's update and the backprop gradient on a fixed batch; step time is the "
            "median per training step; `step × reference` comes from the timing phase (the rules stepping in "
            "turn in one process) and divides CPU time on CPU (other processes on a busy machine do not "
            "inflate it), synchronised wall time on CUDA, both shown as step CPU ms and step wall ms; saved MiB is the peak of tensors saved for backward in one step.", ""]
    out += [comparison_table(suite, rows), ""]
    for metric, anchor in suite.anchors.items():
        note = f" {anchor['note']}" if anchor.get("note") else ""
        out.append(f"Anchors for {metric}: {anchor['source']}.{note}")
    if suite.anchors:
        out.append("")
    if tuning:
        out += tuning_section(suite, rows, tuning)
    problems = [r for r in rows if r.get("status") != "ok"]
    noted = [r for r in rows if r.get("notes")]
    if problems or noted:
        out += ["## Failures and notes", ""]
        for r in problems:
            out.append(f"- `{r['rule']}` seed {r['seed']}{_point_text(r, suite)}: {r['status']}: {r['error']}")
        for r in noted:
            out.append(f"- `{r['rule']}` seed {r['seed']}{_point_text(r, suite)}: {r['notes']}")
        out.append("")
    if plot_files:
        out += ["## Plots", ""]
        for name in plot_files:
            out.append(f"![{name}]({name})" if embed_plots else f"- `{name}` (in the output directory)")
        out.append("")
    out += ["Every row (one per rule, seed and setting) is in `results.json` and `results.csv`; each cell's run "
            "directory is under `runs/`.", ""]
    return "\n".join(out)


def _mean_metric(rows: list[dict], label: str, metric: str) -> tuple[float | None, int]:
    values = [r[metric] for r in rows if r.get("rule") == label and r.get("status") == "ok"
              and isinstance(r.get(metric), (int, float))]
    return (sum(values) / len(values) if values else None), len(values)


def tuning_section(suite: Suite, rows: list[dict], tuning: dict) -> list[str]:
    """Markdown lines of the Tuning section: how settings were chosen, each rule's choice, its
    validation score and trials, and its test error untuned against tuned (mean over seeds)."""
    from fa_rules.benchmark.tune import UNTUNED_SUFFIX

    tune = suite.tune
    split = next((r.get("validation_split") for r in tuning["rules"].values() if r.get("validation_split")), None)
    split_text = (f"{split['n_train']} training and {split['n_validation']} validation examples, indices "
                  f"SHA-256 `{split['indices_sha256'][:12]}…`" if split else "no finished trial yet")
    metric = tuning["metric"].replace("_", " ")
    out = ["## Tuning", "",
           f"Each rule's settings were searched with Optuna (TPE sampler, seed {tune['sampler_seed']}; "
           f"{'median pruner on the per-epoch validation metric' if tune['pruner'] == 'median' else 'no pruning'}; "
           f"budget {tune['trials']} finished trials of {tune['epochs'] or 'the suite' + chr(39) + 's'} epochs, "
           f"seed {suite.seeds[0]}). Trials trained on the training split minus a validation split stratified "
           f"by label (fraction {tune['validation_fraction']}, seed {tune['validation_seed']}: {split_text}) and "
           f"were scored by {metric} on it; the test split was never read while choosing. The cells above then "
           "train each rule with its chosen setting on the whole training split"
           + (f" (`<rule>{UNTUNED_SUFFIX}`: the suite's own settings)." if tune["untuned"] else "."), ""]
    head = ["rule", "chosen setting", f"best {metric}", "trials complete / pruned / budget"]
    if tune["untuned"]:
        head += ["test error % untuned", "test error % tuned", "change (points)", "rank untuned → tuned"]
    else:
        head += ["test error % tuned"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = list(tuning["rules"])
    rank_untuned = _ranks({label: _mean_metric(rows, label + UNTUNED_SUFFIX, "test_error")[0] for label in labels})
    rank_tuned = _ranks({label: _mean_metric(rows, label, "test_error")[0] for label in labels})
    for label, record in tuning["rules"].items():
        params = record.get("params")
        chosen = "none (no trial finished)" if params is None else ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        value = record.get("value")
        cells = [label, chosen, f"{value:.4f}" if isinstance(value, (int, float)) else "",
                 f"{record.get('trials_complete', 0)} / {record.get('trials_pruned', 0)} / {record.get('budget')}"]
        tuned, _ = _mean_metric(rows, label, "test_error")
        fmt = (lambda v: f"{100 * v:.2f}" if v is not None else "")
        if tune["untuned"]:
            untuned, _ = _mean_metric(rows, label + UNTUNED_SUFFIX, "test_error")
            change = f"{100 * (tuned - untuned):+.2f}" if tuned is not None and untuned is not None else ""
            cells += [fmt(untuned), fmt(tuned), change, f"{rank_untuned[label]} → {rank_tuned[label]}"]
        else:
            cells += [fmt(tuned)]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    errors = [(label, r["error"]) for label, r in tuning["rules"].items() if r.get("error")]
    out += [""] + [f"- tuning `{label}`: {error}" for label, error in errors] + ([""] if errors else [])
    out += ["Studies: `tune/<rule>.journal` (Optuna journal storage), trials' runs: `tune/<rule>/trial-<n>/`; "
            "`tuning_history.png` plots each rule's best validation score against the trial number.", ""]
    return out


def _ranks(errors: dict[str, float | None]) -> dict[str, int]:
    """1 for the lowest mean test error; a rule with none (every seed diverged or failed) ranks last."""
    order = sorted(errors, key=lambda label: (errors[label] is None, errors[label] or 0.0))
    return {label: order.index(label) + 1 for label in errors}


def _point_text(r: dict, suite: Suite) -> str:
    extra = [f"{k}={r.get(k)}" for k in suite.vary]
    return f" ({', '.join(extra)})" if extra else ""
