"""``find_label_issues`` in a 2-process CPU DDP predict pass, for ``tests/test_label_issues.py`` to compare with one
process: run in 2 processes by ``ddp_launch.py`` (the suite's one DDP launch), in this process by the test.

Each rank records the fields of the :class:`LabelIssues` it returned. The data set has an odd
number of samples and batches of 4, so the two shards differ in length and the last batches are short.
"""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.helpers`

from lightning_adalabel.label_issues import find_label_issues  # noqa: E402
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs  # noqa: E402

NUM_SAMPLES, BATCH_SIZE = 45, 4


def run(devices: int) -> Dict[str, Any]:
    """The fields of ``find_label_issues``'s result for a fixed model on a fixed loader, on ``devices`` processes."""
    torch.manual_seed(0)
    model = TinyClassifier()
    loader = make_loader(num_samples=NUM_SAMPLES, batch_size=BATCH_SIZE)
    strategy = {"strategy": "ddp"} if devices > 1 else {}
    trainer = L.Trainer(**trainer_kwargs(devices=devices, **strategy))
    return asdict(find_label_issues(model, loader, trainer, keep_probabilities=True))
