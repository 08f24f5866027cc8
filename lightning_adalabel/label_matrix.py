"""The dense engine: the K x K label matrix Q and the statistics that refresh it.

Pure torch, no Lightning: :class:`LabelMatrix` implements :class:`~lightning_adalabel.engine.LabelMatrixEngine`, and
can be driven by hand, by the :class:`~lightning_adalabel.AdaLabel` callback, or by any other training loop.

Layout of the statistics. Everything a refresh needs is a ``K x (K + 4)`` table, the *accumulator* (what
``state_dict`` saves): the sums of the residual predictions (``[:, :K]``; of their logs for ``geometric``), then the
``K x 4`` tallies of :mod:`lightning_adalabel.statistics` (counted, seen, non-finite, invalid). Read it through the
named properties (:attr:`LabelMatrix.sums`, :attr:`~LabelMatrix.counts`, ...), never by column index.

It is stored as one flat float32 buffer, ``[tallies (K x 4) | sums (K x K) | spare row (K)]``, so that a refresh
all-reduces one contiguous tensor (its first ``K * (K + 4)`` entries) and a batch adds its statistics with two
``index_add_`` into contiguous blocks (much faster on a CPU than into the columns of a ``K x (K + 4)`` table).
A sample that is not counted (not selected, or with NaN/Inf logits) adds its statistic to the spare row instead
of being masked, which saves a pass over the batch; the spare row is never reduced, saved or read.

The steps follow torchmetrics' naming: :func:`_label_matrix_update` (one batch into the accumulator, as
:func:`_batch_statistics` then :func:`_add_statistics`) and
:func:`~lightning_adalabel.statistics._label_matrix_compute` (the refreshed Q from reduced statistics).
:meth:`LabelMatrix.loss` computes the loss and the statistics of a batch from one softmax
(:mod:`lightning_adalabel.fused`).
"""

from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from lightning_adalabel.compiled_loss import compiled
from lightning_adalabel.engine import Collective, LabelMatrixEngine
from lightning_adalabel.fused import fused_soft_label_loss
from lightning_adalabel.inputs import ClassificationBatch, _format, _reduce
from lightning_adalabel.losses import _reduced_loss, _straightforward_per_sample
from lightning_adalabel.state_versions import DENSE_STATE_VERSION, read_dense_engine_state
from lightning_adalabel.statistics import (
    TALLY_COLUMNS,
    _counted,
    _label_matrix_compute,
    batch_tallies,
    softmax_is_statistic,
    statistics_target,
    uniform_entry,
)
from lightning_adalabel.validation import check_int, validate_label_matrix
from lightning_adalabel.visualization import top_off_diagonal


