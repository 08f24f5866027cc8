"""Text classification for the recipes (AG News, Yahoo! Answers, Yelp Review Full): the CSV format of Zhang et al.
(2015), a hashing tokenizer that needs no vocabulary or download, and a fastText-style EmbeddingBag classifier
(Joulin et al. 2017).

Data layout: one folder per data set with ``train.csv`` and ``test.csv``, as in the original archives
(``ag_news_csv/``, ``yahoo_answers_csv/``, ``yelp_review_full_csv/``). No header; each row is the 1-based class
label, then one or more quoted text fields (AG News: title, description; Yahoo: question title, question content,
best answer; Yelp: review text). Quotes inside a field are doubled (``""``) and line breaks are written ``\\n``.
"""

import abc
import csv
import os
import re
import sys
import zlib
from typing import Any, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightning_adalabel.examples.recipes.classification import ClassificationModule
from lightning_adalabel.examples.recipes.data import SplitDataModule, split_indices

WORD_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# fastText's multiplier for combining word hashes into n-gram hashes.
NGRAM_HASH_MULTIPLIER = 116_049_371

Bag = Tuple[Tensor, Tensor]  # (token ids of the whole batch, flat; offset of each sample's first token)


class HashingTokenizer:
    """Lower-cased regex words plus word n-grams, hashed into ``num_buckets`` ids (the hashing trick of fastText).

    No vocabulary to build or download, and every process maps a text to the same ids (CRC-32, not Python's salted
    ``hash``). Words and n-grams share the buckets; collisions are rare enough at 2**20+ buckets to cost little.

    Args:
        num_buckets: size of the id space (the classifier's embedding table).
        ngrams: longest word n-gram; 1 = words only, 2 = words + bigrams (fastText's text-classification setting).
        max_words: keep only the first ``max_words`` words of a text; ``None`` keeps all.

    Example:
        >>> tokenizer = HashingTokenizer(num_buckets=1000, ngrams=2)
        >>> ids = tokenizer("Hello, hello World!")
        >>> len(ids), bool(ids[0] == ids[1]), int(ids.max()) < 1000  # 3 words + 2 bigrams; case-insensitive
        (5, True, True)
    """

    def __init__(self, num_buckets: int = 2**20, ngrams: int = 2, max_words: Optional[int] = None) -> None:
        if num_buckets < 1 or ngrams < 1:
            raise ValueError(f"`num_buckets` and `ngrams` must be >= 1, got {num_buckets} and {ngrams}.")
        self.num_buckets = num_buckets
        self.ngrams = ngrams
        self.max_words = max_words

    def words(self, text: str) -> List[str]:
        words = WORD_PATTERN.findall(text.lower())
        return words if self.max_words is None else words[: self.max_words]

    def __call__(self, text: str) -> Tensor:
        word_hashes = np.fromiter((zlib.crc32(word.encode()) for word in self.words(text)), dtype=np.int64)
        ids = [word_hashes % self.num_buckets]
        ngram_hashes = word_hashes % self.num_buckets
        for n in range(2, self.ngrams + 1):
            # Rolling hash h(w1..wn) = h(w1..wn-1) * M + h(wn), reduced modulo num_buckets at every step so that the
            # int64 product cannot overflow (the result modulo num_buckets is unchanged).
            ngram_hashes = (ngram_hashes[:-1] * NGRAM_HASH_MULTIPLIER + word_hashes[n - 1:]) % self.num_buckets
            ids.append(ngram_hashes)
        return torch.from_numpy(np.concatenate(ids))


def check_csv_exists(path: str) -> None:
    """Raise ``FileNotFoundError``, naming ``--data.root``, when the CSV file ``path`` is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.abspath(path)} does not exist. Point `--data.root` at the data set's folder, which must hold"
            " train.csv and test.csv (see the text-classification layout in docs/recipes.md)."
        )


def read_labeled_csv(path: str, num_classes: int) -> Tuple[List[str], List[int]]:
    """Read a ``train.csv``/``test.csv`` file: 0-based labels, and each row's text fields joined by spaces."""
    check_csv_exists(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # Yahoo! Answers has fields longer than csv's 128 kB default
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as file:
        for line_number, row in enumerate(csv.reader(file), start=1):
            if not row:
                continue
            try:
                label = int(row[0]) - 1
            except ValueError:
                raise ValueError(
                    f"{path}, row {line_number}: the first column must be the 1-based class label, got {row[0]!r}"
                    " (the files have no header row)."
                ) from None
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"{path}, row {line_number}: label {label + 1} is outside 1..{num_classes}; check"
                    " `--data.num_classes` (AG News 4, Yahoo! Answers 10, Yelp Review Full 5)."
                )
            labels.append(label)
            texts.append(" ".join(field.replace("\\n", " ") for field in row[1:]))
    return texts, labels


class HashedTextDataset(Dataset):
    """Texts with class labels; tokenised on the fly (in the loader workers) into hashed ids."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: HashingTokenizer) -> None:
        self.texts = texts
        self.labels = labels
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        return self.tokenizer(self.texts[index]), self.labels[index]


def collate_bags(samples: Sequence[Tuple[Tensor, int]]) -> Tuple[Bag, Tensor]:
    """Concatenate variable-length id sequences into one flat tensor plus offsets, ``nn.EmbeddingBag``'s input."""
    ids = [sample[0] for sample in samples]
    lengths = torch.tensor([0] + [len(sample_ids) for sample_ids in ids[:-1]], dtype=torch.long)
    offsets = lengths.cumsum(dim=0)
    labels = torch.tensor([sample[1] for sample in samples], dtype=torch.long)
    return (torch.cat(ids), offsets), labels


