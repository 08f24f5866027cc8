"""``AdaLabel``: the Lightning callback that owns the label matrix and decides when it is refreshed."""

import itertools
import math
import os
import sys
from dataclasses import replace
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_adalabel.engine import LabelMatrixEngine
from lightning_adalabel.engine_factory import check_engine_options, new_engine
from lightning_adalabel.hand_over import HandOverFile
from lightning_adalabel.inputs import (
    _arg_validation,
    _format,
    _tensor_validation,
    check_values,
    count_unusable_logits,
    invalid_targets_message,
)
from lightning_adalabel.label_matrix_logging import log_heatmap_and_pairs
from lightning_adalabel.module import AdaLabelMixin
from lightning_adalabel.presets import PRESETS, Preset, resolve_preset
from lightning_adalabel.state_versions import CALLBACK_STATE_VERSION, read_callback_state
from lightning_adalabel.statistics import statistic_totals
from lightning_adalabel.training_margins import BatchMargins, TrainingMargins, batch_margins
from lightning_adalabel.validation import (
    REDUCTIONS,
    check_bool,
    check_choice,
    check_class_names,
    check_int,
    validate_label_matrix,
    warn_deprecated,
)

PresetName = Literal["alr", "ols", "ols_official", "label_smoothing", "fixed", "none"]
SamplePolicy = Literal["misclassified", "all", "correct", "none"]
Estimator = Literal["mean", "geometric", "confusion"]
LossMode = Literal["decoupled", "mixed", "ce"]
Prior = Literal["uniform", "previous"]
Start = Literal["uniform", "zeros"]
EmptyRows = Literal["keep", "uniform"]

# Distinct state keys for Lightning's duplicate check only (see AdaLabel.state_key).
_validation_keys = itertools.count()


