"""Text classification for the recipes (AG News, Yahoo! Answers, Yelp Review Full): the CSV format of Zhang et al.
(2015), a hashing tokenizer that needs no vocabulary or download, and a fastText-style EmbeddingBag classifier
(Joulin et al. 2017).

Data layout: one folder per data set with ``train.csv`` and ``test.csv``, as in the original archives
(``ag_news_csv/``, ``yahoo_answers_csv/``, ``yelp_review_full_csv/``). No header; each row is the 1-based class
label, then one or more quoted text fields (AG News: title, description; Yahoo: question title, question content,
best answer; Yelp: review text). Every row of a file has the same number of fields. Quotes inside a field are
doubled (``""``) and line breaks are written ``\\n``. The files are UTF-8, with or without a byte-order mark.
"""

import abc
import csv
import os
import re
import sys
import unicodedata
import zlib
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from lightning_adalabel.examples.recipes.classification import ClassificationModule
from lightning_adalabel.examples.recipes.data import (
    SameFieldCount,
    SplitDataModule,
    split_indices,
    text_decoding_error,
)


def _combining_marks() -> str:
    r"""A regex character class of every Unicode combining mark (categories Mn, Mc, Me): the vowel signs and viramas
    of Indic scripts, and accents that have no precomposed letter. ``\w`` leaves them out, which would cut
    "हिन्दी" (Hindi) into three words."""
    marks = [code for code in range(sys.maxunicode + 1) if unicodedata.category(chr(code)).startswith("M")]
    ranges = []
    for code in marks:
        if ranges and code == ranges[-1][1] + 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return "[" + "".join(f"{re.escape(chr(first))}-{re.escape(chr(last))}" for first, last in ranges) + "]"


# A word: letters and digits of any script (``\w`` without ``_``) with their combining marks, and at most one inner
# apostrophe (don't, l'homme). Written as runs of letters between runs of marks: one alternation per character
# would make Latin text, which has no marks, twice as slow to match.
_WORD = rf"[^\W_]+(?:{_combining_marks()}+[^\W_]*)*"
WORD_PATTERN = re.compile(rf"{_WORD}(?:'{_WORD})?")
# Warn when at least this share of a file's rows has no word: the model sees nothing of them.
NO_WORD_WARNING_SHARE = 0.05
# The files' encoding: UTF-8, with or without the byte-order mark that Excel writes first.
CSV_ENCODING = "utf-8-sig"
# fastText's multiplier for combining word hashes into n-gram hashes.
NGRAM_HASH_MULTIPLIER = 116_049_371

Bag = Tuple[Tensor, Tensor]  # (token ids of the whole batch, flat; offset of each sample's first token)


def normalize_text(text: str) -> str:
    """What the tokenizer reads: the text in Unicode NFKC form (composed accents, "ﬁ" -> "fi", full-width "２" ->
    "2"), case-folded (lower case, "ß" -> "ss"), with the typographic apostrophe "’" as "'".

    Example:
        >>> normalize_text("Déjà VU, l’ﬁn Straße ２０２４")
        "déjà vu, l'fin strasse 2024"
    """
    return unicodedata.normalize("NFKC", text).casefold().replace("’", "'")