def _empty_buffer(num_classes: int, device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """The flat statistics buffer: tallies (K x 4), sums (K x K), spare row (K); see the module docstring.

    float32 whatever the default dtype: Lightning's ``precision="64-true"`` makes float64 the default inside a
    training step, where the callback builds its engine."""
    return torch.zeros(num_classes * (TALLY_COLUMNS + num_classes + 1), device=device, dtype=torch.float32)


def _buffer_views(buffer: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """``(tallies K x 4, sums with the spare row (K + 1) x K)``: views, no copy."""
    split = num_classes * TALLY_COLUMNS
    return buffer[:split].view(num_classes, TALLY_COLUMNS), buffer[split:].view(num_classes + 1, num_classes)


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
    matrix = torch.full((num_classes, num_classes), uniform_entry(num_classes, include_diagonal), device=device,
                        dtype=torch.float32)
    return matrix if include_diagonal else matrix.fill_diagonal_(0.0)


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
    instead of an ``argmax``, which is much slower on a CPU at large K).

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
    target = statistics_target(batch)  # a probability target's dominant class
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
    destination, counts = batch_tallies(batch, target, counted, finite)
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


def _loss_and_statistics(
    logits: Tensor, target: Tensor, ignore_index: int, matrix: Tensor, loss: str, alpha: float, reduction: str,
    samples: str, estimator: str, include_diagonal: bool, rows_sum_to_one: bool,
) -> Tuple[Tensor, BatchStatistics]:
    """The reduced loss of a batch in ``F.cross_entropy``'s layouts and its statistics; one softmax where the loss's
    probabilities are the statistic (class-index targets, the ``mean`` estimator), the straightforward path
    otherwise. A pure function of tensors and settings, so that ``compile_loss=True`` compiles it whole."""
    batch = _format(logits, target, ignore_index)
    decoupled = loss == "decoupled"
    fused = loss != "ce" and not batch.probabilistic and softmax_is_statistic(samples, estimator, include_diagonal,
                                                                               decoupled)
    if not fused:
        value = _reduce(_straightforward_per_sample(batch, matrix, loss, alpha), batch, reduction)
        return value, _batch_statistics(batch, samples, estimator, include_diagonal)
    value, probs, destination, counts = fused_soft_label_loss(
        batch, matrix, decoupled, alpha, reduction, samples, rows_sum_to_one
    )
    rows = probs if samples != "none" else probs[:, :0]
    return value, BatchStatistics(rows, destination, batch.target, counts)


def _buffer_from_accumulator(accumulator: Tensor, num_classes: int) -> Tensor:
    """The flat statistics buffer (:func:`_empty_buffer`) holding a ``K x (K + 4)`` accumulator's statistics."""
    buffer = _empty_buffer(num_classes, accumulator.device)
    tallies, sums = _buffer_views(buffer, num_classes)
    tallies.copy_(accumulator[:, num_classes:])
    sums[:num_classes].copy_(accumulator[:, :num_classes])
    return buffer


class LabelMatrix(LabelMatrixEngine):
    """The label matrix Q as a dense ``K x K`` tensor, with its online statistics (the
    :class:`~lightning_adalabel.engine.LabelMatrixEngine` contract).

    Args:
        num_classes: K.
        samples: which samples feed the statistics: ``"misclassified"`` (argmax != target), ``"all"``,
            ``"correct"``, or ``"none"`` (Q never changes, e.g. label smoothing).
        estimator: ``"mean"``, ``"geometric"`` or ``"confusion"`` (see
            :func:`~lightning_adalabel.statistics.refreshed_rows`).
        momentum: refreshed row = ``(1 - momentum) * old + momentum * estimate``.
        include_diagonal: keep the true class in the statistics (full softmax, Online Label Smoothing) instead
            of the residual (wrong classes only, ALR).
        device: where Q and the statistics live (the logits' device).
        initial_matrix: start from this K x K matrix instead of the uniform one (checked by
            :func:`~lightning_adalabel.validation.validate_label_matrix`); with ``samples="none"`` it stays fixed.
        prior: what a refreshed row is shrunk toward: ``"uniform"`` (the initial uniform row) or ``"previous"``
            (the row before the refresh).
        prior_strength: the prior's pseudo-count per sample of the class seen since the last refresh (0: no
            shrinkage, each row is its statistics' estimate); see
            :func:`~lightning_adalabel.statistics._label_matrix_compute`.
        start: ``"uniform"`` (the initial matrix above) or ``"zeros"``: Q starts all-zero, so the soft part of the
            loss is 0 until the first refresh (the official Online Label Smoothing code).
        empty_rows: at a refresh, a row without samples is kept (``"keep"``) or reset to uniform (``"uniform"``, the
            official Online Label Smoothing code).
        compile_loss: compute :meth:`loss` (formatting, loss and statistics) as one ``torch.compile``'d graph
            (see :mod:`lightning_adalabel.compiled_loss`). Values equal the eager ones to float rounding.

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

    stores_dense = True

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
        self._configure(num_classes, compile_loss, samples=samples, estimator=estimator, momentum=momentum,
                        include_diagonal=include_diagonal, prior=prior, prior_strength=prior_strength, start=start,
                        empty_rows=empty_rows)
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

    @property
    def accumulator(self) -> Tensor:
        """The ``K x (K + 4)`` statistics since the last refresh (see the module docstring for its columns); a copy."""
        tallies, sums = _buffer_views(self._buffer, self.num_classes)
        return torch.cat([sums[: self.num_classes], tallies], dim=1)

    @property
    def tallies(self) -> Tensor:  # type: ignore[override]
        """``K x 4`` sample counts per class since the last refresh: counted, seen, non-finite, invalid (a view)."""
        return _buffer_views(self._buffer, self.num_classes)[0]

    @property
    def sums(self) -> Tensor:
        """``K x K`` running sums of ``p_res`` (or ``log p_res``) per target class, since the last refresh."""
        return _buffer_views(self._buffer, self.num_classes)[1][: self.num_classes]

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def to(self, device: Union[str, torch.device]) -> "LabelMatrix":
        self.matrix = self.matrix.to(device)
        self._buffer = self._buffer.to(device)
        return self

    # ---- per batch ---------------------------------------------------------------------------------------------

    def batch_statistics(self, batch: ClassificationBatch) -> BatchStatistics:
        """The statistics of a formatted batch, from its logits (when no loss of this Q computed them)."""
        return _batch_statistics(batch, self.samples, self.estimator, self.include_diagonal)

    def loss_and_statistics(
        self, logits: Tensor, target: Tensor, ignore_index: int, loss: str, alpha: float, reduction: str = "mean"
    ) -> Tuple[Tensor, BatchStatistics]:
        """The reduced loss and the statistics of a checked batch (see :func:`_loss_and_statistics`), compiled when
        this engine was built with ``compile_loss=True``; plain cross-entropy is torch's own, eagerly.

        Example:
            >>> matrix = LabelMatrix(3)
            >>> logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 1.0]], requires_grad=True)
            >>> loss, statistics = matrix.loss(logits, torch.tensor([0, 0]))
            >>> loss.backward()
            >>> matrix.add(statistics)
            >>> matrix.counts  # the first sample is misclassified
            tensor([1., 0., 0.])
        """
        if loss == "ce":
            batch = _format(logits, target, ignore_index)
            value = _reduced_loss(logits, target, batch, self.matrix, loss, alpha, ignore_index, reduction)
            return value, self.batch_statistics(batch)
        compute = compiled(_loss_and_statistics) if self.compile_loss else _loss_and_statistics
        return compute(logits, target, ignore_index, self.matrix, loss, alpha, reduction, self.samples,
                       self.estimator, self.include_diagonal, self.start != "zeros")

    def loss_only(
        self, logits: Tensor, target: Tensor, ignore_index: int, loss: str, alpha: float, reduction: str = "mean"
    ) -> Tensor:
        batch = _format(logits, target, ignore_index)
        return _reduced_loss(logits, target, batch, self.matrix, loss, alpha, ignore_index, reduction)

    def add(self, statistics: BatchStatistics) -> None:
        """Add the statistics of a batch (from :meth:`loss`) to the accumulator."""
        with torch.no_grad():
            _add_statistics(self._buffer, self.num_classes, statistics)

    # ---- per refresh -------------------------------------------------------------------------------------------

    def _refresh(self, collective: Collective) -> Tensor:
        # One sum over processes of one flat tensor: all the statistics but the spare row.
        num_classes = self.num_classes
        statistics = collective.sum(self._buffer[: num_classes * (num_classes + TALLY_COLUMNS)])
        split = num_classes * TALLY_COLUMNS
        tallies = statistics[:split].view(num_classes, TALLY_COLUMNS)
        sums = statistics[split:].view(num_classes, num_classes)
        if self.samples != "none":
            self.matrix = _label_matrix_compute(self.matrix, sums, tallies, self.estimator, self.momentum,
                                                self.include_diagonal, self.prior, self.prior_strength,
                                                self.empty_rows)
        tallies = tallies.clone()  # the buffer is cleared next
        self._buffer.zero_()
        return tallies

    def reset_statistics(self) -> None:
        self._buffer.zero_()

    # ---- Q -----------------------------------------------------------------------------------------------------

    def to_dense(self) -> Tensor:
        return self.matrix

    def rows(self, classes: Tensor) -> Tensor:
        return self.matrix.index_select(0, classes)

    def mean_entropy(self) -> Tensor:
        return torch.special.entr(self.matrix).sum(dim=1).mean()

    def top_pairs(self, n: int) -> Tuple[Tensor, Tensor, Tensor]:
        return top_off_diagonal(self.matrix, n)

    # ---- state -------------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": DENSE_STATE_VERSION,
            **self.config(),
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
        state = read_dense_engine_state(state)
        self._check_config(state)
        matrix, accumulator = state["matrix"], state["accumulator"]
        try:
            validate_label_matrix(matrix, self.num_classes, self.include_diagonal, self.start == "zeros")
        except ValueError as error:
            raise ValueError(f"The saved label matrix is not valid: {error}") from error
        expected = (self.num_classes, self.num_classes + TALLY_COLUMNS)
        if not isinstance(accumulator, Tensor) or tuple(accumulator.shape) != expected:
            shape = tuple(accumulator.shape) if isinstance(accumulator, Tensor) else type(accumulator).__name__
            raise ValueError(f"The saved label-matrix statistics have shape {shape}, expected {expected}.")
        stats = accumulator.detach().double().cpu()
        if not bool(torch.isfinite(stats).all()) or bool((stats[:, self.num_classes:] < 0).any()):
            raise ValueError(
                "The saved label-matrix statistics hold NaN/Inf or negative counts. Resume from an earlier checkpoint,"
                " or start a new run."
            )
        num_refreshes = state["num_refreshes"]
        check_int("num_refreshes", num_refreshes, minimum=0)
        self.matrix = matrix.detach().to(self.device, torch.float32).clone()
        self._buffer = _buffer_from_accumulator(accumulator.detach().to(self.device, torch.float32), self.num_classes)
        self.num_refreshes = num_refreshes

    def __setstate__(self, state: Dict[str, Any]) -> None:
        if "_buffer" not in state:  # pickled by lightning_adalabel 0.1, which kept the K x (K + 4) table itself
            state = dict(state)
            state["_buffer"] = _buffer_from_accumulator(state.pop("accumulator"), state["num_classes"])
        super().__setstate__(state)
