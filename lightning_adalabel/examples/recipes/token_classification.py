"""Named-entity recognition for the recipes: the CoNLL-2003 file format, word labels aligned to word pieces as
Hugging Face does, ``AutoModelForTokenClassification`` trained with the AdaLabel loss on every labelled token, and
entity-level F1 (the chunks of CoNLL's ``conlleval`` and seqeval's default mode).

File format (CoNLL-2003, Tjong Kim Sang and De Meulder 2003): one token per line with its tags separated by spaces,
the named-entity tag last (``EU NNP B-NP B-ORG``); a blank line ends a sentence; ``-DOCSTART-`` lines separate
documents. The original English files tag in IOB1 (``I-ORG`` opens an entity unless it follows another of the same
type); they are converted to IOB2 (``B-`` opens every entity) on reading, which leaves the entities unchanged.

Word pieces: the first piece of each word carries the word's tag; the other pieces, the special tokens and the
padding carry -100 (``ignore_index``), so they enter neither the loss nor the label matrix's statistics. Entity F1 is
computed over the first pieces, i.e. over the words (words cut off by ``max_length`` are left out, as in Hugging
Face's ``run_ner.py``). Needs ``pip install "lightning-adalabel[transformers]"``.
"""

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_adalabel import AdaLabel, top_correlated_pairs
from lightning_adalabel.examples.recipes.data import SameFieldCount, SplitDataModule, text_decoding_error
from lightning_adalabel.examples.recipes.huggingface import (
    Batch,
    ModelConfig,
    PadToLongest,
    TransformerModule,
    load_tokenizer,
    tokenizer_for,
)

IGNORE_INDEX = -100  # torch's and Hugging Face's label of positions without a target
DOCUMENT_START = "-DOCSTART-"
# The CoNLL-2003 named-entity tags in IOB2, in the order of the Hugging Face `conll2003` data set.
CONLL2003_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

Sentence = Tuple[List[str], List[str]]  # (words, tags)
Entity = Tuple[str, int, int]  # (type, first word, last word)


# ---- the file format ---------------------------------------------------------------------------------------------


