"""The ALR engine: the K x K residual label matrix Q and the statistics that refresh it.

Pure torch, no Lightning: :class:`LabelMatrix` can be driven by hand, by the :class:`~lightning_adalabel.AdaLabel`
callback, or by any other training loop.

Layout of the statistics. Everything a refresh needs lives in one ``K x (K + 3)`` float32 tensor, the
*accumulator*, so that one batch costs a single ``index_add_`` and one refresh costs a single all-reduce:

======================  ==================================================================
column(s)               meaning (row k = samples whose target class is k)
======================  ==================================================================
``[:, :K]``             sum of the residual predictions (or of their logs, ``geometric``)
``[:, K]``              number of samples that entered those sums
``[:, K + 1]``          number of samples of class k seen (entered or not)
``[:, K + 2]``          number of samples of class k left out for non-finite logits
======================  ==================================================================
"""

from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

SAMPLE_POLICIES = ("misclassified", "all", "correct", "none")
ESTIMATORS = ("mean", "geometric")

_SUMS, _COUNT, _SEEN, _NONFINITE = slice(None, -3), -3, -2, -1

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
        return torch.full((num_classes, num_classes), 1.0 / num_classes, device=device)
    matrix = torch.full((num_classes, num_classes), 1.0 / (num_classes - 1), device=device)
    return matrix.fill_diagonal_(0.0)


def validate_label_matrix(matrix: Tensor, num_classes: Optional[int] = None, include_diagonal: bool = False) -> None:
    """Raise a ``ValueError`` that names the problem and the fix unless ``matrix`` is a valid label matrix.

    Valid: a K x K float tensor (K = ``num_classes`` when given), finite, non-negative, rows summing to 1, and for a
    residual matrix (``include_diagonal=False``, the ALR default) a zero diagonal.

    Example:
        >>> validate_label_matrix(initial_label_matrix(3))
        >>> validate_label_matrix(torch.full((3, 3), 1 / 3))
        Traceback (most recent call last):
        ...
        ValueError: A residual label matrix (include_diagonal=False) must have a zero diagonal, ...
    """
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"A label matrix must be a square K x K tensor, got {shape}.")
    if num_classes is not None and matrix.shape[0] != num_classes:
        raise ValueError(
            f"The label matrix is {matrix.shape[0]} x {matrix.shape[0]} but the model has {num_classes} classes: use"
            " a matrix learned on the same label set, or set `num_classes` to match it."
        )
    if not matrix.is_floating_point():
        raise ValueError(f"A label matrix must hold floating-point probabilities, got dtype {matrix.dtype}.")
    matrix = matrix.detach().double().cpu()
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("The label matrix contains NaN or Inf; it cannot be used as soft labels. Re-export it.")
    if bool((matrix < 0).any()):
        raise ValueError(
            f"A label matrix must be non-negative (its rows are probabilities), got a minimum of {matrix.min():.4g}."
        )
    row_sums = matrix.sum(dim=1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4):
        worst = int((row_sums - 1).abs().argmax())
        raise ValueError(
            f"Every row of a label matrix must sum to 1, but row {worst} sums to {row_sums[worst]:.6g}. Normalise it"
            " first: `matrix / matrix.sum(dim=1, keepdim=True)`."
        )
    if not include_diagonal and bool((matrix.diagonal().abs() > 1e-6).any()):
        raise ValueError(
            "A residual label matrix (include_diagonal=False) must have a zero diagonal, but this one has"
            f" diagonal entries up to {matrix.diagonal().max():.4g}. If it is a full-softmax matrix (e.g. from"
            " preset 'ols'), set include_diagonal=True and loss='mixed'."
        )


def _check_config(num_classes: int, samples: str, estimator: str, momentum: float) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    if samples not in SAMPLE_POLICIES:
        raise ValueError(f"`samples` must be one of {SAMPLE_POLICIES}, got {samples!r}.")
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    if not isinstance(momentum, (int, float)) or not 0.0 < float(momentum) <= 1.0:
        raise ValueError(
            f"`momentum` must be a number in (0, 1] (1 replaces each refreshed row, smaller values average"
            f" over refreshes), got {momentum!r}."
        )


def _format_batch(logits: Tensor, target: Tensor, num_classes: int) -> "tuple[Tensor, Tensor]":
    """Check shapes and dtypes (free: no device-to-host copy) and return float32 logits, integer targets.

    Probability targets (B x K) enter the statistics under their dominant class.
    """
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"Expected logits of shape (batch, num_classes={num_classes}), got {tuple(logits.shape)}. If the model"
            f" has {logits.shape[-1] if logits.ndim else '?'} outputs, set `num_classes` to match it."
        )
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"Probability targets must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}."
            )
        target = target.argmax(dim=1)
    elif target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"Expected integer targets of shape ({logits.shape[0]},) to match the logits, got {tuple(target.shape)}."
        )
    return logits.detach().float(), target.detach().long()


