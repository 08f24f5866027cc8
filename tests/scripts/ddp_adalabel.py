"""Train the same AdaLabel runs in one process or in a 2-process CPU DDP run and save what every rank saw.

Run in 2 processes by ``ddp_launch.py`` (the suite's one DDP launch), and imported by ``tests/test_ddp.py`` for the
single-process reference (:func:`run_config` with ``devices=1``).

The data never change and are never shuffled, so an unshuffled ``DistributedSampler`` gives rank r the samples r,
r + 2, ...: with a per-rank batch of ``GLOBAL_BATCH // 2`` the two ranks together see exactly the single-process batch
``GLOBAL_BATCH``. Every run records, for every refresh: Q after it, the local
accumulator before it, ``global_step``, ``batch_idx``, and how many times the strategy reduced (inside and outside
refreshes); plus what the DDP-wrapped module holds as buffers and state.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.helpers`

from lightning_adalabel import AdaLabel  # noqa: E402
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs  # noqa: E402

NUM_SAMPLES, IN_FEATURES, NUM_CLASSES, GLOBAL_BATCH, MAX_EPOCHS = 64, 8, 5, 8, 2

# name -> AdaLabel / Trainer settings; 64 samples in global batches of 8 are 8 batches an epoch.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "alr": dict(preset="alr", refresh_every_n_steps=2, accumulate_grad_batches=1),
    "ols": dict(preset="ols", refresh_every_n_steps=2, accumulate_grad_batches=1),
    "alr_accumulate": dict(preset="alr", refresh_every_n_steps=2, accumulate_grad_batches=2),
    "alr_epoch": dict(preset="alr", refresh_every_n_steps=None, accumulate_grad_batches=1),
    # The per-batch path compiled in every process (each rank compiles its own graph).
    "alr_compiled": dict(preset="alr", refresh_every_n_steps=2, accumulate_grad_batches=1, compile_loss=True),
}


class CountingDDPStrategy(DDPStrategy):
    """The real DDP strategy; it also records the shape of every tensor it all-reduces."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reduced_shapes: List[tuple] = []

    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Any = "mean") -> Any:
        if isinstance(tensor, torch.Tensor):
            self.reduced_shapes.append(tuple(tensor.shape))
        return super().reduce(tensor, group=group, reduce_op=reduce_op)


class RecordingAdaLabel(AdaLabel):
    """AdaLabel that records every refresh (and, once, what DDP wraps) for the test to compare."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refreshes: List[Dict[str, Any]] = []
        self.wrapped_module: Dict[str, Any] = {}
        self._batch_idx = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self._batch_idx = batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.wrapped_module:
            self.wrapped_module = describe_wrapped_module(trainer, self.engine)

    def _refresh(self, trainer, pl_module) -> None:  # type: ignore[override]
        shapes = getattr(trainer.strategy, "reduced_shapes", [])
        before = len(shapes)
        local = self.engine.accumulator.clone()
        seen = self.engine.seen.sum().clone()
        super()._refresh(trainer, pl_module)
        self.refreshes.append(
            dict(
                global_step=trainer.global_step,
                batch_idx=self._batch_idx,
                local_accumulator=local,
                local_seen=seen,
                matrix=self.engine.matrix.clone(),
                reduced_shapes=shapes[before:],
            )
        )


def describe_wrapped_module(trainer: L.Trainer, label_matrix: Any) -> Dict[str, Any]:
    """Which tensors the strategy's wrapped module would broadcast or checkpoint, and whether Q is among them."""
    wrapped = trainer.strategy.model
    state = wrapped.state_dict()
    tensors = list(wrapped.buffers()) + list(wrapped.parameters()) + list(state.values())
    ours = {label_matrix.matrix.data_ptr(), label_matrix.accumulator.data_ptr()}
    return dict(
        is_ddp=isinstance(wrapped, DistributedDataParallel),
        buffer_names=[name for name, _ in wrapped.named_buffers()],
        state_keys=list(state),
        holds_label_matrix=any(tensor.data_ptr() in ours for tensor in tensors),
    )


class ShardedData(L.LightningDataModule):
    """The fixed data set split by an unshuffled ``DistributedSampler``: rank r of W gets samples r, r + W, ...

    (Lightning's automatic sampler would shuffle the training data.)
    """

    def train_dataloader(self) -> DataLoader:
        dataset = make_loader(NUM_SAMPLES, IN_FEATURES, NUM_CLASSES).dataset
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)


def run_config(name: str, devices: int) -> Dict[str, Any]:
    """Train config ``name`` on ``devices`` CPU processes; return this rank's record."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = TinyClassifier(IN_FEATURES, NUM_CLASSES, lr=0.1)
    callback = RecordingAdaLabel(preset=config["preset"], refresh_every_n_steps=config["refresh_every_n_steps"],
                                 compile_loss=config.get("compile_loss", False))
    strategy: Any = CountingDDPStrategy() if devices > 1 else "auto"
    trainer = L.Trainer(
        **trainer_kwargs(
            devices=devices,
            strategy=strategy,
            max_epochs=MAX_EPOCHS,
            callbacks=[callback],
            accumulate_grad_batches=config["accumulate_grad_batches"],
            use_distributed_sampler=False,
        )
    )
    trainer.fit(model, datamodule=ShardedData())
    shapes = getattr(trainer.strategy, "reduced_shapes", [])
    return dict(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        refreshes=callback.refreshes,
        reduced_shapes=list(shapes),
        wrapped_module=callback.wrapped_module,
        matrix=callback.engine.matrix.clone(),
        weight=model.net.weight.detach().clone(),
    )