def read_conll(path: str, tag_column: int = -1, encoding: str = "utf-8") -> List[Sentence]:
    """The sentences of a CoNLL file: each line's first column is the word, ``tag_column`` its tag; blank lines end
    sentences and ``-DOCSTART-`` lines are skipped. A byte-order mark at the start of the file is skipped.

    Refused, in one line naming the line and the fix: text that does not decode as ``encoding``, a word without a
    tag, a line without column ``tag_column``, a line with another number of columns than the first word's line,
    and a file without sentences.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.abspath(path)} does not exist. Point `--data.root` at the folder of the CoNLL files and name"
            " them with `--data.train_file`, `--data.val_file` and `--data.test_file` (see docs/recipes.md)."
        )
    with open(path, encoding=encoding) as file:
        try:
            sentences = _read_sentences(path, file, tag_column)
        except UnicodeDecodeError:
            raise text_decoding_error(
                path, encoding, "Save the file as UTF-8, or give its encoding with `--data.encoding` (e.g. latin-1)."
            ) from None
    if not sentences:
        raise ValueError(
            f"{path} has no sentences. Fill it with one word and its tags per line and a blank line after each"
            " sentence (see the CoNLL-2003 layout in docs/recipes.md), or name another file with `--data.*_file`."
        )
    return sentences


def _read_sentences(path: str, lines: Iterable[str], tag_column: int) -> List[Sentence]:
    sentences: List[Sentence] = []
    words: List[str] = []
    tags: List[str] = []
    columns_per_line = SameFieldCount(
        path, "line", "columns", "Give every word the same tag columns (a tag is missing or a word holds a space)."
    )
    for line_number, line in enumerate(lines, start=1):
        columns = line.lstrip("\ufeff").split() if line_number == 1 else line.split()
        if not columns or columns[0] == DOCUMENT_START:
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        if len(columns) < 2:
            raise ValueError(
                f"{path}, line {line_number}: a word without tags ({line.strip()!r}). Each line is a word and its tags"
                " separated by spaces; a blank line ends a sentence."
            )
        if not -len(columns) <= tag_column < len(columns):
            raise ValueError(
                f"{path}, line {line_number}: {len(columns)} columns ({line.strip()!r}), so no column"
                f" `--data.tag_column {tag_column}`. Pick the tags' column (0 is the word, -1 the last) or fix the"
                " line."
            )
        columns_per_line.check(line_number, len(columns), f" ({line.strip()!r})")
        words.append(columns[0])
        tags.append(columns[tag_column])
    if words:
        sentences.append((words, tags))
    return sentences


def iob1_to_iob2(tags: Sequence[str]) -> List[str]:
    """IOB1 tags (``I-`` opens an entity, ``B-`` only one that directly follows another of its type) as IOB2
    (``B-`` opens every entity). Tags already in IOB2 are returned unchanged.

    Example:
        >>> iob1_to_iob2(["I-ORG", "O", "I-PER", "I-PER", "B-PER", "I-LOC"])
        ['B-ORG', 'O', 'B-PER', 'I-PER', 'B-PER', 'B-LOC']
    """
    converted = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            converted.append("B-" + tag[2:])
        else:
            converted.append(tag)
        previous = tag
    return converted


# ---- entity-level F1 -------------------------------------------------------------------------------------------


def _split_tag(tag: str) -> Tuple[str, str]:
    """``"B-ORG"`` -> ``("B", "ORG")``; a tag without a type (``"O"``, ``"B"``) gets type ``"_"``, as in seqeval."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends_chunk(previous_tag: str, tag: str, previous_type: str, type_: str) -> bool:
    return (
        previous_tag in ("E", "S")
        or (previous_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (previous_tag != "O" and previous_type != type_)
    )


def _starts_chunk(previous_tag: str, tag: str, previous_type: str, type_: str) -> bool:
    return (
        tag in ("B", "S")
        or (previous_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag != "O" and previous_type != type_)
    )


def entity_chunks(tags: Sequence[str]) -> List[Entity]:
    """The entities of one sentence's tags, ``(type, first, last)`` with word indices: conlleval's chunks, which are
    seqeval's default mode (tags ``O``, ``B-X``, ``I-X``, and ``E-X``/``S-X`` of IOBES). An ``I-X`` that follows
    ``O`` or another type opens an entity (IOB1), and a type change closes one.

    Example:
        >>> entity_chunks(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"])
        [('PER', 0, 1), ('LOC', 3, 3), ('LOC', 4, 4), ('ORG', 5, 5)]
    """
    chunks: List[Entity] = []
    previous_tag, previous_type, begin = "O", "", 0
    for index, chunk in enumerate([*tags, "O"]):  # the final "O" closes an entity that ends the sentence
        tag, type_ = _split_tag(chunk)
        if _ends_chunk(previous_tag, tag, previous_type, type_):
            chunks.append((previous_type, begin, index - 1))
        if _starts_chunk(previous_tag, tag, previous_type, type_):
            begin = index
        previous_tag, previous_type = tag, type_
    return chunks


def entity_scores(true_positives: float, predicted: float, gold: float) -> Dict[str, float]:
    """Micro precision, recall and F1 over entities (0 where a denominator is 0, as seqeval reports it).

    Example:
        >>> entity_scores(true_positives=1, predicted=2, gold=3)
        {'precision': 0.5, 'recall': 0.3333333333333333, 'f1': 0.4}
    """
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class EntityF1(Metric):
    """Entity-level precision, recall and F1 (micro over entity types), as ``seqeval.metrics.f1_score`` computes them:
    an entity counts when its type and its words match exactly.

    The states are three counts, summed across processes, so the score is exact under DDP.

    Args:
        tags: tag of each class index (``["O", "B-PER", ...]``).
        ignore_index: positions with this label (sub-word pieces, special tokens, padding) are not words.

    Example:
        >>> metric = EntityF1(["O", "B-PER", "I-PER"])
        >>> metric.update(torch.tensor([[1, 2, 0, 1]]), torch.tensor([[1, 2, 0, 0]]))
        >>> {name: round(value, 3) for name, value in metric.compute().items()}
        {'precision': 0.5, 'recall': 1.0, 'f1': 0.667}
    """

    full_state_update = False

    def __init__(self, tags: Sequence[str], ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.tags = list(tags)
        self.ignore_index = ignore_index
        for name in ("true_positives", "predicted", "gold"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted_ids: Tensor, label_ids: Tensor) -> None:  # type: ignore[override]
        """``predicted_ids`` and ``label_ids``: ``(N, T)`` class indices; each row is one sentence."""
        for predicted_row, label_row in zip(predicted_ids.tolist(), label_ids.tolist()):
            words = [index for index, label in enumerate(label_row) if label != self.ignore_index]
            gold: Set[Entity] = set(entity_chunks([self.tags[label_row[i]] for i in words]))
            predicted: Set[Entity] = set(entity_chunks([self.tags[predicted_row[i]] for i in words]))
            self.true_positives += len(gold & predicted)
            self.predicted += len(predicted)
            self.gold += len(gold)

    def compute(self) -> Dict[str, float]:
        return entity_scores(float(self.true_positives), float(self.predicted), float(self.gold))


# ---- data --------------------------------------------------------------------------------------------------------


def align_word_labels(word_ids: Sequence[Optional[int]], word_labels: Sequence[int]) -> List[int]:
    """One label per token: the word's label on its first piece, ``-100`` on its other pieces and on special tokens
    (``word_id`` None), as Hugging Face's token-classification examples align them.

    Example:
        >>> align_word_labels([None, 0, 1, 1, 2, None], [3, 0, 5])  # word 1 is two pieces
        [-100, 3, 0, -100, 5, -100]
    """
    labels = []
    previous = None
    for word_id in word_ids:
        labels.append(IGNORE_INDEX if word_id is None or word_id == previous else word_labels[word_id])
        previous = word_id
    return labels


class TaggedSentenceDataset(Dataset):
    """Sentences (word lists) with one tag index per word, tokenised on the fly into word pieces with aligned labels."""

    def __init__(
        self, sentences: Sequence[List[str]], tag_ids: Sequence[List[int]], tokenizer: Any, max_length: int
    ) -> None:
        self.sentences = sentences
        self.tag_ids = tag_ids
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        encoding = self.tokenizer(
            self.sentences[index], is_split_into_words=True, truncation=True, max_length=self.max_length
        )
        return {**encoding, "labels": align_word_labels(encoding.word_ids(), self.tag_ids[index])}


class CoNLLDataModule(SplitDataModule):
    """A named-entity data set in the CoNLL-2003 format: ``root/train.txt``, ``valid.txt`` and ``test.txt`` (or the
    original ``eng.train``, ``eng.testa``, ``eng.testb``, named with ``train_file``, ...).

    Args:
        root: the folder of the files.
        tags: the tag set, one class per tag (default: CoNLL-2003's nine IOB2 tags); must equal the model's ``tags``.
        tokenizer: a Hub name or a ``save_pretrained`` folder (a fast tokenizer); ``None`` (the default) takes the
            model's ``--model.checkpoint``.
        train_file, val_file: file names under ``root``.
        test_file: file name under ``root``; ``None`` tests on ``val_file``.
        tag_column: the column of the tag to learn (-1: the last, CoNLL-2003's named-entity tag).
        to_iob2: convert IOB1 tags (the original CoNLL-2003 files) to IOB2 on reading.
        encoding: the files' text encoding.
        max_length: truncate every sentence to this many word pieces (special tokens included).
        batch_size: per device.
        num_workers: tokenising processes per device, at most: fewer where the machine has fewer CPUs.
        pin_memory: page-locked host batches (on a GPU only).
        persistent_workers: keep loader workers alive between epochs.
    """

    # What a trained model depends on: a run from its checkpoint refuses other values (recipes/resume.py).
    model_input_settings = ("tags", "tokenizer", "to_iob2")
    # AdaLabel's training margins are one per sample with one label; a sentence has a label per word, so the training
    # batches carry no index and `adalabel label-issues` ranks the words by the trained model's probabilities.
    index_training_samples = False

    def __init__(
        self,
        root: str,
        tags: Optional[List[str]] = None,
        tokenizer: Optional[str] = None,
        train_file: str = "train.txt",
        val_file: str = "valid.txt",
        test_file: Optional[str] = "test.txt",
        tag_column: int = -1,
        to_iob2: bool = True,
        encoding: str = "utf-8",
        max_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.root = root
        self.tags = list(CONLL2003_TAGS if tags is None else tags)
        self.tokenizer_name = tokenizer
        self.files = {"train": train_file, "val": val_file, "test": test_file or val_file}
        self.tag_column = tag_column
        self.to_iob2 = to_iob2
        self.encoding = encoding
        self.max_length = max_length
        self.tokenizer: Any = None

    @property
    def num_classes(self) -> int:
        return len(self.tags)

    def _splits(self, stage: str) -> List[str]:
        return {"fit": ["train", "val"], "validate": ["val"]}.get(stage, ["test"])

    def check_data_exists(self, stage: str) -> None:
        for split in self._splits(stage):
            path = os.path.join(self.root, self.files[split])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{os.path.abspath(path)} does not exist. Point `--data.root` at the folder of the CoNLL files"
                    f" and name them with `--data.train_file`, `--data.val_file`, `--data.test_file`."
                )

    def read(self, split: str) -> TaggedSentenceDataset:
        path = os.path.join(self.root, self.files[split])
        sentences = read_conll(path, self.tag_column, self.encoding)
        tag_index = {tag: index for index, tag in enumerate(self.tags)}
        tag_ids = []
        for _, tags in sentences:
            tags = iob1_to_iob2(tags) if self.to_iob2 else tags
            unknown = sorted(set(tags) - set(tag_index))
            if unknown:
                raise ValueError(
                    f"{path} has the tag(s) {', '.join(unknown)}, which are not in `--data.tags` ({', '.join(self.tags)})."
                    " Give the full tag set to `--data.tags` and `--model.tags`, or choose the column with"
                    " `--data.tag_column`."
                )
            tag_ids.append([tag_index[tag] for tag in tags])
        return TaggedSentenceDataset([words for words, _ in sentences], tag_ids, self.tokenizer, self.max_length)

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(tokenizer_for(self, self.tokenizer_name), for_word_lists=True)
            self.collate_fn = PadToLongest(self.tokenizer, pad_labels=True)
        for split in self._splits(stage):
            setattr(self, f"{split}_set", self.read(split))


# ---- the model -----------------------------------------------------------------------------------------------------


class TokenClassifier(TransformerModule):
    """``AutoModelForTokenClassification`` trained with the AdaLabel loss on every labelled word piece: its logits,
    ``(N, T, K)``, go to the loss as ``(N, K, T)``, and every labelled position is one sample of the label matrix,
    which so learns which tags the network confuses (e.g. ``B-ORG`` with ``B-LOC``).

    Logs ``val/entity_f1``, ``val/entity_precision``, ``val/entity_recall`` (and ``test/...``), ``val/loss`` and
    ``val/acc`` (accuracy over the labelled tokens). After each training epoch it prints the
    ``report_confused_pairs`` largest entries of the label matrix, as tag pairs, and keeps them in
    ``confused_tag_pairs``.

    Args:
        tags: the tag of each class (default: CoNLL-2003's nine IOB2 tags); must equal the data's ``tags``.
        checkpoint: a Hugging Face Hub name (``bert-base-cased``) or a folder written by ``save_pretrained``.
        config: instead of ``checkpoint``, a randomly initialised model, ``{"model_type": "bert", ...}`` (or its
            YAML/JSON text).
        report_confused_pairs: how many tag pairs to report after each epoch (0: none).
        **kwargs: ``ignore_mismatched_sizes`` and the optimizer and schedule settings of
            :class:`~lightning_adalabel.examples.recipes.huggingface.TransformerModule`.
    """

    auto_model_class_name = "AutoModelForTokenClassification"

    def __init__(
        self,
        tags: Optional[List[str]] = None,
        checkpoint: Optional[str] = None,
        config: Optional[ModelConfig] = None,
        report_confused_pairs: int = 5,
        **kwargs: Any,
    ) -> None:
        tags = list(CONLL2003_TAGS if tags is None else tags)
        super().__init__(num_classes=len(tags), checkpoint=checkpoint, config=config, label_names=tags, **kwargs)
        self.save_hyperparameters()
        self.tags = tags
        self.report_confused_pairs = report_confused_pairs
        self.confused_tag_pairs: List[Tuple[str, str, float]] = []
        # Token accuracy over labelled positions; top-5 accuracy means little for tags.
        self.val_acc = MulticlassAccuracy(len(tags), average="micro", ignore_index=IGNORE_INDEX)
        self.test_acc = MulticlassAccuracy(len(tags), average="micro", ignore_index=IGNORE_INDEX)
        self.val_acc_top5 = self.test_acc_top5 = None
        self.val_entities = EntityF1(tags)
        self.test_entities = EntityF1(tags)

    def forward(self, inputs: Dict[str, Tensor]) -> Tensor:
        """Logits ``(N, K, T)``: classes on dim 1, as ``F.cross_entropy`` and ``adalabel_loss`` take them."""
        return self.net(**inputs).logits.transpose(1, 2)

    def check_matches_data(self, datamodule: Optional[pl.LightningDataModule]) -> None:
        data_tags = getattr(datamodule, "tags", None)
        if data_tags is not None and list(data_tags) != self.tags:
            raise ValueError(
                f"The data's tags {data_tags} differ from the model's {self.tags}; give the same list to"
                " `--data.tags` and `--model.tags`."
            )
        super().check_matches_data(datamodule)

    def _evaluate(self, batch: Batch, split: str, top1: MulticlassAccuracy, top5: Optional[MulticlassAccuracy]) -> None:
        inputs, target = batch
        logits = self(inputs).float()
        batch_size = target.shape[0]
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=batch_size)
        top1(logits, target)
        self.log(f"{split}/acc", top1, prog_bar=True, batch_size=batch_size)
        getattr(self, f"{split}_entities").update(logits.argmax(dim=1), target)

    def _log_entity_scores(self, split: str) -> None:
        metric = getattr(self, f"{split}_entities")
        scores = metric.compute()  # summed over processes
        self.log(f"{split}/entity_f1", scores["f1"], prog_bar=True)
        self.log(f"{split}/entity_precision", scores["precision"])
        self.log(f"{split}/entity_recall", scores["recall"])
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_entity_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_entity_scores("test")

    def on_train_epoch_end(self) -> None:
        # Runs after the callbacks' epoch-end hooks, so an end-of-epoch refresh of the label matrix is included.
        callback = next((cb for cb in self.trainer.callbacks if isinstance(cb, AdaLabel)), None)
        label_matrix = callback.label_matrix if callback is not None else None
        if not self.report_confused_pairs or label_matrix is None or callback.preset.samples == "none":
            return
        self.confused_tag_pairs = top_correlated_pairs(label_matrix.matrix, self.report_confused_pairs, self.tags)
        pairs = ", ".join(f"{tag} -> {other}: {value:.3f}" for tag, other, value in self.confused_tag_pairs)
        self.print(f"epoch {self.current_epoch}: most confused tags (tag -> soft-label tag: Q) {pairs}")
