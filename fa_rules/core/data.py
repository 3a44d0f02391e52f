"""In-memory datasets with fixed train/test splits, and how the engine batches them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from fa_rules.core.errors import UserError


@dataclass
class Dataset:
    """Images as (N, C, H, W) (uint8 in [0, 255] or float in [0, 1]) and integer labels.

    `num_classes` is 0 for unlabelled data (generative use only).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The shape of one example (C, H, W)."""
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "Dataset":
        """The same dataset with every tensor on `device`."""
        return Dataset(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
        )


def check_dataset(dataset: Dataset) -> None:
    """What training and evaluation need of a loaded dataset (a plugin's, or files the user put in
    place): examples in both splits, as many labels as images, test images shaped like the
    training ones. Anything else is one line naming the dataset."""
    for split, x, y in (("training", dataset.train_x, dataset.train_y), ("test", dataset.test_x, dataset.test_y)):
        if x.shape[0] == 0:
            raise UserError(f"dataset '{dataset.name}' has no {split} examples")
        if y.shape[0] != x.shape[0]:
            raise UserError(f"dataset '{dataset.name}': its {split} split has {x.shape[0]} images but "
                            f"{y.shape[0]} labels")
    if tuple(dataset.test_x.shape[1:]) != dataset.in_shape:
        raise UserError(f"dataset '{dataset.name}': test images of shape {tuple(dataset.test_x.shape[1:])}, "
                        f"training images of shape {dataset.in_shape}")


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Batch inputs as float32 in [0, 1] whatever the storage dtype."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def epoch_order(num: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a fixed function of (seed, epoch), so resuming replays it."""
    # modulo 2**64: large seeds must not overflow the generator (smaller ones keep their order)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.randperm(num, generator=g)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: `load(data_dir) -> Dataset`."""

    name: str
    load: Callable[[str], Dataset]
    summary: str
    shape: tuple[int, ...]
    num_classes: int


def validation_split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, dict]:
    """The training split cut in two: a dataset whose training part is what remains and whose test
    part is the held-out validation part, and the record of the cut. Only the training split is
    read: a run evaluating on the result never sees a test example.

    Labelled data is cut per class (stratified): one generator seeded with `seed` permutes each
    class's examples in turn (classes in label order), and the first round(fraction * n_class) of
    them, at least 1 and never the class's last example, are held out. Unlabelled data
    (`num_classes` < 2: generative use) cannot be stratified and is cut by one seeded permutation
    of all examples. The record holds the fraction, the seed, both sizes and `indices_sha256`, the
    SHA-256 of the held-out indices (into the training split, ascending, comma-separated decimal)."""
    if not 0 < fraction < 1:
        raise UserError(f"validation fraction must be in (0, 1), got {fraction}")
    n = dataset.train_x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    labels = dataset.train_y.cpu()
    if dataset.num_classes >= 2:
        groups = [(labels == c).nonzero().flatten() for c in range(dataset.num_classes)]
    else:
        groups = [torch.arange(n)]
    held = []
    for members in groups:
        count = members.numel()
        if count < 2:  # nothing to hold out without emptying the class from training
            continue
        take = min(max(1, int(fraction * count + 0.5)), count - 1)
        held.append(members[torch.randperm(count, generator=generator)[:take]])
    if not held:
        raise UserError(f"dataset '{dataset.name}' has too few training examples for a validation split")
    validation = torch.cat(held).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[validation] = False
    training = keep.nonzero().flatten()
    index = training.to(dataset.train_x.device), validation.to(dataset.train_x.device)
    split = Dataset(dataset.name, dataset.train_x[index[0]], dataset.train_y[index[0]],
                    dataset.train_x[index[1]], dataset.train_y[index[1]], dataset.num_classes)
    text = ",".join(map(str, validation.tolist()))
    record = {"fraction": fraction, "seed": seed, "n_train": int(training.numel()),
              "n_validation": int(validation.numel()),
              "indices_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return split, record
