"""Atomic writes (a file is either its old complete version or its new complete version), and
checkpoints that are verified before use and never run code when loaded."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fa_rules.core.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, damaged, holding code, or not this run's."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: leave no half-written debris (it fills the disk)
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_tmp_files(folder: Path) -> list[Path]:
    """Remove the temporary files (`.NAME.tmp-PID`) of writes a killed process never finished."""
    removed = []
    for path in Path(folder).glob(".*.tmp-*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def save_checkpoint(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _verify_zip(path: Path, data: bytes) -> None:
    """torch.save writes a zip archive with a CRC-32 per record; torch.load never checks them, so
    flipped bytes would load as silently corrupted tensors (e.g. an optimiser's moments)."""
    if not data:
        raise CheckpointError(f"{path} is empty (a write that never finished?)")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except Exception as e:  # truncated, garbage, a bare pickle: not a complete zip archive
        raise CheckpointError(f"{path} is damaged or not a checkpoint ({_first_line(e)})") from None
    if bad is not None:
        raise CheckpointError(f"{path} is damaged: the checksum of its record '{bad}' does not match its data")


def load_checkpoint(path: Path, map_location=None) -> dict:
    """A checkpoint's payload, after its checksums are verified. Loaded with `weights_only=True`:
    unpickling admits only tensors and plain Python values, so a crafted file cannot run code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    _verify_zip(path, data)
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line naming the refused global is the useful part
        lines = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        detail = lines[0] if lines else _first_line(e)
        raise CheckpointError(
            f"{path} refused: it holds objects other than tensors and plain Python values ({detail})"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a checkpoint (it holds a {type(payload).__name__})")
    return payload


def check_params(path: Path, saved: Any, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    """Refuse saved parameters whose groups, keys, shapes or dtypes differ from those the run's
    configuration builds (e.g. config.json edited after training): they would load wrongly or fail late."""
    where = f"{path} does not match the run's configuration"
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: it holds no parameter groups")
    if set(saved) != set(expected):
        raise CheckpointError(
            f"{where}: parameter groups {', '.join(sorted(map(str, saved)))}, the configuration builds "
            f"{', '.join(sorted(expected))}"
        )
    for group, tensors in expected.items():
        got = saved[group]
        if not isinstance(got, dict):
            raise CheckpointError(f"{where}: group '{group}' holds no parameters")
        missing, extra = sorted(set(tensors) - set(got)), sorted(map(str, set(got) - set(tensors)))
        if missing or extra:
            raise CheckpointError(
                f"{where}: group '{group}' lacks {', '.join(missing) or 'nothing'} and has extra "
                f"{', '.join(extra) or 'nothing'}"
            )
        for key, want in tensors.items():
            t = got[key]
            if not isinstance(t, torch.Tensor) or t.shape != want.shape or t.dtype != want.dtype:
                have = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(
                    f"{where}: {group}/{key} is {have} there, the configuration builds "
                    f"{tuple(want.shape)} {want.dtype}"
                )
