"""``find_label_issues`` in a 2-process CPU DDP predict pass, for ``tests/test_label_issues.py`` to compare with one
process: run in 2 processes by ``ddp_launch.py`` (the suite's one DDP launch), in this process by the test.

Each rank records the fields of the :class:`LabelIssues` it returned. The data set has an odd
number of samples and batches of 4, so the two shards differ in length and the last batches are short.

:func:`run_indexed` trains on ``(x, y, index)`` batches first, so that the callback keeps each sample's margin over
training: each rank also records the logits, labels and indices of its own training steps, from which the test
computes the margins that both ranks' :class:`LabelIssues` must hold.
"""

import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.helpers`

from lightning_adalabel import AdaLabel, IndexedDataset  # noqa: E402
from lightning_adalabel.label_issues import find_label_issues  # noqa: E402
from tests.helpers import IndexRecorder, TinyClassifier, make_loader, trainer_kwargs  # noqa: E402

NUM_SAMPLES, BATCH_SIZE = 45, 4


def run(devices: int) -> Dict[str, Any]:
    """The fields of ``find_label_issues``'s result for a fixed model on a fixed loader, on ``devices`` processes."""
    torch.manual_seed(0)
    model = TinyClassifier()
    loader = make_loader(num_samples=NUM_SAMPLES, batch_size=BATCH_SIZE)
    strategy = {"strategy": "ddp"} if devices > 1 else {}
    trainer = L.Trainer(**trainer_kwargs(devices=devices, **strategy))
    return asdict(find_label_issues(model, loader, trainer, keep_probabilities=True))


def run_indexed(devices: int, epochs: int = 2) -> Dict[str, Any]:
    """Fit on indexed, shuffled batches (Lightning shards them), then ``find_label_issues``: its fields and this
    process's training steps ``(logits, labels, indices)``."""
    torch.manual_seed(0)
    model = IndexRecorder()
    data = make_loader(num_samples=NUM_SAMPLES).dataset
    train = DataLoader(IndexedDataset(data), batch_size=BATCH_SIZE, shuffle=True)
    strategy = {"strategy": "ddp"} if devices > 1 else {}
    trainer = L.Trainer(**trainer_kwargs(devices=devices, max_epochs=epochs, callbacks=[AdaLabel()], **strategy))
    trainer.fit(model, train)
    found = find_label_issues(model, DataLoader(data, batch_size=BATCH_SIZE), trainer)
    return {"found": asdict(found), "records": model.records, "mid_epoch": _from_a_mid_epoch_checkpoint(strategy)}


def _from_a_mid_epoch_checkpoint(strategy: Dict[str, str]) -> Dict[str, Any]:
    """A fit stopped in its second epoch, its checkpoint, and ``find_label_issues(ckpt_path=...)`` in a fresh Trainer:
    this process's margins at the stop (closed epochs, and its own sums of the open one) and the margins found."""
    torch.manual_seed(1)
    callback = AdaLabel()
    data = make_loader(num_samples=NUM_SAMPLES).dataset
    trainer = L.Trainer(**trainer_kwargs(devices=2, max_epochs=2, max_steps=8, callbacks=[callback], **strategy))
    trainer.fit(TinyClassifier(), DataLoader(IndexedDataset(data), batch_size=BATCH_SIZE, shuffle=True))
    path = Path(trainer.strategy.broadcast(tempfile.mkdtemp())) / "mid_epoch.ckpt"
    trainer.save_checkpoint(path)  # written by rank 0, with rank 0's sums of the open epoch
    fresh = L.Trainer(**trainer_kwargs(devices=2, callbacks=[AdaLabel()], **strategy))
    found = find_label_issues(TinyClassifier(), DataLoader(data, batch_size=BATCH_SIZE), fresh, ckpt_path=str(path))
    margins = callback.training_margins
    return {"margin": found.margin, **{name: getattr(margins, name).clone() for name in
                                       ("total", "count", "epoch_total", "epoch_count")}}
