"""The benchmark's timing phase: the cells of one seed and setting step in turn on the same
batches, and a resumed benchmark does not time a group again."""

import pytest

from fa_rules import benchmark as bench
from fa_rules.benchmark import runner
from fa_rules.benchmark.cells import plan_cells
from fa_rules.benchmark.suite import suite_from_dict
from fa_rules.benchmark.timing import time_group


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
    assert len(medians) == 2 and all(m > 0 for m in medians)
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
            return seconds + n
        return step

    medians = interleave({"a": stepper("a", 1.0), "b": stepper("b", 5.0, fail_at=2)}, steps=3, warmup=1)
    assert sorted(calls[:2]) == [("a", 0), ("b", 0)] and sorted(calls[2:4]) == [("a", 1), ("b", 1)]  # round by round
    assert medians["a"] == 3.0  # warm-up step 0 dropped: median of 2, 3, 4
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
    assert timing.interleave({"a": lambda step: 0.5}, steps=2, warmup=1) == {"a": 0.5}
    assert calls == [1]
    monkeypatch.undo()
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert timing.keep_freed_memory() is on_glibc


def test_interleave_shuffles_the_order_of_each_round_reproducibly():
    """A fixed order would leave every stepper the caches of the same predecessor."""
    from fa_rules.benchmark.timing import interleave

    def orders(seed):
        calls = []
        steppers = {k: (lambda n, k=k: calls.append((n, k)) or 1.0) for k in "abcdef"}
        interleave(steppers, steps=7, warmup=1, seed=seed)
        return [tuple(k for n, k in calls if n == step) for step in range(8)]

    rounds = orders(0)
    assert all(sorted(r) == list("abcdef") for r in rounds)  # every stepper once a round
    assert len(set(rounds)) > 1  # not one fixed order
    assert orders(0) == rounds and orders(1) != rounds  # reproducible from the seed
