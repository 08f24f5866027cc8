"""Train AdaLabel(top_k=...) runs in one process or in a 2-process CPU DDP run and save what every rank saw.

Run in 2 processes by ``ddp_launch.py`` (the suite's one DDP launch), and imported by ``tests/test_sparse_training.py``
for the single-process reference (:func:`run_config` with ``devices=1``). The data, the sharding
and the strategy are those of ``ddp_adalabel.py``: the two ranks together see exactly the single-process batches.
"""

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.helpers`

from lightning_adalabel import AdaLabel  # noqa: E402
from tests.helpers import TinyClassifier, trainer_kwargs  # noqa: E402
from tests.scripts.ddp_adalabel import (  # noqa: E402
    IN_FEATURES,
    MAX_EPOCHS,
    NUM_CLASSES,
    CountingDDPStrategy,
    ShardedData,
)

# name -> AdaLabel settings. Q keeps fewer entries than the row has classes (2 of 4, 3 of 5), so every refresh drops
# some; the candidate table (4 * top_k, clamped to the row's classes) keeps every statistic, so DDP and one process
# merge the same sums.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "alr_top2": dict(preset="alr", samples="all", top_k=2, refresh_every_n_steps=2),
    "ols_top3_epoch": dict(preset="ols", top_k=3, refresh_every_n_steps=None),
}


class GatherCountingDDPStrategy(CountingDDPStrategy):
    """The real DDP strategy; it also records the shape of every tensor it all-gathers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gathered_shapes: List[tuple] = []

    def all_gather(self, tensor: Any, group: Optional[Any] = None, sync_grads: bool = False) -> Any:
        if isinstance(tensor, torch.Tensor):
            self.gathered_shapes.append(tuple(tensor.shape))
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)


class RecordingAdaLabel(AdaLabel):
    """AdaLabel that records Q (densified: K is 5) and the local statistics at every refresh."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refreshes: List[Dict[str, Any]] = []

    def _refresh(self, trainer, pl_module) -> None:  # type: ignore[override]
        local = self.engine.state_dict()
        super()._refresh(trainer, pl_module)
        self.refreshes.append(dict(
            global_step=trainer.global_step,
            local_tallies=local["tallies"].clone(),
            local_uniform_sums=local["uniform_sums"].clone(),
            matrix=self.engine.to_dense(),
            indices=self.engine.indices.clone(),
        ))


def run_config(name: str, devices: int) -> Dict[str, Any]:
    """Train config ``name`` on ``devices`` CPU processes; return this rank's record."""
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = TinyClassifier(IN_FEATURES, NUM_CLASSES, lr=0.1)
    callback = RecordingAdaLabel(**config)
    strategy: Any = GatherCountingDDPStrategy() if devices > 1 else "auto"
    trainer = L.Trainer(**trainer_kwargs(devices=devices, strategy=strategy, max_epochs=MAX_EPOCHS,
                                         callbacks=[callback], use_distributed_sampler=False))
    trainer.fit(model, datamodule=ShardedData())
    return dict(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        refreshes=callback.refreshes,
        gathered_shapes=list(getattr(trainer.strategy, "gathered_shapes", [])),
        reduced_shapes=list(getattr(trainer.strategy, "reduced_shapes", [])),
        matrix=callback.engine.to_dense(),
        weight=model.net.weight.detach().clone(),
    )
