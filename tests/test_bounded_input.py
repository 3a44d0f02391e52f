"""Bounded work and memory for any data file or model size, and damaged dataset files as one line
(issue 37, sections 3 and 4). Every crafted file is written here and small on disk: a header's claim,
a sparse file or a compressed run of zeros stands in for the gigabytes it would cost."""

import gzip
import os
import pickle
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli_errors import run_main
from test_datasets import write_mnist_like

from fa_rules.core.errors import UserError
from fa_rules.plugins import datasets as ds

MiB = 1 << 20


def refused(load, *fragments: str) -> tuple[str, int]:
    """(message, peak traced bytes) of `load()`, which must raise one line holding `fragments`."""
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as e:
            load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message, peak


class TookTooLong(BaseException):
    """Not an Exception: no `except Exception` on the way swallows it."""


@contextmanager
def deadline(seconds: float):
    """Fail (rather than hang or run for minutes) when the block takes longer than `seconds`."""

    def expire(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- IDX: the header's claim is checked before anything is allocated ------------------------------
def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


def write_gzip(path: Path, head: bytes, zeros: int) -> None:
    """`head` then `zeros` zero bytes, gzipped (a few hundred KB on disk for tens of MiB)."""
    with gzip.GzipFile(path, "wb", compresslevel=9) as f:
        f.write(head)
        for _ in range(zeros // MiB):
            f.write(bytes(MiB))


def test_an_idx_gzip_claiming_2_32_images_is_refused_before_its_data_is_read(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_like(folder)
    path = folder / "train-images-idx3-ubyte.gz"
    write_gzip(path, idx_header(2**32 - 1, 28, 28), 64 * MiB)  # then 64 MiB of zeros, a bomb's start
    assert path.stat().st_size < MiB
    _, peak = refused(lambda: ds.load_mnist(str(tmp_path)), str(path), "claims 4,294,967,295 items",
                      "more than the 60,000 this file can hold", "delete it")
    assert peak < 8 * MiB, peak  # reading on took the 64 MiB (and a real bomb, all memory)


def test_an_uncompressed_idx_file_is_checked_against_its_size_before_it_is_read(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    write_mnist_like(folder, gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    with open(path, "wb") as f:  # a sparse file: 256 MiB long, nothing on disk
        f.write(idx_header(2**32 - 1, 28, 28))
        f.truncate(256 * MiB)
    _, peak = refused(lambda: ds.load_mnist(str(tmp_path)), str(path), "more than the 10,000 this file can hold")
    assert peak < 8 * MiB, peak
    # within the count, a file shorter than its header promises is refused before any data is read
    path.write_bytes(idx_header(30, 28, 28) + bytes(20 * 28 * 28))
    _, peak = refused(lambda: ds.load_mnist(str(tmp_path)), str(path),
                      "is truncated (15680 bytes of data, expected 23520)")


@pytest.mark.parametrize("gz", [True, False])
def test_the_idx_reader_reads_no_further_than_its_header_promises(tmp_path, gz):
    path = tmp_path / ("images.gz" if gz else "images")
    head = idx_header(10, 28, 28) + bytes(7840)  # promises 7840 bytes, then 32 MiB more
    if gz:
        write_gzip(path, head, 32 * MiB)
    else:
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(len(head) + 32 * MiB)
    _, peak = refused(lambda: ds.read_idx(path, (28, 28)), str(path),
                      "holds more data than the 7840 bytes its header promises")
    assert peak < MiB, peak  # not a whole 1 MiB chunk beyond the promise, let alone the rest


# -- CIFAR-10: the restricted unpickler builds nothing larger than the file ------------------------
def ndarray_call_pickle(n: int) -> bytes:
    """{b"data": numpy.ndarray((n, 3072), "u1"), b"labels": [0] * n}: the type called directly,
    which allocates n x 3072 bytes from a file of 2n bytes."""
    out = b"\x80\x02}" + b"C\x04data" + b"cnumpy\nndarray\n"
    out += b"J" + struct.pack("<i", n) + b"M\x00\x0c\x86" + b"X\x02\x00\x00\x00u1\x86R" + b"s"
    return out + b"C\x06labels]" + b"(" + b"K\x00" * n + b"es."


def reconstruct_at_size_pickle(n: int) -> bytes:
    """{b"data": numpy._core.multiarray._reconstruct(numpy.ndarray, (n, 3072), b"B"), b"labels": [0] * n}."""
    out = b"\x80\x02}" + b"C\x04data" + b"cnumpy._core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
    out += b"J" + struct.pack("<i", n) + b"M\x00\x0c\x86" + b"C\x01B\x87R" + b"s"
    return out + b"C\x06labels]" + b"(" + b"K\x00" * n + b"es."


def test_the_crafted_pickles_build_what_they_claim_without_the_restriction():
    for craft in (ndarray_call_pickle, reconstruct_at_size_pickle):
        d = pickle.loads(craft(3), encoding="bytes")
        assert d[b"data"].shape == (3, 3072) and d[b"data"].dtype == np.uint8 and d[b"labels"] == [0, 0, 0]


@pytest.mark.parametrize("craft, says", [
    (ndarray_call_pickle, "it holds a direct call of numpy.ndarray"),
    (reconstruct_at_size_pickle, "it holds an array made at shape (100000, 3072)"),
])
def test_a_cifar_batch_that_asks_numpy_for_a_large_array_is_refused_before_it_is_allocated(tmp_path, craft, says):
    path = tmp_path / "data_batch_1"
    path.write_bytes(craft(100_000))  # 200 KB on disk, 307 MB of blank images (the audit's 1 MB file: 3.5 GB)
    _, peak = refused(lambda: ds.read_cifar_batch(path), f"{path} refused: not a CIFAR-10 batch", says)
    assert peak < 16 * MiB, peak


def test_a_cifar_batch_of_more_images_than_a_batch_holds_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((10_001, 3072), np.uint8), b"labels": [0] * 10_001}))
    refused(lambda: ds.read_cifar_batch(path), str(path), "it holds 10,001 images, a batch 1 to 10,000")


# -- STL-10 and its cache ------------------------------------------------------------------------------
STL_IMAGE = 3 * 96 * 96


def write_stl10(root: Path, train=3, test=2) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        (folder / f"{split}_X.bin").write_bytes(torch.randint(0, 256, (n * STL_IMAGE,), generator=g)
                                                .to(torch.uint8).numpy().tobytes())
        (folder / f"{split}_y.bin").write_bytes(bytes(1 + i % 10 for i in range(n)))
    return folder


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("case, file, says", [
    ("images_not_whole", "train_X.bin", f"is {3 * STL_IMAGE + 5:,} bytes, not a whole number of 96x96 colour images"),
    ("label_zero", "train_y.bin", "holds label 0, outside STL-10's classes 1..10"),
    ("label_eleven", "test_y.bin", "holds label 11, outside STL-10's classes 1..10"),
    ("fewer_labels", "train_X.bin", "holds 3 images but"),
    ("more_images_than_stl10", "train_X.bin", "more than STL-10's 5,000 train images can be"),
])
def test_damaged_stl10_files_are_one_line_and_cache_nothing(tmp_path, case, file, says):
    folder = write_stl10(tmp_path)
    if case == "images_not_whole":
        with open(folder / "train_X.bin", "ab") as f:
            f.write(bytes(5))
    elif case == "label_zero":
        (folder / "train_y.bin").write_bytes(bytes([1, 0, 3]))
    elif case == "label_eleven":
        (folder / "test_y.bin").write_bytes(bytes([11, 2]))
    elif case == "fewer_labels":
        (folder / "train_y.bin").write_bytes(bytes([1, 2]))
    else:  # a sparse file of 5,001 images: nothing of it is read
        sparse(folder / "train_X.bin", 5001 * STL_IMAGE)
    _, peak = refused(lambda: ds.load_stl10(str(tmp_path)), str(folder / file), says)
    assert peak < 64 * MiB, peak
    assert not (folder / "stl10_64.pt").exists()


def stl10_cache(x=None, y=None, **changes) -> dict:
    x = torch.zeros(2, 3, 64, 64, dtype=torch.uint8) if x is None else x
    y = torch.tensor([0, 9]) if y is None else y
    return {"name": "stl10", "train_x": x, "train_y": y, "test_x": x, "test_y": y, "num_classes": 10, **changes}


@pytest.mark.parametrize("case, says", [
    ("garbage", "is a damaged cache of decoded images (unreadable: "),
    ("truncated", "is a damaged cache of decoded images (unreadable: "),
    ("missing_entries", "(not the entries fa-rules writes)"),
    ("labels_out_of_range", "(its train_y holds labels outside 0..9)"),
    ("images_not_64x64", "(its train_x is not an N x 3 x 64 x 64 uint8 tensor)"),
    ("fewer_labels", "(its train_y is not 2 int64 labels)"),
])
def test_a_damaged_dataset_cache_is_one_line_saying_to_delete_it(tmp_path, case, says):
    folder = write_stl10(tmp_path)
    cache = folder / "stl10_64.pt"
    if case == "garbage":
        cache.write_bytes(b"not a torch file at all")
    elif case == "truncated":
        torch.save(stl10_cache(), cache)
        cache.write_bytes(cache.read_bytes()[:300])
    else:
        payload = {
            "missing_entries": lambda: {"name": "stl10", "train_x": torch.zeros(2, 3, 64, 64, dtype=torch.uint8)},
            "labels_out_of_range": lambda: stl10_cache(y=torch.tensor([-1, 3])),
            "images_not_64x64": lambda: stl10_cache(x=torch.zeros(2, 3, 32, 32, dtype=torch.uint8)),
            "fewer_labels": lambda: stl10_cache(y=torch.tensor([1])),
        }[case]()
        torch.save(payload, cache)
    before = cache.read_bytes()
    refused(lambda: ds.load_stl10(str(tmp_path)), str(cache), says, "delete it and it is rebuilt from the raw files")
    assert cache.read_bytes() == before


def test_a_cache_that_cannot_be_written_is_a_note_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    import errno

    folder = write_stl10(tmp_path)

    def disk_full(obj, path):
        Path(path).write_bytes(b"half a cache")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ds.torch, "save", disk_full)
    d = ds.load_stl10(str(tmp_path))  # the decoded images are there all the same
    assert d.train_x.shape == (3, 3, 64, 64)
    err = capsys.readouterr().err
    assert err.startswith(f"note: stl10: could not cache the decoded images in {folder / 'stl10_64.pt'} "
                          f"(No space left on device)"), err
    assert sorted(p.name for p in folder.iterdir()) == ["test_X.bin", "test_y.bin", "train_X.bin", "train_y.bin"]


# -- CelebA: its partition list and its images ---------------------------------------------------------
def write_celeba(root: Path, n=3) -> Path:
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        pixels = torch.randint(0, 256, (218, 178, 3), generator=g).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "img_align_celeba" / f"{i:06d}.jpg")
    (folder / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {2 if i == n - 1 else 0}\n"
                                                            for i in range(n)))
    return folder


