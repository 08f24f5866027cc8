"""What the transformer recipes share: Hugging Face tokenizers and models, loaded from a Hub name, a local folder
written by ``save_pretrained``, or (for the model) a config for a randomly initialised network; the optimizer groups
of Hugging Face fine-tuning (no weight decay on biases and normalisation weights).

Only the transformer recipes import this module, so the library and the other recipes never need ``transformers``.

Before it loads a Hub name (not a local folder), the module checks in a few seconds that the Hub can be reached
(:mod:`~lightning_adalabel.examples.recipes.hub`); if it cannot, it reads the local cache only, as
``HF_HUB_OFFLINE=1`` does, instead of letting ``huggingface_hub`` retry five times (about 20 s, longer where
connections time out) before it gives up.
"""

import difflib
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import lightning.pytorch as pl
import yaml
from torch import Tensor, nn

from lightning_adalabel.examples.recipes.classification import ClassificationModule, OptimizerName, ScheduleName
from lightning_adalabel.examples.recipes.hub import hub_unreachable_reason

TRANSFORMERS_EXTRA = 'pip install "lightning-adalabel[transformers]"'

try:
    import huggingface_hub.errors
    import transformers
except ImportError as error:  # the recipes' CLI prints this message in one line
    raise ImportError(
        f"The transformer recipes need Hugging Face transformers (>= 4.40) and tokenizers: {TRANSFORMERS_EXTRA}"
    ) from error

Batch = Tuple[Dict[str, Tensor], Tensor]  # (tokenised inputs: input_ids, attention_mask, ...; labels)
IndexedBatch = Tuple[Dict[str, Tensor], Tensor, Tensor]  # a training batch: (inputs, labels, the samples' indices)
# `--model.config`: a mapping, or its YAML/JSON text. jsonargparse hands over the text of a value it cannot read as a
# mapping, so that the YAML error (which it would drop) is told here.
ModelConfig = Union[Dict[str, Any], str]

# What from_pretrained raises for a name that is neither a folder nor a reachable Hub repository: OSError, or (in
# transformers 4.x, for a path-like name that does not exist) huggingface_hub's HFValidationError, a ValueError.
LOAD_ERRORS = (OSError, ValueError)
# What building a model from a wrong `--model.config` raises: the config classes' checks (ValueError; in recent
# versions huggingface_hub's strict-dataclass validation errors), and the layers' own (TypeError, KeyError).
CONFIG_ERRORS = (ValueError, TypeError, KeyError, getattr(huggingface_hub.errors, "StrictDataclassError", ValueError))
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
    tokenizer = from_pretrained("tokenizer", transformers.AutoTokenizer.from_pretrained, name_or_path, **kwargs)
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
    token-classification collator pads them with -100). Samples with an ``"index"`` (the training set's, from
    :class:`~lightning_adalabel.IndexedDataset`) give ``(inputs, labels, indices)``: the index is the sample's, not
    an input of the model."""

    def __init__(self, tokenizer: Any, pad_labels: bool = False) -> None:
        collator = transformers.DataCollatorForTokenClassification if pad_labels else transformers.DataCollatorWithPadding
        self.collator = collator(tokenizer)

    def __call__(self, samples: List[Mapping[str, Any]]) -> Union[Batch, IndexedBatch]:
        batch = dict(self.collator(list(samples)))
        labels, index = batch.pop("labels"), batch.pop("index", None)
        return (batch, labels) if index is None else (batch, labels, index)


def model_type_of(name_or_path: str) -> Optional[str]:
    """The ``model_type`` in the checkpoint's config (``"bert"``, ``"roberta"``), or None without a config."""
    try:
        config = from_pretrained("config", transformers.AutoConfig.from_pretrained, name_or_path)
    except FileNotFoundError:  # a tokenizer folder without the model's config.json
        return None
    return getattr(config, "model_type", None)


def from_pretrained(what: str, load: Callable[..., Any], name_or_path: str, **kwargs: Any) -> Any:
    """``load(name_or_path, **kwargs)``, a ``from_pretrained``: from the local cache only when ``name_or_path`` is not
    a folder and the Hub cannot be reached; a failure raises ``FileNotFoundError`` with one line."""
    unreachable = None if os.path.isdir(name_or_path) else hub_unreachable_reason()
    if unreachable is not None:
        kwargs["local_files_only"] = True
    try:
        return load(name_or_path, **kwargs)
    except LOAD_ERRORS as error:
        raise FileNotFoundError(cannot_load_message(what, name_or_path, error, unreachable)) from error


def cannot_load_message(what: str, name_or_path: str, error: Exception, unreachable: Optional[str] = None) -> str:
    """One line for a checkpoint that neither the local disk nor the Hub (or its cache) can provide."""
    if unreachable is not None:
        return (
            f"cannot load the {what} {name_or_path!r}: it is not in the local Hugging Face cache, and the Hub cannot"
            f" be reached ({unreachable}). Run once with network access (the files are then cached), give a folder"
            " written by `save_pretrained`, or set HF_HUB_OFFLINE=1 to read the cache without trying the network."
        )
    return (
        f"cannot load the {what} {name_or_path!r}: {reason(error, first_line_only=True)} Give a Hugging Face Hub"
        " name (needs the network, or the model in the local cache) or a folder written by `save_pretrained`."
    )


def reason(error: BaseException, first_line_only: bool = False, max_length: int = 300) -> str:
    """An error's message as one sentence: its lines joined (or its first line only), cut at ``max_length``
    characters, ending with a full stop; its type's name when it has no message.

    Example:
        >>> reason(ValueError("Validation error for field 'hidden_size':\\n    TypeError: expected int"))
        "Validation error for field 'hidden_size': TypeError: expected int."
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = lines[0] if first_line_only else " ".join(lines)
    text = text if len(text) <= max_length else text[: max_length - 3] + "..."
    return text if text.endswith((".", "!", "?")) else text + "."


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
    config: Optional[Union[Mapping[str, Any], str]] = None,
    label_names: Optional[List[str]] = None,
    ignore_mismatched_sizes: bool = False,
) -> nn.Module:
    """A Hugging Face model with a ``num_labels``-way head: pretrained from ``checkpoint`` (the head is new unless the
    checkpoint has one of this size), or randomly initialised from ``config`` (``{"model_type": "bert", ...}``,
    the keyword arguments of that model type's config class, or that mapping as YAML/JSON text).
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
        return from_pretrained(
            "model", auto_class.from_pretrained, checkpoint, ignore_mismatched_sizes=ignore_mismatched_sizes, **head
        )
    settings = parse_model_config(config or {})
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            "`--model.config` needs a `model_type` (e.g. {\"model_type\": \"bert\", \"num_hidden_layers\": 2}), the"
            " architecture to build."
        )
    config_class = config_class_of(str(model_type))
    try:
        return auto_class.from_config(transformers.AutoConfig.for_model(model_type, **settings, **head))
    except CONFIG_ERRORS as error:
        raise ValueError(
            f"`--model.config` does not make a {model_type} model: {reason(error)} Its keys are the arguments of"
            f" transformers.{config_class.__name__}; fix the value it names."
        ) from error


def parse_model_config(config: Union[Mapping[str, Any], str]) -> Dict[str, Any]:
    """``--model.config`` as a dict: the mapping itself, or the mapping its YAML/JSON text holds.

    Example:
        >>> parse_model_config("{model_type: bert, num_hidden_layers: 2}")
        {'model_type': 'bert', 'num_hidden_layers': 2}
        >>> parse_model_config("{layers: 2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `--model.config {layers: 2` is not YAML: expected ',' or '}', but got '<stream end>' at column 11. ...
    """
    if not isinstance(config, str):
        return dict(config)
    example = "Write a mapping, e.g. --model.config '{model_type: bert, num_hidden_layers: 4}' (quoted for the shell)."
    try:
        parsed = yaml.safe_load(config)
    except yaml.YAMLError as error:
        problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
        where = f"{problem} at column {mark.column + 1}." if problem and mark else reason(error, first_line_only=True)
        raise ValueError(f"`--model.config {config}` is not YAML: {where} {example}") from error
    if not isinstance(parsed, dict):
        raise ValueError(f"`--model.config {config}` is not a mapping but a {type(parsed).__name__}. {example}")
    return parsed


def config_class_of(model_type: str) -> Any:
    """transformers' config class of ``model_type`` (``"bert"`` -> ``BertConfig``); an unknown one is refused with
    the closest names."""
    if model_type in transformers.CONFIG_MAPPING:
        return transformers.CONFIG_MAPPING[model_type]
    close = difflib.get_close_matches(model_type, list(transformers.CONFIG_MAPPING.keys()), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(
        f"`--model.config` has model_type {model_type!r}, which transformers does not know; {hint}The model types are"
        " the keys of transformers.CONFIG_MAPPING (bert, roberta, deberta-v2, distilbert, ...)."
    )


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
            ...}`` (the keyword arguments of that model type's config class), or that mapping as YAML/JSON text.
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
        config: Optional[ModelConfig] = None,
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
