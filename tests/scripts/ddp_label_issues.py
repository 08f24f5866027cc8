"""``find_label_issues`` in a 2-process CPU DDP predict pass, for ``tests/test_label_issues.py`` to compare with one
process.

    python tests/scripts/ddp_label_issues.py OUT_DIR      # Lightning re-executes this script for rank 1

Each rank writes ``OUT_DIR/rank<r>.pt``: the fields of the :class:`LabelIssues` it returned. The data set has an odd
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


if __name__ == "__main__":
    result = run(devices=2)
    out = Path(sys.argv[1])
    rank = torch.distributed.get_rank()
    torch.save(result, out / f"rank{rank}.pt")