@pytest.mark.parametrize("case, says", [
    ("no_split", "line 2 is '000001.jpg', not 'IMAGE_NAME SPLIT' with SPLIT 0, 1 or 2"),
    ("unknown_split", "line 2 is '000001.jpg 7', not 'IMAGE_NAME SPLIT'"),
    ("outside_the_image_folder", "line 2 is '../outside.jpg 0', not 'IMAGE_NAME SPLIT'"),
    ("not_text", "is not text (CelebA's list of image names and splits)"),
])
def test_a_bad_celeba_partition_file_is_one_line_naming_the_line(tmp_path, case, says):
    folder = write_celeba(tmp_path)
    partition = folder / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    if case == "not_text":
        partition.write_bytes(b"\xff\xfe\x00garbage\n")
    else:
        if case == "outside_the_image_folder":
            (folder / "img_align_celeba" / "000001.jpg").rename(folder / "outside.jpg")
        lines[1] = {"no_split": "000001.jpg", "unknown_split": "000001.jpg 7",
                    "outside_the_image_folder": "../outside.jpg 0"}[case]
        partition.write_text("\n".join(lines) + "\n")
    refused(lambda: ds.load_celeba(str(tmp_path)), str(partition), says)
    assert not (folder / "celeba_64.pt").exists()


