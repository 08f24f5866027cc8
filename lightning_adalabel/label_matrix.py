"""The ALR engine: the K x K residual label matrix Q and the statistics that refresh it.

Pure torch, no Lightning: :class:`LabelMatrix` can be driven by hand, by the :class:`~lightning_adalabel.AdaLabel`
callback, or by any other training loop.

Layout of the statistics. Everything a refresh needs is a ``K x (K + 4)`` table, the *accumulator* (what
``state_dict`` saves). Read it through the named properties (:attr:`LabelMatrix.sums`, :attr:`~LabelMatrix.counts`,
...), never by column index:

======================  ==================================================================
column(s)               meaning (row k = samples whose target class is k)
======================  ==================================================================
``[:, :K]``             sum of the residual predictions (or of their logs, ``geometric``)
``[:, K]``              number of samples that entered those sums
``[:, K + 1]``          number of samples of class k seen (entered or not; ignored positions are not seen)
``[:, K + 2]``          number of samples of class k left out for non-finite logits
``[:, K + 3]``          invalid targets (no class: all are added to row 0), see :mod:`lightning_adalabel.inputs`
======================  ==================================================================

It is stored as one flat float32 buffer, ``[tallies (K x 4) | sums (K x K) | spare row (K)]``, so that a refresh
all-reduces one contiguous tensor (its first ``K * (K + 4)`` entries) and a batch adds its statistics with two
``index_add_`` into contiguous blocks (ten times faster on a CPU than into the columns of a ``K x (K + 4)`` table).
A sample that is not counted (not selected, or with NaN/Inf logits) adds its statistic to the spare row instead
of being masked, which saves a pass over the batch; the spare row is never reduced, saved or read.

The steps follow torchmetrics' naming: :func:`_label_matrix_update` (one batch into the accumulator, as
:func:`_batch_statistics` then :func:`_add_statistics`) and :func:`_label_matrix_compute` (the refreshed Q from
reduced statistics). :meth:`LabelMatrix.loss` computes the loss and the statistics of a batch from one softmax
(:mod:`lightning_adalabel.fused`).
"""

import inspect
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_adalabel.compiled_loss import compiled
from lightning_adalabel.fused import _counted, _tallies, fused_soft_label_loss
from lightning_adalabel.inputs import ClassificationBatch, _arg_validation, _format, _reduce, _tensor_validation
from lightning_adalabel.losses import _straightforward_per_sample
from lightning_adalabel.validation import check_bool, check_engine_config, check_int, validate_label_matrix

# Version of the state_dict layout. 1: accumulator K x (K + 3), no invalid-target column (lightning_adalabel 0.1.0).
STATE_VERSION = 2
_STAT_COLUMNS = 4
# Columns of the accumulator; the last four also index the K x 4 tallies on their own.
_SUMS, _COUNT, _SEEN, _NONFINITE, _INVALID = slice(None, -_STAT_COLUMNS), -4, -3, -2, -1


