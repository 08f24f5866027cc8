"""``ClassificationModule``: what every recipe's model shares (ALR loss, top-1 accuracy, optimizer, schedule).

Subclasses only build the network (``self.net``) and, where needed, change how a batch reaches it.
"""

import math
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_adalabel import AdaLabelMixin

OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["cosine", "linear", "constant"]


class ClassificationModule(AdaLabelMixin, pl.LightningModule):
    """A classifier trained with the AdaLabel loss and evaluated by top-1 accuracy.

    Logs ``train/loss`` (the ALR loss), ``train/lr``, ``val/loss`` and ``test/loss`` (plain cross-entropy, so that
    presets compare on the same scale), ``val/acc`` and ``test/acc`` (top-1, ``MulticlassAccuracy(average="micro")``)
    and, with more than five classes, ``val/acc_top5`` and ``test/acc_top5``. The AdaLabel callback adds
    ``adalabel/entropy`` and ``adalabel/counted_fraction`` at each refresh.

    Args:
        num_classes: K, the size of the output layer; must match the data module's ``num_classes``.
        optimizer: ``"sgd"`` (with ``momentum``, ``nesterov``) or ``"adamw"``.
        lr: learning rate, for a global batch of ``lr_reference_batch_size`` when that is set.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: decoupled for AdamW, L2 for SGD; applied to every parameter.
        schedule: ``"cosine"`` or ``"linear"`` decay to zero over the whole run, stepped every optimizer step, or
            ``"constant"``.
        warmup_epochs: linear warm-up from 0 to ``lr`` over this many epochs (may be fractional).
        lr_reference_batch_size: scale ``lr`` by ``global batch / lr_reference_batch_size`` (the linear scaling rule,
            Goyal et al. 2017), where the global batch is the per-device batch size x devices x nodes x
            ``accumulate_grad_batches``. ``None``: use ``lr`` as given.
    """

    net: nn.Module

    def __init__(
        self,
        num_classes: int,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        schedule: ScheduleName = "cosine",
        warmup_epochs: float = 0.0,
        lr_reference_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"`optimizer` must be 'sgd' or 'adamw', got {optimizer!r}.")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"`schedule` must be 'cosine', 'linear' or 'constant', got {schedule!r}.")
        self.num_classes = num_classes
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.lr_reference_batch_size = lr_reference_batch_size
        # top-1 accuracy is the fraction of correct samples: "micro", not torchmetrics' default "macro" average.
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None

    def forward(self, inputs: Any) -> Tensor:
        return self.net(inputs)

    # ---- consistency with the data --------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Runs after the data module's setup, so data-derived sizes (ImageFolder classes, ...) are known here.
        self.check_matches_data(getattr(self.trainer, "datamodule", None))
        super().setup(stage)

    def check_matches_data(self, datamodule: Optional[pl.LightningDataModule]) -> None:
        """Raise when the data module's ``num_classes`` differs from the model's (both are set in the recipe)."""
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"The data has {data_classes} classes but the model has {self.num_classes} outputs. Set"
                f" `--model.num_classes {data_classes}` (model.init_args.num_classes in the YAML)."
            )

    # ---- steps ------------------------------------------------------------------------------------------------

    def training_step(self, batch: Tuple[Any, ...], batch_idx: int) -> Tensor:
        """``(inputs, target, index)`` batches (the recipes' data modules index the training samples), or
        ``(inputs, target)``; ``target``: class indices, or B x K probabilities after MixUp/CutMix."""
        inputs, target, index = batch if len(batch) == 3 else (*batch, None)
        loss = self.adalabel_loss(self(inputs), target, index=margin_index(target, index))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: Tuple[Any, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_acc_top5)

    def test_step(self, batch: Tuple[Any, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_acc_top5)

    def predict_step(self, batch: Tuple[Any, Tensor], batch_idx: int) -> Tensor:
        """Class probabilities (B x K) for the inputs of the data module's predict set."""
        inputs, _ = batch
        return self(inputs).float().softmax(dim=1)

    def _evaluate(
        self, batch: Tuple[Any, Tensor], split: str, top1: MulticlassAccuracy, top5: Optional[MulticlassAccuracy]
    ) -> None:
        inputs, target = batch
        logits = self(inputs).float()
        batch_size = target.shape[0]
        self.log(f"{split}/loss", F.cross_entropy(logits, target), sync_dist=True, batch_size=batch_size)
        # Logging the metric object lets torchmetrics reduce over the epoch and across processes.
        top1(logits, target)
        self.log(f"{split}/acc", top1, prog_bar=True, batch_size=batch_size)
        if top5 is not None:
            top5(logits, target)
            self.log(f"{split}/acc_top5", top5, batch_size=batch_size)

    # ---- optimisation -----------------------------------------------------------------------------------------

    def configure_optimizers(self) -> Dict[str, Any]:
        # estimated_stepping_batches sets up the training data, so the loader's batch size is known below.
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        lr = self.scaled_lr()
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.parameter_groups(), lr=lr, momentum=self.momentum, nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameter_groups(), lr=lr, weight_decay=self.weight_decay)
        warmup_steps = min(total_steps, round(self.warmup_epochs * self._steps_per_epoch()))
        schedule = lr_multiplier(self.schedule, total_steps, warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's parameter groups: one, every parameter with ``weight_decay``. Subclasses may exempt some
        parameters (a group with ``"weight_decay": 0.0``)."""
        return [{"params": list(self.parameters())}]

    def scaled_lr(self) -> float:
        """``lr``, scaled by ``global batch / lr_reference_batch_size`` when a reference batch size is set."""
        if self.lr_reference_batch_size is None:
            return self.lr
        trainer = self.trainer
        global_batch = self._per_device_batch_size() * trainer.world_size * trainer.accumulate_grad_batches
        return self.lr * global_batch / self.lr_reference_batch_size

    def _per_device_batch_size(self) -> int:
        loader = self.trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None) or getattr(self.trainer.datamodule, "batch_size", None)
        if not batch_size:
            raise ValueError(
                "`lr_reference_batch_size` needs the training batch size, but neither the train DataLoader nor the"
                " data module has a `batch_size`. Set `lr_reference_batch_size: null` and give the final `lr`."
            )
        return int(batch_size)

    def _steps_per_epoch(self) -> float:
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):  # an iterable data set of unknown length: warm-up is counted in steps of 1
            return 1.0
        return max(1.0, batches / self.trainer.accumulate_grad_batches)


def margin_index(target: Tensor, index: Optional[Tensor]) -> Optional[Tensor]:
    """The ``index`` to pass to ``adalabel_loss``: the samples' indices with class-index targets, ``None`` with the
    probability targets of MixUp/CutMix, which give a sample no single label to measure a margin for. AdaLabel
    averages each sample's margin over the steps that passed its index, so a run whose batches are all mixed keeps
    no training margins, and ``adalabel label-issues`` ranks by the trained model's probabilities.

    Example:
        >>> margin_index(torch.tensor([2, 0]), torch.tensor([7, 3])).tolist()
        [7, 3]
        >>> margin_index(torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([7, 3])) is None
        True
    """
    return None if target.is_floating_point() else index


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The factor applied to the base learning rate at each optimizer step (a ``LambdaLR`` function).

    Linear warm-up over ``warmup_steps``, then ``schedule`` decays from 1 towards 0 at ``total_steps``.

    Example:
        >>> f = lr_multiplier("cosine", total_steps=10, warmup_steps=2)
        >>> [round(f(step), 3) for step in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