@pytest.mark.parametrize("case, says", [
    ("missing", "cannot read"),
    ("not_an_image", "is not a readable image (UnidentifiedImageError)"),
    ("truncated", "is not a readable image (OSError)"),
    ("larger_than_celeba", "is a 3000x3000 image; CelebA's aligned images are 178x218"),
    ("bomb_error", "claims more pixels than any CelebA image (a decompression bomb?)"),
    ("bomb_warning", "claims more pixels than any CelebA image (a decompression bomb?)"),
    ("fifo", "is not a regular file"),
])
def test_a_damaged_celeba_image_is_one_line_naming_it(tmp_path, monkeypatch, case, says):
    from PIL import Image

    folder = write_celeba(tmp_path)
    # PIL's guard trips on the first image it opens; the other cases damage the second
    image = folder / "img_align_celeba" / ("000000.jpg" if case.startswith("bomb") else "000001.jpg")
    if case == "missing":
        image.unlink()
    elif case == "not_an_image":
        image.write_text("not an image")
    elif case == "truncated":
        image.write_bytes(image.read_bytes()[:600])
    elif case == "larger_than_celeba":  # 1-bit and blank: a few KB on disk, 9 M pixels decoded
        Image.new("1", (3000, 3000)).save(image, format="PNG")
    elif case == "fifo":
        image.unlink()
        os.mkfifo(image)
    else:  # PIL's own guard, tightened so that a 178x218 image trips it (error beyond twice the limit)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000 if case == "bomb_error" else 30_000)
    with deadline(20):  # a FIFO would block the reader forever
        refused(lambda: ds.load_celeba(str(tmp_path)), str(image), says)
    assert not (folder / "celeba_64.pt").exists()


