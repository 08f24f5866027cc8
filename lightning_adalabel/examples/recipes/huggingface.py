"""What the transformer recipes share: Hugging Face tokenizers and models, loaded from a Hub name, a local folder
written by ``save_pretrained``, or (for the model) a config for a randomly initialised network; the optimizer groups
of Hugging Face fine-tuning (no weight decay on biases and normalisation weights).

Only the transformer recipes import this module, so the library and the other recipes never need ``transformers``.
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_adalabel.examples.recipes.classification import ClassificationModule, OptimizerName, ScheduleName

TRANSFORMERS_EXTRA = 'pip install "lightning-adalabel[transformers]"'

try:
    import transformers
except ImportError as error:  # the recipes' CLI prints this message in one line
    raise ImportError(
        f"The transformer recipes need Hugging Face transformers (>= 4.40) and tokenizers: {TRANSFORMERS_EXTRA}"
    ) from error

Batch = Tuple[Dict[str, Tensor], Tensor]  # (tokenised inputs: input_ids, attention_mask, ...; labels)

# What from_pretrained raises for a name that is neither a folder nor a reachable Hub repository: OSError, or (in
# transformers 4.x, for a path-like name that does not exist) huggingface_hub's HFValidationError, a ValueError.
LOAD_ERRORS = (OSError, ValueError)
# BPE tokenizers that mark a word's start with a space need this to encode words given one by one (word lists).
PREFIX_SPACE_MODEL_TYPES = ("bloom", "gpt2", "roberta", "deberta", "longformer", "bart")
# Parameters of normalisation layers (LayerNorm, RMSNorm, ...) are matched by the class name, which covers the
# models' own norm classes (T5LayerNorm, LlamaRMSNorm) as well as torch's.
NORM_CLASS_NAME_PART = "norm"


def load_tokenizer(name_or_path: str, for_word_lists: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained(name_or_path)``, with a padding token, for batches padded to their longest text.

    Args:
        name_or_path: a Hugging Face Hub name (``bert-base-uncased``; needs the network or the local cache) or a
            folder written by ``save_pretrained``.
        for_word_lists: the texts come split into words (token classification): the tokenizer must be a fast one,
            whose ``word_ids`` align word labels to word pieces, and BPE tokenizers get ``add_prefix_space``.
    """
    kwargs: Dict[str, Any] = {}
    if for_word_lists and model_type_of(name_or_path) in PREFIX_SPACE_MODEL_TYPES:
        kwargs["add_prefix_space"] = True
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except LOAD_ERRORS as error:
        raise FileNotFoundError(cannot_load_message("tokenizer", name_or_path, error)) from error
    if for_word_lists and not tokenizer.is_fast:
        raise ValueError(
            f"The tokenizer of {name_or_path!r} is a slow (Python) tokenizer; aligning word labels to word pieces"
            " needs a fast one (`tokenizers`). Pick a checkpoint that ships tokenizer.json."
        )
    if tokenizer.pad_token is None:
        raise ValueError(
            f"The tokenizer of {name_or_path!r} has no padding token, so batches cannot be padded. Use an encoder"
            " checkpoint (BERT, RoBERTa, DeBERTa, ...) or save a tokenizer with `pad_token` set and point"
            " `--data.tokenizer` at it."
        )
    return tokenizer


class PadToLongest:
    """Collate tokenised samples into ``(inputs, labels)``: inputs padded to the batch's longest sample by the
    tokenizer (``DataCollatorWithPadding``), labels as a tensor. ``labels`` may be per sample or per token (the
    token-classification collator pads them with -100)."""

    def __init__(self, tokenizer: Any, pad_labels: bool = False) -> None:
        collator = transformers.DataCollatorForTokenClassification if pad_labels else transformers.DataCollatorWithPadding
        self.collator = collator(tokenizer)

    def __call__(self, samples: List[Mapping[str, Any]]) -> Batch:
        batch = dict(self.collator(list(samples)))
        return batch, batch.pop("labels")


def model_type_of(name_or_path: str) -> Optional[str]:
    """The ``model_type`` in the checkpoint's config (``"bert"``, ``"roberta"``), or None without a config."""
    try:
        return getattr(transformers.AutoConfig.from_pretrained(name_or_path), "model_type", None)
    except (OSError, ValueError):  # a tokenizer folder without the model's config.json
        return None


