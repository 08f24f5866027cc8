"""``find_label_issues``: rank every training sample by how likely its label is wrong, from one trained model.

A model trained with ALR memorises flipped labels much less than one trained with plain cross-entropy, so its own
probability of each training sample's *given* label, ``p(y_given | x)`` on the training set, ranks the wrong labels
well. Better still is each sample's logit margin averaged over the whole run, which the callback keeps when the
training steps pass the samples' indices (:class:`~lightning_adalabel.IndexedDataset`,
:mod:`lightning_adalabel.training_margins`): a wrong label spends most of the run with a negative margin even where
the last epochs memorised it. Where the run kept them, the ranking and the default cut-off use these margins
(docs/benchmarks.md, "Finding the wrong labels"). This module runs the pass through Lightning's predict loop, so that
DDP, precision and devices come from the Trainer:

- per batch, on the device and without a host sync, each position's score (the probability of its given label), its
  most probable class and its validity (torch's cross-entropy layouts and ``ignore_index``, as in the loss);
- at the end, the results gathered across processes (once: the lengths, then one all-gather per column); then the
  cut-off (:data:`CUT_OFFS`) and the ranking, the same on every rank.

Host memory is ``O(N)`` (a few numbers per sample); the ``N x K`` probabilities are kept only on request
(``keep_probabilities=True``, or ``cut_off="cleanlab"``, which needs them).
"""

import csv
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Sized, Tuple, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from lightning_adalabel.callback import AdaLabel, StrategyCollective
from lightning_adalabel.inputs import _format, _tensor_validation, invalid_targets_message
from lightning_adalabel.module import AdaLabelMixin
from lightning_adalabel.training_margins import TrainingMargins
from lightning_adalabel.validation import check_bool, check_choice, check_int

#: How :func:`find_label_issues` decides which samples to flag.
#:
#: - ``"margin"`` (the default where the training kept :attr:`~lightning_adalabel.AdaLabel.training_margins`): the
#:   samples whose logit margin, averaged over the run, is negative: on average over training, the model preferred
#:   another class to the given one.
#: - ``"misclassified"`` (the default otherwise): the samples whose most probable class is not their given label, the
#:   samples that ALR's ``samples="misclassified"`` statistics count; in class k that is ``e_k n_k`` of its ``n_k``
#:   samples, ``e_k`` the model's error rate on the samples labelled k. Measured against ``"margin"``, cleanlab's rule
#:   and flagging the ``e_k n_k`` lowest-scored samples of each class in docs/benchmarks.md ("Finding the wrong
#:   labels").
#: - ``"cleanlab"``: ``cleanlab.filter.find_label_issues(labels, probabilities)``, cleanlab's default rule, on this
#:   model's probabilities (the optional extra ``lightning-adalabel[cleanlab]``).
#: - ``"none"``: flag nothing; use the ranking alone.
CUT_OFFS = ("margin", "misclassified", "cleanlab", "none")

# Per position: dataset index, position in the sample, given label, most probable class, suggested label, flag.
_COLUMNS = ("index", "position", "given", "predicted", "suggested")


