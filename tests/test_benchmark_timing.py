"""The benchmark's timing phase: the cells of one seed and setting step in turn on the same
batches, and a resumed benchmark does not time a group again."""

import pytest

from fa_rules import benchmark as bench
from fa_rules.benchmark import runner
from fa_rules.benchmark.cells import plan_cells
from fa_rules.benchmark.suite import suite_from_dict
from fa_rules.benchmark.timing import StepTime, time_group


def _suite(**measure):
    return suite_from_dict({"rules": ["backprop", "feedback_alignment"], "seeds": 2,
                            "settings": {"epochs": 1, "width": 16, "batch_size": 256, "device": "cpu"},
                            "measure": {"fid": False, **measure}})


def test_time_group_steps_every_cell_on_the_same_batches(monkeypatch):
    from fa_rules.core.trainer import Trainer

    seen = []
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch, share=1.0: seen.append(
        (self.config.rule, batch.seed, batch.x.sum().item())) or step(self, batch, share))
    cells = [c for c in plan_cells(_suite()) if c.seed == 0]
    medians = time_group(cells, steps=2, warmup=1)
    assert len(medians) == 2 and all(m.wall > 0 and m.cpu > 0 for m in medians)
    rounds = [seen[2 * k:2 * k + 2] for k in range(3)]
    assert len(seen) == 6 and all({r for r, _, _ in pair} == {"backprop", "feedback_alignment"} for pair in rounds)
    assert all(a[1:] == b[1:] for a, b in rounds)  # each round, both on the same batch


def test_the_timing_phase_fills_the_rows_once_and_can_be_turned_off(tmp_path, monkeypatch):
    calls = []
    group = runner.time_group
    monkeypatch.setattr(runner, "time_group", lambda cells, steps: calls.append(len(cells)) or group(cells, 2))
    rows = bench.run_suite(_suite(), tmp_path / "a")
    assert calls == [2, 2]  # one group per seed
    assert all(r["interleaved_step_time_s"] > 0 for r in rows)
    # on CPU the ratio's time is the CPU time; the wall time is kept beside it
    assert all(r["interleaved_step_time_s"] == r["interleaved_step_cpu_s"] and r["interleaved_step_wall_s"] > 0
               for r in rows)
    report = (tmp_path / "a" / "report.md").read_text()
    assert "step CPU ms" in report and "step wall ms" in report and "divides CPU time on CPU" in report
    bench.run_suite(_suite(), tmp_path / "a")  # resumed: every cell and every group done before
    assert calls == [2, 2]
    off = bench.run_suite(_suite(timing=False), tmp_path / "b")
    assert calls == [2, 2] and all("interleaved_step_time_s" not in r for r in off)
    with pytest.raises(Exception, match="timing_steps must be an integer in 1..10000, got 0"):
        _suite(timing_steps=0)


def test_interleave_takes_steps_in_turn_and_drops_a_failing_stepper():
    from fa_rules.benchmark.timing import interleave

    calls = []

    def stepper(label, seconds, fail_at=None):
        def step(n):
            calls.append((label, n))
            if n == fail_at:
                raise ValueError("bad shape\nsecond line")
            return StepTime(wall=seconds + n, cpu=seconds - n)
        return step

    medians = interleave({"a": stepper("a", 1.0), "b": stepper("b", 5.0, fail_at=2)}, steps=3, warmup=1)
    assert sorted(calls[:2]) == [("a", 0), ("b", 0)] and sorted(calls[2:4]) == [("a", 1), ("b", 1)]  # round by round
    assert medians["a"] == (3.0, -1.0)  # warm-up step 0 dropped: medians of 2, 3, 4 and 0, -1, -2
    assert medians["b"] == "error: ValueError: bad shape"
    assert ("b", 3) not in calls


def test_interleaved_timing_keeps_freed_memory_for_reuse(monkeypatch):
    """By default glibc hands large freed blocks back to the system, and a step that allocates them
    again pays page faults that depend on what stepped before it; interleave turns that off first
    (mallopt accepts every setting on glibc; elsewhere nothing changes)."""
    import platform

    from fa_rules.benchmark import timing

    calls = []
    monkeypatch.setattr(timing, "keep_freed_memory", lambda: calls.append(1) or True)
    assert timing.interleave({"a": lambda step: StepTime(0.5, 0.25)}, steps=2, warmup=1) == {"a": (0.5, 0.25)}
    assert calls == [1]
    monkeypatch.undo()
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert timing.keep_freed_memory() is on_glibc


def test_interleave_shuffles_the_order_of_each_round_reproducibly():
    """A fixed order would leave every stepper the caches of the same predecessor."""
    from fa_rules.benchmark.timing import interleave

    def orders(seed):
        calls = []
        steppers = {k: (lambda n, k=k: calls.append((n, k)) or StepTime(1.0, 1.0)) for k in "abcdef"}
        interleave(steppers, steps=7, warmup=1, seed=seed)
        return [tuple(k for n, k in calls if n == step) for step in range(8)]

    rounds = orders(0)
    assert all(sorted(r) == list("abcdef") for r in rounds)  # every stepper once a round
    assert len(set(rounds)) > 1  # not one fixed order
    assert orders(0) == rounds and orders(1) != rounds  # reproducible from the seed


def _busy(n: int = 30_000) -> int:
    return sum(i * i for i in range(n))


def test_cpu_time_ratios_hold_while_the_wall_clock_is_inflated():
    """Two steppers doing the same work, one also losing 20 ms of wall clock a step (as a step loses
    the core to another process on a busy machine), while a busy-loop competitor runs in another
    process: the wall ratio moves, the CPU-time ratio stays at the work's ratio, 1."""
    import subprocess
    import sys
    import time

    from fa_rules.benchmark.timing import interleave, ratio_seconds, since, start_clocks

    def stepper(lost_s):
        def step(n):
            start = start_clocks()
            _busy()
            time.sleep(lost_s)  # wall time without CPU time
            return since(start)
        return step

    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        medians = interleave({"plain": stepper(0.0), "held up": stepper(0.02)}, steps=15, warmup=2)
    finally:
        competitor.kill()
        competitor.wait()
    plain, held = medians["plain"], medians["held up"]
    # the wall clock counts the 20 ms lost, less what the competitor also takes from the plain steps
    # (a ratio would depend on the load)
    assert held.wall - plain.wall > 0.01
    assert 0.75 < held.cpu / plain.cpu < 1.33  # CPU time does not
    assert ratio_seconds(held, "cpu") == held.cpu and ratio_seconds(held, "cuda:0") == held.wall


def test_the_cpu_clock_is_the_threads_own_with_one_torch_thread_else_the_process(monkeypatch):
    """With more torch threads a step's intra-op work runs on other threads than the caller's."""
    import time

    import torch

    from fa_rules.benchmark import timing

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert timing.cpu_clock() == (time.thread_time, "thread CPU time")
    assert timing.ratio_clock("cpu") == "thread CPU time"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert timing.cpu_clock() == (time.process_time, "process CPU time")
    assert timing.ratio_clock("cuda") == "wall time, steps synchronised"
