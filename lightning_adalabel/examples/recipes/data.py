"""Data-loading helpers shared by the image and text recipes (no torchvision import)."""

import codecs
from typing import Callable, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import suggested_max_num_workers
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from lightning_adalabel import IndexedDataset


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
    :func:`make_loader` with the subclass's ``batch_size``, ``num_workers``, ``pin_memory`` and ``persistent_workers``,
    sized to the machine it runs on: ``num_workers`` is a most, cut to the CPUs there are per training process on this
    machine (:func:`workers_for_machine`), and memory is pinned only when the Trainer trains on a GPU (pinned host
    memory speeds up copies to a GPU and does nothing else).

    Without a ``test_set`` the validation split doubles as the test and predict split.

    The training batches carry each sample's index in ``train_set`` (``(x, y, index)``, or a mapping's ``"index"``:
    :class:`~lightning_adalabel.IndexedDataset`), for the model to pass to ``adalabel_loss(..., index=index)``: AdaLabel
    then averages each training sample's logit margin over the run, and ``adalabel label-issues`` ranks the samples of
    :meth:`label_issues_set`, the same samples in the same order, by it. The validation, test and predict batches
    carry no index.
    """

    collate_fn: Optional[Callable] = None
    #: Whether the training batches carry the samples' indices (see above); False where the model cannot pass them
    #: (token classification: the training margins need one class label per sample).
    index_training_samples = True
    train_set: Optional[Dataset] = None
    val_set: Optional[Dataset] = None
    test_set: Optional[Dataset] = None

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool, persistent_workers: bool) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self._told_worker_cut = False

    def check_data_exists(self, stage: str) -> None:
        """Raise ``FileNotFoundError`` (with what to pass instead) when the files that ``setup(stage)`` reads are
        missing. ``adalabel fit`` calls it before it builds the Trainer, so that a wrong ``--data.root`` is told in
        one line rather than after the Trainer's device banner. ``setup`` raises the same errors on its own."""

    def _loader(self, dataset: Optional[Dataset], train: bool) -> DataLoader:
        trainer = self.trainer  # None when the data module is used without a Trainer
        processes = trainer.num_devices if trainer is not None else 1
        workers = workers_for_machine(self.num_workers, processes)
        if workers < self.num_workers and not self._told_worker_cut:
            self._told_worker_cut = True
            rank_zero_info(
                f"adalabel: --data.num_workers {self.num_workers} cut to {workers}: this machine has CPUs for"
                f" {workers} loader worker(s) per training process ({processes} on this machine)"
            )
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return make_loader(
            dataset, self.batch_size, workers, train, self.pin_memory and on_gpu,  # type: ignore
            self.persistent_workers, self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        train_set = IndexedDataset(self.train_set) if self.index_training_samples else self.train_set
        return self._loader(train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def label_issues_set(self) -> Dataset:
        """The training samples that ``adalabel label-issues`` scores (after ``setup("fit")``): the training set, or
        in a subclass the same samples without random augmentation. Sample ``i`` here must be sample ``i`` of
        ``train_set``: the training batches' indices, and with them the training margins, count in ``train_set``."""
        return self.train_set  # type: ignore[return-value]

    def label_issues_dataloader(self) -> DataLoader:
        """:meth:`label_issues_set` unshuffled, every sample once (no ``drop_last``)."""
        return self._loader(self.label_issues_set(), train=False)


def workers_for_machine(requested: int, processes_per_machine: int = 1) -> int:
    """``requested`` loader workers, or fewer: at most the CPUs this process may use shared among the training
    processes on this machine, less one for each training process itself (Lightning's suggestion: more workers than
    that only make torch and Lightning warn and the processes compete for the CPUs).

    Example:
        >>> import os
        >>> workers_for_machine(0)
        0
        >>> workers_for_machine(1000) == max(1, len(os.sched_getaffinity(0)) - 1)
        True
    """
    return min(requested, suggested_max_num_workers(processes_per_machine))


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


class SameFieldCount:
    """Checks that every record of a text file (a CSV row, a CoNLL line) has as many fields as its first record: one
    more or one less means that a field was split or lost (an unquoted comma, a missing tag).

    Example:
        >>> rows = SameFieldCount("train.csv", "row", "fields", "Quote every field.")
        >>> rows.check(1, 3); rows.check(2, 3); rows.check(3, 4)
        Traceback (most recent call last):
        ...
        ValueError: train.csv, row 3: 4 fields, but row 1 has 3. Quote every field.
    """

    def __init__(self, path: str, record: str, field: str, fix: str) -> None:
        self.path, self.record, self.field, self.fix = path, record, field, fix
        self.first_number = self.count = 0

    def check(self, number: int, count: int, shown: str = "") -> None:
        """Record ``number`` has ``count`` fields; ``shown`` (its text, say) goes into the message after the count."""
        if not self.count:
            self.first_number, self.count = number, count
        elif count != self.count:
            raise ValueError(
                f"{self.path}, {self.record} {number}: {count} {self.field}{shown}, but {self.record}"
                f" {self.first_number} has {self.count}. {self.fix}"
            )


def text_decoding_error(path: str, encoding: str, fix: str) -> ValueError:
    """The error for a text file that does not decode as ``encoding``, in one line: the file, its first undecodable
    line and byte, and ``fix``. Called after a ``UnicodeDecodeError``, whose own position counts from the start of a
    read buffer rather than of a line.

    Example:
        >>> import os, tempfile
        >>> with tempfile.NamedTemporaryFile("wb", suffix=".csv", delete=False) as file:
        ...     _ = file.write(b'"1","ok"\\n"2","caf\\xe9"\\n')  # cp1252, as Excel writes on Windows
        >>> str(text_decoding_error(file.name, "utf-8-sig", "Save it as UTF-8.")).split(", ", 1)[1]
        'line 2: not UTF-8 text (byte 0xe9, the 9th of the line). Save it as UTF-8.'
        >>> os.remove(file.name)
    """
    name = "UTF-8" if codecs.lookup(encoding).name.startswith("utf-8") else encoding
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as error:
                byte = line[error.start:error.start + 1].hex()
                return ValueError(
                    f"{path}, line {line_number}: not {name} text (byte 0x{byte}, the {ordinal(error.start + 1)} of"
                    f" the line). {fix}"
                )
    return ValueError(f"{path}: not {name} text. {fix}")


def ordinal(number: int) -> str:
    """``1`` -> ``"1st"``, ``12`` -> ``"12th"``, ``23`` -> ``"23rd"``."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"
