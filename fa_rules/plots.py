"""Pictures of a run, drawn with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fa_rules.core.checkpoint import atomic_write_with  # noqa: E402
from fa_rules.core.errors import UserError  # noqa: E402

_TASK_METRICS = ("test_accuracy", "test_recon_mse", "fid")


def save_figure(fig, path: Path) -> None:
    """`fig` as a PNG at `path`, written atomically and never through a symlink (`atomic_write_with`),
    then closed; the OS refusing (a full disk, a read-only folder) is one line."""
    try:
        atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free space or fix the folder, "
                        "the files written before it are complete") from None
    finally:
        plt.close(fig)


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Training loss and the task metric against epoch."""
    if not history:
        return
    epochs = [r["epoch"] for r in history]
    metric = next((m for m in _TASK_METRICS if m in history[-1]), None)
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(9 if metric else 4.5, 3.4), squeeze=False)
    axes[0, 0].plot(epochs, [r.get("train_loss") for r in history], marker="o")
    axes[0, 0].set(xlabel="epoch", ylabel="train loss")
    if metric:  # only the evaluated epochs (`eval_every`)
        evaluated = [r for r in history if r.get(metric) is not None]
        axes[0, 1].plot([r["epoch"] for r in evaluated], [r[metric] for r in evaluated], marker="o", color="tab:orange")
        axes[0, 1].set(xlabel="epoch", ylabel=metric.replace("_", " "))
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_angles(history: list[dict], path: Path, title: str = "") -> None:
    """Per-block angle between the rule's update and the backprop gradient, against epoch."""
    rows = [r for r in history if r.get("alignment_angle_deg")]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i in range(len(rows[-1]["alignment_angle_deg"])):
        ax.plot(epochs, [r["alignment_angle_deg"][i] for r in rows], marker="o", label=f"block {i}")
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="epoch", ylabel="angle to backprop (deg)", ylim=(0, 100))
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def draw_run_pictures(trainer) -> None:
    """The pictures of a finished run: curves.png and, for classifiers, alignment.png."""
    cfg = trainer.config
    plot_curves(trainer.history, trainer.out_dir / "curves.png", title=f"{cfg.rule} on {cfg.dataset}")
    plot_angles(trainer.history, trainer.out_dir / "alignment.png", title=f"{cfg.rule}: update vs backprop")
