"""Built-in datasets: scikit-learn's 8x8 digits (always offline) and torchvision's image datasets.

Files live in the data directory (`--data-dir`, else $FA_RULES_DATA_DIR, else
~/.cache/fa-rules/data). Files already there are read directly and never downloaded again;
otherwise torchvision downloads them (set FA_RULES_OFFLINE=1 to skip trying). Fashion-MNIST is also
found where Debian's `dataset-fashion-mnist` package installs it.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import stat
import sys
import warnings
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from fa_rules.core.data import Dataset, DatasetSpec
from fa_rules.core.errors import UserError
from fa_rules.core.hooks import hookimpl

DATA_DIR_ENV = "FA_RULES_DATA_DIR"
OFFLINE_ENV = "FA_RULES_OFFLINE"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def default_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fa-rules" / "data"


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


# what every message about a damaged or foreign data file tells the user to do
_REPLACE = "delete it (fa-rules then downloads the dataset again) or put the original file there"


def _open_data_file(path: Path, max_bytes: int | None = None, what: str = "this file", fix: str = _REPLACE):
    """`path` opened for reading if it is a regular file of at most `max_bytes`: a FIFO would block
    the reader forever, a device never ends, and a file larger than the dataset's can be is refused
    before any of it is read. Anything else is one line naming the file and ending in `fix`."""
    try:
        # non-blocking: opening a FIFO for reading would otherwise wait for a writer forever
        f = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except (OSError, ValueError) as e:  # missing, no permission, a symlink loop, a NUL in the name
        raise UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); {fix}") from None
    info = os.fstat(f.fileno())  # the file opened, not a name that may change under us
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif max_bytes is not None and info.st_size > max_bytes:
        problem = f"is {info.st_size:,} bytes, more than {what} can be ({max_bytes:,} bytes)"
    if problem:
        f.close()
        raise UserError(f"{path} {problem}; {fix}")
    return f


def _read_data_file(path: Path, max_bytes: int, what: str) -> bytes:
    """The bytes of `path`, a regular file of at most `max_bytes` (see `_open_data_file`)."""
    with _open_data_file(path, max_bytes, what) as f:
        size = os.fstat(f.fileno()).st_size  # read asks for no more: a read allocates what it asks
        try:
            data = f.read(size + 1)
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror or e}); {_REPLACE}") from None
    if len(data) > size:
        raise UserError(f"{path} grew while it was read; is another process writing it?")
    return data


def _download(name: str, fetch: Callable[[], object], where: Path, files: str) -> None:
    """Run a torchvision download, turning any failure into one actionable line; a failed download
    leaves no folder behind that it created (a fresh data cache stays absent, not empty)."""
    missing = f"{name}: no data files found; put {files} in {where}"
    if _offline():
        raise UserError(missing + f" ({OFFLINE_ENV} is set, so nothing is downloaded)")
    created = None  # the outermost folder on the way to `where` that does not exist yet
    for folder in (Path(where), *Path(where).parents):
        if folder.exists():
            break
        created = folder
    try:
        fetch()
    except Exception as e:  # offline, moved mirrors, quota: all end the same way for the user
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise UserError(f"{missing} (download failed: {type(e).__name__})") from None


# -- digits ---------------------------------------------------------------------------------------
DIGITS_COUNT = 1797


def _bundled_digits() -> tuple[torch.Tensor, torch.Tensor] | None:
    """scikit-learn's digits file (`sklearn/datasets/data/digits.csv.gz`: 1797 rows of 64 pixels in
    0..16 and a label), read without importing scikit-learn, whose import takes seconds and would
    be most of a short command's start-up. None where the file is not there (another layout)."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            rows = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.float64))
            valid = (rows.shape == (DIGITS_COUNT, 65) and bool(((rows >= 0) & (rows <= 16)).all())
                     and bool((rows == rows.round()).all()) and bool((rows[:, -1] <= 9).all()))
            if not valid:
                raise UserError(f"{path} is not scikit-learn's digits file (1797 rows of 64 pixels in 0..16 "
                                "and a label); reinstall scikit-learn")
            return rows[:, :64].reshape(-1, 8, 8), rows[:, 64]
    return None


