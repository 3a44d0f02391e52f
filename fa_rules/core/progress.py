"""A Rich progress bar for training: one bar per epoch with live loss, a line per finished epoch."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# a run on a validation split (`validation_fraction`) names its metrics validation_* instead of test_*
_SHOWN = ("test_accuracy", "test_loss", "test_recon_mse", "validation_accuracy", "validation_loss",
          "validation_recon_mse", "fid")


class TrainingProgress:
    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool = True):
        self.epochs = epochs
        self.steps = steps_per_epoch
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
            transient=True,
        )
        self.task = None
        self.epoch = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False

    def resume_at(self, epoch: int) -> None:
        self.epoch = epoch
        self._new_task()

    def _new_task(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        if self.epoch < self.epochs:
            desc = f"epoch {self.epoch + 1}/{self.epochs}"
            self.task = self.progress.add_task(desc, total=self.steps, loss="-")

    def advance(self) -> None:
        self.progress.update(self.task, advance=1)

    def show_loss(self, loss: float) -> None:
        """The loss figure (the trainer updates it once per logging interval, not every step)."""
        self.progress.update(self.task, loss=f"{loss:.4f}")

    def end_epoch(self, record: dict) -> None:
        if self.enabled:
            shown = "  ".join(f"{k} {record[k]:.4f}" for k in _SHOWN if isinstance(record.get(k), float))
            self.progress.console.print(
                f"epoch {record['epoch']:>3}/{self.epochs}  train_loss {record['train_loss']:.4f}  {shown}"
            )
        self.epoch += 1
        self._new_task()
