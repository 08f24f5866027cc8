"""Transformer text classification for the recipes (AG News, Yahoo! Answers, Yelp Review Full): the CSV files of
:mod:`~lightning_adalabel.examples.recipes.text`, a Hugging Face tokenizer and ``AutoModelForSequenceClassification``
(BERT, RoBERTa, DeBERTa, ... from the Hub, from a ``save_pretrained`` folder, or randomly initialised from a config).

Texts are tokenised in the loader workers, truncated to ``max_length`` tokens and padded per batch to the longest
text (``DataCollatorWithPadding``). Needs ``pip install "lightning-adalabel[transformers]"``.
"""

from typing import Any, Dict, Optional, Sequence

from torch.utils.data import Dataset

from lightning_adalabel.examples.recipes.huggingface import (
    ModelConfig,
    PadToLongest,
    TransformerModule,
    load_tokenizer,
    tokenizer_for,
)
from lightning_adalabel.examples.recipes.text import LabeledCSVDataModule

class TokenizedTextDataset(Dataset):
    """Texts with class labels, tokenised on the fly (in the loader workers) and truncated to ``max_length``."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Any, max_length: int) -> None:
        self.texts = texts
        self.labels = labels
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        encoding = self.tokenizer(self.texts[index], truncation=True, max_length=self.max_length)
        return {**encoding, "labels": self.labels[index]}


class TransformerTextDataModule(LabeledCSVDataModule):
    """A CSV text-classification data set (``root/train.csv``, ``root/test.csv``, as the fastText recipes read them)
    tokenised by a Hugging Face tokenizer.

    Args:
        root: the data set's folder.
        num_classes: number of labels (AG News 4, Yahoo! Answers 10, Yelp Review Full 5).
        tokenizer: a Hub name or a folder written by ``save_pretrained``; ``None`` (the default) takes the model's
            ``--model.checkpoint``.
        max_length: truncate every text to this many tokens (special tokens included).
        batch_size: per device.
        num_workers: tokenising processes per device, at most: fewer where the machine has fewer CPUs.
        val_fraction: hold out this fraction of train.csv for validation; 0 validates on test.csv.
        seed: seed of the hold-out split.
        pin_memory: page-locked host batches (on a GPU only).
        persistent_workers: keep loader workers alive between epochs.
    """

    # What a trained model depends on: a run from its checkpoint refuses other values (recipes/resume.py).
    model_input_settings = ("num_classes", "tokenizer")

    def __init__(
        self,
        root: str,
        num_classes: int,
        tokenizer: Optional[str] = None,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 4,
        val_fraction: float = 0.0,
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(root, num_classes, batch_size, num_workers, val_fraction, seed, pin_memory, persistent_workers)
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.tokenizer: Any = None

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(tokenizer_for(self, self.tokenizer_name))
            self.collate_fn = PadToLongest(self.tokenizer)
        super().setup(stage)

    def make_dataset(self, texts: Sequence[str], labels: Sequence[int]) -> TokenizedTextDataset:
        return TokenizedTextDataset(texts, labels, self.tokenizer, self.max_length)


class TransformerTextClassifier(TransformerModule):
    """``AutoModelForSequenceClassification`` fine-tuned with the AdaLabel loss: the pretrained encoder of
    ``checkpoint`` with a new ``num_classes``-way head (or a randomly initialised model from ``config``).

    Args:
        num_classes: K.
        checkpoint: a Hugging Face Hub name (``bert-base-uncased``, ``microsoft/deberta-v3-base``, ...) or a folder
            written by ``save_pretrained``.
        config: instead of ``checkpoint``, a randomly initialised model, ``{"model_type": "bert", ...}`` (or its
            YAML/JSON text).
        **kwargs: ``ignore_mismatched_sizes``, ``label_names`` and the optimizer and schedule settings of
            :class:`~lightning_adalabel.examples.recipes.huggingface.TransformerModule`.
    """

    auto_model_class_name = "AutoModelForSequenceClassification"

    def __init__(
        self,
        num_classes: int,
        checkpoint: Optional[str] = None,
        config: Optional[ModelConfig] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, checkpoint=checkpoint, config=config, **kwargs)
        self.save_hyperparameters()