@dataclass
class LabelIssues:
    """What :func:`find_label_issues` found: one entry per labelled position, in the data set's order (by
    ``index``, then ``position``). All tensors are on the CPU."""

    index: Tensor
    """``(M,)`` int64: the sample's index in the data set (its position in an unshuffled loader)."""
    position: Tensor
    """``(M,)`` int64: the position inside the sample for token layouts (targets ``(N, d1, ...)``, flattened);
    0 for ``(N,)`` targets. Positions equal to ``ignore_index`` are left out."""
    given: Tensor
    """``(M,)`` int64: the label the data set gives."""
    score: Tensor
    """``(M,)`` float32: the model's probability of the given label; low means likely wrong."""
    predicted: Tensor
    """``(M,)`` int64: the model's most probable class."""
    suggested: Tensor
    """``(M,)`` int64: the label to check first: the most probable class other than the given one, weighted by the
    given class's row of Q (half Q's row, half uniform) when the module has an AdaLabel label matrix."""
    is_issue: Tensor
    """``(M,)`` bool: flagged by the cut-off."""
    ranking: Tensor
    """``(M,)`` int64: every entry, most likely wrong first: ascending :attr:`margin` where the training kept the
    margins (a sample no training step saw, NaN, comes last), ascending :attr:`score` otherwise."""
    cut_off: str
    """The rule that set :attr:`is_issue` (:data:`CUT_OFFS`)."""
    margin: Optional[Tensor] = None
    """``(M,)`` float32: the sample's logit margin ``z_given - max_{k != given} z_k`` averaged over the training steps
    that saw it (:attr:`~lightning_adalabel.AdaLabel.training_margins`); negative means the model mostly preferred
    another class. ``None`` where the training did not pass the samples' indices."""
    probabilities: Optional[Tensor] = None
    """``(M, K)`` float32 class probabilities, kept only with ``keep_probabilities=True`` (or the cleanlab cut-off)."""

    @property
    def issues(self) -> Tensor:
        """The flagged entries, most likely wrong first: indices into this object's tensors."""
        return self.ranking[self.is_issue[self.ranking]]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ranked_by(self) -> str:
        """What :attr:`ranking` sorts by: ``"margin"`` (averaged over training) or ``"score"``."""
        return "score" if self.margin is None else "margin"

    def rows(self, only_issues: bool = False) -> List[Dict[str, Any]]:
        """Entries as dicts (``index``, ``position``, ``given``, ``suggested``, ``score``, ``margin`` where kept,
        ``is_issue``), most likely wrong first."""
        order = self.issues if only_issues else self.ranking
        names = ("index", "position", "given", "suggested", "score", *(("margin",) if self.margin is not None else ()),
                 "is_issue")
        columns = {name: getattr(self, name)[order].tolist() for name in names}
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    def to_csv(self, path: Union[str, "os.PathLike[str]"], only_issues: bool = False,
               class_names: Optional[Sequence[str]] = None) -> int:
        """Write :meth:`rows` to ``path`` as CSV, most likely wrong first; returns the number of rows written.
        ``position`` is written only for token layouts; with ``class_names`` labels are written as names."""
        rows = self.rows(only_issues)
        tokens = bool(len(self.position)) and bool(self.position.max() > 0)
        fields = ["index", *(["position"] if tokens else []), "given", "suggested", "score",
                  *(["margin"] if self.margin is not None else []), "is_issue"]
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(fields)
            for row in rows:
                if class_names is not None:
                    row["given"], row["suggested"] = class_names[row["given"]], class_names[row["suggested"]]
                row["score"] = f"{row['score']:.6g}"
                if "margin" in row:
                    row["margin"] = f"{row['margin']:.6g}"
                row["is_issue"] = int(row["is_issue"])
                writer.writerow([row[field] for field in fields])
        return len(rows)


LogitsAndTarget = Callable[[pl.LightningModule, Any], Tuple[Tensor, Tensor]]


def inputs_and_target(module: pl.LightningModule, batch: Any) -> Tuple[Tensor, Tensor]:
    """The default ``logits_and_target``: ``(module(inputs), target)`` of an ``(inputs, target, ...)`` batch, the
    layout of :meth:`AdaLabelMixin.training_step`; or of a mapping with ``"labels"`` (Hugging Face), whose other
    entries go to the module as keyword arguments."""
    if isinstance(batch, Mapping) and "labels" in batch:
        inputs = {key: value for key, value in batch.items() if key not in ("labels", "index")}
        return module(**inputs), batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return module(batch[0]), batch[1]
    kind = type(batch).__name__ + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise ValueError(
        f"find_label_issues needs the given labels, but the loader's batches are a {kind} without a label tensor."
        " Pass a loader over the training data with its labels ((inputs, labels) batches, or a mapping with"
        " 'labels'), or `logits_and_target=` a function (module, batch) -> (logits, labels)."
    )


