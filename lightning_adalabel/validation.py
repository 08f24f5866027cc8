"""One home for argument checks: small named checks that raise a ``ValueError`` naming the argument and the fix.

The engine, the presets, the losses and the callback all validate through these, so a setting is refused with the
same words wherever it is given, and as soon as it is given.
"""

import math
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

SAMPLE_POLICIES = ("misclassified", "all", "correct", "none")
ESTIMATORS = ("mean", "geometric", "confusion")
LOSS_MODES = ("decoupled", "mixed", "ce")
REDUCTIONS = ("mean", "sum", "none")
PRIORS = ("uniform", "previous")
STARTS = ("uniform", "zeros")
EMPTY_ROWS = ("keep", "uniform")


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False, hint: str = "") -> None:
    """``value`` is an ``int`` (not a ``bool``) and at least ``minimum`` (or ``None`` where allowed).

    Example:
        >>> check_int("top_pairs", 3, minimum=0)
        >>> check_int("num_classes", 1, minimum=2)
        Traceback (most recent call last):
        ...
        ValueError: `num_classes` must be an integer >= 2, got 1.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer >= {minimum}{allowed}, got {value!r}.{hint}")


def check_bool(name: str, value: Any, allow_none: bool = False) -> None:
    """``value`` is ``True`` or ``False``: a string such as ``"no"`` is truthy and would silently mean ``True``.

    Example:
        >>> check_bool("include_diagonal", "no")
        Traceback (most recent call last):
        ...
        ValueError: `include_diagonal` must be True or False, got 'no'.
    """
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False{' (or None)' if allow_none else ''}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``.

    Example:
        >>> check_choice("estimator", "median", ESTIMATORS)
        Traceback (most recent call last):
        ...
        ValueError: `estimator` must be one of ('mean', 'geometric', 'confusion'), got 'median'.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")


def check_number(
    name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False, hint: str = ""
) -> None:
    """``value`` is a finite real number (not a ``bool``) in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Example:
        >>> check_number("alpha", float("inf"), 0.0)
        Traceback (most recent call last):
        ...
        ValueError: `alpha` must be a finite number >= 0.0, got inf.
        >>> check_number("momentum", True, 0.0, 1.0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `momentum` must be a finite number in (0.0, 1.0], got True.
    """
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    in_range = is_real and math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not in_range:
        if high == math.inf:
            bounds = f"> {low}" if low_open else f">= {low}"
        else:
            bounds = f"in {'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"`{name}` must be a finite number {bounds}, got {value!r}.{hint}")


def check_engine_config(
    samples: str, estimator: str, momentum: float, include_diagonal: bool, prior: str = "uniform",
    prior_strength: float = 0.0, start: str = "uniform", empty_rows: str = "keep",
) -> None:
    """The settings that define how the label matrix learns (shared by :class:`~lightning_adalabel.Preset` and
    :class:`~lightning_adalabel.LabelMatrix`)."""
    check_choice("samples", samples, SAMPLE_POLICIES)
    check_choice("estimator", estimator, ESTIMATORS)
    check_number(
        "momentum", momentum, 0.0, 1.0, low_open=True,
        hint=" 1 replaces each refreshed row, smaller values average over refreshes.",
    )
    check_bool("include_diagonal", include_diagonal)
    check_choice("prior", prior, PRIORS)
    check_number(
        "prior_strength", prior_strength, 0.0,
        hint=" It is the prior's pseudo-count per sample of the class seen since the last refresh; 0 turns it off.",
    )
    check_choice("start", start, STARTS)
    check_choice("empty_rows", empty_rows, EMPTY_ROWS)
    if start == "zeros" and prior == "previous" and prior_strength > 0:
        raise ValueError(
            "A matrix that starts from zeros has all-zero rows until they first receive samples, so the 'previous'"
            " prior would shrink them toward zero (rows no longer summing to 1). Use prior='uniform'."
        )


def check_class_names(class_names: Optional[Sequence[Any]], num_classes: Optional[int]) -> None:
    """One name per class, once the number of classes is known.

    Example:
        >>> check_class_names(["cat", "dog"], 3)
        Traceback (most recent call last):
        ...
        ValueError: Got 2 `class_names` for 3 classes; give one name per class.
    """
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"Got {len(class_names)} `class_names` for {num_classes} classes; give one name per class.")


def validate_label_matrix(
    matrix: Tensor, num_classes: Optional[int] = None, include_diagonal: bool = False, allow_zero_rows: bool = False
) -> None:
    """Raise a ``ValueError`` that names the problem and the fix unless ``matrix`` is a valid label matrix.

    Valid: a K x K float tensor (K = ``num_classes`` when given), finite, non-negative, rows summing to 1, and for a
    residual matrix (``include_diagonal=False``, the ALR default) a zero diagonal; with ``allow_zero_rows`` (a
    matrix that starts from zeros, as the official Online Label Smoothing) an all-zero row is valid too. Reads
    values: call it when a matrix arrives (a file, a checkpoint, an argument), never per batch.

    Example:
        >>> from lightning_adalabel.label_matrix import initial_label_matrix
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
    bad_rows = (row_sums - 1).abs() > 1e-4
    if allow_zero_rows:
        bad_rows &= row_sums != 0
    if bool(bad_rows.any()):
        worst = int(((row_sums - 1).abs() * bad_rows).argmax())
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


def warn_deprecated(old: str, new: str) -> None:
    """Warn that ``old`` (a name or a way of calling) is deprecated in favour of ``new``; it keeps working for one
    minor version.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_deprecated("lightning_adalabel.f", "lightning_adalabel.g")
        >>> print(caught[0].message)
        lightning_adalabel.f is deprecated and will be removed in the next minor version: use lightning_adalabel.g.
    """
    warnings.warn(f"{old} is deprecated and will be removed in the next minor version: use {new}.", DeprecationWarning,
                  stacklevel=3)