class LabeledCSVDataModule(SplitDataModule, abc.ABC):
    """A CSV text-classification data set (``root/train.csv``, ``root/test.csv``): reading the files, the hold-out
    split and the missing-file checks. Subclasses turn the texts and labels into a data set (:meth:`make_dataset`).

    Args:
        root: the data set's folder.
        num_classes: number of labels (AG News 4, Yahoo! Answers 10, Yelp Review Full 5).
        batch_size: per device.
        num_workers: tokenising processes per device.
        val_fraction: hold out this fraction of train.csv for validation; 0 validates on test.csv (the data sets
            have no official validation split).
        seed: seed of the hold-out split.
        pin_memory: page-locked host batches.
        persistent_workers: keep loader workers alive between epochs.
    """

    def __init__(
        self,
        root: str,
        num_classes: int,
        batch_size: int,
        num_workers: int,
        val_fraction: float,
        seed: int,
        pin_memory: bool,
        persistent_workers: bool,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers)
        self.root = root
        self.num_classes = num_classes
        self.val_fraction = val_fraction
        self.seed = seed

    @abc.abstractmethod
    def make_dataset(self, texts: Sequence[str], labels: Sequence[int]) -> Dataset:
        """The data set of one split's texts and 0-based labels, as the model takes them."""

    def check_data_exists(self, stage: str) -> None:
        # setup("fit") reads train.csv, and test.csv as well unless validation is held out of train.csv.
        splits = ["train"] if stage == "fit" else []
        if stage != "fit" or self.val_fraction == 0:
            splits.append("test")
        for split in splits:
            check_csv_exists(os.path.join(self.root, f"{split}.csv"))

    def _read(self, split: str) -> Dataset:
        texts, labels = read_labeled_csv(os.path.join(self.root, f"{split}.csv"), self.num_classes)
        return self.make_dataset(texts, labels)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            train_set = self._read("train")
            if self.val_fraction > 0:
                train_idx, val_idx = split_indices(len(train_set), self.val_fraction, self.seed)
                self.train_set, self.val_set = Subset(train_set, train_idx), Subset(train_set, val_idx)
            else:
                self.train_set = train_set
        if self.val_set is None or stage in ("test", "predict"):
            self.test_set = self._read("test")
            if self.val_set is None:
                self.val_set = self.test_set


class TextClassificationDataModule(LabeledCSVDataModule):
    """A CSV text-classification data set (``root/train.csv``, ``root/test.csv``) with hashed n-gram inputs.

    Args:
        root: the data set's folder.
        num_classes: number of labels (AG News 4, Yahoo! Answers 10, Yelp Review Full 5).
        num_buckets: hashing space; must equal the model's ``num_buckets``.
        ngrams: longest word n-gram (2: words + bigrams).
        max_words: truncate texts to this many words; ``None`` keeps whole texts.
        batch_size: per device.
        num_workers: tokenising processes per device.
        val_fraction: hold out this fraction of train.csv for validation; 0 validates on test.csv (the data sets
            have no official validation split).
        seed: seed of the hold-out split.
        pin_memory: page-locked host batches.
        persistent_workers: keep loader workers alive between epochs.
    """

    collate_fn = staticmethod(collate_bags)  # variable-length texts: ids and offsets for nn.EmbeddingBag
    # What a trained model depends on: a run from its checkpoint refuses other values (recipes/resume.py).
    model_input_settings = ("num_classes", "num_buckets", "ngrams")

    def __init__(
        self,
        root: str,
        num_classes: int,
        num_buckets: int = 2**20,
        ngrams: int = 2,
        max_words: Optional[int] = 1000,
        batch_size: int = 64,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(root, num_classes, batch_size, num_workers, val_fraction, seed, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.num_buckets = num_buckets
        self.tokenizer = HashingTokenizer(num_buckets, ngrams, max_words)

    def make_dataset(self, texts: Sequence[str], labels: Sequence[int]) -> HashedTextDataset:
        return HashedTextDataset(texts, labels, self.tokenizer)


class FastTextClassifier(ClassificationModule):
    """fastText's classifier: the mean of the hashed word and n-gram embeddings, then one linear layer.

    Args:
        num_classes: K.
        num_buckets: rows of the embedding table; must equal the data module's ``num_buckets``.
        embed_dim: embedding width (fastText uses 10 for these data sets; wider is cheap on a GPU).
        dropout: dropout on the averaged embedding.
        **kwargs: optimizer and schedule settings of
            :class:`~lightning_adalabel.examples.recipes.classification.ClassificationModule`.
    """

    def __init__(
        self, num_classes: int, num_buckets: int = 2**20, embed_dim: int = 64, dropout: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.num_buckets = num_buckets
        self.embedding = nn.EmbeddingBag(num_buckets, embed_dim, mode="mean")
        # fastText's initialisation: small uniform input vectors, zero output layer.
        nn.init.uniform_(self.embedding.weight, -1.0 / embed_dim, 1.0 / embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, inputs: Bag) -> Tensor:
        ids, offsets = inputs
        return self.classifier(self.dropout(self.embedding(ids, offsets)))

    def check_matches_data(self, datamodule: Optional[pl.LightningDataModule]) -> None:
        super().check_matches_data(datamodule)
        data_buckets = getattr(datamodule, "num_buckets", None)
        if data_buckets is not None and data_buckets != self.num_buckets:
            raise ValueError(
                f"The tokenizer hashes into {data_buckets} buckets but the model's embedding table has"
                f" {self.num_buckets} rows. Set `--data.num_buckets` and `--model.num_buckets` to the same value."
            )