def find_label_issues(
    model: pl.LightningModule,
    dataloader: DataLoader,
    trainer: Optional[pl.Trainer] = None,
    *,
    cut_off: Optional[str] = None,
    keep_probabilities: bool = False,
    logits_and_target: LogitsAndTarget = inputs_and_target,
    ignore_index: Optional[int] = None,
    ckpt_path: Optional[str] = None,
    log_top: int = 0,
    **trainer_kwargs: Any,
) -> LabelIssues:
    """Rank every labelled sample of ``dataloader`` by how likely its label is wrong, from the trained ``model``.

    Args:
        model: a trained :class:`~lightning_adalabel.AdaLabelMixin` module (trained with ALR: its probabilities
            rank the wrong labels far better than those of a model trained with plain cross-entropy).
        dataloader: an *unshuffled* loader over the training data with its labels that visits every sample once (a
            random sampler is refused; one that leaves samples out is refused after the pass, unless the Trainer's
            ``limit_predict_batches`` limits it). Under DDP Lightning shards it.
        trainer: the Trainer whose predict loop runs the model (devices, strategy, precision); ``None`` builds one
            from ``trainer_kwargs`` (default: no logger, no progress bar).
        cut_off: which samples to flag, see :data:`CUT_OFFS`; ``None``: ``"margin"`` where the training kept the
            margins, else ``"misclassified"``.
        keep_probabilities: also return the ``M x K`` probabilities (``O(N K)`` host memory).
        logits_and_target: ``(module, batch) -> (logits, target)``; the default reads ``(inputs, target)`` batches
            (:func:`inputs_and_target`). Logits and targets follow ``F.cross_entropy``'s layouts; targets must be
            class indices.
        ignore_index: targets equal to it are not samples; default: the AdaLabel callback's (else -100).
        ckpt_path: a checkpoint to load into ``model`` first, as ``trainer.predict(ckpt_path=...)`` does; the
            Trainer needs the AdaLabel callback the run trained with, which receives the checkpoint's margins and Q.
        log_top: log a table of the ``log_top`` most suspect flagged samples through the Trainer's loggers (see
            :func:`log_top_suspects`); 0: none.

    Returns:
        :class:`LabelIssues`, the same on every process. Where the module trained with the samples' indices
        (:class:`~lightning_adalabel.IndexedDataset`), it ranks by each sample's margin averaged over training
        (:attr:`LabelIssues.margin`), which needs ``dataloader`` over the same training set, in its order.

    Example::

        trainer.fit(model, train_loader)  # model: an AdaLabelMixin module, trainer with AdaLabel()
        found = find_label_issues(model, DataLoader(train_set, batch_size=256), trainer)
        found.to_csv("label_issues.csv", only_issues=True)
    """
    if not isinstance(model, AdaLabelMixin) or not isinstance(model, pl.LightningModule):
        raise TypeError(
            f"find_label_issues needs a LightningModule that inherits AdaLabelMixin, trained with AdaLabel;"
            f" {type(model).__name__} does not. Declare `class {type(model).__name__}(AdaLabelMixin, LightningModule)`"
            " and train it with `self.adalabel_loss(logits, y)` and the AdaLabel callback."
        )
    if cut_off is not None:
        check_choice("cut_off", cut_off, CUT_OFFS)
    check_bool("keep_probabilities", keep_probabilities)
    check_int("log_top", log_top, minimum=0)
    _check_loader(dataloader)
    callback = model._adalabel_callback
    if cut_off == "cleanlab":
        _import_cleanlab()  # before the pass, not after it
    if ignore_index is None:
        ignore_index = getattr(callback, "ignore_index", -100)
    # The callback the module trained with (in this process), if any: a Trainer given here with an AdaLabel of its
    # own replaces it on the module during the pass (see _Collector.on_predict_start).
    trained_with = model._adalabel_callback
    collector = _Collector(keep_probabilities or cut_off == "cleanlab", cut_off, dataloader,
                           trained_with=None if ckpt_path is not None else trained_with)
    if trainer is None:
        defaults = dict(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
        trainer = pl.Trainer(**{**defaults, **trainer_kwargs})
    elif trainer_kwargs:
        raise ValueError(f"Pass either a `trainer` or Trainer settings, not both (got {sorted(trainer_kwargs)}).")
    if ckpt_path is not None and not any(isinstance(callback, AdaLabel) for callback in trainer.callbacks):
        # Lightning would restore the weights alone and only warn: the ranking would silently fall back from the
        # checkpoint's training margins to the final probabilities, and the suggestion would lose Q's rows.
        raise ValueError(
            "find_label_issues(ckpt_path=...) restores the checkpoint's AdaLabel state (its training margins and label"
            " matrix) into the Trainer's AdaLabel callback, and this Trainer has none. Add the callback the run"
            " trained with: `find_label_issues(model, loader, ckpt_path=..., callbacks=[AdaLabel(...)])`, or"
            " `trainer=Trainer(callbacks=[AdaLabel(...)])`."
        )

    def predict_step(batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Tensor]:
        source = collector.source  # whose Q weights the suggestion
        engine = source.engine if source is not None else None
        return _positions(*logits_and_target(model, batch), ignore_index, engine)

    # The pass runs the module's own hooks (device transfer, eval mode, precision) with this step in place of the
    # module's predict_step, which usually returns predictions rather than logits and labels.
    model.predict_step = predict_step  # type: ignore[method-assign]
    trainer.callbacks.append(collector)
    try:
        trainer.predict(model, dataloaders=dataloader, return_predictions=False, ckpt_path=ckpt_path)
    finally:
        trainer.callbacks.remove(collector)
        del model.predict_step
        model._adalabel_callback = trained_with  # the pass leaves the module as it found it
    found = collector.result
    if found is None:
        raise ValueError("find_label_issues saw no batch: the loader is empty (or limit_predict_batches is 0).")
    _check_coverage(collector.samples_seen, dataloader, trainer)
    num_invalid, num_classes = int(found.pop("invalid").sum()), found.pop("num_classes")
    if num_invalid:
        raise ValueError(invalid_targets_message(num_invalid, None, False, num_classes, ignore_index))
    issues = _label_issues(found, collector.cut_off)
    if log_top:
        log_top_suspects(trainer, issues, log_top)
    return issues


def _check_loader(dataloader: Any) -> None:
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"find_label_issues takes a torch DataLoader over the training data, got {type(dataloader).__name__}."
            " Pass e.g. `DataLoader(train_set, batch_size=256)` (unshuffled)."
        )
    if isinstance(dataloader.dataset, IterableDataset):
        raise ValueError(
            f"find_label_issues needs a map-style data set, whose samples have an index to report; the loader's"
            f" {type(dataloader.dataset).__name__} is an IterableDataset. Pass a loader over a data set with"
            " `__getitem__` and `__len__`, e.g. `DataLoader(train_set, batch_size=256)`."
        )
    if dataloader.batch_size is None and dataloader.batch_sampler is None:
        raise ValueError(
            "find_label_issues needs batches of samples, and this DataLoader has batching turned off (batch_size=None)."
            " Pass e.g. `DataLoader(train_set, batch_size=256)`."
        )
    # A custom batch sampler may have no `sampler`; the check after the pass still catches one that skips samples.
    sampler = _sampler_of(dataloader)
    if isinstance(sampler, (RandomSampler, WeightedRandomSampler, SubsetRandomSampler)) or (
        isinstance(sampler, DistributedSampler) and sampler.shuffle
    ):
        raise ValueError(
            f"find_label_issues got a shuffled DataLoader (its sampler is a {type(sampler).__name__}), the kind that"
            " trains: each sample must be scored once, as it is, and a random sampler may skip or repeat samples"
            " (and comes with random augmentation). Build a loader for the pass with `shuffle=False` and without"
            " random augmentation, e.g. `DataLoader(train_set, batch_size=256)`."
        )


def _sampler_of(dataloader: DataLoader) -> Any:
    """What picks the loader's samples: its batch sampler's ``sampler``, or a batch sampler of its own that has none."""
    batches = dataloader.batch_sampler
    if batches is None:
        return dataloader.sampler
    return batches.sampler if hasattr(batches, "sampler") else batches


def _check_coverage(samples_seen: int, dataloader: DataLoader, trainer: "pl.Trainer") -> None:
    """Every sample of a sized data set was ranked, unless the Trainer limits the pass on purpose."""
    size = len(dataloader.dataset) if isinstance(dataloader.dataset, Sized) else None
    limit = trainer.limit_predict_batches
    if size is None or samples_seen >= size or not (isinstance(limit, float) and limit >= 1.0):
        return
    sampler = _sampler_of(dataloader)
    raise ValueError(
        f"find_label_issues saw {samples_seen} of the data set's {size} samples: the loader's sampler"
        f" ({type(sampler).__name__}) leaves {size - samples_seen} out, and their labels would go unchecked. Pass a"
        " loader that visits every sample once, e.g. `DataLoader(train_set, batch_size=256)`, or limit the pass on"
        " purpose with the Trainer's `limit_predict_batches`."
    )


def _holds_nothing(callback: Optional[Any]) -> bool:
    """Whether ``callback`` (an AdaLabel, or None) has learned nothing yet: no label matrix, no margins."""
    return callback is None or (callback.engine is None and callback.training_margins is None)


