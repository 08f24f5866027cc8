"""A 2-process CPU DDP run whose ranks get a different number of batches (as with a custom sampler).

Run by ``tests/test_ddp.py``: ``python tests/scripts/ddp_uneven.py MODE`` with MODE ``adalabel`` or ``plain``.
Rank 0 gets 5 batches an epoch, rank 1 gets 4. Prints the error each rank ends with.
"""

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.helpers`

from lightning_adalabel import AdaLabel  # noqa: E402
from tests.helpers import TinyClassifier, trainer_kwargs  # noqa: E402


class PlainClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UnevenData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        batches = 5 if self.trainer.global_rank == 0 else 4
        generator = torch.Generator().manual_seed(self.trainer.global_rank)
        x = torch.randn(8 * batches, 8, generator=generator)
        y = torch.randint(0, 5, (8 * batches,), generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=8)


def main(mode: str) -> None:
    torch.manual_seed(0)
    callbacks = [AdaLabel()] if mode == "adalabel" else []
    model = TinyClassifier() if mode == "adalabel" else PlainClassifier()
    trainer = L.Trainer(**trainer_kwargs(devices=2, strategy="ddp", max_epochs=2, callbacks=callbacks,
                                         use_distributed_sampler=False))
    try:
        trainer.fit(model, datamodule=UnevenData())
    except Exception as error:  # noqa: BLE001 - the test reads what each rank ended with
        print(f"rank {trainer.global_rank} error: {type(error).__name__}: {error}", flush=True)
        raise
    print(f"rank {trainer.global_rank} finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
