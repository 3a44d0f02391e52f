"""The live progress table of `fa-rules benchmark`."""

from __future__ import annotations

import time

from fa_rules.benchmark.cells import plan_cells
from fa_rules.benchmark.report import print_whole
from fa_rules.benchmark.suite import Suite

class LiveTable:
    """A Rich live table of every cell: status, epoch, task metric, step time (an `Event` callable)."""

    def __init__(self, suite: Suite, enabled: bool = True):
        from rich.console import Console

        self.cells = plan_cells(suite)
        self.state = [{"status": "waiting"} for _ in self.cells]
        self.enabled = enabled
        self.started: dict[int, float] = {}
        self.console = Console(stderr=True)
        self.live = None  # started at the first event: a refusal before any cell prints one line, no table

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
            self.live.__exit__(*exc)
        elif self.enabled and self.started_any and not self.console.is_terminal:
            print_whole(self.console, self._table())  # a log file gets the final table, uncut
        return False

    @property
    def started_any(self) -> bool:
        return any(s["status"] != "waiting" for s in self.state)

    def _show(self) -> None:
        if not self.enabled or not self.console.is_terminal:
            return  # off a terminal a live table only repeats itself: the final one is printed on exit
        if self.live is None:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        self.live.update(self._table())

    def __call__(self, kind: str, index: int, payload: dict) -> None:
        s = self.state[index]
        if kind == "start":
            s.update(status="running", epoch=0)
            self.started[index] = time.perf_counter()
        elif kind == "epoch":
            s["epoch"] = payload.get("epoch")
            s["metric"] = _metric_text(payload)
        elif kind in ("done", "skip"):
            s.update(status=payload.get("status", "?") + (" (earlier)" if kind == "skip" else ""),
                     epoch=payload.get("epochs"), metric=_metric_text(payload),
                     step=payload.get("step_time_s"), time=payload.get("train_time_s"),
                     error=payload.get("error"))
        self._show()

    def _table(self):
        from rich.table import Table

        table = Table(title="benchmark", expand=False)
        varied = any(c.point for c in self.cells)
        for col in ("rule", "settings", "seed", "status", "epoch", "metric", "step ms", "time s"):
            if col != "settings" or varied:
                table.add_column(col, no_wrap=col in ("rule", "metric"))
        colors = {"ok": "green", "failed": "red", "diverged": "yellow", "running": "cyan"}
        for i, (cell, s) in enumerate(zip(self.cells, self.state)):
            status = s["status"]
            color = colors.get(status.split()[0], "")
            elapsed = s.get("time")
            if status == "running":
                elapsed = time.perf_counter() - self.started.get(i, time.perf_counter())
            epochs = f"{s.get('epoch') or 0}/{cell.config.epochs}" if status != "waiting" else ""
            text = status if not s.get("error") else f"{status}: {s['error'][:60]}"
            settings = [" ".join(f"{k}={v}" for k, v in cell.point.items())] if varied else []
            table.add_row(cell.entry.label, *settings, str(cell.seed),
                          f"[{color}]{text}[/]" if color else text, epochs, s.get("metric", ""),
                          f"{1e3 * s['step']:.2f}" if s.get("step") else "",
                          f"{elapsed:.0f}" if elapsed is not None else "")
        return table


def _metric_text(record: dict) -> str:
    for key, fmt in (("test_accuracy", "acc {:.4f}"), ("test_recon_mse", "mse {:.4g}"), ("fid", "fid {:.2f}"),
                     ("validation_accuracy", "val acc {:.4f}"), ("validation_recon_mse", "val mse {:.4g}")):
        if isinstance(record.get(key), (int, float)):
            return fmt.format(record[key])
    return ""
