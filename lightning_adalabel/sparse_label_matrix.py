"""The ALR engine for large label sets: each row of Q keeps its ``top_k`` largest entries and a uniform remainder.

A dense Q and its statistics are ``2 K^2`` floats (80 GB at K = 100,000). :class:`SparseLabelMatrix` never builds a
``K x K`` tensor: in the loss, the statistics, the refresh and the checkpoint every tensor is ``K x k`` or smaller.

Representation. Row k of Q is ``Q[k] = sum_i values[k, i] e_{indices[k, i]} + residual_mass[k] * u_k``: ``top_k``
explicit entries plus a mass spread uniformly over the row's allowed classes ``u_k`` (the other K - 1 classes, or
all K with ``include_diagonal``). The rows sum to 1 (0 before their first refresh with ``start="zeros"``). The
uniform remainder makes the initial matrix (uniform) exact, and a refresh moves what it cannot keep into it instead
of renormalising the kept entries, so every row keeps its total mass and what is dropped becomes uniform, never
concentrated on arbitrary classes. An unused slot holds the row's own class with value 0.

Statistics in bounded memory. Every counted sample of class k contributes the ``statistics_top_k`` largest entries
of its residual prediction ``p_res`` (``p`` with ``include_diagonal``); the rest of its mass goes to the row's
uniform remainder. The contributions are merged at every batch into a candidate table of ``candidates`` entries per
class (a ``(K + 1) x c`` table, the last row a spare for samples that are not counted): the batch's rows of the table
and its new entries are coalesced and each row keeps its ``c`` largest sums; what does not fit goes to the row's
remainder. What the approximation drops, then: the mass outside each sample's top entries, and candidates that fall
out of a row's ``c`` largest sums (both kept as uniform mass). With ``top_k = statistics_top_k = candidates = K - 1``
nothing is dropped and the engine equals the dense :class:`~lightning_adalabel.LabelMatrix`.

The refresh is the dense engine's (mean estimator with momentum, count-aware prior, rows without samples kept or
reset), computed on the sparse rows: the new row is a weighted sum of the old row and the statistics, coalesced, and
its ``top_k`` largest entries kept. Across processes the statistics are gathered (one ``all_gather`` of a
``K x (5 + 2c)`` tensor per refresh) and merged identically on every rank, so every rank ends with the same Q.

The steps follow torchmetrics' naming: :func:`_sparse_statistics` (one batch, no state), :func:`_coalesce_top` (a
batch's merge into the candidate table: triples of any rows), :func:`_coalesce_rows` (the refresh's merge of each
row's old entries with every rank's candidates), :func:`_refresh_weights` (the dense refresh as weights).
"""

from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_adalabel.compiled_loss import compiled
from lightning_adalabel.engine import Collective, LabelMatrixEngine
from lightning_adalabel.fused import sparse_soft_label_loss
from lightning_adalabel.inputs import ClassificationBatch, _format, _reduce
from lightning_adalabel.losses import sparse_loss_per_sample
from lightning_adalabel.state_versions import SPARSE_STATE_VERSION, read_sparse_engine_state
from lightning_adalabel.statistics import (
    COUNTED,
    SEEN,
    TALLY_COLUMNS,
    _counted,
    _refresh_weights,
    batch_tallies,
    softmax_is_statistic,
    statistics_target,
)
from lightning_adalabel.validation import check_int, warn_deprecated

# Class indices travel through the cross-rank gather as float32, exact below 2^24.
_MAX_CLASSES = 2**24
# Non-negative float32 values order as their bit patterns read as integers: a row-major, value-descending order in one
# sort key (row * 2^32 + descending bits).
_ROW_STRIDE, _TOP_BITS = 2**32, 2**31 - 1


class SparseBatchStatistics(NamedTuple):
    """What one batch adds to the statistics (see :meth:`SparseLabelMatrix.add`); computed without touching them."""

    destination: Tensor
    """``(M,)`` row of each sample's entries: its class if counted, K (the spare row) otherwise."""
    columns: Tensor
    """``(M, m)`` classes of the sample's largest residual probabilities."""
    values: Tensor
    """``(M, m)`` those probabilities (0 where the sample is not counted)."""
    rest: Tensor
    """``(M,)`` the sample's mass outside its ``m`` entries, kept as uniform mass (0 where not counted)."""
    classes: Tensor
    """``(M,)`` class of each sample for the tallies (0 for invalid targets)."""
    counts: Tensor
    """``(M, 4)`` float: counted, seen, non-finite, invalid (the dense engine's tallies)."""


