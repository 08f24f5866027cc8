"""Image data modules for the recipes: CIFAR-10/100 (torchvision's loaders) and ImageNet (``ImageFolder``).

All transforms are ``torchvision.transforms.v2``; images are decoded and augmented in the loader workers, batches
are pinned, and workers persist between epochs.

An image that cannot be decoded stops the run with its path (see :class:`UnreadableImage`).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple, Type

import torch
from torch.utils.data import Dataset, Subset, default_collate
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.datasets.utils import check_integrity
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
        num_workers: loader processes per device, at most: fewer where the machine has fewer CPUs.
        val_fraction: hold out this fraction of the training set for validation; 0 validates on the test split
            (CIFAR has no official validation split).
        seed: seed of the hold-out split.
        pin_memory: page-locked host batches for faster, asynchronous host-to-GPU copies (on a GPU only).
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
        if self.check_integrity:
            self._check_md5()
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

    def label_issues_set(self) -> Dataset:
        """The training images without random crops and flips: a label is judged on the image as it is."""
        images = self._dataset(train=True, transform=self.eval_transform())
        return Subset(images, self.train_set.indices) if isinstance(self.train_set, Subset) else images

    def _dataset(self, train: bool, transform: Callable) -> datasets.CIFAR10:
        # setup has compared the MD5s once (if asked to); torchvision's checked loader would hash every file again
        # for each split, and fail without naming the file.
        return self.unchecked_dataset_class(self.root, train=train, transform=transform, download=False)

    def _check_md5(self) -> None:
        dataset_class = self.dataset_class
        meta = dataset_class.meta
        for name, md5 in [*dataset_class.train_list, *dataset_class.test_list, (meta["filename"], meta["md5"])]:
            path = self._folder() / name
            if not check_integrity(str(path), md5):
                raise ValueError(
                    f"{os.path.abspath(path)} is not the file of the official {dataset_class.__name__} release (its"
                    f" MD5 is not {md5}). If you wrote the files yourself in the same pickle format, pass"
                    " `--data.check_integrity false`; otherwise delete the folder and download it again with"
                    " `--data.download true`."
                )

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


@dataclass(frozen=True)
class UnreadableImage:
    """An image file that could not be decoded, carried from the loader worker to the main process as a batch.

    Raised in the worker, the error would reach the main process re-wrapped by PyTorch, as a worker traceback without
    the file's path in its last line; carried as a batch, it is raised by
    :meth:`ImageNetDataModule.on_before_batch_transfer` with the path, the cause and the fix in one line. Not a tuple:
    IndexedDataset would unpack a tuple sample into ``(path, cause, index)`` and lose what it is.
    """

    path: str
    cause: str

    def error(self) -> ValueError:
        return ValueError(
            f"{self.path}: cannot decode the image ({self.cause}). The file is damaged or is not an image: copy it"
            " again from the data set's source, or delete it. The run stops here rather than train or evaluate on"
            " other images than the folders hold."
        )


class _ImageFolder(datasets.ImageFolder):
    """``ImageFolder`` whose undecodable files become :class:`UnreadableImage` samples instead of errors raised in
    the loader worker (module level, so that loader workers can pickle it)."""

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, SyntaxError) as error:  # PIL: truncated or unidentified files; SyntaxError: broken headers
            return UnreadableImage(os.path.abspath(path), f"{type(error).__name__}: {error}")
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def collate_images(samples: Sequence[Any]) -> Any:
    """``default_collate`` of ``(image, label)`` or ``(image, label, index)`` samples, or the first
    :class:`UnreadableImage` among them (a training sample's comes indexed, ``(UnreadableImage, index)``)."""
    for sample in samples:
        unreadable = sample[0] if isinstance(sample, tuple) else sample
        if isinstance(unreadable, UnreadableImage):
            return unreadable
    return default_collate(samples)


def _has_image(folder: str) -> bool:
    """Whether ``folder`` or a folder below it holds a file with an image extension (what ``ImageFolder`` reads)."""
    return any(
        has_file_allowed_extension(name, IMG_EXTENSIONS)
        for _, _, names in os.walk(folder, followlinks=True) for name in names
    )


def missing_images_message(root: str, argument: str) -> Optional[str]:
    """What the image-folder tree ``root`` (``--data.<argument>``) lacks, in one line: class folders, or the images
    of some of them; None when it lacks neither."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        return (
            f"{os.path.abspath(root)} has no class folder. `--data.{argument}` must hold one sub-folder of images per"
            " class (<class>/<image>.JPEG; see the ImageNet layout in docs/recipes.md)."
        )
    empty = [name for name in classes if not _has_image(os.path.join(root, name))]
    if not empty:
        return None
    others = f" (and {len(empty) - 1} other class folders: {', '.join(empty[1:4])}{', ...' * (len(empty) > 4)})"
    return (
        f"{os.path.abspath(os.path.join(root, empty[0]))} holds no image{others * (len(empty) > 1)}. Every"
        f" sub-folder of `--data.{argument}` is a class: put the class's images ({', '.join(IMG_EXTENSIONS)}) in it,"
        " or delete it from both --data.train_root and --data.val_root."
    )


class ImageNetDataModule(SplitDataModule):
    """ImageNet (or any image-classification folder tree) through ``torchvision.datasets.ImageFolder``.

    Both roots hold one sub-folder per class with the same names (``train/n01440764/*.JPEG``,
    ``val/n01440764/*.JPEG``, ...); the validation split doubles as the test and predict split.

    Args:
        train_root: training folder.
        val_root: validation folder, arranged in class sub-folders like ``train_root``.
        batch_size: per device; the global batch is this x devices x nodes (x gradient accumulation).
        num_workers: decoding processes per device, at most: fewer where the machine has fewer CPUs.
        train_crop_size: side of the RandomResizedCrop training crops.
        val_resize_size: validation images are resized so that their short side is this ...
        val_crop_size: ... then center-cropped to this.
        pin_memory: page-locked host batches for faster, asynchronous host-to-GPU copies (on a GPU only).
        persistent_workers: keep loader workers alive between epochs (no re-fork of 8+ workers per epoch).
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    collate_fn = staticmethod(collate_images)

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

    def label_issues_set(self) -> Dataset:
        """The training images with the validation transform (resize, center crop), in the training set's order: a
        label is judged on the image as it is, not on a random crop."""
        return self._image_folder(self.train_root, "train_root", self.eval_transform())

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
        try:
            return _ImageFolder(root, transform=transform)
        except FileNotFoundError as error:  # torchvision's: no class folder, or a class folder without images
            message = missing_images_message(root, argument)
            if message is None:
                raise
            raise FileNotFoundError(message) from error

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Raise the error of an :class:`UnreadableImage` batch in the main process; other batches go to the model's
        own ``on_before_batch_transfer`` (Lightning calls the data module's hook instead of the model's)."""
        if isinstance(batch, UnreadableImage):
            raise batch.error()
        return self.trainer.lightning_module.on_before_batch_transfer(batch, dataloader_idx)

