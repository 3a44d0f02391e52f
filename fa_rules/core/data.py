"""In-memory datasets with fixed train/test splits, and how the engine batches them."""

from __future__ import annotations

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
