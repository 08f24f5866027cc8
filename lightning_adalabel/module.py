"""``AdaLabelMixin``: gives a LightningModule the ALR loss; the AdaLabel callback supplies the label matrix."""

from typing import Any, Optional

from torch import Tensor

from lightning_adalabel.callback import AdaLabel


class AdaLabelMixin:
    """Mix into a LightningModule (``class Net(AdaLabelMixin, LightningModule)``) and train with
    :meth:`adalabel_loss` instead of ``F.cross_entropy``; add :class:`~lightning_adalabel.AdaLabel` to the Trainer.

    The mixin also provides a default :meth:`training_step` for ``(x, y)`` batches.
    """

    # Set by AdaLabel.setup. A plain attribute, not a buffer: Q must not be broadcast by DDP on every forward.
    _adalabel_callback: Optional[AdaLabel] = None

    def adalabel_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The training loss of the attached AdaLabel callback's preset for ``logits`` (B x K) and ``target``.

        ``target`` holds class indices (B,) or class probabilities (B x K, e.g. from MixUp/CutMix). Before the
        first refresh the loss uses the initial label matrix (uniform over the other classes).
        """
        callback = self._adalabel_callback
        if callback is None:
            raise RuntimeError(
                f"{type(self).__name__}.adalabel_loss needs the AdaLabel callback: pass `callbacks=[AdaLabel()]` to"
                " the Trainer (it supplies the label matrix)."
            )
        return callback.loss(self, logits, target)  # type: ignore[arg-type]

    def on_fit_start(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if self._adalabel_callback is None or self._adalabel_callback not in trainer.callbacks:
            raise RuntimeError(
                f"{type(self).__name__} uses AdaLabelMixin but the Trainer has no AdaLabel callback. Add it:"
                " `Trainer(callbacks=[AdaLabel()])`, or AdaLabel(preset='none') for plain cross-entropy."
            )
        super().on_fit_start()  # type: ignore[misc]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Default step for ``(x, y)`` batches: ``self.adalabel_loss(self(x), y)``, logged as ``train_loss``."""
        x, y = batch
        loss = self.adalabel_loss(self(x), y)  # type: ignore[operator]
        self.log("train_loss", loss, prog_bar=True)  # type: ignore[attr-defined]
        return loss
