"""Small models and data shared by the tests: real modules, real loaders, nothing mocked."""

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adalabel import AdaLabelMixin


class TinyClassifier(AdaLabelMixin, L.LightningModule):
    """A linear classifier that trains with the mixin's default ``training_step``."""

    def __init__(self, in_features: int = 8, num_classes: int = 5, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class StepRecorder(TinyClassifier):
    """Trains with ``adalabel_loss`` and records ``(epoch, logits, targets, loss)`` of every training step, so a test
    can replay the run through a reference."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records: List[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.adalabel_loss(logits, y)
        self.records.append((self.current_epoch, logits.detach().clone(), y, loss.detach()))
        return loss


def launch_env() -> Dict[str, str]:
    """This process's environment without what an earlier in-process DDP run left in it (a port that may still be
    taken, ranks): a launched script picks its own."""
    return {key: value for key, value in os.environ.items()
            if key not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


def make_loader(
    num_samples: int = 128, in_features: int = 8, num_classes: int = 5, batch_size: int = 16, seed: int = 0
) -> DataLoader:
    """A fixed, unshuffled classification set whose labels depend on the inputs (so a model can learn them)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, in_features, generator=generator)
    projection = torch.randn(in_features, num_classes, generator=generator)
    y = (x @ projection).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer_kwargs(**overrides: Any) -> Dict[str, Any]:
    """Quiet, deterministic CPU Trainer settings for tests."""
    kwargs: Dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def fit(
    callbacks: Union[L.Callback, List[L.Callback]],
    model: Optional[L.LightningModule] = None,
    loader: Optional[DataLoader] = None,
    ckpt_path: Optional[str] = None,
    **overrides: Any,
) -> Tuple[L.Trainer, L.LightningModule]:
    """One real ``Trainer.fit`` with :func:`trainer_kwargs` (one epoch unless ``max_epochs`` is overridden)."""
    model = model if model is not None else TinyClassifier()
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    trainer = L.Trainer(**trainer_kwargs(callbacks=callbacks, **overrides))
    trainer.fit(model, loader if loader is not None else make_loader(), ckpt_path=ckpt_path)
    return trainer, model


def learned_matrix(num_classes: int = 5, seed: int = 0) -> torch.Tensor:
    """A valid residual label matrix that is clearly not uniform."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(num_classes, num_classes, generator=generator) ** 4
    matrix.fill_diagonal_(0.0)
    return matrix / matrix.sum(dim=1, keepdim=True)


def reference_margin(logits: Tensor, target: int) -> float:
    """``z_target - max_{k != target} z_k`` of one sample, the naive way."""
    others = [float(value) for k, value in enumerate(logits.tolist()) if k != target]
    return float(logits[target]) - max(others)


def reference_means(records: List[Tuple[Tensor, Tensor, Tensor]], num_samples: int) -> Tensor:
    """Each sample's mean margin over the ``(logits, targets, indices)`` of the steps that saw it (NaN: none did)."""
    margins: Dict[int, List[float]] = {}
    for logits, targets, indices in records:
        for row, target, index in zip(logits, targets.tolist(), indices.tolist()):
            margins.setdefault(index, []).append(reference_margin(row, target))
    return torch.tensor([sum(margins[i]) / len(margins[i]) if i in margins else math.nan for i in range(num_samples)])


class IndexRecorder(TinyClassifier):
    """Trains on ``(x, y, index)`` batches with ``adalabel_loss(..., index=...)`` and records each completed step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records: List[Tuple[Tensor, Tensor, Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        logits = self(x)
        self.records.append((logits.detach().clone(), y, index))
        return self.adalabel_loss(logits, y, index=index)


def load_script(script: Path) -> Any:
    """A script of ``benchmarks/`` as a module (they are files, not a package), to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(f"script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script_main(script: Path, argv: List[str]) -> int:
    """``main(argv)`` of a benchmark script, in this process: one interpreter start fewer than a subprocess (about 5 s
    of the suite each). The script's workers set torch's thread count; it is set back afterwards."""
    threads = torch.get_num_threads()
    try:
        return load_script(script).main(argv)
    finally:
        torch.set_num_threads(threads)
