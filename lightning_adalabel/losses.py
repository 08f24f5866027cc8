"""Functional losses of ALR; no state. All are computed in float32 (float64 inputs stay float64) whatever the
input dtype, so bf16/fp16 logits under autocast cannot overflow the log-sum-exp.

Targets are class indices (B,) or class probabilities (B x K, e.g. MixUp/CutMix). Every loss here is linear in
the target distribution, so the loss of a probability target is the same mixture of the per-class losses.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_MODES = ("decoupled", "mixed", "ce")


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def soft_target_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_j t_j log softmax(z)_j``.

    Example:
        >>> soft_target_cross_entropy(torch.zeros(1, 4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        tensor(1.3863)
    """
    return -(_at_least_float32(target_probs) * _at_least_float32(logits).log_softmax(dim=1)).sum(dim=1).mean()


def _logsumexp_without_each_class(logits: Tensor) -> Tensor:
    """``log sum_{i != k} exp(z_i)`` for every class k at once (B x K), numerically stable.

    ``lse - log(1 - p_k)`` is exact except where ``p_k`` is close to 1, i.e. at the arg-max; there the masked
    logsumexp is computed directly.
    """
    lse = logits.logsumexp(dim=1, keepdim=True)
    # p_k <= 0.5 away from the arg-max; the clamp only keeps the arg-max entry (replaced below) finite.
    all_but = lse + torch.log1p(-(logits - lse).exp().clamp_max(0.5))
    top = logits.argmax(dim=1, keepdim=True)
    without_top = logits.scatter(1, top, float("-inf")).logsumexp(dim=1, keepdim=True)
    return all_but.scatter(1, top, without_top)


def residual_cross_entropy(logits: Tensor, target: Tensor, residual_labels: Tensor) -> Tensor:
    """The residual loss: mean over the batch of ``-sum_{j != y} Q[y, j] log p_res_j``.

    ``p_res = softmax(z with z_y = -inf)`` is the prediction over the wrong classes and ``Q`` a residual label
    matrix (zero diagonal, rows sum to 1). For probability targets ``y``, the ``y``-weighted mixture over classes.

    Example:
        >>> Q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
        >>> residual_cross_entropy(torch.zeros(1, 3), torch.tensor([0]), Q)
        tensor(0.6931)
    """
    logits = _at_least_float32(logits)
    residual_labels = _at_least_float32(residual_labels)
    if target.is_floating_point():
        # -sum_j Q[k,j] (z_j - lse_{-k}) = lse_{-k} - (z Q^T)_k for a zero-diagonal Q with rows summing to 1.
        lse_without = _logsumexp_without_each_class(logits)
        with torch.autocast(logits.device.type, enabled=False):  # autocast would run the matmul in bf16/fp16
            per_class = lse_without * residual_labels.sum(dim=1) - logits @ residual_labels.T
        return (_at_least_float32(target) * per_class).sum(dim=1).mean()
    # -sum_j Q[y,j] (z_j - lse_{-y}) = lse_{-y} - sum_j Q[y,j] z_j: no B x K log-softmax, and Q[y,y] = 0 keeps the
    # masked -inf out of the product.
    without_true = logits.scatter(1, target[:, None], float("-inf")).logsumexp(dim=1)
    return (without_true - (residual_labels[target] * logits).sum(dim=1)).mean()


def decoupled_loss(logits: Tensor, target: Tensor, residual_labels: Tensor, alpha: float) -> Tensor:
    """ALR's decoupled loss: ``CE(z, y) + alpha * residual_cross_entropy(z, y, Q)``.

    The hard label keeps full confidence on the true class; the residual label shapes only the mass on the wrong
    classes.

    Example:
        >>> Q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
        >>> decoupled_loss(torch.zeros(1, 3), torch.tensor([0]), Q, alpha=0.5)
        tensor(1.4452)
    """
    hard = hard_cross_entropy(logits, target)
    return hard + alpha * residual_cross_entropy(logits, target, residual_labels)


def mixed_loss(logits: Tensor, target: Tensor, label_matrix: Tensor, alpha: float) -> Tensor:
    """One soft-target cross-entropy with ``t = (1 - alpha) * onehot(y) + alpha * Q[y]``.

    For probability targets ``t = (1 - alpha) * y + alpha * (y @ Q)``. With a uniform ``Q`` (diagonal included)
    this is exactly label smoothing.

    Example:
        >>> Q = torch.full((4, 4), 0.25)
        >>> logits, target = torch.randn(8, 4), torch.randint(0, 4, (8,))
        >>> torch.allclose(mixed_loss(logits, target, Q, 0.1), F.cross_entropy(logits, target, label_smoothing=0.1))
        True
    """
    if target.is_floating_point():
        with torch.autocast(logits.device.type, enabled=False):  # autocast would run the matmul in bf16/fp16
            soft = _at_least_float32(target) @ _at_least_float32(label_matrix)
    else:
        soft = _at_least_float32(label_matrix)[target]
    return (1.0 - alpha) * hard_cross_entropy(logits, target) + alpha * soft_target_cross_entropy(logits, soft)


def hard_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``F.cross_entropy`` in float32 for class indices or class probabilities."""
    if target.is_floating_point():
        return soft_target_cross_entropy(logits, target)
    return F.cross_entropy(_at_least_float32(logits), target)


def adalabel_loss(logits: Tensor, target: Tensor, label_matrix: Tensor, mode: str, alpha: float) -> Tensor:
    """Dispatch to the loss ``mode`` (``"decoupled"``, ``"mixed"`` or ``"ce"``)."""
    if mode == "decoupled":
        return decoupled_loss(logits, target, label_matrix, alpha)
    if mode == "mixed":
        return mixed_loss(logits, target, label_matrix, alpha)
    if mode == "ce":
        return hard_cross_entropy(logits, target)
    raise ValueError(f"Loss mode must be one of {LOSS_MODES}, got {mode!r}.")
