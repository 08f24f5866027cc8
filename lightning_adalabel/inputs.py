"""torch's cross-entropy input contract, shared by the losses and the statistics.

Layouts are those of ``F.cross_entropy``: logits ``(N, K)`` or ``(N, K, d1, ..., dk)`` (classes on dim 1); targets
``(N)`` / ``(N, d1, ..., dk)`` class indices (``int64`` or ``uint8``, the dtypes torch accepts) or probabilities of
the logits' shape. Every position is one sample. Positions equal to ``ignore_index`` and all-zero probability rows
(padding) enter neither the loss nor the statistics.

Values are never read on the per-batch path (no host sync): a target that is neither a class nor ``ignore_index``,
or a probability row that is negative or does not sum to 1, is marked *invalid* on the device. It never indexes the
label matrix and never enters the statistics; its loss is NaN (a loud value with a zero gradient, so the weights
stay intact) and the callback raises a clear error at the next refresh, or at once on the first training batch,
which :func:`check_values` reads.

A ``-inf`` logit is a mask (a class the position may not take), as ``F.cross_entropy`` takes it: the statistics use
the softmax over the other classes. Logits holding NaN or ``+inf`` are not usable: their positions are left out of
the statistics and counted, and the callback warns (on the first training batch, and at each refresh).

The steps follow torchmetrics' naming: :func:`_tensor_validation` (shapes and dtypes, free), :func:`_format`
(flatten to ``(M, K)`` and mark each position), :func:`check_values` (reads values, once), :func:`_reduce`.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from lightning_adalabel.validation import REDUCTIONS, check_choice


class ClassificationBatch(NamedTuple):
    """A batch flattened to one row per position."""

    logits: Tensor
    """``(M, K)`` logits in their own dtype (not detached: the loss differentiates through them)."""
    target: Tensor
    """``(M,)`` int64 class indices, 0 where the target is no class (the row is then not ``valid``); or ``(M, K)``
    probabilities, zero rows where not valid. Safe to index the label matrix with, whatever the input held."""
    valid: Tensor
    """``(M,)`` bool: enters the loss and the statistics."""
    invalid: Tensor
    """``(M,)`` bool: neither a class nor ``ignore_index``, or a malformed probability row."""
    shape: Tuple[int, ...]
    """The per-position shape ``(N, d1, ..., dk)``, for ``reduction="none"``."""

    @property
    def probabilistic(self) -> bool:
        return self.target.ndim == 2


def _arg_validation(ignore_index: int, reduction: str) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"`ignore_index` must be an integer (torch's default is -100), got {ignore_index!r}.")
    check_choice("reduction", reduction, REDUCTIONS)


def _tensor_validation(logits: Tensor, target: Tensor, num_classes: Optional[int] = None) -> None:
    """Shapes and dtypes against torch's contract; free (no value is read).

    Example:
        >>> _tensor_validation(torch.zeros(2, 7, 5), torch.zeros(2, 7, dtype=torch.long), num_classes=5)
        Traceback (most recent call last):
        ...
        ValueError: The logits have shape (2, 7, 5): classes must be on dim 1, as in F.cross_entropy. ...
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"Logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}.")
    if not isinstance(target, Tensor):
        raise ValueError(f"Targets must be a tensor, got {type(target).__name__}.")
    if logits.ndim < 2:
        raise ValueError(
            f"Logits must be (N, K) or (N, K, d1, ...), got shape {tuple(logits.shape)}. For a single sample add the"
            " batch dimension: `logits[None]`, `target[None]`."
        )
    shape, classes = tuple(logits.shape), logits.shape[1]
    channels_last = logits.ndim > 2 and (
        (num_classes is not None and classes != num_classes and logits.shape[-1] == num_classes)
        or (not target.is_floating_point() and tuple(target.shape) == shape[:-1] and classes != shape[-1])
    )
    if channels_last:
        raise ValueError(
            f"The logits have shape {shape}: classes must be on dim 1, as in F.cross_entropy. For a model that"
            " returns (N, T, K) (or (N, H, W, K)), pass `logits.movedim(-1, 1)`."
        )
    if num_classes is not None and classes != num_classes:
        raise ValueError(
            f"Expected logits with num_classes={num_classes} on dim 1 (the label matrix is {num_classes} x"
            f" {num_classes}), got shape {shape}. Make the model's output layer, `num_classes` and any checkpoint"
            " you resume from agree."
        )
    if target.is_floating_point():
        if tuple(target.shape) == shape[:1] + shape[2:]:  # the class-index layout, in a float dtype
            raise ValueError(
                f"Targets of shape {tuple(target.shape)} and dtype {target.dtype} look like class indices: those must be"
                " int64 (torch.long) or uint8, as in F.cross_entropy. Use `target.long()`. (Float targets are class"
                f" probabilities, of the logits' shape {shape}.)"
            )
        if tuple(target.shape) != shape:
            raise ValueError(f"Probability targets must have the logits' shape {shape}, got {tuple(target.shape)}.")
        return
    if target.dtype not in (torch.int64, torch.uint8):
        raise ValueError(
            f"Class-index targets must be int64 (torch.long) or uint8, the dtypes F.cross_entropy accepts; got"
            f" {target.dtype}. Use `target.long()`."
        )
    expected = shape[:1] + shape[2:]
    if tuple(target.shape) != expected:
        raise ValueError(
            f"Class-index targets for logits of shape {shape} must have shape {expected} (the logits without their"
            f" class dim 1), got {tuple(target.shape)}."
        )


