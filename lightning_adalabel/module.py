"""``AdaLabelMixin``: gives a LightningModule the ALR loss; the AdaLabel callback supplies the label matrix."""

from typing import Any, Dict, Optional

from torch import Tensor
from typing_extensions import Protocol


class _LossOwner(Protocol):
    """What the mixin needs of :class:`~lightning_adalabel.AdaLabel`: the callback imports this module, so the mixin
    names only the one method it calls."""

    def loss(self, pl_module: Any, logits: Tensor, target: Tensor, reduction: str = "mean",
             index: Optional[Tensor] = None) -> Tensor: ...


class AdaLabelMixin:
    """Mix into a LightningModule (``class Net(AdaLabelMixin, LightningModule)``) and train with
    :meth:`adalabel_loss` instead of ``F.cross_entropy``; add :class:`~lightning_adalabel.AdaLabel` to the Trainer.

    The mixin also provides a default :meth:`training_step` for ``(x, y)`` and ``(x, y, index)`` batches.
    """

    # Set by AdaLabel.setup. A plain attribute, not a buffer: Q must not be broadcast by DDP on every forward.
    _adalabel_callback: Optional[_LossOwner] = None

    def adalabel_loss(
        self, logits: Tensor, target: Tensor, reduction: str = "mean", *, index: Optional[Tensor] = None
    ) -> Tensor:
        """The training loss of the attached AdaLabel callback's preset, with ``F.cross_entropy``'s contract.

        Args:
            logits: ``(N, K)`` or ``(N, K, d1, ..., dk)``, classes on dim 1.
            target: class indices ``(N)`` / ``(N, d1, ..., dk)`` (``int64`` or ``uint8``; positions equal to the
                callback's ``ignore_index`` are left out) or class probabilities of the logits' shape (MixUp/CutMix).
            reduction: ``"mean"``, ``"sum"`` or ``"none"``, as ``F.cross_entropy``.
            index: ``(N,)`` the samples' indices in the training set (:class:`~lightning_adalabel.IndexedDataset`
                adds them to the batches). In a training step, the callback then averages each sample's logit
                margin over the run (:attr:`AdaLabel.training_margins`), which ranks the wrong labels for
                :func:`~lightning_adalabel.find_label_issues`. Needs ``(N, K)`` logits and class-index targets.

        Before the first refresh the loss uses the initial label matrix (uniform over the other classes).
        """
        callback = self._adalabel_callback
        if callback is None:
            raise RuntimeError(
                f"{type(self).__name__}.adalabel_loss needs the AdaLabel callback: pass `callbacks=[AdaLabel()]` to"
                " the Trainer (it supplies the label matrix)."
            )
        return callback.loss(self, logits, target, reduction, index)

    def on_fit_start(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if self._adalabel_callback is None or self._adalabel_callback not in trainer.callbacks:
            raise RuntimeError(
                f"{type(self).__name__} uses AdaLabelMixin but the Trainer has no AdaLabel callback. Add it:"
                " `Trainer(callbacks=[AdaLabel()])`, or AdaLabel(preset='none') for plain cross-entropy."
            )
        super().on_fit_start()  # type: ignore[misc]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Default step for ``(x, y)`` batches, ``self.adalabel_loss(self(x), y)``, and for ``(x, y, index)`` batches
        (:class:`~lightning_adalabel.IndexedDataset`), which also pass ``index``; logged as ``train_loss``."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            kind = type(batch).__name__ + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise ValueError(
                f"AdaLabelMixin's default training_step takes (x, y) or (x, y, index) batches, got a {kind}."
                " Override training_step for other batches and call `self.adalabel_loss(logits, y)` in it."
            )
        x, y, index = batch if len(batch) == 3 else (*batch, None)
        loss = self.adalabel_loss(self(x), y, index=index)  # type: ignore[operator]
        self.log("train_loss", loss, prog_bar=True)  # type: ignore[attr-defined]
        return loss

    def __getstate__(self) -> Dict[str, Any]:
        # The callback (and with it Q and its statistics) belongs to the Trainer, not to the model: pickle,
        # copy.deepcopy (e.g. the averaged copy of WeightAveraging) and torch.save(model) leave it out.
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state.pop("_adalabel_callback", None)
        return state
