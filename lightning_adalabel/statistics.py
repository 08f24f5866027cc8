"""What every engine counts per batch, and the refresh rule that turns its statistics into Q.

Both engines (the dense :class:`~lightning_adalabel.label_matrix.LabelMatrix` and the ``top_k``
:class:`~lightning_adalabel.sparse_label_matrix.SparseLabelMatrix`) keep, besides their sums of predictions, the same
``K x 4`` *tallies*, one row per target class:

======================  ==================================================================
column                  meaning (row k = samples whose target class is k)
======================  ==================================================================
:data:`COUNTED` (0)     number of samples that entered the sums
:data:`SEEN` (1)        number of samples of class k seen (entered or not; ignored positions are not seen)
:data:`NONFINITE` (2)   number of samples of class k left out for non-finite logits
:data:`INVALID` (3)     invalid targets (no class: all are added to row 0), see :mod:`lightning_adalabel.inputs`
======================  ==================================================================

Read them through the engines' named properties (``counts``, ``seen``, ``nonfinite``, ``invalid``), or these
constants, never by a bare column number.

Which samples enter the sums (:func:`_counted`) is one rule for both engines and both paths (the loss's own softmax,
:mod:`lightning_adalabel.fused`, or a second pass over the logits): valid, with usable logits, and selected by
``samples`` (``"misclassified"``, ``"correct"``, ``"all"`` or ``"none"``); a tie between the true class and a wrong
one counts as predicted right.

The refresh (:func:`_label_matrix_compute`; :func:`_refresh_weights` is the same rule as per-row weights, which the
sparse engine applies to its rows): each row that received samples moves toward its estimate,
``Q[k] <- lerp(Q[k], estimate_k, momentum)``, where the estimate is the statistics' mean (or, with a prior,
``(S_k + m_k prior_k) / (n_k + m_k)``); a row without samples is kept, or reset to uniform with
``empty_rows="uniform"``.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from lightning_adalabel.inputs import ClassificationBatch

TALLY_COLUMNS = 4
# The columns of the K x 4 tallies.
COUNTED, SEEN, NONFINITE, INVALID = range(TALLY_COLUMNS)


def _counted(samples: str, usable: Tensor, correct: Tensor) -> Tensor:
    """Which rows enter the statistics' sums, among the valid rows with finite logits."""
    if samples == "misclassified":
        return usable > correct
    if samples == "correct":
        return usable & correct
    return usable if samples == "all" else torch.zeros_like(usable)


def _tallies(
    counted: Tensor, valid: Tensor, finite: Tensor, invalid: Tensor, target: Tensor, num_classes: int
) -> Tuple[Tensor, Tensor]:
    """Each row's place in the statistics, ``(M,)``: its class, or the spare row K when it is not counted; and its
    tallies ``(counted, seen, non-finite, invalid)`` as ``(M, 4)`` floats. Every argument is an ``(M, 1)`` column."""
    tallies = torch.cat([counted, valid, valid > finite, invalid], dim=1).float()  # valid > finite: valid, not finite
    return torch.where(counted, target, num_classes).view(-1), tallies


def batch_tallies(batch: ClassificationBatch, target: Tensor, counted: Tensor, finite: Tensor) -> Tuple[Tensor, Tensor]:
    """:func:`_tallies` of a formatted batch, from ``(M,)`` vectors: ``target`` (:func:`statistics_target`),
    ``counted`` and ``finite`` (usable logits)."""
    columns = (value[:, None] for value in (counted, batch.valid, finite, batch.invalid, target))
    return _tallies(*columns, batch.logits.shape[1])  # type: ignore[call-arg]


def statistics_target(batch: ClassificationBatch) -> Tensor:
    """The class each row's statistic goes to: its target, or a probability target's dominant class."""
    return batch.target.argmax(dim=1) if batch.probabilistic else batch.target


