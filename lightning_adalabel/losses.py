"""Functional losses of ALR; no state. All are computed in float32 (float64 inputs stay float64) whatever the
input dtype, so bf16/fp16 logits under autocast cannot overflow the log-sum-exp.

Inputs follow ``F.cross_entropy`` (see :mod:`lightning_adalabel.inputs`): logits ``(N, K)`` or
``(N, K, d1, ..., dk)``; targets class indices ``(N)`` / ``(N, d1, ..., dk)`` or probabilities of the logits' shape
(MixUp/CutMix); ``ignore_index`` and ``reduction`` as torch. Every loss here is linear in the target distribution,
so the loss of a probability target is the same mixture of the per-class losses.

Each public loss validates, formats to one row per position, computes a per-position loss on those rows (the
``_per_sample`` functions) and reduces. Class-index targets go through the one-softmax implementation with a
hand-written gradient (:mod:`lightning_adalabel.fused`); :func:`_straightforward_per_sample`, written term by term
with autograd, is the reference it is tested against and serves probability targets.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_adalabel.fused import fused_soft_label_loss
from lightning_adalabel.inputs import ClassificationBatch, _arg_validation, _format, _reduce, _tensor_validation
from lightning_adalabel.validation import LOSS_MODES


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _logsumexp_without_each_class(logits: Tensor) -> Tensor:
    """``log sum_{i != k} exp(z_i)`` for every class k at once (M x K), numerically stable.

    ``lse - log(1 - p_k)`` is exact except where ``p_k`` is close to 1, i.e. at the arg-max; there the masked
    logsumexp is computed directly.
    """
    lse = logits.logsumexp(dim=1, keepdim=True)
    # p_k <= 0.5 away from the arg-max; the clamp only keeps the arg-max entry (replaced below) finite.
    all_but = lse + torch.log1p(-(logits - lse).exp().clamp_max(0.5))
    top = logits.argmax(dim=1, keepdim=True)
    without_top = logits.scatter(1, top, float("-inf")).logsumexp(dim=1, keepdim=True)
    return all_but.scatter(1, top, without_top)


def _soft_labels(target: Tensor, label_matrix: Tensor) -> Tensor:
    """``Q[y]`` for class indices, ``y @ Q`` for probabilities (float32 at least)."""
    if target.is_floating_point():
        target = _at_least_float32(target)
        with torch.autocast(target.device.type, enabled=False):  # autocast would run the matmul in bf16/fp16
            return target @ label_matrix.to(target.dtype)  # a float64 target meets the engine's float32 Q
    return _at_least_float32(label_matrix)[target]


def _hard_cross_entropy_per_sample(logits: Tensor, target: Tensor) -> Tensor:
    if target.is_floating_point():
        return -(_at_least_float32(target) * logits.log_softmax(dim=1)).sum(dim=1)
    return F.cross_entropy(logits, target, reduction="none")


def _residual_cross_entropy_per_sample(logits: Tensor, target: Tensor, residual_labels: Tensor) -> Tensor:
    residual_labels = residual_labels.to(logits.dtype)  # float64 logits meet the engine's float32 Q
    if target.is_floating_point():
        # -sum_j Q[k,j] (z_j - lse_{-k}) = lse_{-k} - (z Q^T)_k for a zero-diagonal Q with rows summing to 1.
        lse_without = _logsumexp_without_each_class(logits)
        with torch.autocast(logits.device.type, enabled=False):  # autocast would run the matmul in bf16/fp16
            per_class = lse_without * residual_labels.sum(dim=1) - logits @ residual_labels.T
        return (_at_least_float32(target) * per_class).sum(dim=1)
    # -sum_j Q[y,j] (z_j - lse_{-y}) = lse_{-y} sum_j Q[y,j] - sum_j Q[y,j] z_j: no M x K log-softmax, and
    # Q[y,y] = 0 keeps the masked -inf out of the product. A row sums to 1, or to 0 before its first refresh with
    # start="zeros" (no soft loss).
    without_true = logits.scatter(1, target[:, None], float("-inf")).logsumexp(dim=1)
    soft = residual_labels[target]
    return without_true * soft.sum(dim=1) - (soft * logits).sum(dim=1)


def _straightforward_per_sample(batch: ClassificationBatch, label_matrix: Tensor, mode: str, alpha: float) -> Tensor:
    """The loss of every row of a formatted batch (M,), before masking and reduction: term by term, differentiated
    by autograd."""
    logits, target = _at_least_float32(batch.logits), batch.target
    hard = _hard_cross_entropy_per_sample(logits, target)
    if mode == "ce":
        return hard
    if mode == "decoupled":
        return hard + alpha * _residual_cross_entropy_per_sample(logits, target, label_matrix)
    soft = -(_soft_labels(target, label_matrix) * logits.log_softmax(dim=1)).sum(dim=1)
    return (1.0 - alpha) * hard + alpha * soft


def _reduced_loss(
    logits: Tensor, target: Tensor, batch: ClassificationBatch, label_matrix: Tensor, mode: str, alpha: float,
    ignore_index: int, reduction: str,
) -> Tensor:
    """The reduced loss of a batch, given both as passed (``logits``, ``target``) and formatted (``batch``)."""
    if mode == "ce" and not batch.probabilistic:
        # torch's own kernel on the caller's layout, so plain cross-entropy is F.cross_entropy to the last bit.
        # Invalid targets are handed to it as ignored (it would raise, or assert on a GPU) and made NaN after.
        invalid = batch.invalid.reshape(batch.shape)
        safe_target = torch.where(invalid, ignore_index, target.long())
        loss = F.cross_entropy(_at_least_float32(logits), safe_target, ignore_index=ignore_index, reduction=reduction)
        return torch.where(invalid if reduction == "none" else invalid.any(), float("nan"), loss)
    if mode == "ce" or batch.probabilistic:
        return _reduce(_straightforward_per_sample(batch, label_matrix, mode, alpha), batch, reduction)
    return fused_soft_label_loss(batch, label_matrix, mode == "decoupled", alpha, reduction)[0]


def _loss(
    logits: Tensor, target: Tensor, label_matrix: Tensor, mode: str, alpha: float, ignore_index: int, reduction: str
) -> Tensor:
    _arg_validation(ignore_index, reduction)
    _tensor_validation(logits, target, label_matrix.shape[0])
    batch = _format(logits, target, ignore_index)
    return _reduced_loss(logits, target, batch, label_matrix, mode, alpha, ignore_index, reduction)


def soft_target_cross_entropy(logits: Tensor, target_probs: Tensor, reduction: str = "mean") -> Tensor:
    """``-sum_j t_j log softmax(z)_j`` per position, reduced as ``F.cross_entropy`` reduces probability targets.

    Example:
        >>> soft_target_cross_entropy(torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        tensor(1.3863)
    """
    if not target_probs.is_floating_point():
        raise ValueError("soft_target_cross_entropy takes probability targets; for class indices use F.cross_entropy.")
    _arg_validation(-100, reduction)
    _tensor_validation(logits, target_probs)
    batch = _format(logits, target_probs)
    return _reduce(_hard_cross_entropy_per_sample(_at_least_float32(batch.logits), batch.target), batch, reduction)


def residual_cross_entropy(
    logits: Tensor, target: Tensor, residual_labels: Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> Tensor:
    """The residual loss: ``-sum_{j != y} Q[y, j] log p_res_j`` per position, reduced as torch.

    ``p_res = softmax(z with z_y = -inf)`` is the prediction over the wrong classes and ``Q`` a residual label
    matrix (zero diagonal, rows sum to 1). For probability targets ``y``, the ``y``-weighted mixture over classes.

    Example:
        >>> Q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
        >>> residual_cross_entropy(torch.zeros(1, 3), torch.tensor([0]), Q)
        tensor(0.6931)
    """
    _arg_validation(ignore_index, reduction)
    _tensor_validation(logits, target, residual_labels.shape[0])
    batch = _format(logits, target, ignore_index)
    per_sample = _residual_cross_entropy_per_sample(_at_least_float32(batch.logits), batch.target, residual_labels)
    return _reduce(per_sample, batch, reduction)


def decoupled_loss(
    logits: Tensor, target: Tensor, residual_labels: Tensor, alpha: float, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """ALR's decoupled loss: ``CE(z, y) + alpha * residual_cross_entropy(z, y, Q)``.

    The hard label keeps full confidence on the true class; the residual label shapes only the mass on the wrong
    classes.

    Example:
        >>> Q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
        >>> decoupled_loss(torch.zeros(1, 3), torch.tensor([0]), Q, alpha=0.5)
        tensor(1.4452)
    """
    return _loss(logits, target, residual_labels, "decoupled", alpha, ignore_index, reduction)


def mixed_loss(
    logits: Tensor, target: Tensor, label_matrix: Tensor, alpha: float, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """One soft-target cross-entropy with ``t = (1 - alpha) * onehot(y) + alpha * Q[y]``.

    For probability targets ``t = (1 - alpha) * y + alpha * (y @ Q)``. With a uniform ``Q`` (diagonal included)
    this is exactly label smoothing, ``ignore_index`` and every layout included.

    Example:
        >>> Q = torch.full((4, 4), 0.25)
        >>> logits, target = torch.randn(8, 4, 3), torch.randint(0, 4, (8, 3))
        >>> target[0, 0] = -100
        >>> expected = F.cross_entropy(logits, target, label_smoothing=0.1)
        >>> torch.allclose(mixed_loss(logits, target, Q, 0.1), expected)
        True
    """
    return _loss(logits, target, label_matrix, "mixed", alpha, ignore_index, reduction)


def adalabel_loss(
    logits: Tensor, target: Tensor, label_matrix: Tensor, mode: str, alpha: float, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The loss ``mode`` (``"decoupled"``, ``"mixed"`` or ``"ce"``) with torch's ``ignore_index`` and ``reduction``.

    Example:
        >>> logits, target = torch.randn(4, 5), torch.tensor([0, 4, -100, 2])
        >>> Q = torch.full((5, 5), 0.2)
        >>> torch.allclose(adalabel_loss(logits, target, Q, "ce", 0.0), F.cross_entropy(logits, target))
        True
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"Loss mode must be one of {LOSS_MODES}, got {mode!r}.")
    return _loss(logits, target, label_matrix, mode, alpha, ignore_index, reduction)