def cannot_load_message(what: str, name_or_path: str, error: Exception) -> str:
    """One line for a checkpoint that neither the local disk nor the Hub (or its cache) can provide."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"cannot load the {what} {name_or_path!r}: {first_line} Give a Hugging Face Hub name (needs the network, or"
        " the model in the local cache) or a folder written by `save_pretrained`."
    )


def tokenizer_for(datamodule: pl.LightningDataModule, tokenizer_name: Optional[str]) -> str:
    """The tokenizer to load: ``tokenizer_name`` when given, else the checkpoint of the model being trained.

    A pretrained model's tokenizer is saved with it, so ``--model.checkpoint bert-base-uncased`` alone names both.
    """
    if tokenizer_name is not None:
        return tokenizer_name
    trainer = getattr(datamodule, "trainer", None)
    checkpoint = getattr(getattr(trainer, "lightning_module", None), "checkpoint", None)
    if checkpoint is None:
        raise ValueError(
            "`--data.tokenizer` is not set and the model has no `--model.checkpoint` to take the tokenizer from"
            " (a model built from `--model.config`). Set `--data.tokenizer` to a Hub name or a tokenizer folder."
        )
    return checkpoint


def build_model(
    auto_class: Any,
    num_labels: int,
    checkpoint: Optional[str] = None,
    config: Optional[Mapping[str, Any]] = None,
    label_names: Optional[List[str]] = None,
    ignore_mismatched_sizes: bool = False,
) -> nn.Module:
    """A Hugging Face model with a ``num_labels``-way head: pretrained from ``checkpoint`` (the head is new unless the
    checkpoint has one of this size), or randomly initialised from ``config`` (``{"model_type": "bert", ...}``,
    the keyword arguments of that model type's config class).
    """
    if (checkpoint is None) == (config is None):
        raise ValueError(
            "Give exactly one of `--model.checkpoint` (a Hub name or a `save_pretrained` folder: pretrained weights)"
            " and `--model.config` (a dict with `model_type`: a randomly initialised model)"
            + ("; with `--model.config`, pass `--model.checkpoint null`." if checkpoint is not None else ".")
        )
    head: Dict[str, Any] = {"num_labels": num_labels}
    if label_names is not None:  # saved in the model's config.json, so that its predictions read as names
        head["id2label"] = dict(enumerate(label_names))
        head["label2id"] = {name: index for index, name in enumerate(label_names)}
    if checkpoint is not None:
        try:
            return auto_class.from_pretrained(checkpoint, ignore_mismatched_sizes=ignore_mismatched_sizes, **head)
        except LOAD_ERRORS as error:
            raise FileNotFoundError(cannot_load_message("model", checkpoint, error)) from error
    settings = dict(config or {})
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            "`--model.config` needs a `model_type` (e.g. {\"model_type\": \"bert\", \"num_hidden_layers\": 2}), the"
            " architecture to build."
        )
    return auto_class.from_config(transformers.AutoConfig.for_model(model_type, **settings, **head))


def no_weight_decay_names(model: nn.Module) -> List[str]:
    """Names of the parameters that Hugging Face fine-tuning leaves out of weight decay: biases, and every parameter
    of a normalisation layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
        >>> no_weight_decay_names(model)
        ['0.bias', '1.weight', '1.bias']
    """
    names = []
    for module_name, module in model.named_modules():
        is_norm = NORM_CLASS_NAME_PART in type(module).__name__.lower()
        for name, _ in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


class TransformerModule(ClassificationModule):
    """A Hugging Face model (``self.net``) fine-tuned with the AdaLabel loss, AdamW without weight decay on biases
    and normalisation weights, and a linear warm-up then decay, as Hugging Face's fine-tuning scripts do.

    Args:
        num_classes: K, the size of the new classification head.
        checkpoint: a Hugging Face Hub name (``bert-base-uncased``, ``microsoft/deberta-v3-base``) or a folder
            written by ``save_pretrained``; its tokenizer is also the data's unless ``--data.tokenizer`` is set.
        config: instead of ``checkpoint``, a randomly initialised model: ``{"model_type": "bert", "hidden_size": 256,
            ...}`` (the keyword arguments of that model type's config class).
        ignore_mismatched_sizes: load a checkpoint whose classification head has another number of classes (the
            head is then newly initialised).
        label_names: class names stored in the model's config (``id2label``).
        optimizer, lr, weight_decay, schedule, warmup_epochs: as in
            :class:`~lightning_adalabel.examples.recipes.classification.ClassificationModule`, with Hugging Face's
            fine-tuning defaults.
        **kwargs: the other settings of ``ClassificationModule``.
    """

    auto_model_class_name: str  # the transformers Auto class of the task, e.g. "AutoModelForSequenceClassification"

    def __init__(
        self,
        num_classes: int,
        checkpoint: Optional[str] = None,
        config: Optional[Dict[str, Any]] = None,
        ignore_mismatched_sizes: bool = False,
        label_names: Optional[List[str]] = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        schedule: ScheduleName = "linear",
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_classes=num_classes, optimizer=optimizer, lr=lr, weight_decay=weight_decay, schedule=schedule,
            warmup_epochs=warmup_epochs, **kwargs,
        )
        self.checkpoint = checkpoint
        self.net = build_model(
            getattr(transformers, self.auto_model_class_name), num_classes, checkpoint, config, label_names,
            ignore_mismatched_sizes,
        )
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode when training
        # starts: without this, dropout would stay off during fine-tuning.
        self.net.train()

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits of a tokenised batch (``input_ids``, ``attention_mask``, ...), classes on dim 1."""
        return self.net(**inputs).logits

    def parameter_groups(self) -> List[Dict[str, Any]]:
        exempt = set(no_weight_decay_names(self))
        decayed = [parameter for name, parameter in self.named_parameters() if name not in exempt]
        not_decayed = [parameter for name, parameter in self.named_parameters() if name in exempt]
        return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]

    def check_matches_data(self, datamodule: Optional[pl.LightningDataModule]) -> None:
        super().check_matches_data(datamodule)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None and len(tokenizer) > self.net.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's embedding table has"
                f" {self.net.get_input_embeddings().num_embeddings} rows: they come from different checkpoints. Set"
                " `--data.tokenizer` to the model's tokenizer (or leave it out to use `--model.checkpoint`'s)."
            )
        max_length = getattr(datamodule, "max_length", None)
        positions = getattr(self.net.config, "max_position_embeddings", None)
        if max_length is not None and positions is not None and max_length > positions:
            raise ValueError(
                f"`--data.max_length {max_length}` is longer than the model's {positions} positions; set"
                f" `--data.max_length {positions}` or less."
            )