def load_digits(data_dir: str | None = None) -> Dataset:
    """scikit-learn's bundled 1797 8x8 digits; a fixed 1437 / 360 train/test split."""
    bundled = _bundled_digits()
    if bundled is None:  # scikit-learn keeps its data elsewhere: its own loader finds it
        from sklearn.datasets import load_digits as sk_digits

        d = sk_digits()
        bundled = torch.from_numpy(d.images), torch.from_numpy(d.target)
    images, labels = bundled
    x = images.to(torch.float32).unsqueeze(1) / 16.0
    y = labels.to(torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    n_train = 1437
    return Dataset("digits", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


# -- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------
IDX_CHUNK = 1 << 20
IDX_MAX_BYTES = 1 << 28  # 256 MiB of data: far above any IDX file here (MNIST's training images: 47 MB)
# the most items each file of MNIST and Fashion-MNIST holds (their training and test splits)
IDX_MAX_ITEMS = {"train": 60_000, "t10k": 10_000}


def read_idx(path: Path, item_shape: tuple[int, ...] | None = None, max_items: int | None = None) -> torch.Tensor:
    """An IDX file (optionally gzipped) of unsigned bytes, as a uint8 tensor of its shape.

    The header's claim is checked before anything is allocated: items of `item_shape`, at most
    `max_items` of them and IDX_MAX_BYTES of data, and an uncompressed file exactly as long as the
    header promises. Then streamed in bounded chunks: memory grows with the data that really
    arrives and reading stops at the promised size (a gzip bomb costs no memory; gzip's own size
    field is only modulo 4 GiB, so it is never trusted). Anything wrong (not gzip, truncated,
    damaged, data beyond that size) is a one-line UserError naming the file."""
    path = Path(path)
    gz = path.suffix == ".gz"
    with _open_data_file(path) as raw:
        try:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            head = f.read(4)
            if len(head) < 4 or head[:3] != bytes([0, 0, 0x08]):
                raise UserError(f"{path} is not an IDX file of unsigned bytes; {_REPLACE}")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise UserError(f"{path} is truncated (its header ends early); {_REPLACE}")
            dims = [int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            if item_shape is not None and tuple(dims[1:]) != tuple(item_shape):
                want = "x".join(map(str, item_shape)) or "single values"
                raise UserError(f"{path} holds items of shape {tuple(dims[1:])}, expected {want}")
            if max_items is not None and dims and dims[0] > max_items:
                raise UserError(f"{path}: its header claims {dims[0]:,} items, more than the {max_items:,} this "
                                f"file can hold; {_REPLACE}")
            expected = math.prod(dims)
            if expected > IDX_MAX_BYTES:
                raise UserError(f"{path}: its header claims {expected:,} bytes of data, more than the "
                                f"{IDX_MAX_BYTES:,} an IDX file may hold; {_REPLACE}")
            if not gz:  # the file's length says how much data is there, before any is read
                present = os.fstat(raw.fileno()).st_size - 4 - 4 * ndim
                if present < expected:
                    raise UserError(f"{path} is truncated ({present} bytes of data, expected {expected}); {_REPLACE}")
                if present > expected:
                    raise UserError(f"{path} holds more data than the {expected} bytes its header promises; "
                                    f"{_REPLACE}")
            data = bytearray()  # grows with what really arrives, never beyond the promised size
            while len(data) < expected:
                chunk = f.read(min(IDX_CHUNK, expected - len(data)))
                if not chunk:
                    raise UserError(f"{path} is truncated ({len(data)} bytes of data, expected {expected}); "
                                    f"{_REPLACE}")
                data += chunk
            if f.read(1):
                raise UserError(f"{path} holds more data than the {expected} bytes its header promises; {_REPLACE}")
        except gzip.BadGzipFile:
            raise UserError(f"{path} is not a gzip file (rename it without .gz if it is uncompressed)") from None
        except EOFError:  # a .gz cut short; click would print only "Aborted."
            raise UserError(f"{path} is truncated (the compressed stream ends early); {_REPLACE}") from None
        except zlib.error as e:
            raise UserError(f"{path} is damaged ({e}); {_REPLACE}") from None
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    return torch.frombuffer(data, dtype=torch.uint8).reshape(dims) if expected else torch.zeros(dims, dtype=torch.uint8)


def _find_idx(dirs: list[Path]) -> dict[str, Path] | None:
    for d in dirs:
        found = {}
        for stem in IDX_FILES:
            for candidate in (d / stem, d / f"{stem}.gz"):
                if candidate.is_file():
                    found[stem] = candidate
                    break
        if len(found) == len(IDX_FILES):
            return found
    return None


def _load_idx_dataset(name: str, tv_name: str, data_dir: str | None, extra_dirs: list[Path]) -> Dataset:
    root = Path(data_dir) if data_dir else default_data_dir()
    raw_dir = root / tv_name / "raw"
    dirs = [raw_dir, root / name, *extra_dirs]
    files = _find_idx(dirs)
    if files is None:
        import torchvision.datasets as tvd

        fetch = getattr(tvd, tv_name)
        _download(
            name,
            lambda: [fetch(str(root), train=t, download=True) for t in (True, False)],
            raw_dir,
            ", ".join(f"{f}.gz" for f in IDX_FILES),
        )
        files = _find_idx(dirs)
        if files is None:
            raise UserError(f"{name}: download finished but the IDX files are not in {raw_dir}")
    used = files[IDX_FILES[0]].parent
    if data_dir and not used.is_relative_to(root):  # never replace the user's choice silently
        print(f"note: {name}: no complete IDX files in {root}; using those in {used}", file=sys.stderr)
    arrays = {s: read_idx(files[s], (28, 28) if "images" in s else (), IDX_MAX_ITEMS[s.split("-")[0]])
              for s in IDX_FILES}
    for images, labels in (IDX_FILES[:2], IDX_FILES[2:]):
        n, y = arrays[images].shape[0], arrays[labels]
        if n != y.shape[0]:
            raise UserError(f"{files[images]} holds {n} images but {files[labels]} holds {y.shape[0]} labels")
        if y.numel() and int(y.max()) >= 10:
            raise UserError(f"{files[labels]} holds label {int(y.max())}, outside the classes 0..9")
    tx, ty, vx, vy = (arrays[s] for s in IDX_FILES)
    return Dataset(name, tx.unsqueeze(1), ty.long(), vx.unsqueeze(1), vy.long(), 10)


def load_mnist(data_dir: str | None = None) -> Dataset:
    return _load_idx_dataset("mnist", "MNIST", data_dir, [])


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    return _load_idx_dataset("fashion_mnist", "FashionMNIST", data_dir, [DEBIAN_FASHION_MNIST])


# -- CIFAR-10 ------------------------------------------------------------------------------------------
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_BATCH_IMAGES = 10_000  # what one CIFAR-10 batch holds
CIFAR_BATCH_MAX_BYTES = 64 << 20  # a batch file is about 31 MB


class _Refused(pickle.UnpicklingError):
    """Something a CIFAR-10 batch never holds."""


class _ArrayType:
    """Stands in for `numpy.ndarray` in a batch: numpy's pickles only name the type (for
    `_reconstruct`); a pickle calling it would allocate whatever shape it asks for."""

    def __call__(self, *args, **kwargs):
        raise _Refused("a direct call of numpy.ndarray, which numpy's own pickles never make")


_ARRAY_TYPE = _ArrayType()


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's python batches hold: a dict of bytes/str, lists of ints and
    uint8 numpy arrays, built as numpy pickles them (an empty array filled from the file's own
    bytes, so its size is bounded by the file's). Any other global (the way a pickle runs code) is
    refused."""

    def find_class(self, module: str, name: str):
        import numpy as np

        def reconstruct(subtype, shape, dtype):
            if subtype is not _ARRAY_TYPE:
                raise _Refused("an array of a type other than numpy.ndarray")
            if shape != (0,):  # numpy's pickles start empty; any other size would be allocated here
                raise _Refused(f"an array made at shape {shape!r}, not as numpy pickles arrays")
            return np.ndarray.__new__(np.ndarray, shape, dtype)

        def uint8_dtype(spec, align=False, copy=False):
            if np.dtype(spec) != np.uint8:
                raise _Refused(f"an array of dtype {np.dtype(spec)}, not uint8")
            return np.dtype(spec, align, copy)

        # numpy < 2 pickles name numpy.core, numpy >= 2 numpy._core (CIFAR's own files: the former)
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): _ARRAY_TYPE,
            ("numpy", "dtype"): uint8_dtype,
        }
        if (module, name) not in allowed:
            raise _Refused(f"global {module}.{name}")
        return allowed[(module, name)]


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch file: (N, 3, 32, 32) uint8 images and their labels, N at most
    the 10,000 a batch holds."""
    import numpy as np

    with _open_data_file(path, CIFAR_BATCH_MAX_BYTES, "a CIFAR-10 batch") as f:
        try:
            d = _CifarUnpickler(f, encoding="bytes").load()
        except _Refused as e:
            raise UserError(f"{path} refused: not a CIFAR-10 batch (it holds {e}); {_REPLACE}") from None
        except Exception as e:  # truncated, garbage
            raise UserError(f"{path} is not a CIFAR-10 batch file (unreadable: {type(e).__name__}); {_REPLACE}") from None
    data = labels = None
    if isinstance(d, dict):
        data, labels = d.get(b"data", d.get("data")), d.get(b"labels", d.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise UserError(f"{path} is not a CIFAR-10 batch file (no uint8 'data' array of N x 3072); {_REPLACE}")
    if not 1 <= data.shape[0] <= CIFAR_BATCH_IMAGES:
        raise UserError(f"{path} is not a CIFAR-10 batch file (it holds {data.shape[0]:,} images, a batch "
                        f"1 to {CIFAR_BATCH_IMAGES:,}); {_REPLACE}")
    if not (isinstance(labels, list) and len(labels) == data.shape[0]
            and all(type(v) is int and 0 <= v < 10 for v in labels)):
        raise UserError(f"{path} is not a CIFAR-10 batch file ('labels' are not {data.shape[0]} classes 0..9); "
                        f"{_REPLACE}")
    return torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32), torch.tensor(labels, dtype=torch.int64)


def _read_cifar_batches(folder: Path, names) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(read_cifar_batch(folder / n) for n in names))
    return torch.cat(xs), torch.cat(ys)


def load_cifar10(data_dir: str | None = None) -> Dataset:
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / CIFAR_DIR
    needed = (*CIFAR_TRAIN, "test_batch")
    if not all((folder / n).is_file() for n in needed):
        import torchvision.datasets as tvd

        _download("cifar10", lambda: tvd.CIFAR10(str(root), download=True), folder, ", ".join(needed))
    tx, ty = _read_cifar_batches(folder, CIFAR_TRAIN)
    vx, vy = _read_cifar_batches(folder, ("test_batch",))
    return Dataset("cifar10", tx, ty, vx, vy, 10)


# -- 64x64 colour datasets (CelebA, STL-10), as in the feature alignment paper ---------------------------
def _resize_uint8(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    out = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].float()
        xb = F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(xb.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


_CACHE_KEYS = {"name", "train_x", "train_y", "test_x", "test_y", "num_classes"}
_CACHE_BYTES_PER_IMAGE = 3 * 64 * 64 + 8  # a 64x64 colour image and its int64 label


def _cached(path: Path, build: Callable[[], Dataset], num_classes: int, max_images: int) -> Dataset:
    """Decoded images are cached beside the raw files, so they are decoded once. A cache that is
    damaged or not what fa-rules writes (at most `max_images` 64x64 colour images with labels in
    0..num_classes-1) is one line saying to delete it."""
    if path.is_file():
        return _load_cache(path, num_classes, max_images)
    ds = build()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"name": ds.name, "train_x": ds.train_x, "train_y": ds.train_y, "test_x": ds.test_x,
                    "test_y": ds.test_y, "num_classes": ds.num_classes}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # disk full, a read-only folder: the cache only saves decoding again
        tmp.unlink(missing_ok=True)
        why = getattr(e, "strerror", None) or type(e).__name__
        print(f"note: {ds.name}: could not cache the decoded images in {path} ({why}); they are decoded again "
              f"next time", file=sys.stderr)
    except BaseException:  # Ctrl-C: no half-written cache left behind
        tmp.unlink(missing_ok=True)
        raise
    return ds


def _load_cache(path: Path, num_classes: int, max_images: int) -> Dataset:
    fix = "delete it and it is rebuilt from the raw files"
    limit = max_images * _CACHE_BYTES_PER_IMAGE + (1 << 20)
    with _open_data_file(path, limit, "a cache of this dataset") as f:
        try:
            d = torch.load(f, weights_only=True)  # tensors and plain values only: never runs code
        except Exception as e:
            raise UserError(f"{path} is a damaged cache of decoded images (unreadable: {type(e).__name__}); "
                            f"{fix}") from None
    problem = _cache_problem(d, num_classes)
    if problem:
        raise UserError(f"{path} is a damaged cache of decoded images ({problem}); {fix}")
    return Dataset(d["name"], d["train_x"], d["train_y"], d["test_x"], d["test_y"], d["num_classes"])


def _cache_problem(d, num_classes: int) -> str | None:
    """What is wrong with a loaded cache, or None."""
    if not isinstance(d, dict) or set(d) != _CACHE_KEYS:
        return "not the entries fa-rules writes"
    if not isinstance(d["name"], str) or type(d["num_classes"]) is not int or d["num_classes"] != num_classes:
        return f"its number of classes is {d['num_classes']!r}, not {num_classes}"
    for split in ("train", "test"):
        x, y = d[f"{split}_x"], d[f"{split}_y"]
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4
                and tuple(x.shape[1:]) == (3, 64, 64)):
            return f"its {split}_x is not an N x 3 x 64 x 64 uint8 tensor"
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and tuple(y.shape) == (x.shape[0],)):
            return f"its {split}_y is not {x.shape[0]} int64 labels"
        if y.numel() and not (0 <= int(y.min()) and int(y.max()) < max(num_classes, 1)):
            return f"its {split}_y holds labels outside 0..{max(num_classes, 1) - 1}"
    return None


STL10_IMAGE_BYTES = 3 * 96 * 96
STL10_IMAGES = {"train": 5000, "test": 8000}  # the labelled images of each split


def load_stl10(data_dir: str | None = None) -> Dataset:
    """STL-10's labelled 5000 / 8000 split, resized from 96x96 to 64x64 (the paper's size)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / "stl10_binary"
    needed = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
    if not all((folder / n).is_file() for n in needed):
        import torchvision.datasets as tvd

        _download("stl10", lambda: tvd.STL10(str(root), split="train", download=True), folder, ", ".join(needed))

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        most = STL10_IMAGES[name]
        images_path, labels_path = folder / f"{name}_X.bin", folder / f"{name}_y.bin"
        raw = _read_data_file(images_path, most * STL10_IMAGE_BYTES, f"STL-10's {most:,} {name} images")
        if len(raw) % STL10_IMAGE_BYTES:
            raise UserError(f"{images_path} is {len(raw):,} bytes, not a whole number of 96x96 colour images "
                            f"({STL10_IMAGE_BYTES:,} bytes each); {_REPLACE}")
        labels = _read_data_file(labels_path, most, f"STL-10's {most:,} {name} labels")
        if len(labels) != len(raw) // STL10_IMAGE_BYTES:
            raise UserError(f"{images_path} holds {len(raw) // STL10_IMAGE_BYTES:,} images but {labels_path} holds "
                            f"{len(labels):,} labels; {_REPLACE}")
        if labels and not 1 <= min(labels) <= max(labels) <= 10:
            raise UserError(f"{labels_path} holds label {min(labels) if min(labels) < 1 else max(labels)}, outside "
                            f"STL-10's classes 1..10; {_REPLACE}")
        images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 3, 96, 96).transpose(2, 3)  # column-major
        return _resize_uint8(images, 64), torch.tensor(list(labels), dtype=torch.int64) - 1

    def build() -> Dataset:
        (tx, ty), (vx, vy) = split("train"), split("test")
        return Dataset("stl10", tx, ty, vx, vy, 10)

    return _cached(folder / "stl10_64.pt", build, 10, sum(STL10_IMAGES.values()))


CELEBA_IMAGES = 202_599  # CelebA's images; its partition file lists each once
CELEBA_CROP = 148  # the centre crop, then resized to 64x64
CELEBA_MAX_SIDE = 1024  # aligned CelebA images are 178x218: a larger header is no CelebA image (or a bomb)
CELEBA_IMAGE_MAX_BYTES = 16 << 20
CELEBA_PARTITION_MAX_BYTES = 16 << 20  # the real list is about 2.8 MB


def _celeba_partition(path: Path) -> tuple[list[str], list[str]]:
    """The (train + valid, test) image names of CelebA's `list_eval_partition.txt`: one
    `NAME SPLIT` per line, SPLIT 0 (train), 1 (valid) or 2 (test), NAME a file name in the image folder."""
    raw = _read_data_file(path, CELEBA_PARTITION_MAX_BYTES, "CelebA's partition list")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text (CelebA's list of image names and splits); {_REPLACE}") from None
    train, test = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        name = fields[0]
        if len(fields) != 2 or fields[1] not in ("0", "1", "2") or Path(name).name != name or name in (".", ".."):
            raise UserError(f"{path} line {number} is {line.strip()[:60]!r}, not 'IMAGE_NAME SPLIT' with SPLIT 0, "
                            f"1 or 2; {_REPLACE}")
        (test if fields[1] == "2" else train).append(name)
    if len(train) + len(test) > CELEBA_IMAGES:
        raise UserError(f"{path} lists {len(train) + len(test):,} images, more than the {CELEBA_IMAGES:,} CelebA has; "
                        f"{_REPLACE}")
    return train, test


def _celeba_crop(path: Path) -> torch.Tensor:
    """The 148x148 centre crop of one aligned CelebA image, as (3, 148, 148) uint8. Its size is
    checked from the header before the pixels are decoded (a decompression bomb costs nothing)."""
    import numpy as np
    from PIL import Image

    fix = "put the original image there, or remove its line from list_eval_partition.txt"
    try:
        with _open_data_file(path, CELEBA_IMAGE_MAX_BYTES, "a CelebA image", fix) as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                w, h = img.size
                if not (CELEBA_CROP <= w <= CELEBA_MAX_SIDE and CELEBA_CROP <= h <= CELEBA_MAX_SIDE):
                    raise UserError(f"{path} is a {w}x{h} image; CelebA's aligned images are 178x218 (between "
                                    f"{CELEBA_CROP} and {CELEBA_MAX_SIDE} pixels a side here); {fix}")
                left, top = (w - CELEBA_CROP) // 2, (h - CELEBA_CROP) // 2
                crop = img.convert("RGB").crop((left, top, left + CELEBA_CROP, top + CELEBA_CROP))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path} claims more pixels than any CelebA image (a decompression bomb?); {fix}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # not an image, truncated, a damaged header
        raise UserError(f"{path} is not a readable image ({type(e).__name__}); {fix}") from None
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)


def load_celeba(data_dir: str | None = None) -> Dataset:
    """CelebA aligned faces, centre-cropped to 148x148 and resized to 64x64; official partition
    (train = train + valid). Unlabelled here (generative use)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / "celeba"
    images_dir, partition = folder / "img_align_celeba", folder / "list_eval_partition.txt"
    if not (images_dir.is_dir() and partition.is_file()):
        import torchvision.datasets as tvd

        _download("celeba", lambda: tvd.CelebA(str(root), split="all", download=True), folder,
                  "img_align_celeba/ (the aligned JPEGs) and list_eval_partition.txt")

    def images(names: list[str], chunk: int = 2048) -> torch.Tensor:
        out = []  # resized chunk by chunk: 148x148 crops of all of CelebA would take 13 GB at once
        for i in range(0, len(names), chunk):
            out.append(_resize_uint8(torch.stack([_celeba_crop(images_dir / n) for n in names[i : i + chunk]]), 64))
        return torch.cat(out) if out else torch.zeros(0, 3, 64, 64, dtype=torch.uint8)

    def build() -> Dataset:
        train, test = _celeba_partition(partition)
        tx, vx = images(train), images(test)
        return Dataset("celeba", tx, torch.zeros(len(tx), dtype=torch.long), vx,
                       torch.zeros(len(vx), dtype=torch.long), 0)

    return _cached(folder / "celeba_64.pt", build, 0, CELEBA_IMAGES)


@hookimpl
def register_datasets(register):
    register(DatasetSpec("digits", load_digits, "scikit-learn 8x8 handwritten digits (bundled, offline)", (1, 8, 8), 10))
    register(DatasetSpec("mnist", load_mnist, "MNIST handwritten digits 28x28", (1, 28, 28), 10))
    register(DatasetSpec("fashion_mnist", load_fashion_mnist, "Fashion-MNIST clothing 28x28", (1, 28, 28), 10))
    register(DatasetSpec("cifar10", load_cifar10, "CIFAR-10 colour images 32x32", (3, 32, 32), 10))
    register(DatasetSpec("celeba", load_celeba, "CelebA aligned faces, 64x64, unlabelled", (3, 64, 64), 0))
    register(DatasetSpec("stl10", load_stl10, "STL-10 labelled images, resized to 64x64", (3, 64, 64), 10))
