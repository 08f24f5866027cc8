"""``AdaLabel``: the Lightning callback that owns the label matrix and decides when it is refreshed."""

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_adalabel.label_matrix import (
    LabelMatrix,
    check_batch_values,
    statistic_totals,
    validate_label_matrix,
)
from lightning_adalabel.label_matrix_logging import log_label_matrix
from lightning_adalabel.losses import adalabel_loss
from lightning_adalabel.presets import Preset, resolve_preset

# The refresh scalars are computed from all-reduced statistics and are identical on every rank: syncing them again
# would only add collectives, so Lightning's advice to log them with sync_dist=True does not apply to them.
warnings.filterwarnings("ignore", message=r".*self\.log\('adalabel/.*sync_dist=True", category=UserWarning)


class AdaLabel(pl.Callback):
    r"""Adaptive Label Regularization (ALR) for any classifier trained with Lightning.

    The callback keeps a ``K x K`` label matrix ``Q``. After every training batch it accumulates the model's
    predictions on wrong classes (no gradient, float32, on the logits' device, no host sync); at the end of each
    training epoch (or every ``refresh_every_n_steps`` optimizer steps) it all-reduces those statistics across
    processes and refreshes ``Q``. The module, an :class:`~lightning_adalabel.AdaLabelMixin`, trains with
    ``self.adalabel_loss(logits, y)``, whose soft part comes from ``Q[y]``.

    Args:
        preset: ``"alr"`` (default), ``"ols"`` (Online Label Smoothing), ``"label_smoothing"`` or ``"none"``
            (plain cross-entropy); see :data:`~lightning_adalabel.PRESETS`. The arguments below override it.
        num_classes: K; inferred from the first batch's logits when ``None``.
        alpha: weight of the soft part of the loss.
        samples: which samples feed the statistics: ``"misclassified"``, ``"all"``, ``"correct"`` or ``"none"``.
        estimator: ``"mean"`` or ``"geometric"``.
        momentum: in (0, 1]; each refreshed row becomes ``(1 - momentum) * old + momentum * estimate``.
        loss: ``"decoupled"`` (CE + alpha x residual CE), ``"mixed"`` (soft-target CE) or ``"ce"``.
        include_diagonal: keep the true class in the statistics (full softmax) instead of the residual.
        refresh_every_n_steps: refresh every N optimizer steps instead of at each training epoch's end.
        initial_matrix: start Q from this K x K matrix (a tensor, or a ``.pt``/``.csv`` path written by
            :func:`~lightning_adalabel.save_label_matrix`) instead of the uniform one. With ``preset="fixed"``
            (or ``samples="none"``) Q stays that matrix for the whole run: a learned Q reused as fixed soft labels.
        log_label_matrix: at each refresh, log a heatmap of Q and its ``top_pairs`` most correlated class pairs
            (TensorBoard figure and text; with other loggers a PNG and a CSV under ``<log_dir>/label_matrix/``).
        class_names: names for the heatmap's axes and the pairs (default: class indices).
        top_pairs: how many of the largest off-diagonal entries of Q to log.

    Example::

        model = MyClassifier()  # class MyClassifier(AdaLabelMixin, LightningModule)
        trainer = Trainer(callbacks=[AdaLabel()])
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        preset: str = "alr",
        num_classes: Optional[int] = None,
        alpha: Optional[float] = None,
        samples: Optional[str] = None,
        estimator: Optional[str] = None,
        momentum: Optional[float] = None,
        loss: Optional[str] = None,
        include_diagonal: Optional[bool] = None,
        refresh_every_n_steps: Optional[int] = None,
        initial_matrix: Union[Tensor, str, "os.PathLike[str]", None] = None,
        log_label_matrix: bool = False,
        class_names: Optional[Sequence[str]] = None,
        top_pairs: int = 10,
    ) -> None:
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"`num_classes` must be an integer >= 2 or None (inferred), got {num_classes!r}.")
        if refresh_every_n_steps is not None and (
            isinstance(refresh_every_n_steps, bool) or not isinstance(refresh_every_n_steps, int)
            or refresh_every_n_steps < 1
        ):
            raise ValueError(
                f"`refresh_every_n_steps` must be a positive integer, or None to refresh at each epoch's end, got"
                f" {refresh_every_n_steps!r}."
            )
        self.preset_name = preset
        self.preset: Preset = resolve_preset(
            preset, alpha=alpha, samples=samples, estimator=estimator, momentum=momentum, loss=loss,
            include_diagonal=include_diagonal,
        )
        self.num_classes = num_classes
        self.refresh_every_n_steps = refresh_every_n_steps
        self.label_matrix: Optional[LabelMatrix] = None
        self._last_refresh_step = 0
        # The epoch whose statistics wait for its end-of-epoch refresh (None: nothing waits).
        self._statistics_epoch: Optional[int] = None
        self._pending: List[Tuple[Tensor, Tensor]] = []
        self._values_checked = False
        self.initial_matrix = self._initial_matrix(initial_matrix)
        self.log_label_matrix = log_label_matrix
        self.class_names = self._class_names(class_names)
        if isinstance(top_pairs, bool) or not isinstance(top_pairs, int) or top_pairs < 0:
            raise ValueError(f"`top_pairs` must be a non-negative integer, got {top_pairs!r}.")
        self.top_pairs = top_pairs

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

    def _class_names(self, class_names: Optional[Sequence[str]]) -> Optional[List[str]]:
        if class_names is None:
            return None
        names = [str(name) for name in class_names]
        if self.num_classes is not None and len(names) != self.num_classes:
            raise ValueError(f"Got {len(names)} `class_names` for {self.num_classes} classes; give one per class.")
        return names

    # ---- the loss side, called by AdaLabelMixin.adalabel_loss -------------------------------------------------

    def loss(self, pl_module: "pl.LightningModule", logits: Tensor, target: Tensor) -> Tensor:
        """The configured loss for a batch; during training, the batch is also kept for the statistics."""
        label_matrix = self._label_matrix_for(logits)
        if not self._values_checked:
            check_batch_values(logits.detach(), target, label_matrix.num_classes)
            self._values_checked = True
        if pl_module.training and torch.is_grad_enabled():
            self._pending.append((logits.detach(), target.detach()))
        return adalabel_loss(logits, target, label_matrix.matrix, self.preset.loss, self.preset.alpha)

    def _label_matrix_for(self, logits: Tensor) -> LabelMatrix:
        num_classes = logits.shape[-1] if logits.ndim else 0
        if self.label_matrix is None:
            if self.num_classes is not None and num_classes != self.num_classes:
                raise ValueError(self._num_classes_mismatch(num_classes, self.num_classes))
            self.label_matrix = LabelMatrix(
                num_classes,
                samples=self.preset.samples,
                estimator=self.preset.estimator,
                momentum=self.preset.momentum,
                include_diagonal=self.preset.include_diagonal,
                device=logits.device,
                initial_matrix=self.initial_matrix,
            )
        elif num_classes != self.label_matrix.num_classes:
            raise ValueError(self._num_classes_mismatch(num_classes, self.label_matrix.num_classes))
        if self.label_matrix.device != logits.device:  # e.g. restored from a checkpoint, which loads on the CPU
            self.label_matrix.to(logits.device)
        return self.label_matrix

    @staticmethod
    def _num_classes_mismatch(got: int, expected: int) -> str:
        return (
            f"AdaLabel expects logits with {expected} classes (the label matrix is {expected} x {expected}) but the"
            f" model returned {got}. Make `AdaLabel(num_classes=...)`, the model's output layer and the checkpoint"
            " you resume from agree."
        )

    # ---- hooks -------------------------------------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        from lightning_adalabel.module import AdaLabelMixin

        if not isinstance(pl_module, AdaLabelMixin):
            raise TypeError(
                f"AdaLabel needs a LightningModule that inherits AdaLabelMixin; {type(pl_module).__name__} does not."
                f" Declare `class {type(pl_module).__name__}(AdaLabelMixin, LightningModule)` and compute the training"
                " loss with `self.adalabel_loss(logits, y)`."
            )
        pl_module._adalabel_callback = self
        self._pending = []
        self._values_checked = False

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # A restored label matrix arrives on the CPU; it must be on the module's device before a refresh can
        # all-reduce it (NCCL refuses CPU tensors), which may happen before the first loss moves it.
        if self.label_matrix is not None:
            self.label_matrix.to(pl_module.device)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # Resumed from a checkpoint written on an epoch's last batch, Lightning skips that epoch's end and with it
        # the refresh: do it before the next epoch's first loss, as an uninterrupted run would have.
        if self._statistics_epoch is not None and self._statistics_epoch != trainer.current_epoch:
            self._refresh(trainer, pl_module, on_step=False)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._pending = self._pending, []
        if not pending and self.label_matrix is None:
            raise RuntimeError(
                f"{type(pl_module).__name__}.training_step did not call `self.adalabel_loss(logits, y)`, so AdaLabel"
                " has nothing to learn from. Replace the training loss (e.g. `F.cross_entropy(logits, y)`) with it."
            )
        for logits, target in pending:  # one entry per adalabel_loss call of this step, usually one
            self.label_matrix.update(logits, target)  # type: ignore[union-attr]
        if self.refresh_every_n_steps is None:
            self._statistics_epoch = trainer.current_epoch
        else:
            step = trainer.global_step
            # global_step only moves when the optimizer steps, so a refresh never falls between the micro-batches
            # of one accumulated step.
            if step != self._last_refresh_step and step % self.refresh_every_n_steps == 0:
                self._refresh(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.refresh_every_n_steps is None:
            self._refresh(trainer, pl_module, on_step=False)

    def _refresh(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", on_step: bool) -> None:
        self._last_refresh_step = trainer.global_step
        self._statistics_epoch = None
        if self.label_matrix is None:
            return
        stats = self.label_matrix.refresh(reduce=lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"))
        counted, seen, nonfinite = statistic_totals(stats)
        pl_module.log_dict(
            {
                "adalabel/entropy": torch.special.entr(self.label_matrix.matrix).sum(dim=1).mean(),
                "adalabel/counted_fraction": counted / seen.clamp_min(1.0),
                "adalabel/nonfinite": nonfinite,
            },
            on_step=on_step,
            on_epoch=not on_step,
            batch_size=1,
        )
        if self.log_label_matrix:  # heatmap and top class pairs of the new Q, written by global rank 0 only
            log_label_matrix(trainer, self.label_matrix.matrix, self.class_names, self.top_pairs)
        if nonfinite > 0:  # one host sync per refresh, never per batch
            rank_zero_warn(
                f"AdaLabel left {int(nonfinite)} training samples out of the label statistics because their logits were"
                " NaN or Inf. Training is diverging: lower the learning rate, clip gradients or check the inputs."
            )

    # ---- checkpointing -----------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "preset": self.preset_name,
            "config": self.preset.__dict__.copy(),
            "label_matrix": None if self.label_matrix is None else self.label_matrix.state_dict(),
            "last_refresh_step": self._last_refresh_step,
            "statistics_epoch": self._statistics_epoch,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict["preset"] != self.preset_name or state_dict["config"] != self.preset.__dict__:
            raise ValueError(
                f"This checkpoint's AdaLabel state was written by preset {state_dict['preset']!r} with"
                f" {state_dict['config']}, but the callback is preset {self.preset_name!r} with {self.preset.__dict__}."
                " Resume with the same AdaLabel settings, or start a new run."
            )
        saved = state_dict["label_matrix"]
        if saved is not None:
            if self.num_classes is not None and saved["num_classes"] != self.num_classes:
                raise ValueError(
                    f"This checkpoint's label matrix has {saved['num_classes']} classes but AdaLabel(num_classes="
                    f"{self.num_classes}). Resume with the model and num_classes the checkpoint was trained with."
                )
            device = self.label_matrix.device if self.label_matrix is not None else torch.device("cpu")
            self.label_matrix = LabelMatrix(
                saved["num_classes"], self.preset.samples, self.preset.estimator, self.preset.momentum,
                self.preset.include_diagonal, device=device,
            )
            self.label_matrix.load_state_dict(saved)
        self._last_refresh_step = state_dict["last_refresh_step"]
        self._statistics_epoch = state_dict["statistics_epoch"]