def _check_margins(margins: Optional[TrainingMargins], cut_off: Optional[str], dataloader: DataLoader) -> None:
    if margins is None:
        if cut_off == "margin":
            raise ValueError(
                "cut_off='margin' needs the margins the callback averages over training, and this module's training"
                " kept none: train with the samples' indices (IndexedDataset(train_set), or"
                " `self.adalabel_loss(logits, y, index=index)`), or use cut_off='misclassified'."
            )
        return
    size = len(dataloader.dataset) if isinstance(dataloader.dataset, Sized) else None
    if size is not None and size != margins.num_samples:
        raise ValueError(
            f"The module's training kept margins for {margins.num_samples} training samples, but the loader's data set"
            f" has {size}. Pass a loader over the training set it was trained on, in the same order (unshuffled,"
            " without augmentation), so that each index names the same sample."
        )


def _import_cleanlab() -> Any:
    try:
        import cleanlab.filter
    except ImportError as error:
        raise ImportError(
            "cut_off='cleanlab' needs cleanlab: `pip install \"lightning-adalabel[cleanlab]\"` (or use the default"
            " cut_off='misclassified')."
        ) from error
    return cleanlab.filter


def _positions(logits: Tensor, target: Tensor, ignore_index: int, engine: Optional[Any] = None) -> Dict[str, Tensor]:
    """One batch's per-position results, on the device, without a host sync. ``engine``: the label matrix whose rows
    weight the suggestion."""
    _tensor_validation(logits, target)
    if target.is_floating_point():
        raise ValueError(
            "find_label_issues needs the given labels as class indices; the batch has probability targets (MixUp,"
            " CutMix or smoothed labels). Pass a loader over the training data without those transforms."
        )
    batch = _format(logits.detach().float(), target.detach(), ignore_index)
    probabilities = batch.logits.softmax(dim=1)
    score = probabilities.gather(1, batch.target[:, None]).squeeze(1)
    # The suggestion is another class than the given one (whose probability is the score). Under class-dependent noise
    # Q's row of the given class says where such labels came from; under symmetric noise it says only which classes
    # look alike. Half Q's row, half uniform won on average over both (docs/benchmarks.md).
    weights = probabilities
    if engine is not None and engine.num_classes == probabilities.shape[1]:
        rows = engine.rows(batch.target.to(engine.device)).to(probabilities.device)
        weights = probabilities * (rows + 1.0 / (probabilities.shape[1] - 1))
    others = weights.scatter(1, batch.target[:, None], -1.0)
    return {"given": batch.target, "score": score, "predicted": probabilities.argmax(dim=1),
            "suggested": others.argmax(dim=1), "valid": batch.valid, "invalid": batch.invalid,
            "probabilities": probabilities}


