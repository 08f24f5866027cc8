"""Data-loading helpers shared by the image and text recipes (no torchvision import)."""

from typing import Callable, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    train: bool,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    collate_fn: Optional[Callable] = None,
) -> DataLoader:
    """A DataLoader with the recipes' settings (Lightning swaps in a DistributedSampler under DDP)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,  # equal-sized training batches: BatchNorm never sees a batch of one
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,  # PyTorch refuses it without workers
    )


class SplitDataModule(pl.LightningDataModule):
    """A data module whose ``setup`` fills ``train_set``, ``val_set`` and (optionally) ``test_set``; every loader is
    :func:`make_loader` with the subclass's ``batch_size``, ``num_workers``, ``pin_memory`` and ``persistent_workers``.

    Without a ``test_set`` the validation split doubles as the test and predict split.
    """

    collate_fn: Optional[Callable] = None
    train_set: Optional[Dataset] = None
    val_set: Optional[Dataset] = None
    test_set: Optional[Dataset] = None

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool, persistent_workers: bool) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers

    def check_data_exists(self, stage: str) -> None:
        """Raise ``FileNotFoundError`` (with what to pass instead) when the files that ``setup(stage)`` reads are
        missing. ``adalabel fit`` calls it before it builds the Trainer, so that a wrong ``--data.root`` is told in
        one line rather than after the Trainer's device banner. ``setup`` raises the same errors on its own."""

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        return make_loader(
            dataset, self.batch_size, self.num_workers, train, self.pin_memory, self.persistent_workers,  # type: ignore
            self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def split_indices(size: int, val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """A seeded random (train, validation) split of ``range(size)``, the same in every process.

    Example:
        >>> train, val = split_indices(10, 0.2, seed=0)
        >>> len(train), len(val), sorted(train + val) == list(range(10))
        (8, 2, True)
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = int(round(size * val_fraction))
    return order[num_val:], order[:num_val]
