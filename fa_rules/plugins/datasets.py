"""Built-in datasets: scikit-learn's 8x8 digits (always offline) and torchvision's image datasets.

Files live in the data directory (`--data-dir`, else $FA_RULES_DATA_DIR, else
~/.cache/fa-rules/data). Files already there are read directly and never downloaded again;
otherwise torchvision downloads them (set FA_RULES_OFFLINE=1 to skip trying). Fashion-MNIST is also
found where Debian's `dataset-fashion-mnist` package installs it.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import sys
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
def load_digits(data_dir: str | None = None) -> Dataset:
    """scikit-learn's bundled 1797 8x8 digits; a fixed 1437 / 360 train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    n_train = 1437
    return Dataset("digits", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


# -- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------
IDX_CHUNK = 1 << 20


def read_idx(path: Path, item_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """An IDX file (optionally gzipped) of unsigned bytes, as a uint8 tensor of its shape.

    Streamed: reading stops at the size the header promises (a gzip bomb costs no memory), and
    anything wrong (not gzip, truncated, damaged, data beyond that size, items not of
    `item_shape`) is a one-line UserError naming the file."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != bytes([0, 0, 0x08]):
                raise UserError(f"{path} is not an IDX file of unsigned bytes")
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise UserError(f"{path} is truncated (its header ends early)")
            dims = [int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            if item_shape is not None and tuple(dims[1:]) != tuple(item_shape):
                want = "x".join(map(str, item_shape)) or "single values"
                raise UserError(f"{path} holds items of shape {tuple(dims[1:])}, expected {want}")
            expected = 1
            for d in dims:
                expected *= d
            data = bytearray()  # grows with what really arrives, never beyond the promised size
            while len(data) < expected:
                chunk = f.read(min(IDX_CHUNK, expected - len(data)))
                if not chunk:
                    raise UserError(f"{path} is truncated ({len(data)} bytes of data, expected {expected})")
                data += chunk
            if f.read(1):
                raise UserError(f"{path} holds more data than the {expected} bytes its header promises")
    except gzip.BadGzipFile:
        raise UserError(f"{path} is not a gzip file (rename it without .gz if it is uncompressed)") from None
    except EOFError:  # a .gz cut short; click would print only "Aborted."
        raise UserError(f"{path} is truncated (the compressed stream ends early)") from None
    except zlib.error as e:
        raise UserError(f"{path} is damaged ({e})") from None
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
    arrays = {s: read_idx(files[s], (28, 28) if "images" in s else ()) for s in IDX_FILES}
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


class _Refused(pickle.UnpicklingError):
    """Something a CIFAR-10 batch never holds."""


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's python batches hold: a dict of bytes/str, lists of ints and
    uint8 numpy arrays. Any other global (the way a pickle runs code) is refused."""

    def find_class(self, module: str, name: str):
        import numpy as np

        def reconstruct(subtype, shape, dtype):
            if subtype is not np.ndarray:
                raise _Refused("an array of a type other than numpy.ndarray")
            return np.ndarray.__new__(subtype, shape, dtype)

        def uint8_dtype(spec, align=False, copy=False):
            if np.dtype(spec) != np.uint8:
                raise _Refused(f"an array of dtype {np.dtype(spec)}, not uint8")
            return np.dtype(spec, align, copy)

        # numpy < 2 pickles name numpy.core, numpy >= 2 numpy._core (CIFAR's own files: the former)
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): uint8_dtype,
        }
        if (module, name) not in allowed:
            raise _Refused(f"global {module}.{name}")
        return allowed[(module, name)]


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 python batch file: (N, 3, 32, 32) uint8 images and their labels."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise UserError(f"{path} refused: not a CIFAR-10 batch (it holds {e})") from None
    except Exception as e:  # truncated, garbage
        raise UserError(f"{path} is not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None
    data = labels = None
    if isinstance(d, dict):
        data, labels = d.get(b"data", d.get("data")), d.get(b"labels", d.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise UserError(f"{path} is not a CIFAR-10 batch file (no uint8 'data' array of N x 3072)")
    if not (isinstance(labels, list) and len(labels) == data.shape[0]
            and all(type(v) is int and 0 <= v < 10 for v in labels)):
        raise UserError(f"{path} is not a CIFAR-10 batch file ('labels' are not {data.shape[0]} classes 0..9)")
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


def _cached(path: Path, build: Callable[[], Dataset]) -> Dataset:
    """Decoded images are cached beside the raw files, so they are decoded once."""
    if path.is_file():
        d = torch.load(path, weights_only=True)
        return Dataset(d["name"], d["train_x"], d["train_y"], d["test_x"], d["test_y"], d["num_classes"])
    ds = build()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {"name": ds.name, "train_x": ds.train_x, "train_y": ds.train_y, "test_x": ds.test_x,
         "test_y": ds.test_y, "num_classes": ds.num_classes},
        tmp,
    )
    os.replace(tmp, path)
    return ds


def load_stl10(data_dir: str | None = None) -> Dataset:
    """STL-10's labelled 5000 / 8000 split, resized from 96x96 to 64x64 (the paper's size)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    folder = root / "stl10_binary"
    needed = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
    if not all((folder / n).is_file() for n in needed):
        import torchvision.datasets as tvd

        _download("stl10", lambda: tvd.STL10(str(root), split="train", download=True), folder, ", ".join(needed))

    def build() -> Dataset:
        def images(name):
            raw = torch.frombuffer(bytearray((folder / name).read_bytes()), dtype=torch.uint8)
            return _resize_uint8(raw.reshape(-1, 3, 96, 96).transpose(2, 3), 64)  # stored column-major

        def labels(name):
            return torch.frombuffer(bytearray((folder / name).read_bytes()), dtype=torch.uint8).long() - 1

        return Dataset("stl10", images("train_X.bin"), labels("train_y.bin"), images("test_X.bin"),
                       labels("test_y.bin"), 10)

    return _cached(folder / "stl10_64.pt", build)


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

    def build() -> Dataset:
        import numpy as np
        from PIL import Image

        train, test = [], []
        for line in partition.read_text().split("\n"):
            if line.strip():
                name, split = line.split()
                (test if split == "2" else train).append(name)

        def images(names):
            out = []
            for name in names:
                with Image.open(images_dir / name) as img:
                    w, h = img.size
                    left, top = (w - 148) // 2, (h - 148) // 2
                    crop = img.convert("RGB").crop((left, top, left + 148, top + 148))
                out.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
            return _resize_uint8(torch.stack(out), 64) if out else torch.zeros(0, 3, 64, 64, dtype=torch.uint8)

        tx, vx = images(train), images(test)
        return Dataset("celeba", tx, torch.zeros(len(tx), dtype=torch.long), vx,
                       torch.zeros(len(vx), dtype=torch.long), 0)

    return _cached(folder / "celeba_64.pt", build)


@hookimpl
def register_datasets(register):
    register(DatasetSpec("digits", load_digits, "scikit-learn 8x8 handwritten digits (bundled, offline)", (1, 8, 8), 10))
    register(DatasetSpec("mnist", load_mnist, "MNIST handwritten digits 28x28", (1, 28, 28), 10))
    register(DatasetSpec("fashion_mnist", load_fashion_mnist, "Fashion-MNIST clothing 28x28", (1, 28, 28), 10))
    register(DatasetSpec("cifar10", load_cifar10, "CIFAR-10 colour images 32x32", (3, 32, 32), 10))
    register(DatasetSpec("celeba", load_celeba, "CelebA aligned faces, 64x64, unlabelled", (3, 64, 64), 0))
    register(DatasetSpec("stl10", load_stl10, "STL-10 labelled images, resized to 64x64", (3, 64, 64), 10))
