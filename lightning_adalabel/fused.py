"""ALR's losses and statistics from one softmax of the logits, with a hand-written gradient, for both engines.

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
vectorised ops on the logits' device, float32 at least, with no host sync.

Two ``autograd.Function``'s share these formulas (:func:`_probabilities` and :func:`_hard_part`, the one softmax and
the hard label's part)
and differ in how they read ``Q[y]``: :class:`_SoftLabelCrossEntropy` gathers the dense row, and
:class:`_SparseSoftLabelCrossEntropy` its ``top_k`` entries plus a uniform remainder ``r_y`` spread over the allowed
classes (see :mod:`lightning_adalabel.sparse_label_matrix`); both losses are linear in the row, so the remainder needs
only the logits' sum. The term-by-term implementations in :mod:`lightning_adalabel.losses`
(``_straightforward_per_sample``, ``sparse_loss_per_sample``) stay as the references the tests compare these against;
they also serve what these do not cover (probability targets).
"""

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_adalabel.inputs import ClassificationBatch
from lightning_adalabel.statistics import _counted, _tallies

# Below this many classes a softmax written out (max, exp, sum, divide) beats torch's CPU softmax kernel, which is
# tuned for long rows. Compiled (compile_loss=True), the written-out form is always the faster: inductor fuses it,
# while torch's softmax and the logsumexp read back from it cost one more pass (docs/benchmarks.md, "Design choices
# the code cites").
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


def _probabilities(logits: Tensor, index: Tensor, decoupled: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``(P, lse, max)`` of both losses: ``P = p_res``, the softmax with the true class (``index``, ``(M, 1)``)
    masked, for ``decoupled``; ``P = p`` for ``mixed``. ``lse`` and ``max`` are ``(M, 1)`` columns."""
    return _softmax_and_logsumexp(logits.scatter(1, index, float("-inf")) if decoupled else logits)


def _hard_part(gap: Tensor, decoupled: bool, alpha: float) -> Tuple[Union[Tensor, float], Tensor]:
    """``(hard_weight, hard)``: the hard label's loss and its weight on ``onehot(y)`` in the gradient, from
    ``gap = lse - z_y``. ``decoupled``: ``CE = softplus(gap)`` and ``1 - p_y = sigmoid(gap)`` (exact even where ``p_y``
    rounds to 1); ``mixed``: ``(1 - alpha) CE`` and the float ``1 - alpha``."""
    if decoupled:
        return torch.sigmoid(gap), F.softplus(gap)
    return 1.0 - alpha, gap * (1.0 - alpha)


class _SoftLabelCrossEntropy(torch.autograd.Function):
    """The reduced loss and, as outputs without gradient, ``P`` and the batch's statistics (see the module docstring).

    Forward saves ``P`` and ``Q[y]`` (gathered once); backward is two passes over them. Computing the gradient in
    forward instead (as Liger-Kernel's fused losses do) costs one more pass over the batch. The
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
        probs, lse, top = _probabilities(logits, index, decoupled)
        gap = lse - true_logit
        hard_weight, per_row = _hard_part(gap, decoupled, alpha)
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
        # here and reading it back (docs/benchmarks.md, "Design choices the code cites").
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
    the common path skips ``once_differentiable``'s wrapper, a measurable share of a small step (docs/benchmarks.md)."""
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


class _SparseSoftLabelCrossEntropy(torch.autograd.Function):
    """Per-row decoupled or mixed loss of class-index targets with the sparse rows ``Q[y] = V[y] + r_y u_y``, and,
    without gradient, the probabilities ``P``, the largest logit that ``P`` saw and the logits' row sums (what the
    statistics need, so they take no second softmax).

    Backward is one pass over ``P`` and two scatters: ``dL/dz = (w + alpha s) P - alpha (V[y] + r_y u_y) - w onehot(y)``
    with ``w`` the hard weight (see :func:`_hard_part`) and ``s`` the row's sum.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, target: Tensor, indices: Tensor, values: Tensor, mass: Tensor, row_sums: Tensor,
        decoupled: bool, alpha: float, include_diagonal: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        num_classes = logits.shape[1]
        index = target[:, None]
        true_logit = logits.gather(1, index).squeeze(1)
        logit_sums = logits.sum(dim=1)
        soft_dot = (values * logits.gather(1, indices)).sum(dim=1)
        floor_on_target = decoupled or not include_diagonal  # the uniform part leaves out the true class
        probs, lse, top = _probabilities(logits, index, decoupled)
        lse, top = lse.squeeze(1), top.squeeze(1)  # this Function's per-row quantities are (M,) vectors
        hard_weight, hard = _hard_part(lse - true_logit, decoupled, alpha)
        mean_allowed = (logit_sums - true_logit) / (num_classes - 1) if floor_on_target else logit_sums / num_classes
        per_row = hard + alpha * (lse * row_sums - soft_dot - mass * mean_allowed)
        ctx.alpha, ctx.floor_on_target = alpha, floor_on_target
        ctx.hard_weight = None if isinstance(hard_weight, Tensor) else hard_weight
        ctx.save_for_backward(probs, target, indices, values, mass, row_sums,
                              *([hard_weight] if isinstance(hard_weight, Tensor) else []))
        ctx.mark_non_differentiable(probs, top, logit_sums)
        return per_row, probs, top, logit_sums

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rows: Tensor, *unused: Any) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        probs, target, indices, values, mass, row_sums, *saved_weight = ctx.saved_tensors
        hard_weight = saved_weight[0] if saved_weight else ctx.hard_weight
        alpha, num_classes = ctx.alpha, probs.shape[1]
        floor = alpha * grad_rows * mass / (num_classes - 1 if ctx.floor_on_target else num_classes)
        grad = torch.addcmul(-floor[:, None], probs, ((hard_weight + alpha * row_sums) * grad_rows)[:, None])
        grad.scatter_add_(1, indices, values * (-alpha * grad_rows)[:, None])
        on_target = -hard_weight * grad_rows + (floor if ctx.floor_on_target else 0.0)
        grad.scatter_add_(1, target[:, None], on_target[:, None])
        return (grad,) + (None,) * 8


def sparse_soft_label_loss(
    batch: ClassificationBatch, indices: Tensor, values: Tensor, residual_mass: Tensor, decoupled: bool, alpha: float,
    include_diagonal: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(per-row loss, P, largest logit P saw, logit row sums)`` of a batch with class-index targets and the sparse Q
    (``indices``, ``values``: K x k; ``residual_mass``: K), from one softmax with a hand-written gradient; the same
    loss as :func:`~lightning_adalabel.losses.sparse_loss_per_sample` (which the tests check)."""
    logits = batch.logits if batch.logits.dtype == torch.float64 else batch.logits.float()
    target = batch.target
    values = values.to(logits.dtype)
    mass = residual_mass.to(logits.dtype)[target]
    rows = values[target]
    return _SparseSoftLabelCrossEntropy.apply(logits, target, indices[target], rows, mass, rows.sum(dim=1) + mass,
                                              decoupled, alpha, include_diagonal)