class _Collector(BasePredictionWriter):
    """Keeps each batch's per-position results on the device (no host sync), with the dataset indices that the
    predict loop reports, and gathers them across processes at the end of the pass."""

    def __init__(self, keep_probabilities: bool, cut_off: Optional[str], dataloader: DataLoader,
                 trained_with: Optional[Any] = None) -> None:
        super().__init__(write_interval="batch")
        self.keep_probabilities = keep_probabilities
        self.cut_off = cut_off
        self.dataloader = dataloader
        self.trained_with = trained_with
        self.source: Optional[Any] = None  # the AdaLabel callback whose margins and Q the pass uses
        self.margins: Optional[TrainingMargins] = None
        self.parts: Dict[str, List[Tensor]] = {}
        self.num_classes = 0
        self.samples_seen = 0  # distinct samples, labelled or not, over every process
        self.result: Optional[Dict[str, Any]] = None

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.parts, self.result, self.samples_seen = {}, None, 0
        # Here, not before the pass: a checkpoint given as `ckpt_path` has been restored by now, margins included.
        callback = getattr(pl_module, "_adalabel_callback", None)
        if callback is not self.trained_with and _holds_nothing(callback) and not _holds_nothing(self.trained_with):
            # A new AdaLabel in the Trainer given for the pass, with nothing restored into it: what the module's
            # training learned (its margins and Q) is in the callback it trained with.
            callback = self.trained_with
        self.source = callback
        self.margins = callback.training_margins if callback is not None else None
        _check_margins(self.margins, self.cut_off, self.dataloader)
        if self.cut_off is None:
            self.cut_off = "misclassified" if self.margins is None else "margin"

    def write_on_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", prediction: Dict[str, Tensor],
        batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        if batch_indices is None:
            raise ValueError("find_label_issues could not tell which samples a batch holds: pass a torch DataLoader.")
        samples = len(batch_indices)
        per_sample = len(prediction["score"]) // samples  # positions per sample (token layouts), from shapes alone
        self.num_classes = prediction["probabilities"].shape[1]
        # The indices come from the sampler, on the host, and stay there: no copy to the device per batch.
        index = torch.as_tensor(list(batch_indices), dtype=torch.long)
        columns = dict(prediction, index=index.repeat_interleave(per_sample),
                       position=torch.arange(per_sample).repeat(samples))
        if not self.keep_probabilities:
            columns.pop("probabilities")
        for name, value in columns.items():
            self.parts.setdefault(name, []).append(value)

    def on_predict_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Every process must enter the gathers, also one that saw no batch.
        local = {name: torch.cat(values) for name, values in self.parts.items()}
        if local:
            local["invalid"] = local["invalid"].sum()[None]
        gathered = _gather(trainer.strategy, local, pl_module.device)
        margins = None
        if self.margins is not None:  # every process: an unfinished epoch's margins are all-reduced
            collective = StrategyCollective(trainer.strategy) if trainer.world_size > 1 else None
            with torch.inference_mode(False):
                margins = self.margins.mean(collective).cpu()
        if gathered is None:
            return
        invalid = gathered.pop("invalid")
        valid = gathered.pop("valid")
        self.samples_seen = len(torch.unique(gathered["index"]))
        result = {name: value[valid] for name, value in gathered.items()}
        # One entry per (index, position), in the data set's order; a sampler that pads (DistributedSampler) repeats
        # a few samples: keep one of each.
        positions = int(result["position"].max()) + 1 if len(result["position"]) else 1
        key = result["index"] * positions + result["position"]
        key, order = torch.sort(key, stable=True)
        keep = torch.ones_like(key, dtype=torch.bool)
        keep[1:] = key[1:] != key[:-1]
        self.result = {name: value[order][keep] for name, value in result.items()}
        if margins is not None:
            self.result["margin"] = margins[self.result["index"]]
        self.result["invalid"], self.result["num_classes"] = invalid, self.num_classes