def _format(logits: Tensor, target: Tensor, ignore_index: int = -100) -> ClassificationBatch:
    """Flatten to one row per position and mark which rows count; a few vectorised ops, no host sync.

    Example:
        >>> batch = _format(torch.zeros(2, 3, 2), torch.tensor([[0, -100], [2, 7]]))
        >>> batch.logits.shape, batch.target.tolist(), batch.valid.tolist(), batch.invalid.tolist()
        (torch.Size([4, 3]), [0, 0, 2, 0], [True, False, True, False], [False, False, False, True])
    """
    num_classes = logits.shape[1]
    if logits.ndim > 2:  # (N, K, d1, ...) -> (N * d1 * ..., K): every position is a sample
        logits = logits.movedim(1, -1).reshape(-1, num_classes)
    if target.is_floating_point():
        shape = tuple(target.shape[:1] + target.shape[2:])
        if target.ndim > 2:
            target = target.movedim(1, -1).reshape(-1, num_classes)
        low, high = torch.aminmax(target, dim=1)
        padding = (low == 0) & (high == 0)
        # Half-precision targets round each entry: allow the sum a few units in the last place.
        tolerance = max(1e-3, 4 * torch.finfo(target.dtype).eps)
        # Comparisons with NaN are False, so a non-finite row is never valid.
        valid = (low >= 0) & ((target.sum(dim=1, dtype=torch.float32) - 1).abs() <= tolerance)
        invalid = ~valid & ~padding
        target = torch.where(valid[:, None], target, 0.0)
        return ClassificationBatch(logits, target, valid, invalid, shape)
    shape = tuple(target.shape)
    target = target.reshape(-1).long()
    # Five ops, not eight: on a CPU at small K each op costs more than its arithmetic.
    in_range = target.clamp(0, num_classes - 1)
    is_class = in_range == target
    not_ignored = target != ignore_index
    valid = is_class & not_ignored if 0 <= ignore_index < num_classes else is_class
    return ClassificationBatch(logits, in_range * is_class, valid, not_ignored > is_class, shape)  # no class: 0


