import gzip
import pickle
import struct
from pathlib import Path

import pytest
import torch

from fa_rules.core.errors import UserError
from fa_rules.plugins import datasets as ds


def write_idx(path: Path, array: torch.Tensor, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.to(torch.uint8).numpy().tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist_like(folder: Path, n_train=20, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=g),
        "train-labels-idx1-ubyte": torch.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=g),
        "t10k-labels-idx1-ubyte": torch.arange(n_test) % 10,
    }
    for name, a in arrays.items():
        write_idx(folder / name, a, gz)
    return arrays


def test_digits_fixed_split():
    d = ds.load_digits()
    assert d.train_x.shape == (1437, 1, 8, 8) and d.test_x.shape == (360, 1, 8, 8)
    assert 0.0 <= d.train_x.min() and d.train_x.max() <= 1.0
    assert torch.equal(ds.load_digits().test_y, d.test_y)


def test_digits_read_without_scikit_learn_equal_its_own_loader(tmp_path, monkeypatch):
    """The CLI reads scikit-learn's digits file without importing scikit-learn (seconds of start-up):
    the same images and labels, in the same order, as `sklearn.datasets.load_digits`; where the file
    is elsewhere, scikit-learn's loader is used; a damaged file is one line that names it."""
    import importlib.util

    from sklearn.datasets import load_digits as sk_digits

    images, labels = ds._bundled_digits()
    theirs = sk_digits()
    assert torch.equal(images, torch.from_numpy(theirs.images)) and torch.equal(labels.long(), torch.from_numpy(theirs.target))
    direct = ds.load_digits()

    monkeypatch.setattr(ds, "_bundled_digits", lambda: None)  # scikit-learn's own loader: the same split
    fallback = ds.load_digits()
    assert torch.equal(fallback.train_x, direct.train_x) and torch.equal(fallback.test_y, direct.test_y)
    monkeypatch.undo()

    fake = tmp_path / "sklearn"
    (fake / "datasets" / "data").mkdir(parents=True)
    with gzip.open(fake / "datasets" / "data" / "digits.csv.gz", "wt") as f:
        f.write("\n".join(",".join(["17"] * 65) for _ in range(ds.DIGITS_COUNT)))  # pixels above 16
    spec = importlib.util.spec_from_loader("sklearn", loader=None, is_package=True)
    spec.submodule_search_locations = [str(fake)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(UserError, match="digits.csv.gz is not scikit-learn's digits file"):
        ds.load_digits()


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files_in_the_data_dir(tmp_path, gz):
    arrays = write_mnist_like(tmp_path / "MNIST" / "raw", gz=gz)
    d = ds.load_mnist(str(tmp_path))
    assert d.train_x.shape == (20, 1, 28, 28) and d.test_x.shape == (10, 1, 28, 28)
    assert torch.equal(d.train_x[:, 0], arrays["train-images-idx3-ubyte"].to(torch.uint8))
    assert torch.equal(d.test_y, arrays["t10k-labels-idx1-ubyte"])


def test_missing_files_offline_is_one_clear_line(tmp_path):
    with pytest.raises(UserError) as e:
        ds.load_mnist(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "MNIST" / "raw") in msg


def test_failed_download_removes_the_folders_it_created(tmp_path, monkeypatch):
    monkeypatch.delenv(ds.OFFLINE_ENV, raising=False)
    where = tmp_path / "cache" / "data" / "MNIST" / "raw"

    def fetch():  # torchvision makes its folders, writes part of an archive, then the network fails
        where.mkdir(parents=True)
        (where / "train-images-idx3-ubyte.gz.part").write_bytes(b"partial")
        raise ConnectionError("offline")

    with pytest.raises(UserError, match="download failed: ConnectionError"):
        ds._download("mnist", fetch, where, "files")
    assert list(tmp_path.iterdir()) == []  # no empty cache left to puzzle over
    (tmp_path / "kept").mkdir()  # a folder that existed before stays, with what it held
    (tmp_path / "kept" / "mine").write_text("x")
    where = tmp_path / "kept" / "MNIST"
    with pytest.raises(UserError):
        ds._download("mnist", fetch, where, "files")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine"]


def test_truncated_idx_file_is_reported(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_like(folder, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="truncated"):
        ds.load_mnist(str(tmp_path))


def test_fashion_mnist_found_in_debian_location(tmp_path):
    # CI installs Debian's dataset-fashion-mnist; the loader must find it with an empty data dir
    assert ds.DEBIAN_FASHION_MNIST.is_dir(), "apt-get install dataset-fashion-mnist"
    d = ds.load_fashion_mnist(str(tmp_path))
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert sorted(d.train_y.unique().tolist()) == list(range(10))


def test_cifar10_reads_pickled_batches(tmp_path):
    folder = tmp_path / ds.CIFAR_DIR
    folder.mkdir()
    for name in (*ds.CIFAR_TRAIN, "test_batch"):
        data = {b"data": torch.randint(0, 256, (4, 3072)).to(torch.uint8).numpy(), b"labels": [1, 2, 3, 4]}
        (folder / name).write_bytes(pickle.dumps(data))
    d = ds.load_cifar10(str(tmp_path))
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    assert d.train_y.tolist()[:4] == [1, 2, 3, 4]


def test_stl10_binary_resized_to_64(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        (folder / f"{split}_X.bin").write_bytes(torch.randint(0, 256, (n * 3 * 96 * 96,)).to(torch.uint8).numpy().tobytes())
        (folder / f"{split}_y.bin").write_bytes(bytes([1, 10, 5][:n]))
    d = ds.load_stl10(str(tmp_path))
    assert d.train_x.shape == (3, 3, 64, 64) and d.train_y.tolist() == [0, 9, 4]
    assert (folder / "stl10_64.pt").is_file()  # decoded once, then cached
    assert torch.equal(ds.load_stl10(str(tmp_path)).train_x, d.train_x)


def test_celeba_jpegs_cropped_and_resized(tmp_path):
    from PIL import Image

    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i, split in enumerate([0, 0, 1, 2]):
        name = f"{i:06d}.jpg"
        pixels = torch.randint(0, 256, (218, 178, 3)).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "img_align_celeba" / name)
        lines.append(f"{name} {split}")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    d = ds.load_celeba(str(tmp_path))
    assert d.train_x.shape == (3, 3, 64, 64) and d.test_x.shape == (1, 3, 64, 64) and d.num_classes == 0


def test_epoch_order_accepts_every_valid_seed_and_keeps_small_seeds_orders():
    from fa_rules.core.data import epoch_order

    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1_000_003 + 2))
    assert torch.equal(epoch_order(50, 7, 2), expected)
    big = 2**63 - 1
    assert sorted(epoch_order(50, big, 3).tolist()) == list(range(50))
    assert not torch.equal(epoch_order(50, big, 3), epoch_order(50, big, 4))