def softmax_is_statistic(samples: str, estimator: str, include_diagonal: bool, decoupled: bool) -> bool:
    """Whether the loss's softmax is also the batch's statistic, so that no second softmax is needed: the ``mean``
    estimator sums ``p_res`` (the decoupled loss's softmax) or, with the diagonal, ``p`` (the mixed loss's); with
    ``samples="none"`` nothing is summed at all."""
    return samples == "none" or (estimator == "mean" and include_diagonal != decoupled)


def statistic_totals(stats: Tensor) -> Tensor:
    """``(counted, seen, nonfinite, invalid)`` sample totals over all classes of the ``K x 4`` tallies (what an
    engine's ``refresh`` returns), or of any table whose last four columns are the tallies.

    Example:
        >>> statistic_totals(torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
        tensor([1., 2., 0., 1.])
    """
    return stats[:, -TALLY_COLUMNS:].sum(dim=0)


def uniform_entry(num_classes: int, include_diagonal: bool) -> float:
    """An entry of the uniform row: ``1 / K`` over all classes, or ``1 / (K - 1)`` over the wrong ones."""
    return 1.0 / (num_classes if include_diagonal else num_classes - 1)


# ---- the refresh ------------------------------------------------------------------------------------------------


def refreshed_rows(
    sums: Tensor, counts: Tensor, estimator: str, include_diagonal: bool, prior: Optional[Tensor] = None,
    pseudo_counts: Optional[Tensor] = None,
) -> Tensor:
    """The estimator's target row for every class (rows with ``counts == 0`` and no pseudo-count are meaningless).

    ``mean`` is the arithmetic mean of ``p_res`` (minimises E[KL(p_res || q)]); ``geometric`` is the softmax of
    the mean ``log p_res`` (minimises E[KL(q || p_res)], the paper's update loss); ``confusion`` is the frequency
    of each wrong class as the model's top wrong guess. With a ``prior`` (K x K) and
    ``pseudo_counts`` m (K,), row k is shrunk toward ``prior[k]`` as if m_k samples equal to it had been seen:
    ``(S_k + m_k prior_k) / (n_k + m_k)`` for ``mean``, the same on ``log p_res`` for ``geometric``.

    Example:
        >>> sums = torch.tensor([[0.0, 1.5], [0.5, 0.0]])
        >>> refreshed_rows(sums, torch.tensor([3.0, 1.0]), "mean", include_diagonal=True)
        tensor([[0.0000, 0.5000],
                [0.5000, 0.0000]])
    """
    return _refreshed_rows_(sums.clone(), counts, estimator, include_diagonal, prior,
                            pseudo_counts if prior is not None else None)


def _refreshed_rows_(
    sums: Tensor, counts: Tensor, estimator: str, include_diagonal: bool, prior: Optional[Tensor] = None,
    pseudo_counts: Optional[Tensor] = None, uniform_prior: bool = False,
) -> Tensor:
    """:func:`refreshed_rows` in the memory of ``sums`` (overwritten): no K x K temporary, except the ``xlogy`` of a
    previous-row prior for ``geometric``. ``uniform_prior`` shrinks toward the uniform row without building it."""
    in_logs = estimator == "geometric"
    if pseudo_counts is not None and (prior is not None or uniform_prior):
        if uniform_prior:
            value = uniform_entry(sums.shape[0], include_diagonal)
            per_row = pseudo_counts * (math.log(value) if in_logs else value)
            sums.add_(per_row[:, None])
            if not include_diagonal:  # the prior's diagonal is 0 (in logs: left out, filled with -inf below)
                sums.diagonal().sub_(per_row)
        elif in_logs:
            # xlogy: a zero pseudo-count adds nothing, even where the prior is 0 (log 0 = -inf, the residual diagonal).
            sums.add_(torch.xlogy(pseudo_counts[:, None], prior))  # type: ignore[arg-type]
        else:
            sums.addcmul_(pseudo_counts[:, None], prior)  # type: ignore[arg-type]
        counts = counts + pseudo_counts
        sums.div_(torch.where(counts > 0, counts, 1.0)[:, None])
    else:
        sums.div_(counts.clamp_min(1.0)[:, None])
    if not in_logs:
        return sums
    if not include_diagonal:
        sums.fill_diagonal_(float("-inf"))
    sums.sub_(sums.amax(dim=1, keepdim=True)).exp_()  # a softmax in place (exp(-inf) = 0 on the diagonal)
    return sums.div_(sums.sum(dim=1, keepdim=True))