def check_values(logits: Tensor, target: Tensor, ignore_index: int = -100) -> None:
    """Read the targets of one batch and raise a clear error for invalid ones.

    One host sync: the callback runs it on the first training batch of a fit; later batches are counted on the
    device and reported at the next refresh.

    Example:
        >>> check_values(torch.zeros(2, 3), torch.tensor([0, 3]))
        Traceback (most recent call last):
        ...
        ValueError: 1 of 2 targets is neither a class index in [0, 3) nor ignore_index=-100 (values seen: [3]). ...
    """
    _tensor_validation(logits, target)
    batch = _format(logits.detach(), target.detach(), ignore_index)
    num_invalid = int(batch.invalid.sum())
    if num_invalid:
        raise ValueError(invalid_targets_message(num_invalid, len(batch.invalid), batch.probabilistic,
                                                 logits.shape[1], ignore_index, target.detach(), batch.invalid))


def count_unusable_logits(batch: ClassificationBatch) -> Tensor:
    """The number of valid positions whose logits the statistics cannot use, as a tensor (no host sync): a NaN or
    +inf anywhere, or -inf at the target class (the dominant class of a probability row). A ``-inf`` entry at another
    class is a mask, a class the position may not take, as ``F.cross_entropy`` takes it: not counted.

    Example:
        >>> inf = float("inf")
        >>> logits = torch.tensor([[0.0, -inf], [-inf, 0.0], [inf, 1.0], [0.0, 1.0]])
        >>> batch = _format(logits, torch.tensor([0, 0, 1, 1]))
        >>> count_unusable_logits(batch)  # the second row masks its own target; the third holds +inf
        tensor(2)
    """
    logits = batch.logits.detach()
    target = batch.target.argmax(dim=1) if batch.probabilistic else batch.target
    usable = (logits.sum(dim=1) < float("inf")) & (logits.gather(1, target[:, None]).squeeze(1) > float("-inf"))
    return (batch.valid & ~usable).sum()


def invalid_targets_message(
    num_invalid: int, num_seen: Optional[int], probabilistic: Optional[bool], num_classes: int, ignore_index: int,
    target: Optional[Tensor] = None, invalid: Optional[Tensor] = None,
) -> str:
    """The error for invalid targets: how many, what they were (when known) and the fix."""
    of = f" of {num_seen}" if num_seen is not None else ""
    if probabilistic:
        return (
            f"{num_invalid}{of} probability targets are not distributions (a negative or non-finite entry, or a row"
            " that does not sum to 1). Normalise them (`target / target.sum(dim=1, keepdim=True)`) or mark padding"
            " with all-zero rows."
        )
    seen = ""
    if target is not None and invalid is not None:
        values = sorted(set(target.reshape(-1)[invalid].tolist()))
        seen = f" (values seen: {values[:8]}{' ...' if len(values) > 8 else ''})"
    noun = ("targets" if num_seen is not None else "target") + " is" if num_invalid == 1 else "targets are"
    kind = "" if probabilistic is False else " (or probability rows that are not distributions)"
    return (
        f"{num_invalid}{of} {noun} neither a class index in [0, {num_classes}) nor ignore_index={ignore_index}"
        f"{seen}{kind}. Check that the model's num_classes matches the data set, that labels are 0-based, and that"
        " padding uses the callback's ignore_index (AdaLabel(ignore_index=...))."
    )


def _reduce(per_sample: Tensor, batch: ClassificationBatch, reduction: str) -> Tensor:
    """torch's reductions: ``"none"`` keeps the target's shape (0 where ignored); ``"mean"`` divides by the number of
    non-ignored positions for class indices and by the number of positions for probabilities, as torch does.

    Invalid positions are NaN (see the module docstring), with a zero gradient.
    """
    per_sample = torch.where(batch.valid, per_sample, 0.0)
    per_sample = torch.where(batch.invalid, float("nan"), per_sample)
    if reduction == "none":
        return per_sample.reshape(batch.shape)
    total = per_sample.sum()
    if reduction == "sum":
        return total
    if batch.probabilistic:
        return total / per_sample.shape[0]
    return total / batch.valid.sum()  # all positions ignored: NaN, as F.cross_entropy
