"""ALR's losses with a sparse label matrix: each row of Q is ``top_k`` explicit entries plus a uniform remainder
(see :mod:`lightning_adalabel.sparse_label_matrix`), so no ``K x K`` tensor is built.

Row c of Q is ``V[c] + r_c u_c``: ``V[c]`` has k entries (``indices[c]``, ``values[c]``), ``u_c`` is uniform over the
allowed classes (the K - 1 others, or all K with ``include_diagonal``). Both losses are linear in Q's row, so the
uniform part needs only the sum of the logits. For a class-index target y, with ``s = sum V[y] + r_y`` (1, or 0
before the first refresh with ``start="zeros"``) and ``zbar`` the mean logit over the allowed classes:

- ``decoupled``: ``CE(z, y) + alpha * (s lse_res - V[y] . z - r_y zbar)``, ``lse_res = log sum_{j != y} exp z_j``;
- ``mixed``: ``(1 - alpha) CE(z, y) + alpha * (s lse - V[y] . z - r_y zbar)``.

``V[y] . z`` gathers k logits per sample. Probability targets t (MixUp/CutMix) mix these per-class losses with
weights t; the only product with the matrix, ``t @ V``, is a sparse-dense product (``O(M K k)`` work, no ``K x K``
tensor). Everything is computed in float32 (float64 stays float64). Class-index targets take one softmax with a
hand-written gradient (:func:`sparse_soft_label_loss`), whose probabilities are also the batch's statistic;
:func:`sparse_loss_per_sample`, term by term with autograd, is the reference it is tested against and serves
probability targets. The tests compare both, values and gradients, with the dense losses of
:mod:`lightning_adalabel.losses` on the densified Q.
"""

import warnings
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_adalabel.fused import _softmax_and_logsumexp
from lightning_adalabel.inputs import ClassificationBatch
from lightning_adalabel.losses import _logsumexp_without_each_class


