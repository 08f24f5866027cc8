"""ALR's losses and statistics from one softmax of the logits, with a hand-written gradient.

The loss, its gradient and the statistic all derive from one probability row ``P`` per sample:

- ``decoupled`` (ALR): ``P = p_res``, the softmax over the wrong classes (the true-class logit masked to ``-inf``).
  With ``lse_res = log sum_{j != y} exp z_j`` and ``d = lse_res - z_y``:
  ``CE = softplus(d)``, ``1 - p_y = sigmoid(d)``, the residual loss is ``lse_res * sum_j Q[y, j] - Q[y] . z``,
  and ``d loss / d z = (1 - p_y + alpha * sum_j Q[y, j]) * p_res - alpha * Q[y] - (1 - p_y) * onehot(y)``.
- ``mixed`` (label smoothing, OLS): ``P = p``, the full softmax; the target is ``(1 - alpha) onehot(y) + alpha Q[y]``,
  the loss ``(1 - alpha + alpha * sum_j Q[y, j]) * lse - (1 - alpha) z_y - alpha Q[y] . z`` and its gradient
  ``(1 - alpha + alpha * sum_j Q[y, j]) * p - alpha * Q[y] - (1 - alpha) * onehot(y)``.

``P`` is also the statistic the engine accumulates (the ``mean`` estimator's ``p_res``, or ``p`` with the
diagonal), so the callback does not compute a second softmax after the step. Everything is a handful of
vectorised ops on the logits' device, float32 at least, with no host sync. The straightforward implementation
in :mod:`lightning_adalabel.losses` (``_straightforward_per_sample``) stays as the reference the tests compare
this one against; it also serves what this one does not cover (probability targets).
"""

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_adalabel.inputs import ClassificationBatch

# Below this many classes a softmax written out (max, exp, sum, divide) beats torch's CPU softmax kernel,
# which is tuned for long rows (measured on a 2-core CPU: 12 us against 45 us at K=10, 0.28 ms against 0.15 ms
# at K=1000, B=256). Compiled (compile_loss=True), the written-out form is always the faster: inductor fuses it,
# while torch's softmax and the logsumexp read back from it cost one more pass (0.20 against 0.24 ms at K=1000).
_SMALL_NUM_CLASSES = 64