def _sparse_statistics(
    batch: ClassificationBatch, samples: str, estimator: str, include_diagonal: bool, top: int,
    from_loss: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> SparseBatchStatistics:
    """The ``top`` largest entries of each sample's ``p_res`` (``p`` with ``include_diagonal``; a one-hot of the top
    wrong class for ``confusion``) and the tallies; a few vectorised ops, no host sync. ``from_loss``: the loss's
    ``(P, largest logit P saw, logit row sums)`` when its ``P`` is this statistic (no second softmax).

    Example:
        >>> batch = _format(torch.tensor([[0.0, 3.0, 1.0, 0.0]]), torch.tensor([0]))
        >>> statistics = _sparse_statistics(batch, "misclassified", "mean", False, top=1)
        >>> statistics.destination, statistics.columns, statistics.values, statistics.rest
        (tensor([0]), tensor([[1]]), tensor([[0.8438]]), tensor([0.1562]))
    """
    with torch.no_grad():
        logits = batch.logits.detach().float()
        target = statistics_target(batch)  # a probability target's dominant class, as in the dense engine
        index = target[:, None]
        if from_loss is None:
            masked = logits if include_diagonal else logits.scatter(1, index, float("-inf"))
            probs, largest, logit_sums = None, masked.amax(dim=1), logits.sum(dim=1)
        else:
            probs, largest, logit_sums = from_loss
        # Usable, as in the dense engine: no NaN or +inf (the row sum is -inf with -inf masks, NaN or +inf
        # otherwise), a finite target logit, and an allowed class for P (its largest logit finite).
        true_logit = logits.gather(1, index).squeeze(1)
        finite = (logit_sums < float("inf")) & torch.isfinite(largest) & (true_logit > float("-inf"))
        # The true logit against the largest other one (or all, with the diagonal): a tie counts as right.
        correct = true_logit >= largest
        counted = _counted(samples, finite & batch.valid, correct)
        destination, counts = batch_tallies(batch, target, counted, finite)
        if samples == "none":
            empty = logits.new_zeros(logits.shape[0], 0)
            return SparseBatchStatistics(destination, empty.long(), empty, logits.new_zeros(logits.shape[0]), target,
                                         counts)
        if estimator == "confusion":  # one count for the top allowed class, the first of ties (as argmax)
            columns = masked.argmax(dim=1, keepdim=True)
            values, rest = torch.ones_like(columns, dtype=logits.dtype), logits.new_zeros(logits.shape[0])
        else:
            # p_res of the true class is 0: below every wrong class (a tie at 0 adds nothing wherever it goes).
            values, columns = (masked.softmax(dim=1) if probs is None else probs.detach()).topk(top, dim=1)
            values = values.float()
            rest = (1.0 - values.sum(dim=1)).clamp_min(0.0)
        values = torch.where(counted[:, None], values, 0.0)
        rest = torch.where(counted, rest, 0.0)
        return SparseBatchStatistics(destination, columns, values, rest, target, counts)


def _coalesce_top(
    rows: Tensor, columns: Tensor, values: Tensor, num_rows: int, width: int, num_columns: int, fill: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sum the ``(row, column, value)`` triples with the same row and column, and keep each row's ``width`` largest
    sums: ``(indices, values)`` of shape ``(num_rows, width)`` and each row's ``dropped`` mass (what did not fit).

    ``rows`` in ``[0, num_rows]`` (``num_rows`` is a spare row, discarded), ``values >= 0``. Unused slots hold the
    column ``fill[row]`` with value 0. Ties keep the lower column. Static shapes (two sorts and a few scatters), so
    no host sync; deterministic, so every rank that merges the same triples gets the same rows.

    Example:
        >>> rows, columns = torch.tensor([0, 0, 0, 1]), torch.tensor([2, 1, 2, 0])
        >>> _coalesce_top(rows, columns, torch.tensor([0.25, 0.5, 0.5, 1.0]), 2, 1, 3, torch.tensor([0, 1]))
        (tensor([[2],
                [0]]), tensor([[0.7500],
                [1.0000]]), tensor([0.5000, 0.0000]))
    """
    rows, columns = rows.reshape(-1), columns.reshape(-1)
    values = values.reshape(-1).float().abs()  # abs: -0.0 would order as a huge value below
    size, device = rows.numel(), rows.device
    key, order = (rows * num_columns + columns).sort(stable=True)
    new = torch.ones(size, dtype=torch.bool, device=device)
    new[1:] = key[1:] != key[:-1]
    segment = new.cumsum(0) - 1
    summed = values.new_zeros(size).index_add_(0, segment, values[order])
    # Every entry of a segment has the same key; segments past the last one go to the spare row.
    segment_key = key.new_full((size,), num_rows * num_columns).scatter_(0, segment, key)
    segment_row, segment_column = segment_key // num_columns, segment_key % num_columns
    bits = summed.view(torch.int32).long()
    order = (segment_row * _ROW_STRIDE + (_TOP_BITS - bits)).argsort(stable=True)
    segment_row, segment_column, summed = segment_row[order], segment_column[order], summed[order]
    per_row = torch.zeros(num_rows + 1, dtype=torch.long, device=device).index_add_(
        0, segment_row, torch.ones_like(segment_row))
    rank = torch.arange(size, device=device) - (per_row.cumsum(0) - per_row)[segment_row]
    keep = (rank < width) & (segment_row < num_rows)
    slot = torch.where(keep, segment_row * width + rank, num_rows * width)  # the last slot is a discarded dump
    out_indices = torch.cat([fill.long().repeat_interleave(width), fill.new_zeros(1, dtype=torch.long)])
    out_indices = out_indices.index_put_((slot,), segment_column)
    out_values = values.new_zeros(num_rows * width + 1).index_put_((slot,), summed)
    dropped = values.new_zeros(num_rows + 1).index_add_(0, segment_row, torch.where(keep, 0.0, summed))
    return out_indices[:-1].view(num_rows, width), out_values[:-1].view(num_rows, width), dropped[:num_rows]


def _coalesce_rows(columns: Tensor, values: Tensor, width: int, fill: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`_coalesce_top` where row r's triples are the r-th row of ``columns`` and ``values`` (R x w): a batched
    sort of short rows and a ``topk``, much cheaper than one global sort (the refresh's case).

    Example:
        >>> _coalesce_rows(torch.tensor([[2, 1, 2], [0, 0, 1]]), torch.tensor([[0.25, 0.5, 0.5], [1.0, 1.0, 0.5]]),
        ...                1, fill=torch.tensor([0, 1]))
        (tensor([[2],
                [0]]), tensor([[0.7500],
                [2.0000]]), tensor([0.5000, 0.5000]))
    """
    columns, order = columns.sort(dim=1, stable=True)
    values = values.float().gather(1, order)
    new = torch.ones_like(columns, dtype=torch.bool)
    new[:, 1:] = columns[:, 1:] != columns[:, :-1]
    segment = new.cumsum(dim=1) - 1
    summed = torch.zeros_like(values).scatter_add_(1, segment, values)
    # Every entry of a segment has the same column; unused segments hold the fill column with value 0.
    segment_columns = fill[:, None].expand_as(columns).clone().scatter_(1, segment, columns)
    kept, position = summed.topk(min(width, summed.shape[1]), dim=1)
    dropped = summed.scatter(1, position, 0.0).sum(dim=1)
    indices = segment_columns.gather(1, position)
    if kept.shape[1] < width:  # fewer triples than slots
        pad = width - kept.shape[1]
        indices = torch.cat([indices, fill[:, None].expand(-1, pad)], dim=1)
        kept = torch.cat([kept, kept.new_zeros(kept.shape[0], pad)], dim=1)
    return indices, kept, dropped


def _class_index_loss_and_statistics(
    logits: Tensor, target: Tensor, ignore_index: int, indices: Tensor, values: Tensor, residual_mass: Tensor,
    decoupled: bool, alpha: float, reduction: str, samples: str, estimator: str, include_diagonal: bool,
    statistics_top_k: int,
) -> Tuple[Tensor, SparseBatchStatistics]:
    """The reduced loss of a batch with class-index targets and its statistics; one softmax where the loss's
    probabilities are the statistic (the ``mean`` estimator, ``p_res`` for decoupled, ``p`` for mixed with the
    diagonal), as the dense engine. A pure function of tensors and settings, so that ``compile_loss=True`` compiles
    it whole."""
    batch = _format(logits, target, ignore_index)
    per_row, probs, largest, logit_sums = sparse_soft_label_loss(
        batch, indices, values, residual_mass, decoupled, alpha, include_diagonal)
    shared = softmax_is_statistic(samples, estimator, include_diagonal, decoupled)
    statistics = _sparse_statistics(batch, samples, estimator, include_diagonal, statistics_top_k,
                                    (probs, largest, logit_sums) if shared else None)
    return _reduce(per_row, batch, reduction), statistics


class SparseLabelMatrix(LabelMatrixEngine):
    """Q with ``top_k`` entries per row and a uniform remainder, and bounded statistics (see the module docstring);
    the :class:`~lightning_adalabel.engine.LabelMatrixEngine` contract.

    Args:
        num_classes: K.
        top_k: explicit entries per row of Q (at most the K - 1 other classes, K with ``include_diagonal``).
        samples, estimator, momentum, include_diagonal, prior, prior_strength, start, empty_rows: as
            :class:`~lightning_adalabel.label_matrix.LabelMatrix`; ``estimator`` is ``"mean"`` or ``"confusion"``
            (the ``geometric`` mean of ``log p_res`` has no sparse form).
        statistics_top_k: entries of each sample's ``p_res`` kept in the statistics (default ``2 * top_k``).
        candidates: candidate entries per class in the statistics (default ``4 * top_k``). With these defaults the
            learned rows measured as close to the dense Q as a ``top_k`` truncation of it can be (see
            ``docs/large_label_sets.md``).
        device: where Q and the statistics live (the logits' device).
        compile_loss: as :class:`~lightning_adalabel.label_matrix.LabelMatrix`, for class-index targets
            (probability targets run eagerly: torch.compile does not trace their sparse product).

    Example:
        >>> matrix = SparseLabelMatrix(4, top_k=1)
        >>> matrix.update(torch.tensor([[0.0, 3.0, 1.0, 0.0]]), torch.tensor([0]))
        >>> _ = matrix.refresh()
        >>> matrix.indices[0], matrix.values[0], matrix.residual_mass[0]
        (tensor([1]), tensor([0.8438]), tensor(0.1562))
        >>> matrix.to_dense()[0]
        tensor([0.0000, 0.8959, 0.0521, 0.0521])
    """

    def __init__(
        self,
        num_classes: int,
        top_k: int,
        samples: str = "misclassified",
        estimator: str = "mean",
        momentum: float = 1.0,
        include_diagonal: bool = False,
        prior: str = "uniform",
        prior_strength: float = 0.0,
        start: str = "uniform",
        empty_rows: str = "keep",
        statistics_top_k: Optional[int] = None,
        candidates: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        compile_loss: bool = False,
    ) -> None:
        self._configure(num_classes, compile_loss, samples=samples, estimator=estimator, momentum=momentum,
                        include_diagonal=include_diagonal, prior=prior, prior_strength=prior_strength, start=start,
                        empty_rows=empty_rows)
        if num_classes >= _MAX_CLASSES:
            raise ValueError(f"The sparse label matrix takes fewer than {_MAX_CLASSES} classes, got {num_classes}.")
        if estimator == "geometric":
            raise ValueError(
                "The 'geometric' estimator averages log p_res over all classes, which has no sparse form: use"
                " estimator='mean' (the default) or 'confusion' with top_k, or the dense matrix (top_k=None)."
            )
        allowed = num_classes if include_diagonal else num_classes - 1
        check_int("top_k", top_k, minimum=1)
        check_int("statistics_top_k", statistics_top_k, minimum=1, allow_none=True)
        check_int("candidates", candidates, minimum=1, allow_none=True)
        # Never more entries than the row has classes: K - 1 everywhere means nothing is dropped.
        self.top_k = min(top_k, allowed)
        self.statistics_top_k = min(statistics_top_k or 2 * top_k, allowed)
        self.candidates = min(candidates or 4 * top_k, allowed)
        self.allowed = allowed
        diagonal = torch.arange(num_classes, device=device)
        self.indices = diagonal[:, None].repeat(1, self.top_k)
        self.values = torch.zeros(num_classes, self.top_k, device=device, dtype=torch.float32)
        self.residual_mass = torch.full((num_classes,), 0.0 if start == "zeros" else 1.0, device=device,
                                        dtype=torch.float32)
        self.reset_statistics()

    def _sizes(self) -> Dict[str, Any]:
        return {"top_k": self.top_k, "statistics_top_k": self.statistics_top_k, "candidates": self.candidates}

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: Union[str, torch.device]) -> "SparseLabelMatrix":
        for name in ("indices", "values", "residual_mass", "candidate_indices", "candidate_values", "uniform_sums",
                     "tallies"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def reset_statistics(self) -> None:
        num_classes, device = self.num_classes, self.device
        # Row K is the spare row of samples that are not counted; an unused slot holds the row's class, value 0.
        spare = torch.arange(num_classes + 1, device=device).clamp_max(num_classes - 1)
        self.candidate_indices = spare[:, None].repeat(1, self.candidates)
        self.candidate_values = torch.zeros(num_classes + 1, self.candidates, device=device, dtype=torch.float32)
        self.uniform_sums = torch.zeros(num_classes + 1, device=device, dtype=torch.float32)
        self.tallies = torch.zeros(num_classes, TALLY_COLUMNS, device=device, dtype=torch.float32)

    # ---- Q -----------------------------------------------------------------------------------------------------

    def rows(self, classes: Tensor) -> Tensor:
        """The dense rows of Q of the given classes, ``(len(classes), K)``: their uniform remainder with their
        explicit entries added."""
        floor = (self.residual_mass.index_select(0, classes) / self.allowed)[:, None]
        rows = floor.expand(classes.shape[0], self.num_classes).clone()
        if not self.include_diagonal:
            rows.scatter_(1, classes[:, None], 0.0)
        return rows.scatter_add_(1, self.indices.index_select(0, classes), self.values.index_select(0, classes))

    def to_dense(self) -> Tensor:
        """Q as a ``K x K`` tensor: for tests and small K only (it is the tensor this class exists to avoid)."""
        return self.rows(torch.arange(self.num_classes, device=self.device))

    def top_pairs(self, n: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(rows, columns, Q values)`` of the ``n`` largest explicit off-diagonal entries, largest first."""
        values = self.values + (self.residual_mass / self.allowed)[:, None]
        values = values.masked_fill(self.indices == torch.arange(self.num_classes, device=self.device)[:, None],
                                    float("-inf"))
        top = values.flatten().topk(min(n, values.numel()))
        return top.indices // self.top_k, self.indices.flatten()[top.indices], top.values

    def mean_entropy(self) -> Tensor:
        """The mean over rows of the entropy of Q's rows, from the sparse rows (unused slots hold 0)."""
        floor = (self.residual_mass / self.allowed)[:, None]
        explicit = torch.special.entr(self.values + floor) - torch.special.entr(floor.expand_as(self.values))
        explicit = torch.where(self.values > 0, explicit, 0.0)  # a zero entry is the floor, counted once below
        return (explicit.sum(dim=1) + self.allowed * torch.special.entr(floor.squeeze(1))).mean()

    # ---- the loss and the statistics -------------------------------------------------------------------------

    def loss_and_statistics(
        self, logits: Tensor, target: Tensor, ignore_index: int, loss: str, alpha: float, reduction: str = "mean"
    ) -> Tuple[Tensor, SparseBatchStatistics]:
        """The reduced loss and the statistics of a checked batch (see :func:`_class_index_loss_and_statistics`),
        compiled when this engine was built with ``compile_loss=True``."""
        if loss == "ce" or target.is_floating_point():
            # Eager even with compile_loss: torch.compile does not trace the sparse CSR product of probability targets.
            batch = _format(logits, target, ignore_index)
            return self._batch_loss(batch, loss, alpha, reduction), self.batch_statistics(batch)
        compute = compiled(_class_index_loss_and_statistics) if self.compile_loss else _class_index_loss_and_statistics
        return compute(logits, target, ignore_index, self.indices, self.values, self.residual_mass, loss == "decoupled",
                       alpha, reduction, self.samples, self.estimator, self.include_diagonal, self.statistics_top_k)

    def loss_only(
        self, logits: Tensor, target: Tensor, ignore_index: int, loss: str, alpha: float, reduction: str = "mean"
    ) -> Tensor:
        return self._batch_loss(_format(logits, target, ignore_index), loss, alpha, reduction)

    def _batch_loss(self, batch: ClassificationBatch, loss: str, alpha: float, reduction: str) -> Tensor:
        """The loss of a formatted batch with this Q, reduced as torch reduces; no statistics."""
        if loss != "ce" and not batch.probabilistic:
            return _reduce(sparse_soft_label_loss(batch, self.indices, self.values, self.residual_mass,
                                                  loss == "decoupled", alpha, self.include_diagonal)[0],
                           batch, reduction)
        per_sample = sparse_loss_per_sample(batch, self.indices, self.values, self.residual_mass, loss, alpha,
                                            self.include_diagonal)
        return _reduce(per_sample, batch, reduction)

    def batch_statistics(self, batch: ClassificationBatch) -> SparseBatchStatistics:
        """The statistics of a formatted batch, from its logits."""
        return _sparse_statistics(batch, self.samples, self.estimator, self.include_diagonal, self.statistics_top_k)

    def add(self, statistics: SparseBatchStatistics) -> None:
        """Merge a batch's statistics into the candidate table: the rows of the batch's classes are coalesced with
        its entries, each keeps its ``candidates`` largest sums, the rest becomes uniform mass. No host sync."""
        with torch.no_grad():
            self.tallies.index_add_(0, statistics.classes, statistics.counts)
            if statistics.columns.shape[1] == 0:
                return
            self.uniform_sums.index_add_(0, statistics.destination, statistics.rest.float())
            self._merge(statistics.destination, statistics.columns, statistics.values)

    def _merge(self, destination: Tensor, columns: Tensor, values: Tensor) -> None:
        num_classes, width = self.num_classes, self.candidates
        # One local row per distinct destination of the batch: its table row is read once, its entries added.
        classes, order = destination.sort(stable=True)
        first = torch.ones_like(classes, dtype=torch.bool)
        first[1:] = classes[1:] != classes[:-1]
        local_sorted = first.cumsum(0) - 1
        local = torch.empty_like(local_sorted).scatter_(0, order, local_sorted)
        size = classes.numel()
        row_class = torch.full_like(classes, num_classes).scatter_(0, local_sorted, classes)
        table_values = self.candidate_values[classes] * (first & (classes < num_classes))[:, None]
        rows = torch.cat([local_sorted[:, None].expand(size, width), local[:, None].expand_as(columns)], dim=1)
        merged_columns = torch.cat([self.candidate_indices[classes], columns], dim=1)
        merged_values = torch.cat([table_values, values.float()], dim=1)
        indices, kept, dropped = _coalesce_top(rows, merged_columns, merged_values, size, width, num_classes,
                                               fill=row_class.clamp_max(num_classes - 1))
        self.candidate_indices.index_copy_(0, row_class, indices)
        self.candidate_values.index_copy_(0, row_class, kept)
        self.uniform_sums.index_add_(0, row_class, dropped)

    # ---- the refresh -----------------------------------------------------------------------------------------

    def _packed_statistics(self) -> Tensor:
        """``K x (5 + 2c)``: tallies, uniform sums, candidate classes (as floats, exact below 2^24) and values."""
        num_classes = self.num_classes
        return torch.cat([self.tallies, self.uniform_sums[:num_classes, None],
                          self.candidate_indices[:num_classes].float(), self.candidate_values[:num_classes]], dim=1)

    def _refresh(self, collective: Collective) -> Tensor:
        # One gather over processes of one K x (5 + 2c) tensor; every rank merges the same stack in the same order, so
        # every rank ends with the same Q.
        num_classes, width, device = self.num_classes, self.candidates, self.device
        packed = self._packed_statistics()
        stacked = collective.gather(packed).reshape(-1, *packed.shape)
        tallies, uniform_sums = stacked[:, :, :TALLY_COLUMNS].sum(dim=0), stacked[:, :, TALLY_COLUMNS].sum(dim=0)
        candidate_indices = stacked[:, :, TALLY_COLUMNS + 1:TALLY_COLUMNS + 1 + width].round().long()
        candidate_values = stacked[:, :, TALLY_COLUMNS + 1 + width:]
        if self.samples != "none":
            old_weight, stat_weight, uniform_weight = _refresh_weights(
                tallies[:, COUNTED], tallies[:, SEEN], self.momentum, self.prior, self.prior_strength, self.empty_rows)
            classes = torch.arange(num_classes, device=device)
            # Row k: its old entries, then rank 0's candidates, rank 1's, ... (the same order on every rank).
            columns = torch.cat([self.indices, candidate_indices.transpose(0, 1).reshape(num_classes, -1)], dim=1)
            values = torch.cat([self.values * old_weight[:, None],
                                candidate_values.transpose(0, 1).reshape(num_classes, -1) * stat_weight[:, None]],
                               dim=1)
            self.indices, self.values, dropped = _coalesce_rows(columns, values, self.top_k, fill=classes)
            self.residual_mass = (self.residual_mass * old_weight + uniform_sums * stat_weight + uniform_weight
                                  + dropped)
        self.reset_statistics()
        return tallies

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Q and the statistics: ``O(K (top_k + candidates))`` numbers, never ``K x K``."""
        num_classes = self.num_classes
        return {
            "version": SPARSE_STATE_VERSION,
            "kind": "sparse",
            **self.config(),
            "indices": self.indices,
            "values": self.values,
            "residual_mass": self.residual_mass,
            "candidate_indices": self.candidate_indices[:num_classes].clone(),
            "candidate_values": self.candidate_values[:num_classes].clone(),
            "uniform_sums": self.uniform_sums[:num_classes].clone(),
            "tallies": self.tallies.clone(),
            "num_refreshes": self.num_refreshes,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore Q and the statistics onto this matrix's device; the configuration must match and the values must
        be a valid sparse label matrix with finite, non-negative statistics of the right shapes."""
        state = read_sparse_engine_state(state)
        self._check_config(state)
        num_classes, k, c = self.num_classes, self.top_k, self.candidates
        shapes = {"indices": (num_classes, k), "values": (num_classes, k), "residual_mass": (num_classes,),
                  "candidate_indices": (num_classes, c), "candidate_values": (num_classes, c),
                  "uniform_sums": (num_classes,), "tallies": (num_classes, TALLY_COLUMNS)}
        for key, shape in shapes.items():
            value = state.get(key)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"The saved sparse label matrix's `{key}` has shape {got}, expected {shape}.")
        for key in ("indices", "candidate_indices"):
            if bool(((state[key] < 0) | (state[key] >= num_classes)).any()):
                raise ValueError(f"The saved sparse label matrix's `{key}` holds classes outside [0, {num_classes}).")
        numbers = torch.cat([state[key].detach().double().cpu().flatten() for key in
                             ("values", "residual_mass", "candidate_values", "uniform_sums", "tallies")])
        if not bool(torch.isfinite(numbers).all()) or bool((numbers < 0).any()):
            raise ValueError("The saved sparse label matrix holds NaN/Inf or negative values. Resume from an earlier"
                             " checkpoint, or start a new run.")
        row_sums = state["values"].double().sum(dim=1) + state["residual_mass"].double()
        bad = (row_sums - 1).abs() > 1e-3
        if self.start == "zeros":
            bad &= row_sums != 0
        if bool(bad.any()):
            raise ValueError("The saved sparse label matrix has rows that do not sum to 1.")
        check_int("num_refreshes", state.get("num_refreshes"), minimum=0)
        device = self.device
        self.indices = state["indices"].to(device, torch.long).clone()
        self.values = state["values"].to(device, torch.float32).clone()
        self.residual_mass = state["residual_mass"].to(device, torch.float32).clone()
        self.reset_statistics()
        self.candidate_indices[:num_classes] = state["candidate_indices"].to(device, torch.long)
        self.candidate_values[:num_classes] = state["candidate_values"].to(device, torch.float32)
        self.uniform_sums[:num_classes] = state["uniform_sums"].to(device, torch.float32)
        self.tallies.copy_(state["tallies"].to(device, torch.float32))
        self.num_refreshes = state["num_refreshes"]

    def reduced_loss(self, batch: ClassificationBatch, loss: str, alpha: float, reduction: str = "mean") -> Tensor:
        """Deprecated: :meth:`loss_only`, the contract's name, takes the batch as passed to the loss."""
        warn_deprecated("SparseLabelMatrix.reduced_loss", "SparseLabelMatrix.loss_only")
        return self._batch_loss(batch, loss, alpha, reduction)