def _sparse_rows_times(target: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``target @ V`` (M x K) for probability targets, as a sparse-dense product; no gradient (targets are data).

    ``V^T`` is built in CSR form: its rows (V's columns) found by a sort and ``searchsorted`` on the device, so no
    step reads a value back to the host (a COO product would coalesce, which on a GPU waits for the number of
    distinct entries). Duplicate entries of a row, such as empty slots, are summed by the product.

    Example:
        >>> _sparse_rows_times(torch.tensor([[0.5, 0.5]]), torch.tensor([[1], [0]]), torch.tensor([[1.0], [0.25]]))
        tensor([[0.1250, 0.5000]])
    """
    num_classes, width = indices.shape
    columns, order = indices.reshape(-1).sort(stable=True)  # V^T's row of each entry, in row order
    crow = torch.searchsorted(columns, torch.arange(num_classes + 1, device=indices.device))
    source_rows = torch.div(order, width, rounding_mode="floor")  # V's row (V^T's column) of each entry
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice, about a format we only multiply
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        transposed = torch.sparse_csr_tensor(crow, source_rows, values.reshape(-1)[order].to(target.dtype),
                                             (num_classes, num_classes), check_invariants=False)
    with torch.no_grad(), torch.autocast(target.device.type, enabled=False):
        return torch.sparse.mm(transposed, target.detach().T).T


def _softmax_and_logsumexp_rows(logits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The dense loss's ``(softmax, logsumexp, max)`` (:func:`lightning_adalabel.fused._softmax_and_logsumexp`), the
    last two as ``(M,)`` vectors."""
    probs, lse, top = _softmax_and_logsumexp(logits)
    return probs, lse.squeeze(1), top.squeeze(1)


class _SparseSoftLabelCrossEntropy(torch.autograd.Function):
    """Per-row decoupled or mixed loss of class-index targets with the sparse rows ``Q[y]``, and, without gradient,
    the probabilities ``P`` (``p_res`` for decoupled, ``p`` for mixed), the largest logit that ``P`` saw and the
    logits' row sums (what the statistics need, so they take no second softmax).

    Backward is one pass over ``P`` and two scatters: ``dL/dz = (w + alpha s) P - alpha (V[y] + r_y u_y) - w onehot(y)``
    with ``w = 1 - p_y`` (decoupled) or ``1 - alpha`` (mixed), ``s`` the row's sum.
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
        if decoupled:
            probs, lse, top = _softmax_and_logsumexp_rows(logits.scatter(1, index, float("-inf")))
            gap = lse - true_logit
            hard_weight, hard = torch.sigmoid(gap), F.softplus(gap)  # 1 - p_y and CE, exact where p_y rounds to 1
        else:
            probs, lse, top = _softmax_and_logsumexp_rows(logits)
            hard_weight = torch.full_like(lse, 1.0 - alpha)
            hard = (lse - true_logit) * (1.0 - alpha)
        mean_allowed = (logit_sums - true_logit) / (num_classes - 1) if floor_on_target else logit_sums / num_classes
        per_row = hard + alpha * (lse * row_sums - soft_dot - mass * mean_allowed)
        ctx.alpha, ctx.floor_on_target = alpha, floor_on_target
        ctx.save_for_backward(probs, target, indices, values, mass, row_sums, hard_weight)
        ctx.mark_non_differentiable(probs, top, logit_sums)
        return per_row, probs, top, logit_sums

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_rows: Tensor, *unused: Any) -> Tuple[Optional[Tensor], ...]:  # type: ignore[override]
        probs, target, indices, values, mass, row_sums, hard_weight = ctx.saved_tensors
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
    """``(per-row loss, P, largest logit P saw, logit row sums)`` of a batch with class-index targets, from one
    softmax with a hand-written gradient; the same loss as :func:`sparse_loss_per_sample` (which the tests check)."""
    logits = batch.logits if batch.logits.dtype == torch.float64 else batch.logits.float()
    target = batch.target
    values = values.to(logits.dtype)
    mass = residual_mass.to(logits.dtype)[target]
    rows = values[target]
    return _SparseSoftLabelCrossEntropy.apply(logits, target, indices[target], rows, mass, rows.sum(dim=1) + mass,
                                              decoupled, alpha, include_diagonal)


def sparse_loss_per_sample(
    batch: ClassificationBatch, indices: Tensor, values: Tensor, residual_mass: Tensor, mode: str, alpha: float,
    include_diagonal: bool,
) -> Tensor:
    """The loss of every row of a formatted batch (M,), before masking and reduction, with the sparse Q
    (``indices``, ``values``: K x k; ``residual_mass``: K). ``mode`` is ``"decoupled"``, ``"mixed"`` or ``"ce"``.

    Example:
        >>> from lightning_adalabel.inputs import _format
        >>> indices, values = torch.tensor([[1], [0], [1]]), torch.tensor([[1.0], [0.5], [0.5]])
        >>> batch = _format(torch.zeros(1, 3), torch.tensor([0]))
        >>> sparse_loss_per_sample(batch, indices, values, torch.tensor([0.0, 0.5, 0.5]), "decoupled", 0.5, False)
        tensor([1.4452])
    """
    logits = batch.logits if batch.logits.dtype == torch.float64 else batch.logits.float()
    num_classes = logits.shape[1]
    values, residual_mass = values.to(logits.dtype), residual_mass.to(logits.dtype)
    row_sums = values.sum(dim=1) + residual_mass
    logit_sums = logits.sum(dim=1)
    if batch.probabilistic:
        return _probability_target_loss(logits, batch.target.to(logits.dtype), indices, values, residual_mass,
                                        row_sums, logit_sums, mode, alpha, include_diagonal)
    target = batch.target
    index = target[:, None]
    true_logit = logits.gather(1, index).squeeze(1)
    lse = logits.logsumexp(dim=1)
    hard = lse - true_logit
    if mode == "ce":
        return hard
    soft_dot = (values[target] * logits.gather(1, indices[target])).sum(dim=1)
    mass = residual_mass[target]
    if mode == "decoupled":
        lse_residual = logits.scatter(1, index, float("-inf")).logsumexp(dim=1)
        mean_other = (logit_sums - true_logit) / (num_classes - 1)
        residual = lse_residual * row_sums[target] - soft_dot - mass * mean_other
        return F.softplus(lse_residual - true_logit) + alpha * residual
    mean_allowed = logit_sums / num_classes if include_diagonal else (logit_sums - true_logit) / (num_classes - 1)
    soft = lse * row_sums[target] - soft_dot - mass * mean_allowed
    return (1.0 - alpha) * hard + alpha * soft


def _probability_target_loss(
    logits: Tensor, target: Tensor, indices: Tensor, values: Tensor, residual_mass: Tensor, row_sums: Tensor,
    logit_sums: Tensor, mode: str, alpha: float, include_diagonal: bool,
) -> Tensor:
    """The t-weighted mixture of the per-class losses (see the module docstring)."""
    num_classes = logits.shape[1]
    lse = logits.logsumexp(dim=1)
    hard = lse * target.sum(dim=1) - (target * logits).sum(dim=1)
    if mode == "ce":
        return hard
    soft_dot = (logits * _sparse_rows_times(target, indices, values)).sum(dim=1)
    weighted_mass = target * residual_mass  # t_c r_c, for the residual floor's missing own class
    target_mass = weighted_mass.sum(dim=1)  # sum_c t_c r_c (not a matmul: autocast would run it in bf16/fp16)
    if mode == "decoupled":
        # sum_c t_c s_c lse_{-c} - z . (t V) - sum_c t_c r_c (sum z - z_c) / (K - 1)
        lse_without = _logsumexp_without_each_class(logits)
        floor_dot = (target_mass * logit_sums - (weighted_mass * logits).sum(dim=1)) / (num_classes - 1)
        residual = ((target * row_sums) * lse_without).sum(dim=1) - soft_dot - floor_dot
        return hard + alpha * residual
    if include_diagonal:
        floor_dot = target_mass * logit_sums / num_classes
    else:
        floor_dot = (target_mass * logit_sums - (weighted_mass * logits).sum(dim=1)) / (num_classes - 1)
    soft = lse * (target * row_sums).sum(dim=1) - soft_dot - floor_dot
    return (1.0 - alpha) * hard + alpha * soft
