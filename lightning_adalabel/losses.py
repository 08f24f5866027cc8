"""Functional losses of ALR, written term by term; no state. All are computed in float32 (float64 inputs stay
float64) whatever the input dtype, so bf16/fp16 logits under autocast cannot overflow the log-sum-exp.

Inputs follow ``F.cross_entropy`` (see :mod:`lightning_adalabel.inputs`): logits ``(N, K)`` or
``(N, K, d1, ..., dk)``; targets class indices ``(N)`` / ``(N, d1, ..., dk)`` or probabilities of the logits' shape
(MixUp/CutMix); ``ignore_index`` and ``reduction`` as torch. Every loss here is linear in the target distribution,
so the loss of a probability target is the same mixture of the per-class losses.

Each public loss validates, formats to one row per position, computes a per-position loss on those rows (the
``_per_sample`` functions) and reduces. Class-index targets go through the one-softmax implementation with a
hand-written gradient (:mod:`lightning_adalabel.fused`); :func:`_straightforward_per_sample`, written term by term
with autograd, is the reference it is tested against and serves probability targets.

The same two losses with a sparse Q (``AdaLabel(top_k=...)``: each row of Q is ``top_k`` explicit entries plus a
uniform remainder, see :mod:`lightning_adalabel.sparse_label_matrix`) are :func:`sparse_loss_per_sample`: no ``K x K``
tensor is built. Row c of Q is ``V[c] + r_c u_c``: ``V[c]`` has k entries (``indices[c]``, ``values[c]``), ``u_c`` is
uniform over the allowed classes (the K - 1 others, or all K with ``include_diagonal``). Both losses are linear in Q's
row, so the uniform part needs only the sum of the logits. For a class-index target y, with ``s = sum V[y] + r_y`` (1,
or 0 before the first refresh with ``start="zeros"``) and ``zbar`` the mean logit over the allowed classes:

- ``decoupled``: ``CE(z, y) + alpha * (s lse_res - V[y] . z - r_y zbar)``, ``lse_res = log sum_{j != y} exp z_j``;
- ``mixed``: ``(1 - alpha) CE(z, y) + alpha * (s lse - V[y] . z - r_y zbar)``.

``V[y] . z`` gathers k logits per sample. Probability targets t (MixUp/CutMix) mix these per-class losses with
weights t; the only product with the matrix, ``t @ V``, is a sparse-dense product (``O(M K k)`` work, no ``K x K``
tensor). The tests compare it, values and gradients, with the dense losses on the densified Q.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_adalabel.fused import fused_soft_label_loss
from lightning_adalabel.inputs import ClassificationBatch, _arg_validation, _format, _reduce, _tensor_validation
from lightning_adalabel.validation import LOSS_MODES, warn_deprecated


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


def soft_label_loss(
    logits: Tensor, target: Tensor, label_matrix: Tensor, mode: str, alpha: float, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The loss ``mode`` (``"decoupled"``, ``"mixed"`` or ``"ce"``) with a given label matrix Q and torch's
    ``ignore_index`` and ``reduction``: what :meth:`~lightning_adalabel.AdaLabelMixin.adalabel_loss` computes with the
    callback's Q.

    Example:
        >>> logits, target = torch.randn(4, 5), torch.tensor([0, 4, -100, 2])
        >>> Q = torch.full((5, 5), 0.2)
        >>> torch.allclose(soft_label_loss(logits, target, Q, "ce", 0.0), F.cross_entropy(logits, target))
        True
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"Loss mode must be one of {LOSS_MODES}, got {mode!r}.")
    return _loss(logits, target, label_matrix, mode, alpha, ignore_index, reduction)


def adalabel_loss(
    logits: Tensor, target: Tensor, label_matrix: Tensor, mode: str, alpha: float, ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Deprecated name of :func:`soft_label_loss` (``adalabel_loss`` is the mixin's method)."""
    warn_deprecated("lightning_adalabel.losses.adalabel_loss", "lightning_adalabel.losses.soft_label_loss")
    return soft_label_loss(logits, target, label_matrix, mode, alpha, ignore_index, reduction)


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
