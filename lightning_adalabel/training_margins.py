"""``TrainingMargins``: each training sample's logit margin, averaged over the training steps that saw it.

The margin of a sample is ``z_given - max_{k != given} z_k``: positive while the model prefers the given label,
negative while it prefers another class. Averaged over training (the *area under the margin*, Pleiss et al.,
arXiv:2001.10528), it ranks wrong labels better than the final model's probability of the given label: a network
learns the clean samples early and memorises the wrong labels late, if at all, so a wrong label spends most of the run
with a negative margin even where the last epochs memorised it. Measured in docs/benchmarks.md ("Finding the wrong
labels"): on the training set itself, one ALR run ranked with these margins beats cleanlab's five-run recipe.

The callback owns one of these when the training step passes the samples' indices (``adalabel_loss(logits, y,
index=index)``; :class:`~lightning_adalabel.IndexedDataset` adds them to a data set's samples) and decides *when*;
this class does the tensor work:

- per batch, :func:`batch_margins` (pure, on the logits' device, no host sync) and :meth:`TrainingMargins.add`
  (two ``index_add_`` into this epoch's sums);
- at each epoch's end, :meth:`TrainingMargins.end_epoch`: one all-reduce of this epoch's sums across processes (each
  process saw its own shard), added to the run's totals, and one host read that refuses out-of-range indices.

Memory: four ``N``-long float32 vectors on the device (16 bytes a sample: 20 MB for ImageNet's 1.28 million).
"""

from typing import Any, Dict, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_adalabel.engine import Collective, SingleProcess

TRAINING_MARGINS_STATE_VERSION = 1


class BatchMargins(NamedTuple):
    """One batch's margins, for :meth:`TrainingMargins.add`."""

    index: Tensor
    """``(N,)`` int64 sample indices, clamped into range (see ``out_of_range``)."""
    margin: Tensor
    """``(N,)`` float32 logit margins, 0 where not ``used``."""
    used: Tensor
    """``(N,)`` float32, 1 where the margin counts: a class target (not ``ignore_index``), finite logits and margin,
    an index in range."""
    out_of_range: Tensor
    """``()`` float32: labelled samples whose index was outside ``[0, num_samples)``."""


def batch_margins(logits: Tensor, target: Tensor, index: Tensor, num_samples: int, ignore_index: int) -> BatchMargins:
    """The margins of a batch of ``(N, K)`` logits and ``(N,)`` class targets, for samples ``index``; no host sync.

    Example:
        >>> margins = batch_margins(torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 2]),
        ...                         torch.tensor([4, 7]), num_samples=10, ignore_index=-100)
        >>> margins.margin.tolist(), margins.used.tolist()
        ([1.0, -2.0], [1.0, 1.0])
    """
    logits = logits.detach().float()
    target = target.detach().to(logits.device)
    index = index.detach().to(logits.device, torch.long)
    num_classes = logits.shape[1]
    # Not ignore_index, and a class: other invalid targets are the statistics' to refuse, at the next refresh.
    labelled = (target != ignore_index) & (target >= 0) & (target < num_classes)
    classes = torch.where(labelled, target, torch.zeros_like(target)).long()[:, None]
    given = logits.gather(1, classes).squeeze(1)
    other = logits.scatter(1, classes, float("-inf")).amax(dim=1)
    margin = given - other
    in_range = (index >= 0) & (index < num_samples)
    # NaN/inf logits (a diverging step) and a given class masked with -inf, or every other one, give no margin.
    used = labelled & in_range & torch.isfinite(margin)
    return BatchMargins(
        index=index.clamp(0, num_samples - 1),
        margin=torch.where(used, margin, torch.zeros_like(margin)),
        used=used.float(),
        out_of_range=(labelled & ~in_range).sum().float(),
    )