class HashingTokenizer:
    """Unicode words plus word n-grams, hashed into ``num_buckets`` ids (the hashing trick of fastText).

    A word is a run of letters and digits of any script, with their combining marks and at most one inner
    apostrophe, read from the text after :func:`normalize_text` (NFKC, case-folded). Everything else (punctuation,
    symbols, emoji, ``_``) separates words. Scripts written without spaces (Chinese, Japanese, Thai) give one word per
    run of characters: split their words first (e.g. with a segmenter) or use a transformer recipe.

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
        >>> tokenizer.words("Déjà vu! ПРИВЕТ, don't _stop_ हिन्दी")
        ['déjà', 'vu', 'привет', "don't", 'stop', 'हिन्दी']
    """

    def __init__(self, num_buckets: int = 2**20, ngrams: int = 2, max_words: Optional[int] = None) -> None:
        if num_buckets < 1 or ngrams < 1:
            raise ValueError(f"`num_buckets` and `ngrams` must be >= 1, got {num_buckets} and {ngrams}.")
        self.num_buckets = num_buckets
        self.ngrams = ngrams
        self.max_words = max_words

    def words(self, text: str) -> List[str]:
        words = WORD_PATTERN.findall(normalize_text(text))
        return words if self.max_words is None else words[: self.max_words]

    @staticmethod
    def has_words(text: str) -> bool:
        """Whether ``text`` gives at least one word (cheaper than :meth:`words`: it stops at the first)."""
        return WORD_PATTERN.search(normalize_text(text)) is not None

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
    """Read a ``train.csv``/``test.csv`` file: 0-based labels, and each row's text fields joined by spaces.

    Refused, in one line naming the row and the fix: a file that is not UTF-8 (a UTF-8 byte-order mark is fine), a
    row whose label is not in 1..``num_classes``, a row without a text field, a row with another number of fields
    than the first row (an unquoted comma or a stray quote), and a file without rows. Blank lines are skipped.
    """
    check_csv_exists(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # Yahoo! Answers has fields longer than csv's 128 kB default
    with open(path, newline="", encoding=CSV_ENCODING) as file:
        try:
            texts, labels = _read_rows(path, csv.reader(file), num_classes)
        except UnicodeDecodeError:
            raise text_decoding_error(
                path, CSV_ENCODING, "Save the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 old.csv > new.csv`)."
            ) from None
    if not labels:
        raise ValueError(
            f"{path} has no rows. Fill it with one row per text (the 1-based label, then the text fields; see the"
            " text-classification layout in docs/recipes.md), or point `--data.root` at the data set's folder."
        )
    return texts, labels


def _read_rows(path: str, rows: Iterable[List[str]], num_classes: int) -> Tuple[List[str], List[int]]:
    texts, labels = [], []
    fields = SameFieldCount(
        path, "row", "fields", "A comma or a quote inside an unquoted text splits it: quote every field (\"...\", with"
        " inner quotes doubled), as the data sets' files do.",
    )
    for row_number, row in enumerate(rows, start=1):
        if not row:
            continue
        label = _parse_label(path, row_number, row[0], num_classes)
        if len(row) < 2:
            raise ValueError(
                f"{path}, row {row_number}: a label and no text field. Each row is the label, then the text"
                " field(s); give the row its text or delete it."
            )
        fields.check(row_number, len(row))
        labels.append(label)
        texts.append(" ".join(field.replace("\\n", " ") for field in row[1:]))
    return texts, labels


def _parse_label(path: str, row_number: int, field: str, num_classes: int) -> int:
    """The 0-based label of a row's first field, which holds the 1-based label."""
    try:
        label = int(field) - 1
    except ValueError:
        raise ValueError(
            f"{path}, row {row_number}: the first column must be the 1-based class label, got {field!r}"
            " (the files have no header row)."
        ) from None
    if not 0 <= label < num_classes:
        raise ValueError(
            f"{path}, row {row_number}: label {label + 1} is outside 1..{num_classes}; check"
            " `--data.num_classes` (AG News 4, Yahoo! Answers 10, Yelp Review Full 5)."
        )
    return label


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


def collate_bags(samples: Sequence[Tuple[Any, ...]]) -> Tuple[Any, ...]:
    """Concatenate variable-length id sequences into one flat tensor plus offsets, ``nn.EmbeddingBag``'s input:
    ``(ids, label)`` samples give ``((ids, offsets), labels)``; the training set's ``(ids, label, index)`` samples
    (:class:`~lightning_adalabel.IndexedDataset`) give ``((ids, offsets), labels, indices)``.

    Example:
        >>> (ids, offsets), labels, index = collate_bags([(torch.tensor([4, 5]), 1, 7), (torch.tensor([6]), 0, 2)])
        >>> ids.tolist(), offsets.tolist(), labels.tolist(), index.tolist()
        ([4, 5, 6], [0, 2], [1, 0], [7, 2])
    """
    ids = [sample[0] for sample in samples]
    lengths = torch.tensor([0] + [len(sample_ids) for sample_ids in ids[:-1]], dtype=torch.long)
    offsets = lengths.cumsum(dim=0)
    labels, *index = (torch.tensor(column, dtype=torch.long) for column in list(zip(*samples))[1:])
    return ((torch.cat(ids), offsets), labels, *index)


class LabeledCSVDataModule(SplitDataModule, abc.ABC):
    """A CSV text-classification data set (``root/train.csv``, ``root/test.csv``): reading the files, the hold-out
    split and the missing-file checks. Subclasses turn the texts and labels into a data set (:meth:`make_dataset`).

    Args:
        root: the data set's folder.
        num_classes: number of labels (AG News 4, Yahoo! Answers 10, Yelp Review Full 5).
        batch_size: per device.
        num_workers: tokenising processes per device, at most: fewer where the machine has fewer CPUs.
        val_fraction: hold out this fraction of train.csv for validation; 0 validates on test.csv (the data sets
            have no official validation split).
        seed: seed of the hold-out split.
        pin_memory: page-locked host batches (on a GPU only).
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

    def check_texts(self, path: str, texts: Sequence[str]) -> None:
        """Warn about texts of the file ``path`` that the model cannot read (nothing to check here)."""

    def check_data_exists(self, stage: str) -> None:
        # setup("fit") reads train.csv, and test.csv as well unless validation is held out of train.csv.
        splits = ["train"] if stage == "fit" else []
        if stage != "fit" or self.val_fraction == 0:
            splits.append("test")
        for split in splits:
            check_csv_exists(os.path.join(self.root, f"{split}.csv"))

    def _read(self, split: str) -> Dataset:
        path = os.path.join(self.root, f"{split}.csv")
        texts, labels = read_labeled_csv(path, self.num_classes)
        self.check_texts(path, texts)
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
        num_workers: tokenising processes per device, at most: fewer where the machine has fewer CPUs.
        val_fraction: hold out this fraction of train.csv for validation; 0 validates on test.csv (the data sets
            have no official validation split).
        seed: seed of the hold-out split.
        pin_memory: page-locked host batches (on a GPU only).
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

    def check_texts(self, path: str, texts: Sequence[str]) -> None:
        # A row without a word is an empty bag: the model predicts it from its bias alone. Many such rows mean the
        # text is elsewhere (another column, another encoding) rather than a few rows of bare punctuation.
        empty = sum(not self.tokenizer.has_words(text) for text in texts)
        if texts and empty / len(texts) >= NO_WORD_WARNING_SHARE:
            rank_zero_warn(
                f"{path}: {empty} of {len(texts)} rows ({empty / len(texts):.0%}) have no word (no letter or digit"
                " in any script), so the model sees nothing of them. Check that the text is in the fields after the"
                " label and that the file is UTF-8."
            )


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