def check_batch_values(logits: Tensor, target: Tensor, num_classes: int) -> None:
    """Value checks that need a device-to-host copy; run them once, off the steady-state path.

    Example:
        >>> check_batch_values(torch.zeros(2, 3), torch.tensor([0, 3]), 3)
        Traceback (most recent call last):
        ...
        ValueError: Targets must be class indices in [0, 3), got values in [0, 3]. ...
    """
    if not target.is_floating_point():
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"Targets must be class indices in [0, {num_classes}), got values in [{low}, {high}]. Check that"
                f" `num_classes` ({num_classes}) matches the data set and that labels are 0-based."
            )
    elif bool((target < 0).any()) or not torch.allclose(target.sum(1), torch.ones_like(target[:, 0]), atol=1e-3):
        raise ValueError("Probability targets must be non-negative and sum to 1 over the classes.")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "The logits of the first training batch contain NaN or Inf. The model diverges or its inputs are not"
            " normalised; fix the model before training with ALR."
        )


def residual_prediction_stats(logits: Tensor, target: Tensor, include_diagonal: bool, estimator: str) -> Tensor:
    """Per-sample statistic that enters the sums: the residual prediction ``p_res`` or ``log p_res``.

    ``p_res`` is the softmax over the wrong classes (the true-class logit masked to ``-inf``); with
    ``include_diagonal`` it is the full softmax (Online Label Smoothing). For ``geometric`` the true-class
    entry of ``log p_res`` (``-inf``) is replaced by 0 so that it stays out of the sums.

    Example:
        >>> residual_prediction_stats(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([1]), False, "mean")
        tensor([[0.5000, 0.0000, 0.5000]])
    """
    if include_diagonal:
        masked = logits
    else:
        masked = logits.scatter(1, target[:, None], float("-inf"))
    if estimator == "mean":
        return masked.softmax(dim=1)
    log_p = masked.log_softmax(dim=1)
    return log_p if include_diagonal else log_p.scatter_(1, target[:, None], 0.0)


def select_samples(logits: Tensor, target: Tensor, samples: str) -> Tensor:
    """Boolean mask of the samples that count, without a host sync (ties go to the lowest index, as argmax).

    Example:
        >>> logits = torch.tensor([[2.0, 1.0], [2.0, 1.0]])
        >>> select_samples(logits, torch.tensor([0, 1]), "misclassified")
        tensor([False,  True])
    """
    if samples == "all":
        return torch.ones_like(target, dtype=torch.bool)
    correct = logits.argmax(dim=1) == target
    return correct if samples == "correct" else ~correct


def accumulate(
    accumulator: Tensor, logits: Tensor, target: Tensor, samples: str, estimator: str, include_diagonal: bool
) -> None:
    """Add one batch to the accumulator in place: a few vectorised ops and one ``index_add_``."""
    # A row sum is finite iff every entry is (for logits below ~1e35): one reduction, not a B x K boolean mask.
    finite = torch.isfinite(logits.sum(dim=1))
    counted = select_samples(logits, target, samples) & finite
    stats = residual_prediction_stats(logits, target, include_diagonal, estimator)
    # where, not a product: rows with NaN/Inf logits have NaN statistics, and 0 * NaN is NaN.
    stats = torch.where(counted[:, None], stats, 0.0)
    columns = torch.stack([counted, torch.ones_like(finite), ~finite], dim=1).to(stats.dtype)
    accumulator.index_add_(0, target, torch.cat([stats, columns], dim=1))


def statistic_totals(stats: Tensor) -> Tensor:
    """``(counted, seen, nonfinite)`` sample totals over all classes of an accumulator (e.g. what refresh returns).

    Example:
        >>> matrix = LabelMatrix(3, samples="misclassified")
        >>> matrix.update(torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), torch.tensor([0, 1]))
        >>> statistic_totals(matrix.accumulator)
        tensor([1., 2., 0.])
    """
    return stats[:, _COUNT:].sum(dim=0)


def refreshed_rows(sums: Tensor, counts: Tensor, estimator: str, include_diagonal: bool) -> Tensor:
    """The estimator's target row for every class (rows with ``counts == 0`` are meaningless).

    ``mean`` is the arithmetic mean of ``p_res`` (minimises E[KL(p_res || q)]); ``geometric`` is the softmax of
    the mean ``log p_res`` (minimises E[KL(q || p_res)], the paper's update loss).

    Example:
        >>> sums = torch.tensor([[0.0, 1.5], [0.5, 0.0]])
        >>> refreshed_rows(sums, torch.tensor([3.0, 1.0]), "mean", include_diagonal=True)
        tensor([[0.0000, 0.5000],
                [0.5000, 0.0000]])
    """
    mean = sums / counts.clamp_min(1.0)[:, None]
    if estimator == "mean":
        return mean
    if not include_diagonal:
        mean = mean.fill_diagonal_(float("-inf"))
    return mean.softmax(dim=1)