class AdaLabel(pl.Callback):
    r"""Adaptive Label Regularization (ALR) for any classifier trained with Lightning.

    The callback keeps a ``K x K`` label matrix ``Q``. After every training batch it accumulates the model's
    predictions on wrong classes (no gradient, float32, on the logits' device, no host sync); at the end of each
    training epoch (or every ``refresh_every_n_steps`` optimizer steps) it all-reduces those statistics across
    processes and refreshes ``Q``. The module, an :class:`~lightning_adalabel.AdaLabelMixin`, trains with
    ``self.adalabel_loss(logits, y)``, whose soft part comes from ``Q[y]``.

    Args:
        preset: ``"alr"`` (default), ``"ols"`` (Online Label Smoothing), ``"ols_official"`` (OLS as its official
            code runs it), ``"label_smoothing"``, ``"fixed"`` or ``"none"`` (plain cross-entropy), see
            :data:`~lightning_adalabel.PRESETS`; or a :class:`~lightning_adalabel.Preset` of your own. The
            arguments below override it.
        num_classes: K; inferred from the first batch's logits when ``None``.
        alpha: weight of the soft part of the loss.
        samples: which samples feed the statistics: ``"misclassified"``, ``"all"``, ``"correct"`` or ``"none"``.
        estimator: ``"mean"``, ``"geometric"`` or ``"confusion"`` (hard counts of the top wrong class).
        momentum: in (0, 1]; each refreshed row becomes ``(1 - momentum) * old + momentum * estimate``.
        loss: ``"decoupled"`` (CE + alpha x residual CE), ``"mixed"`` (soft-target CE) or ``"ce"``.
        include_diagonal: keep the true class in the statistics (full softmax) instead of the residual.
        refresh_every_n_steps: refresh every N optimizer steps instead of at each training epoch's end.
        prior: what a refreshed row is shrunk toward: ``"uniform"`` (the initial row) or ``"previous"`` (the row
            before the refresh).
        prior_strength: the prior's pseudo-count per sample of the class seen since the last refresh (0, the
            default: no shrinkage). Row k becomes ``(S_k + m_k prior_k) / (n_k + m_k)`` with ``m_k`` this times
            the samples of class k seen, so a row estimated from a few misclassified samples among many stays
            near the prior.
        start: ``"uniform"`` (default) or ``"zeros"``: Q starts all-zero (no soft loss until the first refresh).
        empty_rows: ``"keep"`` (default) or ``"uniform"``: what a refresh does to the row of a class without samples.
        ignore_index: class-index targets equal to it enter neither the loss nor the statistics (torch's default
            -100, the padding label of Hugging Face tokenizers).
        initial_matrix: start Q from this K x K matrix (a tensor, or a ``.pt``/``.csv`` path written by
            :func:`~lightning_adalabel.save_label_matrix`) instead of the uniform one. With ``preset="fixed"``
            (or ``samples="none"``) Q stays that matrix for the whole run: a learned Q reused as fixed soft labels.
        log_label_matrix: at each refresh, log a heatmap of Q and its ``top_pairs`` most correlated class pairs
            (TensorBoard figure and text; with other loggers a PNG and a CSV under ``<log_dir>/label_matrix/``).
        class_names: names for the heatmap's axes and the pairs (default: class indices).
        top_pairs: how many of the largest off-diagonal entries of Q to log.
        top_k: keep only the ``top_k`` largest entries of each row of Q (plus a uniform remainder) and bounded
            statistics, for label sets too large for a ``K x K`` matrix (the sparse engine,
            :mod:`lightning_adalabel.sparse_label_matrix`); ``None`` (default): the dense Q
            (:mod:`lightning_adalabel.label_matrix`). Either way :attr:`engine` answers the same
            calls; ``engine.to_dense()`` is Q as a ``K x K`` tensor (with ``top_k``, for small K only); the heatmap
            is logged up to K = 64 with ``top_k``, the top pairs at any K.
        compile_loss: compute each training batch's loss and statistics as one ``torch.compile``'d graph (a C++
            compiler on the CPU, Triton on a GPU): the same values, for a compilation of seconds on the first batch.
            It pays where the eager cost is the number of operations, not their arithmetic (measured in
            ``docs/benchmarks.md``). See :mod:`lightning_adalabel.compiled_loss`.
        num_training_samples: the size of the training set, for :attr:`training_margins` when the training step
            passes sample indices (``adalabel_loss(logits, y, index=index)``); ``None`` (default): the length of the
            training loader's data set. Needed only for a data set without a length (an ``IterableDataset``).

    Example::

        model = MyClassifier()  # class MyClassifier(AdaLabelMixin, LightningModule)
        trainer = Trainer(max_epochs=10, callbacks=[AdaLabel()])
        trainer.fit(model, train_dataloaders=train_loader)
    """

    def __init__(
        self,
        preset: Union[PresetName, Preset] = "alr",
        num_classes: Optional[int] = None,
        alpha: Optional[float] = None,
        samples: Optional[SamplePolicy] = None,
        estimator: Optional[Estimator] = None,
        momentum: Optional[float] = None,
        loss: Optional[LossMode] = None,
        include_diagonal: Optional[bool] = None,
        refresh_every_n_steps: Optional[int] = None,
        prior: Optional[Prior] = None,
        prior_strength: Optional[float] = None,
        start: Optional[Start] = None,
        empty_rows: Optional[EmptyRows] = None,
        ignore_index: int = -100,
        initial_matrix: Union[Tensor, str, "os.PathLike[str]", None] = None,
        log_label_matrix: bool = False,
        class_names: Optional[Sequence[str]] = None,
        top_pairs: int = 10,
        top_k: Optional[int] = None,
        compile_loss: bool = False,
        num_training_samples: Optional[int] = None,
    ) -> None:
        check_int("num_classes", num_classes, minimum=2, allow_none=True, hint=" (None: inferred from the logits)")
        check_int("refresh_every_n_steps", refresh_every_n_steps, minimum=1, allow_none=True,
                  hint=" (None: refresh at each training epoch's end)")
        check_bool("include_diagonal", include_diagonal, allow_none=True)
        check_bool("log_label_matrix", log_label_matrix)
        check_bool("compile_loss", compile_loss)
        check_int("top_pairs", top_pairs, minimum=0)
        check_int("top_k", top_k, minimum=1, allow_none=True, hint=" (None: the dense K x K label matrix)")
        check_int("num_training_samples", num_training_samples, minimum=1, allow_none=True,
                  hint=" (None: the length of the training data set)")
        _arg_validation(ignore_index, "mean")
        overrides = dict(alpha=alpha, samples=samples, estimator=estimator, momentum=momentum, loss=loss,
                         include_diagonal=include_diagonal, prior=prior, prior_strength=prior_strength, start=start,
                         empty_rows=empty_rows)
        self.preset_name, self.preset = _resolve(preset, overrides)
        self.num_classes = num_classes
        self.top_k = top_k
        self.compile_loss = compile_loss
        check_engine_options(self.preset.engine_settings(), top_k, initial_matrix)
        self.refresh_every_n_steps = refresh_every_n_steps
        self.ignore_index = ignore_index
        self.initial_matrix = self._initial_matrix(initial_matrix)
        self.log_label_matrix = log_label_matrix
        self.class_names = None if class_names is None else [str(name) for name in class_names]
        check_class_names(self.class_names, self.num_classes)
        self.top_pairs = top_pairs
        self._engine: Optional[LabelMatrixEngine] = None
        self.num_training_samples = num_training_samples
        # Like Q, the margins are what the callback learned: they persist across fits (and checkpoints).
        self._margins: Optional[TrainingMargins] = None
        self._margins_restored = False
        self._margins_epoch_open = False  # margins added since the last epoch's end
        self._in_training_step = False
        self._stage: Optional[str] = None
        self._start_fit()
        # ddp_spawn / ddp_notebook train in child processes: rank 0 leaves its state there for this callback.
        self._hand_over = HandOverFile()

    def _initial_matrix(self, initial_matrix: Union[Tensor, str, "os.PathLike[str]", None]) -> Optional[Tensor]:
        if initial_matrix is None:
            if self.preset_name == "fixed":
                raise ValueError(
                    "Preset 'fixed' trains with a given label matrix: pass `initial_matrix=` (a K x K tensor or the"
                    " path of one written by save_label_matrix)."
                )
            return None
        from lightning_adalabel.label_matrix_io import load_label_matrix

        matrix = initial_matrix if isinstance(initial_matrix, Tensor) else load_label_matrix(initial_matrix)
        validate_label_matrix(matrix, self.num_classes, self.preset.include_diagonal)
        self.num_classes = matrix.shape[0]
        return matrix.detach().to("cpu", torch.float32).clone()

    def _start_fit(self) -> None:
        """Per-fit state: every fit starts with empty statistics and its own refresh schedule (a checkpoint that is
        resumed from restores them after this, in ``load_state_dict``)."""
        self._pending: List[Any] = []  # the statistics of this step's losses, for the engine to add
        self._pending_margins: List[BatchMargins] = []  # and their margins, when the step passed indices
        self._margins_sized = False  # whether this fit's training set size was compared with the margins'
        self._first_batch_checked = False
        self._loss_seen_in_training = False
        self._loss_seen_without_grad = False
        self._last_refresh_step = 0
        # The epoch whose statistics wait for its end-of-epoch refresh (None: nothing waits).
        self._statistics_epoch: Optional[int] = None
        if self._engine is not None:
            self._engine.reset_statistics()

    @property
    def engine(self) -> Optional[LabelMatrixEngine]:
        """The engine that holds Q and its statistics (:class:`~lightning_adalabel.engine.LabelMatrixEngine`):
        ``engine.to_dense()`` is Q, ``engine.rows(classes)`` its soft labels. ``None`` until the first batch (or a
        checkpoint) sets K."""
        self._collect_spawned_state()
        return self._engine

    @engine.setter
    def engine(self, value: Optional[LabelMatrixEngine]) -> None:
        self._engine = value

    @property
    def training_margins(self) -> Optional[TrainingMargins]:
        """Each training sample's logit margin summed over the run
        (:class:`~lightning_adalabel.training_margins.TrainingMargins`; ``training_margins.mean()`` is the average),
        which :func:`~lightning_adalabel.find_label_issues` ranks by. ``None`` unless the training steps passed the
        samples' indices: ``self.adalabel_loss(logits, y, index=index)``, or the mixin's default ``training_step``
        on ``(x, y, index)`` batches (:class:`~lightning_adalabel.IndexedDataset`)."""
        self._collect_spawned_state()
        return self._margins

    @property
    def label_matrix(self) -> Optional[LabelMatrixEngine]:
        """Deprecated name of :attr:`engine`."""
        warn_deprecated("AdaLabel.label_matrix", "AdaLabel.engine (and engine.to_dense() for Q)")
        return self.engine

    # ---- the loss side, called by AdaLabelMixin.adalabel_loss -------------------------------------------------

    def loss(self, pl_module: "pl.LightningModule", logits: Tensor, target: Tensor, reduction: str = "mean",
             index: Optional[Tensor] = None) -> Tensor:
        """The configured loss for a batch; during training, the batch is also queued for the statistics (and, with
        the samples' ``index``, for the training margins)."""
        check_choice("reduction", reduction, REDUCTIONS)  # ignore_index was checked once, in __init__
        engine = self._engine_for(logits, target)
        if index is not None:
            _check_index(index, logits, target)
        # A training loss is one computed in the Trainer's training step, with gradients on (a loss under no_grad is
        # not trained on): the Trainer's state, not `pl_module.training`, which a module in eval mode (linear
        # probing, frozen BatchNorm) turns off while it trains. Each call counts (two heads: two samples a position).
        training = self._in_training_step and torch.is_grad_enabled()
        self._loss_seen_without_grad |= self._in_training_step and not training
        if not training:
            return engine.loss_only(logits, target, self.ignore_index, self.preset.loss, self.preset.alpha, reduction)
        if not self._first_batch_checked:
            self._check_first_batch(logits, target)  # reads values: once per fit, on the first training batch
            self._first_batch_checked = True
        # The statistics come from the loss's own softmax where they can. Only queued: on_train_batch_end adds them.
        # That keeps the loss a pure function (no in-place update inside a user's compiled or autocast region), and
        # counts a batch only once its training step has completed.
        value, statistics = engine.loss_and_statistics(
            logits, target, self.ignore_index, self.preset.loss, self.preset.alpha, reduction
        )
        self._pending.append(statistics)
        if index is not None:
            margins = self._margins_for(pl_module, logits.device)
            self._pending_margins.append(batch_margins(logits, target, index, margins.num_samples, self.ignore_index))
        return value

    def _margins_for(self, pl_module: "pl.LightningModule", device: torch.device) -> TrainingMargins:
        margins = self._margins
        if margins is not None and self._margins_sized and margins.device == device:
            return margins  # every batch after a fit's first
        num_samples = self.num_training_samples or _training_set_size(pl_module.trainer)
        self._margins_sized = True
        if margins is not None and margins.num_samples != num_samples:
            rank_zero_warn(
                f"AdaLabel's training margins were kept for {margins.num_samples} samples, but this fit's training set"
                f" has {num_samples}: they start again for the new set."
            )
            margins = None
        if margins is None:
            with torch.inference_mode(False):
                margins = self._margins = TrainingMargins(num_samples, device)
        elif margins.device != device:  # restored from a checkpoint, on the CPU
            margins.to(device)
        return margins

    def _check_first_batch(self, logits: Tensor, target: Tensor) -> None:
        """Invalid targets are refused at once (later ones at the next refresh); NaN or +inf logits are told at once
        and then left out of the statistics as on any later batch (-inf entries are masks, as in torch)."""
        check_values(logits, target, self.ignore_index)
        unusable = int(count_unusable_logits(_format(logits.detach(), target.detach(), self.ignore_index)))
        if unusable:
            rank_zero_warn(
                f"{unusable} of {logits.numel() // logits.shape[1]} positions of the first training batch have NaN or"
                " +Inf logits (or -inf at their target class). F.cross_entropy gives them a NaN or infinite loss, and"
                " AdaLabel leaves them out of the label statistics. Check the inputs' normalisation and the model's"
                " initialisation."
            )

    def _engine_for(self, logits: Tensor, target: Tensor) -> LabelMatrixEngine:
        known = self._engine.num_classes if self._engine is not None else self.num_classes
        if known is None and logits.ndim >= 2 and logits.shape[1] < 2:
            raise ValueError(
                f"The logits have shape {tuple(logits.shape)}: {logits.shape[1]} class on dim 1. A label matrix needs"
                " K >= 2 classes, one logit each, as F.cross_entropy takes them. For a binary task return two logits"
                " (e.g. `torch.cat([-z, z], dim=1) / 2`, or an output layer of size 2)."
            )
        _tensor_validation(logits, target, known)
        # Created or moved in validate/test/predict, these must not be inference tensors: training adds to them.
        with torch.inference_mode(False):
            if self._engine is None:
                num_classes = logits.shape[1]
                check_class_names(self.class_names, num_classes)
                self._engine = self._new_engine(num_classes, logits.device)
            if self._engine.device != logits.device:  # e.g. restored from a checkpoint, which loads on the CPU
                self._engine.to(logits.device)
        return self._engine

    def _new_engine(self, num_classes: int, device: Union[str, torch.device]) -> LabelMatrixEngine:
        return new_engine(num_classes, self.preset.engine_settings(), self.top_k, self.initial_matrix, device,
                          self.compile_loss)

    # ---- hooks -------------------------------------------------------------------------------------------------

    @property
    @override
    def state_key(self) -> str:
        # Lightning refuses two callbacks with one state key when a Trainer is built, with a message about state
        # keys. Two AdaLabel callbacks (or one listed twice) are refused in `setup` instead, with one that says why:
        # for that check alone each answer is a new key. Checkpoints use the class name, as Lightning's default does.
        if sys._getframe(1).f_code.co_name == "_validate_callbacks_list":
            return f"{type(self).__qualname__}#{next(_validation_keys)}"
        return type(self).__qualname__

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not isinstance(pl_module, AdaLabelMixin):
            raise TypeError(
                f"AdaLabel needs a LightningModule that inherits AdaLabelMixin; {type(pl_module).__name__} does not."
                f" Declare `class {type(pl_module).__name__}(AdaLabelMixin, LightningModule)` and compute the training"
                " loss with `self.adalabel_loss(logits, y)`."
            )
        instances = [callback for callback in trainer.callbacks if isinstance(callback, AdaLabel)]
        if len(instances) > 1:
            raise RuntimeError(
                f"The Trainer has {len(instances)} AdaLabel callbacks, but a module trains with one label matrix: keep"
                " one. To compare presets, train one model per preset, each with its own Trainer and AdaLabel."
            )
        pl_module._adalabel_callback = self
        self._stage = stage  # what a checkpoint restored next is for (see load_state_dict)
        # A process forked for this fit (ddp_notebook) continues from the state the previous spawned fit left.
        self._collect_spawned_state()
        if stage == "fit":
            self._start_fit()

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # A restored label matrix arrives on the CPU; it must be on the module's device before a refresh can
        # all-reduce it (NCCL refuses CPU tensors), which may happen before the first loss moves it.
        if self._engine is not None:
            self._engine.to(pl_module.device)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._settle_restored_margins(trainer)
        # Here, not at fit start: the training data are loaded by now (asking earlier would load them out of
        # Lightning's order, before a resumed loader's state is restored).
        every = self.refresh_every_n_steps
        if every is not None and self.preset.samples != "none" and every > trainer.estimated_stepping_batches:
            rank_zero_warn(
                f"AdaLabel(refresh_every_n_steps={every}) is longer than this run ({trainer.estimated_stepping_batches}"
                " optimizer steps), so the label matrix would never be refreshed. Lower refresh_every_n_steps, or"
                " leave it None to refresh at the end of each training epoch."
            )

    @override
    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._settle_restored_margins(trainer)  # find_label_issues(ckpt_path=...) sums the open epoch across ranks

    def _settle_restored_margins(self, trainer: "pl.Trainer") -> None:
        if self._margins_restored and trainer.global_rank != 0:
            # A checkpoint holds rank 0's sums of an unfinished epoch; every process restored them, but they are
            # rank 0's to add at the epoch's end (the other processes' were not saved).
            self._margins.drop_open_epoch()  # type: ignore[union-attr]
        self._margins_restored = False

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.world_size > 1:
            self._check_even_ranks(trainer, pl_module)

    def _check_even_ranks(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Every rank must train on the same number of batches: a rank that runs out first would enter the refresh's
        all-reduce while the others still all-reduce gradients, and the collectives would pair wrongly or hang. The
        ranks are in step at an epoch's start, so one all-gather of the lengths here is safe (once an epoch)."""
        batches = trainer.num_training_batches
        local = torch.tensor([batches if math.isfinite(batches) else -1.0], device=pl_module.device)
        per_rank = [int(value) for value in trainer.strategy.all_gather(local).reshape(-1).tolist()]
        if -1 in per_rank or len(set(per_rank)) == 1:
            return  # unknown lengths (iterable data) cannot be compared in advance; see docs/input_contract.md
        raise RuntimeError(
            f"The training processes have different numbers of batches this epoch (per rank: {per_rank}). DDP needs"
            " the same number on every rank: each step all-reduces the gradients, and AdaLabel's refresh all-reduces"
            " its statistics. Give every rank a sampler of the same length (e.g. DistributedSampler, which pads the"
            " shards), or set Trainer(limit_train_batches=...) to the smallest."
        )

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # Resumed from a checkpoint written on an epoch's last batch, Lightning skips that epoch's end and with it
        # the refresh: do it before the next epoch's first loss, as an uninterrupted run would have. The test is the
        # batch index, not the epoch number: a job resumed in mid-epoch may carry on under the next epoch's number.
        if self._statistics_epoch is not None and batch_idx == 0:
            self._refresh(trainer, pl_module)
        if self._margins is not None and self._margins_epoch_open and batch_idx == 0:
            self._end_margins_epoch(trainer)
        # Only the losses of a training step are added, at its end: not those of a step that never ended, nor those
        # computed while this callback's hooks were off (the tuner's trial steps).
        self._pending = []
        self._pending_margins = []
        self._in_training_step = True

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._in_training_step = False
        pending, self._pending = self._pending, []
        if pending:
            self._loss_seen_in_training = True
        elif outputs and not self._loss_seen_in_training:
            # The step returned a loss that was not ours. A step that returned None (a skipped batch, or manual
            # optimization) proves nothing yet: _refresh checks that some step of the fit called adalabel_loss.
            raise RuntimeError(self._no_adalabel_loss_message(pl_module))
        for statistics in pending:  # one entry per adalabel_loss call of this step, usually one
            self._engine.add(statistics)  # type: ignore[union-attr]
        pending_margins, self._pending_margins = self._pending_margins, []
        for margins in pending_margins:
            self._margins.add(margins)  # type: ignore[union-attr]
            self._margins_epoch_open = True
        if self.refresh_every_n_steps is None:
            self._statistics_epoch = trainer.current_epoch
        else:
            # global_step counts optimizer steps, as max_steps does: it never moves between the micro-batches of an
            # accumulated step, and moves by two a batch with two optimizers, so the test is whether it passed a
            # multiple of N, not whether it equals one.
            every = self.refresh_every_n_steps
            if trainer.global_step // every > self._last_refresh_step // every:
                self._refresh(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning calls this hook also when max_steps, max_time or `should_stop` end a fit in mid-epoch. An epoch
        # cut short is not over: its statistics wait (and are checkpointed) for its real end, so that a job resumed
        # from here refreshes where the uninterrupted run does.
        if not _ran_to_the_end_of_its_data(trainer):
            return
        if self._margins is not None and self._margins_epoch_open:
            self._end_margins_epoch(trainer)
        if self.refresh_every_n_steps is None:
            self._refresh(trainer, pl_module)

    def _end_margins_epoch(self, trainer: "pl.Trainer") -> None:
        self._margins_epoch_open = False
        self._margins.end_epoch(StrategyCollective(trainer.strategy))  # type: ignore[union-attr]

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # The interrupted step never ended: its losses are not statistics, and a checkpoint written now (by a
        # handler of this exception) holds the state after the last step that did.
        self._in_training_step = False
        self._pending = []
        self._pending_margins = []

    def _no_adalabel_loss_message(self, pl_module: "pl.LightningModule") -> str:
        if self._loss_seen_without_grad:
            return (
                f"{type(pl_module).__name__}.training_step called `self.adalabel_loss` only under torch.no_grad()"
                " (or inference mode), so no training loss came from it and AdaLabel has nothing to learn from."
                " Compute the loss you train with as `self.adalabel_loss(logits, y)` with gradients on."
            )
        return (
            f"{type(pl_module).__name__}.training_step did not call `self.adalabel_loss(logits, y)`, so AdaLabel"
            " has nothing to learn from. Replace the training loss (e.g. `F.cross_entropy(logits, y)`) with it."
        )

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        spawned = not self._hand_over.in_owner
        if spawned and stage == "fit" and trainer.global_rank == 0 and self._engine is not None:
            self._hand_over.leave(self.state_dict())

    def _refresh(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last_refresh_step = trainer.global_step
        self._statistics_epoch = None
        engine = self._engine
        if engine is None:
            # Training steps ran (a refresh is only due after one) and none called adalabel_loss, e.g. every step
            # returned None or optimised manually with another loss.
            raise RuntimeError(self._no_adalabel_loss_message(pl_module))
        tallies = engine.refresh(StrategyCollective(trainer.strategy))
        entropy = engine.mean_entropy()
        counted, seen, nonfinite, invalid = statistic_totals(tallies)
        # One host sync per refresh, never per batch. Every rank reads the same all-reduced totals, so every rank
        # raises together below (none is left waiting in a collective).
        summary = torch.stack([entropy, counted / seen.clamp_min(1.0), nonfinite, invalid, seen]).tolist()
        if summary[3] > 0:
            raise ValueError(invalid_targets_message(
                int(summary[3]), int(summary[3] + summary[4]), None, engine.num_classes, self.ignore_index
            ))
        if summary[4] == 0 and not self._loss_seen_in_training:  # the engine may come from validation alone
            raise RuntimeError(self._no_adalabel_loss_message(pl_module))
        metrics = {"adalabel/entropy": summary[0], "adalabel/counted_fraction": summary[1],
                   "adalabel/nonfinite": summary[2]}
        # Once per refresh, at the step the heatmap files are named after: through self.log, a value logged in a
        # hook would be logged again at every step until the epoch ends, and a CSV could not tell when Q changed.
        # The values are identical on every rank; the loggers write from global rank 0. callback_metrics makes them
        # visible to ModelCheckpoint/EarlyStopping monitors and to the progress bar's trainer.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        if self.log_label_matrix:  # heatmap and top class pairs of the new Q, written by global rank 0 only
            log_heatmap_and_pairs(trainer, engine, self.class_names, self.top_pairs)
        if summary[2] > 0:
            rank_zero_warn(
                f"AdaLabel left {int(summary[2])} training samples out of the label statistics because their logits"
                " held NaN or +Inf (or -inf at the target class). Training is diverging: lower the learning rate,"
                " clip gradients or check the inputs. (-inf at other classes is a mask and is fine.)"
            )

    # ---- checkpointing -----------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> Dict[str, Any]:
        engine = self.engine
        return {  # the format and its versions: lightning_adalabel.state_versions
            "version": CALLBACK_STATE_VERSION,
            "preset": self.preset_name,
            "config": self.preset.__dict__.copy(),
            "label_matrix": None if engine is None else engine.state_dict(),  # the engine's state, under its 0.1 name
            "last_refresh_step": self._last_refresh_step,
            "statistics_epoch": self._statistics_epoch,
            "top_k": self.top_k,
            "training_margins": None if self._margins is None else {
                **self._margins.state_dict(), "epoch_open": self._margins_epoch_open},
        }

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = read_callback_state(state_dict)
        try:
            self._check_saved_settings(saved)
        except ValueError as mismatch:
            if self._stage in (None, "fit"):
                raise
            # validate/test/predict need the model's weights, not the label statistics: another AdaLabel setting is
            # no reason to refuse the evaluation of a checkpoint. The training margins are the run's record of its
            # samples, whatever the settings: find_label_issues ranks by them.
            rank_zero_warn(f"{mismatch} {self._stage.capitalize()} goes on with this callback's own settings and label"
                           " matrix; the model's weights (and the training margins) come from the checkpoint.")
            self._restore_margins(saved["training_margins"])
            return
        engine_state = saved["label_matrix"]
        if engine_state is not None:
            num_classes = engine_state.get("num_classes") if isinstance(engine_state, dict) else None
            check_int("the checkpoint's num_classes", num_classes, minimum=2)
            check_class_names(self.class_names, num_classes)
            device = self._engine.device if self._engine is not None else torch.device("cpu")
            with torch.inference_mode(False):  # restored by validate/test too: training adds to these tensors
                restored = self._new_engine(num_classes, device)
                restored.load_state_dict(engine_state)  # validates shapes and values before anything is replaced
        margins = self._read_margins(saved["training_margins"])  # validated before anything is replaced, as Q
        self._engine = None if engine_state is None else restored
        self._last_refresh_step = saved["last_refresh_step"]
        self._statistics_epoch = saved["statistics_epoch"]
        self._restore_margins(saved["training_margins"], margins)
        # Restored mid-fit (the tuner's finders roll the run back after their trial steps, with this callback
        # switched off): what those steps queued or checked belongs to steps that no longer happened.
        self._pending = []
        self._first_batch_checked = self._loss_seen_in_training = False

    def _read_margins(self, state: Optional[Dict[str, Any]]) -> Optional[TrainingMargins]:
        if state is None:
            return None
        device = self._margins.device if self._margins is not None else torch.device("cpu")
        with torch.inference_mode(False):  # restored by predict too; a later fit adds to them
            return TrainingMargins.from_state_dict(state, device)

    def _restore_margins(self, state: Optional[Dict[str, Any]], margins: Optional[TrainingMargins] = None) -> None:
        """The checkpoint's margins, or none where it kept none (as its Q replaces the callback's)."""
        self._pending_margins = []
        self._margins_sized = False
        if state is not None and margins is None:
            margins = self._read_margins(state)
        self._margins = margins
        self._margins_epoch_open = state is not None and bool(state.get("epoch_open", False))
        self._margins_restored = state is not None

    def _check_saved_settings(self, saved: Dict[str, Any]) -> None:
        """Raise a ValueError naming what differs unless the state (read by
        :func:`~lightning_adalabel.state_versions.read_callback_state`) was written with this callback's settings."""
        # A Preset given as an object ("custom") is known by its fields alone, not by the name of the one it came from.
        named = "custom" not in (saved["preset"], self.preset_name)
        saved_settings = {**({"preset": saved["preset"]} if named else {}), **saved["config"]}
        settings = {**({"preset": self.preset_name} if named else {}), **self.preset.__dict__}
        if saved_settings != settings:
            differences = ", ".join(
                f"{key}={saved_settings.get(key)!r} (the callback has {value!r})"
                for key, value in settings.items() if saved_settings.get(key) != value
            )
            raise ValueError(
                f"This checkpoint's AdaLabel state was written by preset {saved['preset']!r} with other settings:"
                f" {differences}. Resume with the AdaLabel settings the checkpoint was written with, or start a new"
                " run without `ckpt_path`."
            )
        if saved["top_k"] != self.top_k:
            raise ValueError(
                f"This checkpoint's AdaLabel state was written with top_k={saved['top_k']!r}, but the callback"
                f" has top_k={self.top_k!r}. Resume with the same AdaLabel settings, or start a new run."
            )
        engine_state = saved["label_matrix"]
        num_classes = engine_state.get("num_classes") if isinstance(engine_state, dict) else None
        if engine_state is not None and self.num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"This checkpoint's label matrix has {num_classes} classes but AdaLabel(num_classes="
                f"{self.num_classes}). Resume with the model and num_classes the checkpoint was trained with."
            )

    def _collect_spawned_state(self) -> None:
        """Take over the state that rank 0 of a ddp_spawn/ddp_notebook fit left (in the launching process, or in
        the processes of the next such fit)."""
        state = self._hand_over.take()
        if state is not None:
            self.load_state_dict(state)

    def __getstate__(self) -> Dict[str, Any]:
        # Pickled for the processes of a ddp_spawn fit: bring along what the previous spawned fit learned.
        self._collect_spawned_state()
        state = self.__dict__.copy()
        state["_pending"] = []  # batches of an unfinished step are not state
        state["_pending_margins"] = []
        state["_in_training_step"] = False
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_in_training_step", False)  # pickled before these existed
        self.__dict__.setdefault("_loss_seen_without_grad", False)
        self.__dict__.setdefault("_stage", None)
        for name, value in (("_margins", None), ("_margins_restored", False), ("_margins_epoch_open", False),
                            ("_pending_margins", []), ("num_training_samples", None), ("_margins_sized", False)):
            self.__dict__.setdefault(name, value)
        # Unpickled in the process that owns the original, this is a copy (copy.deepcopy, a sweep's clones), not the
        # callback of a ddp_spawn child: it hands its state over through a file of its own.
        hand_over = self.__dict__.get("_hand_over")
        if hand_over is None or hand_over.in_owner:
            self._hand_over = HandOverFile()


class StrategyCollective:
    """The refresh's :class:`~lightning_adalabel.engine.Collective` through the Trainer's strategy (DDP, FSDP, a
    single device, ...): each engine calls one of these once per refresh."""

    def __init__(self, strategy: "pl.strategies.Strategy") -> None:
        self.strategy = strategy

    def sum(self, tensor: Tensor) -> Tensor:
        return self.strategy.reduce(tensor, reduce_op="sum")

    def gather(self, tensor: Tensor) -> Tensor:
        return self.strategy.all_gather(tensor)


def _resolve(preset: Union[str, Preset], overrides: Dict[str, Any]) -> Tuple[str, Preset]:
    """``(name, preset)`` of ``AdaLabel(preset=...)`` with its overrides applied: a name of :data:`PRESETS`, or a
    :class:`Preset` (named after the entry of :data:`PRESETS` it equals, ``"custom"`` otherwise)."""
    if isinstance(preset, Preset):
        name = next((key for key, value in PRESETS.items() if value == preset), "custom")
        return name, replace(preset, **{key: value for key, value in overrides.items() if value is not None})
    check_choice("preset", preset, PresetName.__args__)  # type: ignore[attr-defined]
    return preset, resolve_preset(preset, **overrides)


def _check_index(index: Tensor, logits: Tensor, target: Tensor) -> None:
    """``adalabel_loss(..., index=)``: one int index per sample of a batch of ``(N, K)`` logits and ``(N,)`` class
    targets (shapes and dtypes only: free)."""
    if not isinstance(index, Tensor) or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        kind = getattr(index, "dtype", type(index).__name__)
        raise ValueError(f"adalabel_loss(index=...) takes the samples' indices as an integer tensor, got {kind}.")
    if target.is_floating_point() or logits.ndim != 2:
        layout = "probability targets (MixUp, CutMix)" if target.is_floating_point() else \
            f"logits of shape {tuple(logits.shape)} (a token layout)"
        raise ValueError(
            f"adalabel_loss(index=...) tracks each sample's margin for its given label, which needs (N, K) logits and"
            f" (N,) class-index targets; this batch has {layout}. Leave `index` out for such batches (the margins are"
            " averaged over the steps that passed it); find_label_issues then ranks by the trained model alone."
        )
    if tuple(index.shape) != (target.shape[0],):
        raise ValueError(
            f"adalabel_loss(index=...) needs one index per sample: shape ({target.shape[0]},), got"
            f" {tuple(index.shape)}."
        )


def _training_set_size(trainer: "pl.Trainer") -> int:
    """The length of the training loader's data set (under DDP: the whole set, which the sampler shards)."""
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        source = f"a {type(loader).__name__}" + (f" over a {type(dataset).__name__}" if dataset is not None else "")
        raise ValueError(
            f"adalabel_loss(index=...) keeps a margin per training sample, but the size of the training set is not"
            f" known ({source}, without a length). Pass AdaLabel(num_training_samples=...), the number of training"
            " samples."
        ) from None


def _ran_to_the_end_of_its_data(trainer: "pl.Trainer") -> bool:
    """Whether the training epoch that is ending saw its last batch (limit_train_batches included), rather than
    being cut short by max_steps, max_time or `trainer.should_stop`."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches
