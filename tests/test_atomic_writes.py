"""Run files survive an interrupted write: a checkpoint.pt, metrics.jsonl or summary.json whose new
version fails midway (or before its rename) leaves the previous version whole and readable.

Three interruptions are injected into a real run directory: the serialisation of the payload
fails halfway (what a crash inside `torch.save` writing to the file itself would leave), the write
of the bytes fails after half of them (disk full), and the rename of a finished temporary file
fails (a kill between the write and the rename)."""

import builtins
import io
import json
import os

import pytest
import torch

from fa_rules import models as zoo
from fa_rules.core.checkpoint import load_checkpoint, write_json, write_jsonl
from fa_rules.core.errors import UserError
from fa_rules.core.trainer import TrainConfig, Trainer
from fa_rules.plugins.datasets import load_digits
from fa_rules.rules.backprop import backprop

FILES = ("checkpoint.pt", "metrics.jsonl", "summary.json")


class Interrupted(OSError):
    pass


class Unpicklable:
    """Serialising it fails: placed last in a checkpoint payload, its earlier parts are written first."""

    def __reduce__(self):
        raise Interrupted("interrupted while serialising (injected)")


class HalfWriter:
    """A file whose first write stores half of its bytes, then fails with `error` (a full disk)."""

    def __init__(self, f, error: OSError | None = None):
        self._f = f
        self._error = error or Interrupted("no space left on device (injected)")

    def write(self, data):
        self._f.write(bytes(data)[: len(data) // 2])
        self._f.flush()
        raise self._error

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fail_midway_serialising(monkeypatch, trainer):
    payload = trainer.checkpoint_payload
    monkeypatch.setattr(trainer, "checkpoint_payload", lambda: {**payload(), "zz_interrupt": Unpicklable()})


def _fail_midway_writing(monkeypatch, trainer):
    real_open = builtins.open

    def half_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return HalfWriter(f) if any(m in mode for m in "wax") else f

    monkeypatch.setattr(builtins, "open", half_open)
    monkeypatch.setattr(io, "open", half_open)  # pathlib's write_bytes / write_text


def _fail_before_rename(monkeypatch, trainer):
    def refuse(*args, **kwargs):
        raise Interrupted("killed between the write and the rename (injected)")

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "rename", refuse)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run (its three files) and its trainer, which then pretends to be at epoch 2."""
    out = tmp_path_factory.mktemp("atomic") / "run"
    trainer = Trainer(TrainConfig(epochs=1, batch_size=256, device="cpu"), backprop(),
                      lambda: zoo.mlp((1, 8, 8), (10,), width=8), load_digits(), out, progress=False)
    trainer.run()
    return trainer, out


@pytest.mark.parametrize("interrupt", [_fail_midway_serialising, _fail_midway_writing, _fail_before_rename])
def test_an_interrupted_write_leaves_the_previous_run_files_whole(interrupt, finished_run, monkeypatch):
    trainer, out = finished_run
    before = {name: (out / name).read_bytes() for name in FILES}
    params = {k: v.clone() for k, v in trainer.params["model"].items()}
    monkeypatch.setattr(trainer, "epoch", 2)
    monkeypatch.setattr(trainer, "history", [*trainer.history, {**trainer.history[-1], "epoch": 2}])
    with torch.no_grad():
        for v in trainer.params["model"].values():
            v.add_(1.0)
    try:
        interrupt(monkeypatch, trainer)
        # the trainer reports a failed save as one line saying the last good checkpoint is kept
        with pytest.raises(UserError, match="the checkpoint of epoch 1 is kept"):
            trainer.save()
        if interrupt is not _fail_midway_serialising:
            with pytest.raises(OSError):
                write_jsonl(out / "metrics.jsonl", trainer.history)
            with pytest.raises(OSError):
                write_json(out / "summary.json", {"epochs": 2})
        monkeypatch.undo()
    finally:
        with torch.no_grad():
            for k, v in trainer.params["model"].items():
                v.copy_(params[k])
    for name in FILES:
        assert (out / name).read_bytes() == before[name], f"{name} was changed by the interrupted write"
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.equal(ckpt["params"]["model"][k], v) for k, v in params.items())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
