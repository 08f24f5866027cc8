"""``PredictionWriter``: what ``adalabel predict`` computes, written to a CSV file as the batches come.

One row per sample: ``index`` (the sample's position in the predict set: the row of ``test.csv``, the image in the
sorted class folders, the CIFAR test batch), then the ``top_k`` most probable classes and their probabilities,
``top1,p1,top2,p2,...``; ``top1`` is the predicted class. Classes are 0-based indices (the text recipes' CSV label
minus 1, the ImageFolder's class folders in sorted order, the position in ``--data.tags``). For a token classifier
(probabilities ``N x K x T``) there is one row per labelled token, with its position among them, ``word``, after the
index. Under DDP each process writes its own share, ``predictions_rank<r>.csv``.
"""

import csv
import os
from typing import Any, List, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

IGNORE_INDEX = -100  # the target of positions that are not samples (sub-word pieces, padding)


class PredictionWriter(BasePredictionWriter):
    """Write each predict batch's class probabilities to ``output`` as CSV rows (see the module's docstring).

    Args:
        output: the CSV file; ``None`` writes ``predictions.csv`` in the run's log folder (``trainer.log_dir``).
        top_k: how many classes (with their probabilities) each row names, most probable first.
    """

    def __init__(self, output: Optional[str] = None, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ValueError(f"`--predictions.top_k` must be at least 1, got {top_k}.")
        self.output = output
        self.top_k = top_k
        self.path: Optional[str] = None
        self.rows = 0
        self._file: Any = None
        self._writer: Any = None
        self._header_written = False
        self._next_index = 0

    def on_predict_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.path = self.output or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.csv")
        if trainer.world_size > 1:
            stem, extension = os.path.splitext(self.path)
            self.path = f"{stem}_rank{trainer.global_rank}{extension}"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self.rows, self._next_index, self._header_written = 0, 0, False

    def write_on_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", prediction: Any,
        batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        probabilities = prediction.detach().float().cpu()
        indices = list(batch_indices or range(self._next_index, self._next_index + len(prediction)))
        self._next_index = indices[-1] + 1
        if probabilities.dim() == 3:  # N x K x T: a token classifier
            self._write_tokens(probabilities, indices, batch)
        else:
            self._write_header(["index"], probabilities.shape[1])
            for index, row in zip(indices, self._top(probabilities)):
                self._writer.writerow([index, *row])
                self.rows += 1

    def _write_tokens(self, probabilities: Tensor, indices: List[int], batch: Any) -> None:
        target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self._write_header(["index", "word"], probabilities.shape[1])
        for sample, index in enumerate(indices):
            tokens = probabilities[sample].T  # T x K
            if isinstance(target, Tensor):  # the labelled positions are the words (their first word pieces)
                tokens = tokens[target[sample].cpu() != IGNORE_INDEX]
            for word, row in enumerate(self._top(tokens)):
                self._writer.writerow([index, word, *row])
                self.rows += 1

    def _write_header(self, leading: List[str], num_classes: int) -> None:
        if not self._header_written:
            ranks = range(1, min(self.top_k, num_classes) + 1)
            self._writer.writerow([*leading, *(name for rank in ranks for name in (f"top{rank}", f"p{rank}"))])
            self._header_written = True

    def _top(self, probabilities: Tensor) -> List[List[Any]]:
        """Each row's most probable classes and their probabilities, interleaved: [class, p, class, p, ...]."""
        values, classes = probabilities.topk(min(self.top_k, probabilities.shape[1]), dim=1)
        return [
            [item for pair in zip(row_classes, (f"{value:.6g}" for value in row_values)) for item in pair]
            for row_classes, row_values in zip(classes.tolist(), values.tolist())
        ]

    def on_predict_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._close()
        rank_zero_info(f"adalabel: wrote the predictions of the predict set ({self.rows} rows) to {self.path}")

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