class LabelMatrix:
    """The residual label matrix Q with its online statistics.

    Args:
        num_classes: K.
        samples: which samples feed the statistics: ``"misclassified"`` (argmax != target), ``"all"``,
            ``"correct"``, or ``"none"`` (Q never changes, e.g. label smoothing).
        estimator: ``"mean"`` or ``"geometric"`` (see :func:`refreshed_rows`).
        momentum: refreshed row = ``(1 - momentum) * old + momentum * estimate``.
        include_diagonal: keep the true class in the statistics (full softmax, Online Label Smoothing) instead
            of the residual (wrong classes only, ALR).
        device: where Q and the statistics live (the logits' device).
        initial_matrix: start from this K x K matrix instead of the uniform one (checked by
            :func:`validate_label_matrix`); with ``samples="none"`` it stays fixed.

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
    ) -> None:
        _check_config(num_classes, samples, estimator, momentum)
        self.num_classes = num_classes
        self.samples = samples
        self.estimator = estimator
        self.momentum = float(momentum)
        self.include_diagonal = include_diagonal
        if initial_matrix is None:
            self.matrix = initial_label_matrix(num_classes, include_diagonal, device)
        else:  # e.g. a matrix learned by an earlier run (load_label_matrix), used as a fixed or warm-start Q
            validate_label_matrix(initial_matrix, num_classes, include_diagonal)
            self.matrix = initial_matrix.detach().to(device, torch.float32).clone()
        self.accumulator = torch.zeros(num_classes, num_classes + 3, device=device)
        self.num_refreshes = 0

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def sums(self) -> Tensor:
        """``K x K`` running sums of ``p_res`` (or ``log p_res``) per target class, since the last refresh."""
        return self.accumulator[:, _SUMS]

    @property
    def counts(self) -> Tensor:
        """Number of samples per target class that entered :attr:`sums` since the last refresh."""
        return self.accumulator[:, _COUNT]

    @property
    def seen(self) -> Tensor:
        """Number of samples per target class seen since the last refresh, counted or not."""
        return self.accumulator[:, _SEEN]

    @property
    def nonfinite(self) -> Tensor:
        """Number of samples per target class left out since the last refresh because their logits were NaN/Inf."""
        return self.accumulator[:, _NONFINITE]

    def to(self, device: Union[str, torch.device]) -> "LabelMatrix":
        self.matrix = self.matrix.to(device)
        self.accumulator = self.accumulator.to(device)
        return self

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate one batch: ``logits`` (B x K, any float dtype), ``target`` (B,) class indices or B x K probabilities.

        Runs in float32 on the logits' device without a device-to-host copy. Rows with NaN/Inf logits are left
        out of the sums and counted in :attr:`nonfinite`.
        """
        if self.samples == "none":
            return
        logits, target = _format_batch(logits, target, self.num_classes)
        with torch.no_grad():
            accumulate(self.accumulator, logits, target, self.samples, self.estimator, self.include_diagonal)

    def refresh(self, reduce: Optional[ReduceFn] = None) -> Tensor:
        """Fold the statistics into Q and reset them; return the (reduced) statistics that were used.

        Args:
            reduce: sums a tensor over processes (e.g. the strategy's all-reduce) so that every rank ends with
                the same Q; called once, on the whole accumulator.

        Rows that received no sample keep their value. Runs on the device without a host sync.
        """
        stats = self.accumulator if reduce is None else reduce(self.accumulator)
        counts = stats[:, _COUNT]
        if self.samples != "none":
            estimate = refreshed_rows(stats[:, _SUMS], counts, self.estimator, self.include_diagonal)
            blended = torch.lerp(self.matrix, estimate, self.momentum)
            self.matrix = torch.where(counts[:, None] > 0, blended, self.matrix)
        self.accumulator = torch.zeros_like(self.accumulator)
        self.num_refreshes += 1
        return stats

    def state_dict(self) -> Dict[str, object]:
        return {
            "num_classes": self.num_classes,
            "samples": self.samples,
            "estimator": self.estimator,
            "momentum": self.momentum,
            "include_diagonal": self.include_diagonal,
            "matrix": self.matrix.clone(),
            "accumulator": self.accumulator.clone(),
            "num_refreshes": self.num_refreshes,
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore Q and the statistics onto this matrix's device; the configuration must match."""
        mismatched = [
            f"{key}={state.get(key)!r} (this one has {getattr(self, key)!r})"
            for key in ("num_classes", "samples", "estimator", "momentum", "include_diagonal")
            if state.get(key) != getattr(self, key)
        ]
        if mismatched:
            raise ValueError(
                "The label-matrix state was saved with a different configuration: " + ", ".join(mismatched)
                + ". Resume with the same settings, or start a new run without this checkpoint."
            )
        self.matrix = state["matrix"].to(self.device, torch.float32)  # type: ignore[union-attr]
        self.accumulator = state["accumulator"].to(self.device, torch.float32)  # type: ignore[union-attr]
        self.num_refreshes = int(state["num_refreshes"])  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, samples={self.samples!r},"
            f" estimator={self.estimator!r}, momentum={self.momentum}, include_diagonal={self.include_diagonal})"
        )
