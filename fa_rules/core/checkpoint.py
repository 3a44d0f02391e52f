"""Atomic writes (a file is either its old complete version or its new complete version), and
checkpoints that are verified before use and never run code when loaded."""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from fa_rules.core.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, damaged, holding code, or not this run's."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# a new file only: O_EXCL refuses any entry already at the name, O_NOFOLLOW a symlink planted there
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def _open_new(tmp: Path) -> BinaryIO:
    try:
        fd = os.open(tmp, _NEW_FILE, 0o666)
    except FileExistsError:  # debris of a killed process that had this pid (a file, or a link: removed, not followed)
        tmp.unlink()
        fd = os.open(tmp, _NEW_FILE, 0o666)
    return open(fd, "wb")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a new temporary file in the same folder, renamed over `path`:
    `path` is either its old complete version or the new one. Nothing is written through a symlink:
    one at `path` is replaced by the file (its target is untouched), and the temporary file is
    created new. On any failure (disk full, Ctrl-C) the temporary file is removed and the error raised."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with _open_new(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # leave no half-written debris (it fills the disk)
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_with(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(f)` into memory (a figure's savefig, an image encoder, torch.save), then the bytes to
    `path` by `atomic_write_bytes`: a writer that fails midway leaves no file at all."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write_bytes(path, buffer.getvalue())


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's included)."""
    if pid <= 0:  # 0 and negative ids name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_tmp_files(folder: Path) -> list[Path]:
    """Remove the temporary files (`.NAME.tmp-PID`) of writes a killed process never finished: those
    whose process is gone (a live one may be writing its own)."""
    removed = []
    for path in Path(folder).glob(".*.tmp-*"):
        pid = path.name.rpartition(".tmp-")[2]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        if path.is_symlink() or path.is_file():  # a link is removed, never followed
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_or_explain(write: Callable[[Path, Any], None], path: Path, content: Any, then: str) -> None:
    """`write(path, content)` (`write_json`, `atomic_write_text`: atomic, never through a symlink),
    with the OS refusing (a full disk, a read-only folder) as one line: the earlier version of the
    file is kept whole, and `then` says how to finish the job once that is fixed."""
    try:
        write(path, content)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); its earlier version is kept: free space "
                        f"(or fix the folder) and {then}") from None


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_write_with(path, lambda f: torch.save(payload, f))


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


def read_regular_file(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of `path` if it is a regular file of at most `max_bytes`: a FIFO would block,
    /dev/zero never ends, a symlink loop or a directory is not a file, and a file larger than
    anything the run could have written is refused before it is read into memory."""
    try:
        # non-blocking: opening a FIFO for reading would otherwise wait for a writer forever
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            info = os.fstat(f.fileno())  # the file opened, not a name that may change under us
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"{path} is not a regular file (a {_file_kind(info.st_mode)}); "
                                      f"remove it or put the run's checkpoint there")
            if max_bytes is not None and info.st_size > max_bytes:
                raise CheckpointError(
                    f"{path} is {info.st_size / 2**20:,.0f} MiB, more than a checkpoint of this run's "
                    f"configuration can be ({max_bytes / 2**20:,.0f} MiB at most): not this run's checkpoint"
                )
            data = f.read(info.st_size + 1)
    except OSError as e:  # a symlink loop, no permission, a directory
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None
    if len(data) > info.st_size:
        raise CheckpointError(f"{path} grew while it was read; is another process writing it?")
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"))
    return next((name for test, name in kinds if test(mode)), "special file")


def load_checkpoint(path: Path, map_location=None, max_bytes: int | None = None) -> dict:
    """A checkpoint's payload, after its checksums are verified. Loaded with `weights_only=True`:
    unpickling admits only tensors and plain Python values, so a crafted file cannot run code.
    `max_bytes` bounds the file's size (`checkpoint_contents.size_limit`)."""
    path = Path(path)
    data = read_regular_file(path, max_bytes)
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
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{path} is damaged: {group}/{key} holds values that are not finite")
