"""Plots of a suite: learning curves, metric against time, metrics and memory against a varied setting."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fa_rules.core.trainer import METRICS_FILE
from fa_rules.benchmark.aggregate import aggregate

_CURVE_METRICS = (("test_accuracy", "test accuracy"), ("test_recon_mse", "test recon MSE"), ("fid", "FID"))


def _series_label(r: dict, vkeys: list[str]) -> str:
    return r["rule"] + "".join(f" {k}={r.get(k)}" for k in vkeys)


def _read_history(out_dir: Path, row: dict) -> list[dict]:
    path = out_dir / row.get("run_dir", "") / METRICS_FILE
    if not row.get("run_dir") or not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line half-written when the process died: skipped, not fatal
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def make_plots(out_dir: Path, rows: list[dict], vkeys=()) -> list[str]:
    """Learning curves, final metric against step time, the final metrics (angle to backprop
    included) and memory against each numeric varied setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fa_rules.plots import save_figure

    written = []
    for name, draw in (("learning_curves.png", plot_learning_curves), ("metric_vs_step_time.png", plot_metric_vs_time)):
        fig = draw(out_dir, rows, vkeys, plt)
        if fig is not None:
            save_figure(fig, out_dir / name)
            written.append(name)
    from fa_rules.benchmark.tune import read_summary

    tuning = read_summary(out_dir)  # a tuned suite: each rule's best validation score against trials
    fig = plot_tuning_history(tuning, plt) if tuning else None
    if fig is not None:
        save_figure(fig, out_dir / "tuning_history.png")
        written.append("tuning_history.png")
    for key in vkeys:
        values = [r.get(key) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            for name, kinds in (("metrics", _FINAL_METRICS), ("memory", _MEMORY_METRICS)):
                fig = plot_against(rows, key, vkeys, plt, kinds, name)
                if fig is not None:
                    save_figure(fig, out_dir / f"{name}_vs_{key}.png")
                    written.append(f"{name}_vs_{key}.png")
    return written


def plot_learning_curves(out_dir: Path, rows: list[dict], vkeys, plt):
    """Task metric per epoch, mean over seeds, one line per rule (and varied setting)."""
    series: dict[str, dict[str, dict[int, list[float]]]] = {}  # metric -> label -> epoch -> values
    for r in rows:
        for record in _read_history(out_dir, r):
            for metric, _ in _CURVE_METRICS:
                v = record.get(metric)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    by_epoch = series.setdefault(metric, {}).setdefault(_series_label(r, vkeys), {})
                    by_epoch.setdefault(record["epoch"], []).append(v)
                    break
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.8), squeeze=False)
    headings = dict(_CURVE_METRICS)
    for ax, (metric, lines) in zip(axes[0], series.items()):
        for label, by_epoch in lines.items():
            epochs = sorted(by_epoch)
            ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", markersize=3, label=label)
        ax.set(xlabel="epoch", ylabel=headings[metric] + " (mean over seeds)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    fig.suptitle("learning curves")
    fig.tight_layout()
    return fig


def plot_metric_vs_time(out_dir: Path, rows: list[dict], vkeys, plt):
    """Final task metric against median step time, one point per rule (error bars: std over seeds)."""
    aggs = [a for a in aggregate(rows, vkeys) if a.get("step_time_s") is not None]
    metrics = [(m, h) for m, h in (("test_error", "test error"), ("test_recon_mse", "test recon MSE"), ("fid", "FID"))
               if any(a.get(m) is not None for a in aggs)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, (metric, heading) in zip(axes[0], metrics):
        for a in aggs:
            if a.get(metric) is None:
                continue
            x, y = 1e3 * a["step_time_s"], a[metric]
            ax.errorbar(x, y, xerr=1e3 * a["step_time_s_std"], yerr=a[metric + "_std"], fmt="o", capsize=3)
            ax.annotate(_series_label(a, vkeys), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="median step time (ms)", ylabel=f"final {heading}")
    fig.suptitle("final metric against step time")
    fig.tight_layout()
    return fig


_FINAL_METRICS = (("test_error", "final test error", 1.0), ("test_recon_mse", "final test recon MSE", 1.0),
                  ("fid", "FID", 1.0), ("alignment_angle_deg", "angle to backprop (degrees)", 1.0))
_MEMORY_METRICS = (("peak_saved_bytes", "peak saved for backward (MiB)", 1024**-2),
                   ("peak_cuda_bytes", "peak CUDA memory (MiB)", 1024**-2))


def plot_against(rows: list[dict], key: str, vkeys, plt, kinds, name: str):
    """Each metric of `kinds` that some row has (the final task metric and the angle to backprop,
    or the memory), mean over seeds with the std as error bars, against one varied setting: one
    line per rule (and other varied settings)."""
    aggs = aggregate(rows, vkeys)
    kinds = [k for k in kinds if any(a.get(k[0]) for a in aggs)]
    if not kinds:
        return None
    others = [k for k in vkeys if k != key]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.8), squeeze=False)
    for ax, (metric, heading, scale) in zip(axes[0], kinds):
        lines: dict[str, list[tuple]] = {}
        for a in aggs:
            if a.get(metric) is not None:
                std = a.get(metric + "_std") or 0.0
                lines.setdefault(_series_label(a, others), []).append((a[key], a[metric] * scale, std * scale))
        for n, (label, points) in enumerate(lines.items()):
            points.sort()  # rules that measure the same overlap: tell them apart by marker and line
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="os^vDP*X"[n % 8], linestyle=("-", "--", ":", "-.")[n % 4], capsize=3, label=label)
        ax.set(xlabel=key, ylabel=heading)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name} against {key}")
    fig.tight_layout()
    return fig


def plot_tuning_history(tuning: dict, plt):
    """Best-so-far validation metric against trial number (finished trials), one line per rule."""
    lines = {label: [(h["trial"], h["best"]) for h in record.get("history", []) if h.get("best") is not None]
             for label, record in tuning["rules"].items()}
    lines = {label: points for label, points in lines.items() if points}
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for n, (label, points) in enumerate(lines.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^vDP*X"[n % 8],
                linestyle=("-", "--", ":", "-.")[n % 4], markersize=4, drawstyle="steps-post", label=label)
    ax.set(xlabel="trial", ylabel=f"best {tuning['metric'].replace('_', ' ')} so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    fig.suptitle("tuning history (validation split)")
    fig.tight_layout()
    return fig