def _gather(strategy: Any, local: Dict[str, Tensor], device: torch.device) -> Optional[Dict[str, Tensor]]:
    """Every process's entries, concatenated on the CPU: one host read of the lengths, then one all-gather per column
    (padded to the longest; on ``device``, which NCCL needs)."""
    length = len(local["score"]) if local.get("score") is not None else 0
    if strategy.world_size == 1:
        return None if not length else {name: value.cpu() for name, value in local.items()}
    lengths = strategy.all_gather(torch.tensor([length], device=device)).reshape(-1).tolist()
    if not max(lengths):
        return None
    if not min(lengths):
        raise ValueError(
            f"find_label_issues: a process received no sample (samples per process: {lengths}): the loader has fewer"
            " batches than processes. Run it on fewer devices."
        )
    gathered: Dict[str, Tensor] = {}
    for name, value in local.items():
        if name == "invalid":
            gathered[name] = strategy.all_gather(value).reshape(-1).cpu()
            continue
        # gloo gathers no bool tensors: flags travel as bytes.
        padded = torch.zeros((max(lengths), *value.shape[1:]), dtype=torch.uint8 if value.dtype == torch.bool
                             else value.dtype, device=device)
        padded[:length] = value
        every = strategy.all_gather(padded).cpu().to(value.dtype)
        gathered[name] = torch.cat([every[rank, :count] for rank, count in enumerate(lengths)])
    return gathered


def _label_issues(found: Dict[str, Tensor], cut_off: str) -> LabelIssues:
    score, margin = found["score"], found.get("margin")
    # Ascending; NaN (a sample no training step saw) sorts last.
    ranking = torch.sort(score if margin is None else margin, stable=True).indices
    if cut_off == "margin":
        is_issue = margin < 0  # type: ignore[operator]
    elif cut_off == "misclassified":
        is_issue = found["predicted"] != found["given"]
    elif cut_off == "cleanlab":
        # n_jobs=1: cleanlab's worker pool relies on fork-inherited globals, which a spawned process (ddp_spawn, a
        # spawned worker) does not have.
        flags = _import_cleanlab().find_label_issues(found["given"].numpy(), found["probabilities"].double().numpy(),
                                                     n_jobs=1)
        is_issue = torch.as_tensor(flags, dtype=torch.bool)
    else:
        is_issue = torch.zeros_like(score, dtype=torch.bool)
    return LabelIssues(
        index=found["index"], position=found["position"], given=found["given"], score=score,
        predicted=found["predicted"], suggested=found["suggested"], is_issue=is_issue, ranking=ranking,
        cut_off=cut_off, margin=margin, probabilities=found.get("probabilities"),
    )


SUSPECT_COLUMNS = ("index", "position", "given", "suggested", "score")


def log_top_suspects(trainer: "pl.Trainer", found: LabelIssues, count: int) -> None:
    """The ``count`` most suspect flagged samples as a table, from global rank 0: TensorBoard's Text tab
    (``adalabel/label_issues``, a markdown table) for a TensorBoard logger; for the other loggers, or none,
    ``<log_dir>/label_issues/top_suspects.csv``.

    Example:
        >>> print(_suspects_markdown([{"index": 7, "position": 0, "given": 3, "suggested": 5, "score": 0.012}]))
        | index | position | given | suggested | score |
        |---|---|---|---|---|
        | 7 | 0 | 3 | 5 | 0.0120 |
    """
    if not trainer.is_global_zero:
        return
    rows = found.rows(only_issues=True)[:count]
    writes_file = not trainer.loggers
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text") and hasattr(experiment, "add_figure"):  # TensorBoard's SummaryWriter
            experiment.add_text("adalabel/label_issues", _suspects_markdown(rows), global_step=trainer.global_step)
        else:
            writes_file = True
    if writes_file:
        directory = os.path.join(trainer.log_dir or trainer.default_root_dir, "label_issues")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "top_suspects.csv"), "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(SUSPECT_COLUMNS)
            writer.writerows([row[name] for name in SUSPECT_COLUMNS] for row in rows)


def _suspects_markdown(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(SUSPECT_COLUMNS) + " |", "|---" * len(SUSPECT_COLUMNS) + "|"]
    lines += [f"| {row['index']} | {row['position']} | {row['given']} | {row['suggested']} | {row['score']:.4f} |"
              for row in rows]
    return "\n".join(lines)
