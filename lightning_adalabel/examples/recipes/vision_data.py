"""Image data modules for the recipes: CIFAR-10/100 (torchvision's loaders) and ImageNet (``ImageFolder``).

All transforms are ``torchvision.transforms.v2``; images are decoded and augmented in the loader workers, batches
are pinned, and workers persist between epochs.
"""

import os
from pathlib import Path
from typing import Callable, Optional, Tuple, Type

import torch
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import v2

from lightning_adalabel.examples.recipes.data import SplitDataModule, split_indices

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _to_normalized_float(mean: Tuple[float, ...], std: Tuple[float, ...]) -> list:
    """uint8 image -> float in [0, 1] -> per-channel standardised; the last steps of every pipeline."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


# ---- CIFAR ---------------------------------------------------------------------------------------------------


class _UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 loader with the MD5 checks off: files must exist, their content is not compared with the
    official archive (module level, so that loader workers can pickle it)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


class _UncheckedCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR100 loader with the MD5 checks off (see :class:`_UncheckedCIFAR10`)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta = {**datasets.CIFAR100.meta, "md5": None}


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10``: random crop (pad 4) + horizontal flip for training.

    Args:
        root: folder that holds (or receives) ``cifar-10-batches-py/``.
        download: download the archive into ``root`` if it is not there (once, on the first process).
        check_integrity: compare the files' MD5 with the official release (torchvision's check). Turn it off only for
            files you produced yourself in the same pickle format (e.g. a subset, or the test suite's tiny batches).
        batch_size: per device.
        num_workers: loader processes per device.
        val_fraction: hold out this fraction of the training set for validation; 0 validates on the test split
            (CIFAR has no official validation split).
        seed: seed of the hold-out split.
        pin_memory: page-locked host batches for faster, asynchronous host-to-GPU copies.
        persistent_workers: keep loader workers alive between epochs.
    """

    num_classes = 10
    image_size = 32
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    dataset_class: Type[datasets.CIFAR10] = datasets.CIFAR10
    unchecked_dataset_class: Type[datasets.CIFAR10] = _UncheckedCIFAR10

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        check_integrity: bool = True,
        batch_size: int = 128,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.root = root
        self.download = download
        self.check_integrity = check_integrity
        self.val_fraction = val_fraction
        self.seed = seed

    def train_transform(self) -> Callable:
        return v2.Compose([
            v2.ToImage(), v2.RandomCrop(self.image_size, padding=4), v2.RandomHorizontalFlip(),
            *_to_normalized_float(self.mean, self.std),
        ])

    def eval_transform(self) -> Callable:
        return v2.Compose([v2.ToImage(), *_to_normalized_float(self.mean, self.std)])

    def prepare_data(self) -> None:
        if self.download:  # Lightning calls this on one process per node, before any setup
            for train in (True, False):
                self.dataset_class(self.root, train=train, download=True)

    def check_data_exists(self, stage: str) -> None:
        if not self.download:  # with download, prepare_data fetches the files first
            self._check_files_exist()

    def setup(self, stage: str) -> None:
        self._check_files_exist()
        if stage == "fit":
            train_set = self._dataset(train=True, transform=self.train_transform())
            if self.val_fraction > 0:
                train_idx, val_idx = split_indices(len(train_set), self.val_fraction, self.seed)
                self.train_set = Subset(train_set, train_idx)
                self.val_set = Subset(self._dataset(train=True, transform=self.eval_transform()), val_idx)
            else:
                self.train_set = train_set
        if self.val_set is None or stage in ("test", "predict"):
            self.test_set = self._dataset(train=False, transform=self.eval_transform())
            if self.val_set is None:
                self.val_set = self.test_set

    def _dataset(self, train: bool, transform: Callable) -> datasets.CIFAR10:
        dataset_class = self.dataset_class if self.check_integrity else self.unchecked_dataset_class
        try:
            return dataset_class(self.root, train=train, transform=transform, download=False)
        except RuntimeError as error:
            raise RuntimeError(
                f"{error}. The files in {self._folder()} exist but do not match the official release's MD5: re-download"
                " them with `--data.download true` after deleting the folder, or, if you wrote them yourself in the"
                " same pickle format, pass `--data.check_integrity false`."
            ) from error

    def _folder(self) -> Path:
        return Path(self.root) / self.dataset_class.base_folder

    def _check_files_exist(self) -> None:
        dataset_class = self.dataset_class
        names = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
        missing = [name for name in names + [dataset_class.meta["filename"]] if not (self._folder() / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{dataset_class.__name__} is not in {os.path.abspath(self._folder())} (missing: {', '.join(missing)})."
                f" Pass `--data.download true` (data.init_args.download in the YAML) to download it into"
                f" --data.root {self.root!r}, or point `--data.root` at the folder that holds"
                f" {dataset_class.base_folder}/."
            )


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) through ``torchvision.datasets.CIFAR100``; ``root`` holds ``cifar-100-python/``.

    Same arguments as :class:`CIFAR10DataModule`.
    """

    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    dataset_class = datasets.CIFAR100
    unchecked_dataset_class = _UncheckedCIFAR100


# ---- ImageNet ------------------------------------------------------------------------------------------------


class ImageNetDataModule(SplitDataModule):
    """ImageNet (or any image-classification folder tree) through ``torchvision.datasets.ImageFolder``.

    Both roots hold one sub-folder per class with the same names (``train/n01440764/*.JPEG``,
    ``val/n01440764/*.JPEG``, ...); the validation split doubles as the test and predict split.

    Args:
        train_root: training folder.
        val_root: validation folder, arranged in class sub-folders like ``train_root``.
        batch_size: per device; the global batch is this x devices x nodes (x gradient accumulation).
        num_workers: decoding processes per device.
        train_crop_size: side of the RandomResizedCrop training crops.
        val_resize_size: validation images are resized so that their short side is this ...
        val_crop_size: ... then center-cropped to this.
        pin_memory: page-locked host batches for faster, asynchronous host-to-GPU copies.
        persistent_workers: keep loader workers alive between epochs (no re-fork of 8+ workers per epoch).
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        train_root: str = "data/imagenet/train",
        val_root: str = "data/imagenet/val",
        batch_size: int = 128,
        num_workers: int = 8,
        train_crop_size: int = 224,
        val_resize_size: int = 256,
        val_crop_size: int = 224,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.train_root = train_root
        self.val_root = val_root
        self.train_crop_size = train_crop_size
        self.val_resize_size = val_resize_size
        self.val_crop_size = val_crop_size

    @property
    def num_classes(self) -> Optional[int]:
        """Number of class folders; known after :meth:`setup`."""
        dataset = self.train_set or self.val_set
        return None if dataset is None else len(dataset.classes)

    def train_transform(self) -> Callable:
        # Decode to a uint8 tensor first: the geometric ops are cheaper on uint8 than on float.
        return v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(self.train_crop_size, antialias=True), v2.RandomHorizontalFlip(),
            *_to_normalized_float(self.mean, self.std),
        ])

    def eval_transform(self) -> Callable:
        return v2.Compose([
            v2.ToImage(), v2.Resize(self.val_resize_size, antialias=True), v2.CenterCrop(self.val_crop_size),
            *_to_normalized_float(self.mean, self.std),
        ])

    def check_data_exists(self, stage: str) -> None:
        if stage == "fit":
            self._check_folder(self.train_root, "train_root")
        self._check_folder(self.val_root, "val_root")

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._image_folder(self.train_root, "train_root", self.train_transform())
        self.val_set = self._image_folder(self.val_root, "val_root", self.eval_transform())
        if self.train_set is not None and self.train_set.classes != self.val_set.classes:
            raise ValueError(
                f"The class folders of {self.train_root} ({len(self.train_set.classes)}) and {self.val_root}"
                f" ({len(self.val_set.classes)}) differ. Arrange the validation images in the same class sub-folders"
                " as the training images (e.g. with the usual ImageNet `valprep.sh`)."
            )

    @staticmethod
    def _check_folder(root: str, argument: str) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"ImageNet folder {os.path.abspath(root)} does not exist. Set `--data.{argument}` to a folder with one"
                " sub-folder of images per class (see the ImageNet layout in docs/recipes.md)."
            )

    @classmethod
    def _image_folder(cls, root: str, argument: str, transform: Callable) -> datasets.ImageFolder:
        cls._check_folder(root, argument)
        return datasets.ImageFolder(root, transform=transform)