def _softmax_and_logsumexp(logits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(softmax, logsumexp, max)`` of each row, the last two as ``(M, 1)`` columns; rows whose entries are all
    ``-inf`` except one are fine."""
    top = logits.amax(dim=1, keepdim=True)
    if (logits.shape[1] < _SMALL_NUM_CLASSES and logits.device.type == "cpu") or torch.compiler.is_compiling():
        exp = (logits - top).exp_()
        total = exp.sum(dim=1, keepdim=True)
        return exp.div_(total), total.log_().add_(top), top
    probs = logits.softmax(dim=1)
    # The kernel's largest entry is exp(0) / sum: lse = max + log(sum) = max - log(largest probability).
    return probs, top - probs.amax(dim=1, keepdim=True).log_(), top


class _SoftLabelCrossEntropy(torch.autograd.Function):
    """The reduced loss and, as outputs without gradient, ``P`` and the batch's statistics (see the module docstring).

    Forward saves ``P`` and ``Q[y]`` (gathered once); backward is two passes over them. Computing the gradient in
    forward instead (as Liger-Kernel's fused losses do) measured slower here: one more pass over the batch. The
    reduction and the statistics are done here too, not in separate autograd nodes, and every per-row quantity is
    an ``(M, 1)`` column that broadcasts without a reshape: on a CPU at small K the cost of a call is its number of
    operations.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, target: Tensor, valid: Tensor, invalid: Tensor, label_matrix: Tensor,
        decoupled: bool, alpha: float, reduction: str, samples: str, rows_sum_to_one: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # only the loss has a gradient: no zero tensors for the other outputs
        # No op here is one autocast runs in low precision (no matmul, no vecdot): all stays in the logits' float32.
        index, valid, invalid = target[:, None], valid[:, None], invalid[:, None]
        true_logit = logits.gather(1, index)
        soft = label_matrix.index_select(0, target)
        if soft.dtype != logits.dtype:  # float64 logits meet the engine's float32 Q
            soft = soft.to(logits.dtype)
        # Q[y] . z over the unmasked logits: finite, and NaN/Inf exactly when a logit is (0 * Inf is NaN).
        soft_dot = (soft * logits).sum(dim=1, keepdim=True)  # not linalg.vecdot: autocast runs it in bf16/fp16
        # Rows of a label matrix sum to 1, or to 0 before their first refresh with start="zeros".
        soft_sum: Union[Tensor, float] = 1.0 if rows_sum_to_one else soft.sum(dim=1, keepdim=True)
        if decoupled:
            probs, lse, top = _softmax_and_logsumexp(logits.scatter(1, index, float("-inf")))
            gap = lse - true_logit
            hard_weight: Union[Tensor, float] = torch.sigmoid(gap)  # 1 - p_y, exact even where p_y rounds to 1
            per_row = F.softplus(gap)
        else:
            probs, lse, top = _softmax_and_logsumexp(logits)
            hard_weight = 1.0 - alpha
            gap = lse - true_logit
            per_row = gap * hard_weight
        soft_part = lse - soft_dot if rows_sum_to_one else torch.addcmul(-soft_dot, lse, soft_sum)  # type: ignore[arg-type]
        per_row = per_row.add_(soft_part, alpha=alpha)

        # A row's logits are usable for the statistics when they hold no NaN or +inf, the target's logit is finite
        # and at least one other allowed class is; -inf entries are masks (classes a sample may not take), as in
        # F.cross_entropy. lse - z_y is finite exactly then: one op on an (M, 1) column. (With a mask where Q[y] has
        # mass, the soft part of the loss is +inf, as torch's label smoothing is; the statistic p_res is fine.)
        finite = torch.isfinite(gap)
        counted = _counted(samples, valid & finite, true_logit >= top)  # a tie with a wrong class: predicted right
        destination, counts = _tallies(counted, valid, finite, invalid, index, logits.shape[1])
        loss, weight = _reduce_rows(per_row, valid, invalid, counts[:, 1:2].to(per_row.dtype), reduction)
        scale = hard_weight + alpha * soft_sum  # a float for mixed with rows summing to 1
        ctx.alpha, ctx.floats = alpha, [value for value in (hard_weight, scale) if not isinstance(value, Tensor)]
        # Q[y] is kept outside save_for_backward so that backward can turn it into the gradient in place (one B x K
        # tensor fewer); a second backward (retain_graph) gathers it again from Q, which is never changed in place.
        # Compiled, backward always gathers it again: inside its fused loop that is cheaper than writing Q[y] out
        # here and reading it back (7-10% of a step at K=1000).
        ctx.soft, ctx.label_matrix = None if torch.compiler.is_compiling() else soft, label_matrix
        ctx.save_for_backward(probs, index, weight,
                              *[value for value in (hard_weight, scale) if isinstance(value, Tensor)])
        ctx.mark_non_differentiable(probs, destination, counts)
        return loss, probs, destination, counts

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *unused: Any) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        if grad_loss is None:  # a backward through the other outputs only (they have no gradient)
            return (None,) * 10
        if torch.is_grad_enabled():  # create_graph=True: this gradient has no gradient of its own; say so if asked
            return _backward_once_differentiable(ctx, grad_loss)
        return _backward(ctx, grad_loss)


def _backward(ctx: Any, grad_loss: Tensor) -> Tuple[Optional[Tensor], ...]:
    """The gradient (see the module docstring). Outside ``create_graph`` backward already runs without grad mode, so
    the common path skips ``once_differentiable``'s wrapper (5 us a call, 6% of cross-entropy's step at K=10)."""
    probs, index, weight, *row_weights = ctx.saved_tensors
    hard_weight, scale = ctx.floats + row_weights  # the float one(s) first: hard_weight is never the only tensor
    soft, ctx.soft = ctx.soft, None
    if soft is None:
        soft = ctx.label_matrix.index_select(0, index.squeeze(1)).to(probs.dtype)
    grad_rows = grad_loss * weight  # (M, 1)
    grad = soft.mul_(grad_rows * -ctx.alpha).addcmul_(probs, grad_rows * scale)
    return (grad.scatter_add_(1, index, grad_rows * -hard_weight),) + (None,) * 9


_backward_once_differentiable = once_differentiable(_backward)


def _reduce_rows(
    per_row: Tensor, valid: Tensor, invalid: Tensor, weight: Tensor, reduction: str
) -> Tuple[Tensor, Tensor]:
    """torch's reductions of class-index losses (see :func:`lightning_adalabel.inputs._reduce`) of ``(M, 1)`` rows
    and each row's weight in the result, for backward: ``weight`` is ``valid`` as floats, so ignored and invalid
    rows weigh 0; an invalid row makes the result NaN."""
    per_row = torch.where(valid, per_row, 0.0)  # not a product: an ignored row's logits may be NaN (padding)
    if reduction == "none":
        return torch.where(invalid, float("nan"), per_row), weight
    total = per_row.sum()
    if reduction == "mean":
        count = weight.sum()
        total = total / count  # all rows ignored: NaN, as F.cross_entropy
        weight = weight / count.clamp_min(1.0)
    return torch.where(invalid.any(), float("nan"), total), weight


def _tallies(
    counted: Tensor, valid: Tensor, finite: Tensor, invalid: Tensor, target: Tensor, num_classes: int
) -> Tuple[Tensor, Tensor]:
    """Each row's place in the statistics, ``(M,)``: its class, or the spare row K when it is not counted; and its
    tallies ``(counted, seen, non-finite, invalid)`` as ``(M, 4)`` floats (the layout is in
    :mod:`lightning_adalabel.label_matrix`). Every argument is an ``(M, 1)`` column."""
    tallies = torch.cat([counted, valid, valid > finite, invalid], dim=1).float()  # valid > finite: valid, not finite
    return torch.where(counted, target, num_classes).view(-1), tallies


def _counted(samples: str, usable: Tensor, correct: Tensor) -> Tensor:
    """Which rows enter the statistics' sums, among the valid rows with finite logits."""
    if samples == "misclassified":
        return usable > correct
    if samples == "correct":
        return usable & correct
    return usable if samples == "all" else torch.zeros_like(usable)


def fused_soft_label_loss(
    batch: ClassificationBatch, label_matrix: Tensor, decoupled: bool, alpha: float, reduction: str = "mean",
    samples: str = "none", rows_sum_to_one: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, P, destination, counts)`` of a formatted batch with class-index targets.

    ``loss`` is reduced as torch reduces (``reduction``), in float32 at least, and differentiable; ``P`` (M, K) is
    ``p_res`` (``decoupled``) or ``p``; ``destination`` (M,) is each row's class if it enters the statistics of
    ``samples`` (``"misclassified"``, ``"correct"``, ``"all"``, ``"none"``; a row enters only if it is valid and its
    logits are finite) and K otherwise; ``counts`` (M, 4) are its tallies: counted, seen, non-finite, invalid.
    ``rows_sum_to_one`` (every row of ``label_matrix`` sums to 1, the engine knows when) saves a reduction.

    Example:
        >>> from lightning_adalabel.inputs import _format
        >>> Q = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
        >>> batch = _format(torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 0]))
        >>> loss, probs, destination, counts = fused_soft_label_loss(batch, Q, True, 0.5, "none", "misclassified")
        >>> loss, destination  # the first sample is a tie (predicted right): it does not enter the sums
        (tensor([1.4452, 2.3030]), tensor([3, 0]))
        >>> probs
        tensor([[0.0000, 0.5000, 0.5000],
                [0.0000, 0.8808, 0.1192]])
    """
    logits = batch.logits if batch.logits.dtype == torch.float64 else batch.logits.float()
    loss, probs, destination, counts = _SoftLabelCrossEntropy.apply(
        logits, batch.target, batch.valid, batch.invalid, label_matrix, decoupled, alpha, reduction, samples,
        rows_sum_to_one,
    )
    return loss.view(batch.shape) if reduction == "none" else loss, probs, destination, counts