def test_a_damaged_celeba_cache_is_one_line(tmp_path):
    folder = write_celeba(tmp_path)
    (folder / "celeba_64.pt").write_bytes(b"\x00" * 100)
    refused(lambda: ds.load_celeba(str(tmp_path)), str(folder / "celeba_64.pt"), "damaged cache",
            "delete it and it is rebuilt")


def test_celeba_is_decoded_as_before_and_cached(tmp_path):
    folder = write_celeba(tmp_path, n=4)
    d = ds.load_celeba(str(tmp_path))
    assert d.train_x.shape == (3, 3, 64, 64) and d.test_x.shape == (1, 3, 64, 64)
    assert torch.equal(ds.load_celeba(str(tmp_path)).train_x, d.train_x)  # from the cache
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# -- model sizes: an absurd one is refused at once ------------------------------------------------
TRAIN = ["train", "--rule", "backprop", "--dataset", "digits", "--epochs", "1", "-q"]


@pytest.mark.parametrize("args, says", [
    (["--model", "mlp", "--depth", "100000"], "mlp depth=100000 is more than the 1000 it allows; choose depth <= 1000"),
    (["--model", "mlp", "--model-opt", "depth=100000"], "mlp depth=100000 is more than the 1000 it allows"),
    (["--model", "mlp", "--width", str(10**30)], f"mlp width={10**30} is more than the 1048576 it allows"),
    (["--model", "resnet", "--model-opt", "depth=600002"], "resnet depth=600002 is more than the 1202 it allows"),
])
def test_an_absurd_model_size_is_one_line_before_anything_is_built(tmp_path, monkeypatch, capsys, args, says):
    with deadline(10):  # counting 100,000 layers on the meta device took 110 s and 1.7 GB
        code, stderr = run_main([*TRAIN, *args], tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], stderr
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_a_width_multiplier_beyond_its_range_is_refused_in_its_own_words():
    from fa_rules.plugins.manager import get_registry

    with pytest.raises(UserError, match=r"width_multiplier=1e\+300 is more than the 64 the paper networks allow; "
                                        r"choose width_multiplier <= 64"):
        get_registry().model("paper_encoder").make((1, 28, 28), (10,), width_multiplier=1e300)