class TrainingMargins:
    """Per-sample sums of the logit margin over training, for ``num_samples`` samples indexed ``0 .. N-1``.

    Example:
        >>> margins = TrainingMargins(3)
        >>> margins.add(batch_margins(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]),
        ...                           torch.tensor([0, 2]), 3, -100))
        >>> margins.end_epoch()
        >>> margins.mean().tolist()
        [2.0, nan, -1.0]
    """

    def __init__(self, num_samples: int, device: Optional[torch.device] = None) -> None:
        self.num_samples = num_samples
        zeros = torch.zeros(num_samples, device=device)
        # The run's totals (the same on every process) and this epoch's own sums (this process's samples only).
        self.total, self.count = zeros, zeros.clone()
        self.epoch_total, self.epoch_count = zeros.clone(), zeros.clone()
        self.out_of_range = torch.zeros((), device=device)
        self.epochs = 0

    @property
    def device(self) -> torch.device:
        return self.total.device

    def to(self, device: torch.device) -> "TrainingMargins":
        for name in ("total", "count", "epoch_total", "epoch_count", "out_of_range"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def add(self, batch: BatchMargins) -> None:
        """Add one batch (its step has completed); on the device, no host sync."""
        self.epoch_total.index_add_(0, batch.index, batch.margin.to(self.device))
        self.epoch_count.index_add_(0, batch.index, batch.used.to(self.device))
        self.out_of_range += batch.out_of_range.to(self.device)

    def end_epoch(self, collective: Collective = SingleProcess()) -> None:
        """Sum this epoch's margins over the processes into the totals; raise if an index was out of range."""
        epoch = collective.sum(torch.stack([self.epoch_total, self.epoch_count]))
        out_of_range = int(collective.sum(self.out_of_range[None]).item())  # one host read an epoch
        self.total += epoch[0]
        self.count += epoch[1]
        self.epoch_total.zero_()
        self.epoch_count.zero_()
        self.out_of_range.zero_()
        self.epochs += 1
        if out_of_range:
            raise ValueError(
                f"{out_of_range} training samples came with an index outside [0, {self.num_samples}), the training"
                f" set's {self.num_samples} samples. The index passed as `adalabel_loss(..., index=...)` must be the"
                " sample's position in the training data set, as IndexedDataset(train_set) gives it; for a data set"
                " without a length, set AdaLabel(num_training_samples=...) to its size."
            )

    def mean(self, collective: Optional[Collective] = None) -> Tensor:
        """``(N,)`` each sample's average margin, NaN for a sample no training step saw. With ``collective``, the
        unfinished epoch's margins of every process are included (without ending the epoch)."""
        epoch = torch.stack([self.epoch_total, self.epoch_count])
        if collective is not None:
            epoch = collective.sum(epoch)
        total, count = self.total + epoch[0], self.count + epoch[1]
        return torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, float("nan")))

    def drop_open_epoch(self) -> None:
        """Forget this epoch's own sums: a process other than rank 0 restored from a checkpoint holds rank 0's."""
        self.epoch_total.zero_()
        self.epoch_count.zero_()

    def state_dict(self) -> Dict[str, Any]:
        return {"version": TRAINING_MARGINS_STATE_VERSION, "num_samples": self.num_samples, "epochs": self.epochs,
                "total": self.total.clone(), "count": self.count.clone(), "epoch_total": self.epoch_total.clone(),
                "epoch_count": self.epoch_count.clone()}

    @classmethod
    def from_state_dict(cls, state: Any, device: Optional[torch.device] = None) -> "TrainingMargins":
        """A tracker restored from :meth:`state_dict`'s output, checked."""
        names = ("total", "count", "epoch_total", "epoch_count")
        if not isinstance(state, dict) or state.get("version") != TRAINING_MARGINS_STATE_VERSION:
            raise ValueError("This checkpoint's training margins were not written by TrainingMargins.state_dict().")
        num_samples = state.get("num_samples")
        for name in names:
            value = state.get(name)
            if not isinstance(value, Tensor) or tuple(value.shape) != (num_samples,) or not value.isfinite().all():
                raise ValueError(f"This checkpoint's training margins have a malformed {name!r}: expected"
                                 f" {num_samples} finite values.")
        margins = cls(num_samples, device)
        for name in names:
            getattr(margins, name).copy_(state[name])
        margins.epochs = int(state.get("epochs", 0))
        return margins