def _label_matrix_compute(
    matrix: Tensor, sums: Tensor, tallies: Tensor, estimator: str, momentum: float, include_diagonal: bool,
    prior: str = "uniform", prior_strength: float = 0.0, empty_rows: str = "keep",
) -> Tensor:
    """The refreshed dense Q from (reduced) statistics: rows that received no sample keep their value, or with
    ``empty_rows="uniform"`` (the official Online Label Smoothing) are reset to the uniform row.

    With ``prior_strength`` s > 0 each refreshed row is shrunk toward a prior (``"uniform"``: the initial matrix;
    ``"previous"``: the row as it is) with the pseudo-count ``m_k = s * seen_k``: proportional to the samples of
    class k seen since the last refresh, so the same s means the same thing on any data set size. A row estimated
    from a handful of misclassified samples among many (clean data, late in training) stays close to the prior;
    a row with many (label noise) follows its statistics.

    ``sums`` is overwritten (the caller clears the statistics next): besides Q and the statistics, a refresh holds
    one K x K tensor at a time, the new Q (and, for ``geometric`` with the ``previous`` prior, one before it).
    """
    counts = tallies[:, COUNTED]
    num_classes = matrix.shape[0]
    pseudo_counts = prior_strength * tallies[:, SEEN] if prior_strength > 0 else None
    estimate = _refreshed_rows_(sums, counts, estimator, include_diagonal, matrix if prior == "previous" else None,
                                pseudo_counts, uniform_prior=prior == "uniform")
    empty = (counts <= 0)[:, None]
    if empty_rows == "uniform":
        estimate.masked_fill_(empty, uniform_entry(num_classes, include_diagonal))
        if not include_diagonal:
            estimate.diagonal().masked_fill_(empty.squeeze(1), 0.0)
        return torch.lerp(matrix, estimate, momentum)
    # Weight 0 keeps a row exactly (lerp computes a + 0 * (b - a)); its estimate is zeroed so that b is finite.
    return torch.lerp(matrix, estimate.masked_fill_(empty, 0.0), (~empty).to(matrix.dtype) * momentum)


def _refresh_weights(
    counts: Tensor, seen: Tensor, momentum: float, prior: str, prior_strength: float, empty_rows: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per row, the weights of the old row, of the statistics' sums and of the uniform row in the refreshed row:
    :func:`_label_matrix_compute`'s ``lerp(Q, estimate, momentum)`` with ``estimate = (S + m prior) / (n + m)``
    written as one linear combination, for rows that are not stored as a K x K matrix."""
    nonempty = counts > 0
    if prior_strength > 0:
        pseudo = prior_strength * seen
        total = counts + pseudo
        denominator = torch.where(total > 0, total, 1.0)
    else:
        pseudo, denominator = torch.zeros_like(counts), counts.clamp_min(1.0)
    prior_weight = pseudo / denominator
    estimate_old = prior_weight if prior == "previous" else torch.zeros_like(counts)
    estimate_uniform = prior_weight if prior == "uniform" else torch.zeros_like(counts)
    if empty_rows == "uniform":  # a row without samples is reset to the uniform row
        estimate_old = torch.where(nonempty, estimate_old, 0.0)
        estimate_uniform = torch.where(nonempty, estimate_uniform, 1.0)
        weight = torch.full_like(counts, momentum)
    else:  # weight 0 keeps a row
        weight = nonempty.to(counts.dtype) * momentum
    return (1.0 - weight) + weight * estimate_old, weight / denominator, weight * estimate_uniform