def _empty_buffer(num_classes: int, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """The flat statistics buffer: tallies (K x 4), sums (K x K), spare row (K); see the module docstring.

    float32 whatever the default dtype: Lightning's ``precision="64-true"`` makes float64 the default inside a
    training step, where the callback builds its engine."""
    return torch.zeros(num_classes * (_STAT_COLUMNS + num_classes + 1), device=device, dtype=torch.float32)


def _buffer_views(buffer: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """``(tallies K x 4, sums with the spare row (K + 1) x K)``: views, no copy."""
    split = num_classes * _STAT_COLUMNS
    return buffer[:split].view(num_classes, _STAT_COLUMNS), buffer[split:].view(num_classes + 1, num_classes)

ReduceFn = Callable[[Tensor], Tensor]


def initial_label_matrix(
    num_classes: int, include_diagonal: bool = False, device: Optional[Union[str, torch.device]] = None
) -> Tensor:
    """The starting Q: the softmax of an all-zero logit matrix, i.e. uniform over the allowed classes.

    Never all-zero: a zero start would give a zero soft loss until the first refresh.

    Example:
        >>> initial_label_matrix(3)
        tensor([[0.0000, 0.5000, 0.5000],
                [0.5000, 0.0000, 0.5000],
                [0.5000, 0.5000, 0.0000]])
        >>> initial_label_matrix(2, include_diagonal=True)
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    if include_diagonal:
        return torch.full((num_classes, num_classes), 1.0 / num_classes, device=device, dtype=torch.float32)
    matrix = torch.full((num_classes, num_classes), 1.0 / (num_classes - 1), device=device, dtype=torch.float32)
    return matrix.fill_diagonal_(0.0)


def residual_prediction_stats(logits: Tensor, target: Tensor, include_diagonal: bool, estimator: str) -> Tensor:
    """Per-sample statistic that enters the sums: the residual prediction ``p_res``, ``log p_res``, or the one-hot
    of its arg-max.

    ``p_res`` is the softmax over the wrong classes (the true-class logit masked to ``-inf``); with
    ``include_diagonal`` it is the full softmax (Online Label Smoothing). For ``geometric`` the true-class
    entry of ``log p_res`` (``-inf``) is replaced by 0 so that it stays out of the sums. ``confusion`` counts
    hard confusions: a 1 at the wrong class the model ranks highest (ties: the lowest index, as ``argmax``).

    Example:
        >>> residual_prediction_stats(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([1]), False, "mean")
        tensor([[0.5000, 0.0000, 0.5000]])
        >>> residual_prediction_stats(torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([1]), False, "confusion")
        tensor([[0., 0., 1.]])
    """
    if include_diagonal:
        masked = logits
    else:
        masked = logits.scatter(1, target[:, None], float("-inf"))
    if estimator == "mean":
        return masked.softmax(dim=1)
    if estimator == "confusion":
        return torch.zeros_like(masked).scatter_(1, masked.argmax(dim=1, keepdim=True), 1.0)
    log_p = masked.log_softmax(dim=1)
    return log_p if include_diagonal else log_p.scatter_(1, target[:, None], 0.0)


def select_samples(logits: Tensor, target: Tensor, samples: str) -> Tensor:
    """Boolean mask of the samples that count, without a host sync.

    A sample is predicted right when its true class has the largest logit; a tie counts as right (one ``amax``
    instead of an ``argmax``, which is ten times slower on a CPU at K=1000).

    Example:
        >>> logits = torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 0.0]])
        >>> select_samples(logits, torch.tensor([0, 1, 1]), "misclassified")
        tensor([False,  True, False])
    """
    return _counted(samples, torch.ones_like(target, dtype=torch.bool), _predicted_right(logits, target))


def _predicted_right(logits: Tensor, target: Tensor) -> Tensor:
    return logits.gather(1, target[:, None]).squeeze(1) >= logits.amax(dim=1)


class BatchStatistics(NamedTuple):
    """What one batch adds to the accumulator (see :meth:`LabelMatrix.add`); computed without touching it."""

    rows: Tensor
    """``(M, K)`` per-sample statistic (``p_res``, ``log p_res``, ``p`` or a one-hot); may be NaN where not counted."""
    destination: Tensor
    """``(M,)`` accumulator row of each statistic: its class, or K (the spare row) when it is not counted."""
    classes: Tensor
    """``(M,)`` class of each sample for the counts (0 for invalid targets)."""
    counts: Tensor
    """``(M, 4)`` float: counted, seen, non-finite, invalid."""


def _batch_statistics(
    batch: ClassificationBatch, samples: str, estimator: str, include_diagonal: bool
) -> BatchStatistics:
    """The statistics of one formatted batch, computed from its logits (see :meth:`LabelMatrix.loss` for the path
    that takes them from the loss's softmax). Only ``valid`` rows enter the sums and the seen counts; ``invalid``
    ones are only counted (in row 0, their target being no class); ignored and padding rows add nothing."""
    logits = batch.logits.detach().float()
    # Probability targets enter the statistics under their dominant class.
    target = batch.target.argmax(dim=1) if batch.probabilistic else batch.target
    # Usable logits hold no NaN or +inf, and a finite target logit; -inf entries at other classes are masks (classes a
    # sample may not take), as in F.cross_entropy. The row sum tells NaN and +inf in one reduction (for logits below
    # ~1e35): -inf with masks, NaN or +inf otherwise. The same rule as the one-softmax path's (fused.py).
    finite = (logits.sum(dim=1) < float("inf")) & (logits.gather(1, target[:, None]).squeeze(1) > float("-inf"))
    # samples="none": Q never changes, but bad targets are still counted for the refresh's error.
    if samples == "none":
        rows = logits[:, :0]
    else:
        rows = residual_prediction_stats(logits, target, include_diagonal, estimator)
        # A row whose statistic is not finite stays out: no allowed wrong class (NaN), or for "geometric" a masked
        # class (log 0 = -inf, which would pin that class's entry of Q to 0 for good).
        finite &= rows.sum(dim=1) > float("-inf")
    correct = _predicted_right(logits, target) if samples in ("misclassified", "correct") else finite
    counted = _counted(samples, finite & batch.valid, correct)  # the same rule as the one-softmax path's
    columns = (value[:, None] for value in (counted, batch.valid, finite, batch.invalid, target))
    destination, counts = _tallies(*columns, logits.shape[1])  # type: ignore[call-arg]
    return BatchStatistics(rows, destination, target, counts)


def _add_statistics(buffer: Tensor, num_classes: int, statistics: BatchStatistics) -> None:
    """Add a batch's statistics to a flat statistics buffer (:func:`_empty_buffer`) in place."""
    tallies, sums = _buffer_views(buffer, num_classes)
    if statistics.rows.shape[1]:
        sums.index_add_(0, statistics.destination, statistics.rows.to(sums.dtype))
    tallies.index_add_(0, statistics.classes, statistics.counts)


def _label_matrix_update(
    buffer: Tensor, batch: ClassificationBatch, samples: str, estimator: str, include_diagonal: bool
) -> None:
    """Add one formatted batch to a flat statistics buffer (:func:`_empty_buffer`) in place: a few vectorised ops
    and two ``index_add_``."""
    statistics = _batch_statistics(batch, samples, estimator, include_diagonal)
    _add_statistics(buffer, batch.logits.shape[1], statistics)


def statistic_totals(stats: Tensor) -> Tensor:
    """``(counted, seen, nonfinite, invalid)`` sample totals over all classes of an accumulator or of the ``K x 4``
    tallies (what :meth:`LabelMatrix.refresh` returns).

    Example:
        >>> matrix = LabelMatrix(3, samples="misclassified")
        >>> matrix.update(torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 1, 5]))
        >>> statistic_totals(matrix.accumulator)
        tensor([1., 2., 0., 1.])
    """
    return stats[:, _COUNT:].sum(dim=0)


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
            num_classes = sums.shape[0]
            value = 1.0 / (num_classes if include_diagonal else num_classes - 1)
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
    """The refreshed Q from (reduced) statistics: rows that received no sample keep their value, or with
    ``empty_rows="uniform"`` (the official Online Label Smoothing) are reset to the uniform row.

    With ``prior_strength`` s > 0 each refreshed row is shrunk toward a prior (``"uniform"``: the initial matrix;
    ``"previous"``: the row as it is) with the pseudo-count ``m_k = s * seen_k``: proportional to the samples of
    class k seen since the last refresh, so the same s means the same thing on any data set size. A row estimated
    from a handful of misclassified samples among many (clean data, late in training) stays close to the prior;
    a row with many (label noise) follows its statistics.

    ``sums`` is overwritten (the caller clears the statistics next): besides Q and the statistics, a refresh holds
    one K x K tensor at a time, the new Q (and, for ``geometric`` with the ``previous`` prior, one before it).
    """
    counts = tallies[:, _COUNT]
    num_classes = matrix.shape[0]
    pseudo_counts = prior_strength * tallies[:, _SEEN] if prior_strength > 0 else None
    estimate = _refreshed_rows_(sums, counts, estimator, include_diagonal, matrix if prior == "previous" else None,
                                pseudo_counts, uniform_prior=prior == "uniform")
    empty = (counts <= 0)[:, None]
    if empty_rows == "uniform":
        estimate.masked_fill_(empty, 1.0 / (num_classes if include_diagonal else num_classes - 1))
        if not include_diagonal:
            estimate.diagonal().masked_fill_(empty.squeeze(1), 0.0)
        return torch.lerp(matrix, estimate, momentum)
    # Weight 0 keeps a row exactly (lerp computes a + 0 * (b - a)); its estimate is zeroed so that b is finite.
    return torch.lerp(matrix, estimate.masked_fill_(empty, 0.0), (~empty).to(matrix.dtype) * momentum)


def _loss_and_statistics(
    logits: Tensor, target: Tensor, ignore_index: int, matrix: Tensor, loss: str, alpha: float, reduction: str,
    samples: str, estimator: str, include_diagonal: bool, rows_sum_to_one: bool,
) -> Tuple[Tensor, BatchStatistics]:
    """The reduced loss of a batch in ``F.cross_entropy``'s layouts and its statistics; one softmax where the loss's
    probabilities are the statistic (class-index targets, the ``mean`` estimator), the straightforward path
    otherwise. A pure function of tensors and settings, so that ``compile_loss=True`` compiles it whole."""
    batch = _format(logits, target, ignore_index)
    decoupled = loss == "decoupled"
    fused = loss != "ce" and not batch.probabilistic and (
        samples == "none" or (estimator == "mean" and include_diagonal != decoupled)
    )
    if not fused:
        value = _reduce(_straightforward_per_sample(batch, matrix, loss, alpha), batch, reduction)
        return value, _batch_statistics(batch, samples, estimator, include_diagonal)
    value, probs, destination, counts = fused_soft_label_loss(
        batch, matrix, decoupled, alpha, reduction, samples, rows_sum_to_one
    )
    rows = probs if samples != "none" else probs[:, :0]
    return value, BatchStatistics(rows, destination, batch.target, counts)


class LabelMatrix:
    """The residual label matrix Q with its online statistics.

    Args:
        num_classes: K.
        samples: which samples feed the statistics: ``"misclassified"`` (argmax != target), ``"all"``,
            ``"correct"``, or ``"none"`` (Q never changes, e.g. label smoothing).
        estimator: ``"mean"``, ``"geometric"`` or ``"confusion"`` (see :func:`refreshed_rows`).
        momentum: refreshed row = ``(1 - momentum) * old + momentum * estimate``.
        include_diagonal: keep the true class in the statistics (full softmax, Online Label Smoothing) instead
            of the residual (wrong classes only, ALR).
        device: where Q and the statistics live (the logits' device).
        initial_matrix: start from this K x K matrix instead of the uniform one (checked by
            :func:`~lightning_adalabel.validate_label_matrix`); with ``samples="none"`` it stays fixed.
        prior: what a refreshed row is shrunk toward: ``"uniform"`` (the initial uniform row) or ``"previous"``
            (the row before the refresh).
        prior_strength: the prior's pseudo-count per sample of the class seen since the last refresh (0: no
            shrinkage, each row is its statistics' estimate); see :func:`_label_matrix_compute`.
        start: ``"uniform"`` (the initial matrix above) or ``"zeros"``: Q starts all-zero, so the soft part of the
            loss is 0 until the first refresh (the official Online Label Smoothing code).
        empty_rows: at a refresh, a row without samples is kept (``"keep"``) or reset to uniform (``"uniform"``, the
            official Online Label Smoothing code).
        compile_loss: compute :meth:`loss` (formatting, loss and statistics) as one ``torch.compile``'d graph:
            several times fewer operations per batch, for a compilation on the first batch (see
            :mod:`lightning_adalabel.compiled_loss`). Values equal the eager ones to float rounding.

    Example:
        >>> matrix = LabelMatrix(3, samples="all")
        >>> matrix.update(torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]), torch.tensor([0, 0]))
        >>> matrix.counts
        tensor([2., 0., 0.])
        >>> _ = matrix.refresh()  # class 0 saw [0, .88, .12] and [0, .12, .88]; classes 1 and 2 keep their rows
        >>> matrix.matrix
        tensor([[0.0000, 0.4641, 0.5359],
                [0.5000, 0.0000, 0.5000],
                [0.5000, 0.5000, 0.0000]])
    """

    def __init__(
        self,
        num_classes: int,
        samples: str = "misclassified",
        estimator: str = "mean",
        momentum: float = 1.0,
        include_diagonal: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        initial_matrix: Optional[Tensor] = None,
        prior: str = "uniform",
        prior_strength: float = 0.0,
        start: str = "uniform",
        empty_rows: str = "keep",
        compile_loss: bool = False,
    ) -> None:
        check_int("num_classes", num_classes, minimum=2)
        check_bool("compile_loss", compile_loss)
        check_engine_config(samples, estimator, momentum, include_diagonal, prior, prior_strength, start, empty_rows)
        self.num_classes = num_classes
        self.samples = samples
        self.estimator = estimator
        self.momentum = float(momentum)
        self.include_diagonal = include_diagonal
        self.prior = prior
        self.prior_strength = float(prior_strength)
        self.start = start
        self.empty_rows = empty_rows
        self.compile_loss = compile_loss
        if initial_matrix is not None and start == "zeros":
            raise ValueError("`start='zeros'` and `initial_matrix` exclude each other: give one or the other.")
        if start == "zeros":
            self.matrix = torch.zeros(num_classes, num_classes, device=device, dtype=torch.float32)
        elif initial_matrix is None:
            self.matrix = initial_label_matrix(num_classes, include_diagonal, device)
        else:  # e.g. a matrix learned by an earlier run (load_label_matrix), used as a fixed or warm-start Q
            validate_label_matrix(initial_matrix, num_classes, include_diagonal)
            self.matrix = initial_matrix.detach().to(device, torch.float32).clone()
        self._buffer = _empty_buffer(num_classes, device)
        self.num_refreshes = 0

    @property
    def accumulator(self) -> Tensor:
        """The ``K x (K + 4)`` statistics since the last refresh (see the module docstring for its columns); a copy."""
        tallies, sums = _buffer_views(self._buffer, self.num_classes)
        return torch.cat([sums[: self.num_classes], tallies], dim=1)

    @property
    def tallies(self) -> Tensor:
        """``K x 4`` sample counts per class since the last refresh: counted, seen, non-finite, invalid (a view)."""
        return _buffer_views(self._buffer, self.num_classes)[0]

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def sums(self) -> Tensor:
        """``K x K`` running sums of ``p_res`` (or ``log p_res``) per target class, since the last refresh."""
        return _buffer_views(self._buffer, self.num_classes)[1][: self.num_classes]

    @property
    def counts(self) -> Tensor:
        """Number of samples per target class that entered :attr:`sums` since the last refresh."""
        return self.tallies[:, _COUNT]

    @property
    def seen(self) -> Tensor:
        """Number of samples per target class seen since the last refresh, counted or not (ignored ones are not)."""
        return self.tallies[:, _SEEN]

    @property
    def nonfinite(self) -> Tensor:
        """Number of samples per target class left out since the last refresh because their logits held NaN or +inf,
        or -inf at the target class (-inf elsewhere is a mask: such samples count)."""
        return self.tallies[:, _NONFINITE]

    @property
    def invalid(self) -> Tensor:
        """Number of invalid targets since the last refresh (all in row 0: they have no class)."""
        return self.tallies[:, _INVALID]

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # torch.multiprocessing (ddp_spawn, DataLoader workers) pickles CPU tensors as shared memory: every process
        # started from one callback would otherwise update a single accumulator at the same time, losing counts and
        # then all-reducing them twice. Each process owns its copy.
        self.__dict__.update(state)
        self.__dict__.setdefault("compile_loss", False)  # pickled before the setting existed
        self.matrix = self.matrix.clone()
        if "_buffer" not in state:  # pickled by lightning_adalabel 0.1, which kept the K x (K + 4) table itself
            accumulator = self.__dict__.pop("accumulator")
            self._buffer = _empty_buffer(self.num_classes, accumulator.device)
            tallies, sums = _buffer_views(self._buffer, self.num_classes)
            tallies.copy_(accumulator[:, _COUNT:]), sums[: self.num_classes].copy_(accumulator[:, _SUMS])
        self._buffer = self._buffer.clone()

    def to(self, device: Union[str, torch.device]) -> "LabelMatrix":
        self.matrix = self.matrix.to(device)
        self._buffer = self._buffer.to(device)
        return self

    def update(self, logits: Tensor, target: Tensor, ignore_index: int = -100) -> None:
        """Accumulate one batch in ``F.cross_entropy``'s layouts: logits ``(N, K, ...)`` of any float dtype, targets
        class indices ``(N, ...)`` or probabilities of the logits' shape; every position is one sample.

        Runs in float32 on the logits' device without a device-to-host copy. Rows with NaN/+inf logits are left
        out of the sums and counted in :attr:`nonfinite`; invalid targets are counted in :attr:`invalid`.
        """
        _tensor_validation(logits, target, self.num_classes)
        self.update_batch(_format(logits.detach(), target.detach(), ignore_index))

    def update_batch(self, batch: ClassificationBatch) -> None:
        """Accumulate a batch already formatted by :func:`lightning_adalabel.inputs._format`."""
        with torch.no_grad():
            _label_matrix_update(self._buffer, batch, self.samples, self.estimator, self.include_diagonal)

    def batch_statistics(self, batch: ClassificationBatch) -> BatchStatistics:
        """The statistics of a formatted batch, from its logits (when no loss of this Q computed them)."""
        return _batch_statistics(batch, self.samples, self.estimator, self.include_diagonal)

    def loss(
        self, logits: Tensor, target: Tensor, loss: str = "decoupled", alpha: float = 1.0, ignore_index: int = -100,
        reduction: str = "mean",
    ) -> Tuple[Tensor, BatchStatistics]:
        """The loss of a batch with this Q (as :func:`~lightning_adalabel.adalabel_loss`) and the batch's
        statistics, both from one softmax of the logits; :meth:`add` the statistics once the step is done.

        Example:
            >>> matrix = LabelMatrix(3)
            >>> logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 1.0]], requires_grad=True)
            >>> loss, statistics = matrix.loss(logits, torch.tensor([0, 0]))
            >>> loss.backward()
            >>> matrix.add(statistics)
            >>> matrix.counts  # the first sample is misclassified
            tensor([1., 0., 0.])
        """
        _arg_validation(ignore_index, reduction)
        _tensor_validation(logits, target, self.num_classes)
        return self._loss_and_statistics(logits, target, ignore_index, loss, alpha, reduction)

    def _loss_and_statistics(
        self, logits: Tensor, target: Tensor, ignore_index: int, loss: str, alpha: float, reduction: str = "mean"
    ) -> Tuple[Tensor, BatchStatistics]:
        """The reduced loss and the statistics of a checked batch (see :func:`_loss_and_statistics`), compiled when
        this engine was built with ``compile_loss=True``."""
        compute = compiled(_loss_and_statistics) if self.compile_loss else _loss_and_statistics
        return compute(logits, target, ignore_index, self.matrix, loss, alpha, reduction, self.samples,
                       self.estimator, self.include_diagonal, self.start != "zeros")

    def add(self, statistics: BatchStatistics) -> None:
        """Add the statistics of a batch (from :meth:`loss`) to the accumulator."""
        with torch.no_grad():
            _add_statistics(self._buffer, self.num_classes, statistics)

    def refresh(self, reduce: Optional[ReduceFn] = None) -> Tensor:
        """Fold the statistics into Q and reset them; return the (reduced) ``K x 4`` tallies that were used
        (counted, seen, non-finite, invalid per class; :func:`statistic_totals` sums them).

        Args:
            reduce: sums a tensor over processes (e.g. the strategy's all-reduce) so that every rank ends with
                the same Q; called once, on one flat tensor of all the statistics.

        Rows that received no sample keep their value. Runs on the device without a host sync.
        """
        num_classes = self.num_classes
        statistics = self._buffer[: num_classes * (num_classes + _STAT_COLUMNS)]
        if reduce is not None:
            statistics = reduce(statistics)
        split = num_classes * _STAT_COLUMNS
        tallies = statistics[:split].view(num_classes, _STAT_COLUMNS)
        sums = statistics[split:].view(num_classes, num_classes)
        if self.samples != "none":
            self.matrix = _label_matrix_compute(self.matrix, sums, tallies, self.estimator, self.momentum,
                                                self.include_diagonal, self.prior, self.prior_strength,
                                                self.empty_rows)
        tallies = tallies.clone()  # the buffer is cleared next
        self._buffer.zero_()
        self.num_refreshes += 1
        return tallies

    def reset_statistics(self) -> None:
        """Forget the statistics gathered since the last refresh (Q is kept), e.g. when a new ``fit`` starts."""
        self._buffer.zero_()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "num_classes": self.num_classes,
            "samples": self.samples,
            "estimator": self.estimator,
            "momentum": self.momentum,
            "include_diagonal": self.include_diagonal,
            "prior": self.prior,
            "prior_strength": self.prior_strength,
            "start": self.start,
            "empty_rows": self.empty_rows,
            # Q itself, as nn.Module.state_dict returns its parameters: Q is never changed in place (a refresh makes a
            # new one), so this costs no copy. The statistics are: `accumulator` is a fresh copy of them (and
            # Lightning's AsyncCheckpointIO clones what it writes in the background).
            "matrix": self.matrix,
            "accumulator": self.accumulator,
            "num_refreshes": self.num_refreshes,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore Q and the statistics onto this matrix's device; the configuration must match and the values
        must be a valid label matrix with finite, non-negative statistics of the right shape."""
        state = _upgrade_state(state)
        mismatched = [
            f"{key}={state.get(key)!r} (this one has {getattr(self, key)!r})"
            for key in _CONFIG_KEYS
            if state.get(key, _SETTING_DEFAULTS.get(key)) != getattr(self, key)
        ]
        if mismatched:
            raise ValueError(
                "The label-matrix state was saved with a different configuration: " + ", ".join(mismatched)
                + ". Resume with the same settings, or start a new run without this checkpoint."
            )
        matrix, accumulator = state["matrix"], state["accumulator"]
        try:
            validate_label_matrix(matrix, self.num_classes, self.include_diagonal, self.start == "zeros")
        except ValueError as error:
            raise ValueError(f"The saved label matrix is not valid: {error}") from error
        expected = (self.num_classes, self.num_classes + _STAT_COLUMNS)
        if not isinstance(accumulator, Tensor) or tuple(accumulator.shape) != expected:
            shape = tuple(accumulator.shape) if isinstance(accumulator, Tensor) else type(accumulator).__name__
            raise ValueError(f"The saved label-matrix statistics have shape {shape}, expected {expected}.")
        stats = accumulator.detach().double().cpu()
        if not bool(torch.isfinite(stats).all()) or bool((stats[:, _COUNT:] < 0).any()):
            raise ValueError(
                "The saved label-matrix statistics hold NaN/Inf or negative counts. Resume from an earlier checkpoint,"
                " or start a new run."
            )
        num_refreshes = state["num_refreshes"]
        check_int("num_refreshes", num_refreshes, minimum=0)
        self.matrix = matrix.detach().to(self.device, torch.float32).clone()
        accumulator = accumulator.detach().to(self.device, torch.float32)
        buffer = _empty_buffer(self.num_classes, self.device)
        tallies, sums = _buffer_views(buffer, self.num_classes)
        tallies.copy_(accumulator[:, _COUNT:])
        sums[: self.num_classes].copy_(accumulator[:, _SUMS])
        self._buffer = buffer
        self.num_refreshes = num_refreshes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, samples={self.samples!r},"
            f" estimator={self.estimator!r}, momentum={self.momentum}, include_diagonal={self.include_diagonal},"
            f" prior={self.prior!r}, prior_strength={self.prior_strength}, start={self.start!r},"
            f" empty_rows={self.empty_rows!r})"
        )


_CONFIG_KEYS = ("num_classes", "samples", "estimator", "momentum", "include_diagonal", "prior", "prior_strength",
                "start", "empty_rows")
# A state written before a setting existed was written with the setting's default.
_SETTING_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(LabelMatrix.__init__).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
_STATE_KEYS = ("num_classes", "samples", "estimator", "momentum", "include_diagonal", "matrix", "accumulator",
               "num_refreshes")


def _upgrade_state(state: Any) -> Dict[str, Any]:
    """A state of this version from one of any version this package wrote, or a clear error."""
    if not isinstance(state, dict):
        raise ValueError(f"A label-matrix state is a dict, got {type(state).__name__}.")
    version = state.get("version", 1)
    if version not in (1, STATE_VERSION):
        raise ValueError(
            f"This label-matrix state has format version {version!r}; this lightning_adalabel reads versions 1 to"
            f" {STATE_VERSION}. Upgrade lightning_adalabel, or start a new run without this checkpoint."
        )
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"This label-matrix state lacks {missing}: it was not written by LabelMatrix.state_dict(). Start a new"
            " run, or load a checkpoint written by lightning_adalabel."
        )
    if version == 1 and isinstance(state["accumulator"], Tensor) and state["accumulator"].ndim == 2:
        # Version 1 had no invalid-target column; it counted none.
        accumulator = state["accumulator"]
        state = {**state, "accumulator": torch.cat([accumulator, accumulator.new_zeros(accumulator.shape[0], 1)], 1)}
    return state
