"""Naive references the tests compare the package against: Python loops over samples and classes, the math
module, float64. Written for clarity, never for speed; nothing here imports the code under test."""

import math
from typing import List, Sequence

import torch

def random_residual_matrix(num_classes, seed=0, dtype=torch.float32, include_diagonal=False):
    """A random label matrix: rows sum to 1, zero diagonal unless ``include_diagonal``."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(num_classes, num_classes, generator=generator, dtype=dtype)
    if not include_diagonal:
        matrix.fill_diagonal_(0)
    return matrix / matrix.sum(dim=1, keepdim=True)


def naive_residual_ce(logits, target, matrix):
    """Mean over samples of -sum_{j != y} Q[y, j] log p_res_j, one sample and one class at a time."""
    total = 0.0
    for z, y in zip(logits.tolist(), target.tolist()):
        normaliser = sum(math.exp(z[j]) for j in range(len(z)) if j != y)
        total -= sum(matrix[y][j].item() * (z[j] - math.log(normaliser)) for j in range(len(z)) if j != y)
    return total / len(target)


def naive_soft_ce(logits, soft_targets):
    total = 0.0
    for z, t in zip(logits.tolist(), soft_targets.tolist()):
        log_normaliser = math.log(sum(math.exp(value) for value in z))
        total -= sum(t_j * (z_j - log_normaliser) for t_j, z_j in zip(t, z))
    return total / len(logits)


def naive_refresh(matrix, batches, samples, estimator, momentum, include_diagonal, prior="uniform",
                  prior_strength=0.0):
    """Q after one refresh over ``batches``, one sample and one class at a time, in float64.

    With ``prior_strength`` s, row k's estimate is taken as if ``s * seen_k`` extra samples equal to the prior row
    (uniform over the allowed classes, or the row before the refresh) had been averaged in.
    """
    num_classes = len(matrix)
    sums = [[0.0] * num_classes for _ in range(num_classes)]
    counts = [0] * num_classes
    seen = [0] * num_classes
    for logits, target in batches:
        for z, y in zip(logits.tolist(), target.tolist()):
            seen[y] += 1
            if any(math.isnan(value) or value == math.inf for value in z) or z[y] == -math.inf:
                continue  # rows with NaN or +inf logits, or a masked target, never enter the statistics
            others = [value for j, value in enumerate(z) if j != y]
            if not include_diagonal and max(others) == -math.inf:
                continue  # no allowed wrong class: no residual prediction
            if estimator == "geometric" and -math.inf in others:
                continue  # a masked class: log 0
            right = z[y] >= max(z)  # predicted right: the true class has the largest logit, a tie included
            if samples == "misclassified" and right or samples == "correct" and not right:
                continue
            allowed = [j for j in range(num_classes) if include_diagonal or j != y]
            if estimator == "confusion":  # one count for the top allowed class, the first of ties
                sums[y][max(allowed, key=lambda j: z[j])] += 1.0
                counts[y] += 1
                continue
            top = max(z[j] for j in allowed)
            normaliser = sum(math.exp(z[j] - top) for j in allowed)
            for j in allowed:
                probability = math.exp(z[j] - top) / normaliser
                sums[y][j] += probability if estimator == "mean" else math.log(probability)
            counts[y] += 1
    refreshed = [list(row) for row in matrix.tolist()]
    for k in range(num_classes):
        if counts[k] == 0:
            continue
        allowed = [j for j in range(num_classes) if include_diagonal or j != k]
        pseudo = prior_strength * seen[k]
        if prior == "uniform":
            prior_row = {j: 1.0 / len(allowed) for j in allowed}
        else:
            prior_row = {j: matrix[k][j].item() for j in allowed}
        if estimator in ("mean", "confusion"):
            estimate = {j: (sums[k][j] + pseudo * prior_row[j]) / (counts[k] + pseudo) for j in allowed}
        else:
            log_prior = {j: math.log(prior_row[j]) if pseudo else 0.0 for j in allowed}
            weights = {j: math.exp((sums[k][j] + pseudo * log_prior[j]) / (counts[k] + pseudo)) for j in allowed}
            estimate = {j: weight / sum(weights.values()) for j, weight in weights.items()}
        for j in range(num_classes):
            refreshed[k][j] = (1 - momentum) * refreshed[k][j] + momentum * estimate.get(j, 0.0)
    return torch.tensor(refreshed, dtype=torch.float64), counts


def random_batches(num_classes, seed, num_batches=3, batch_size=12, tied=False, present=None):
    """Random logits (integer-valued when ``tied``, so arg-max ties are common) and targets from ``present``."""
    generator = torch.Generator().manual_seed(seed)
    present = torch.arange(num_classes) if present is None else torch.tensor(present)
    batches = []
    for _ in range(num_batches):
        if tied:
            logits = torch.randint(-1, 2, (batch_size, num_classes), generator=generator).float()
        else:
            logits = 3 * torch.randn(batch_size, num_classes, generator=generator)
        target = present[torch.randint(0, len(present), (batch_size,), generator=generator)]
        batches.append((logits, target))
    return batches


def positions(logits: torch.Tensor, target: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """``(M, K)`` logits and ``(M,)`` (or ``(M, K)``) targets, one row per position, in torch's flattening order."""
    num_classes = logits.shape[1]
    flat_logits = logits.movedim(1, -1).reshape(-1, num_classes)
    if target.is_floating_point():
        return flat_logits, target.movedim(1, -1).reshape(-1, num_classes)
    return flat_logits, target.reshape(-1)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(value - top) for value in values))


def naive_position_loss(
    z: Sequence[float], y: int, matrix: Sequence[Sequence[float]], mode: str, alpha: float
) -> float:
    """The loss of one position with class index ``y``: CE, CE + alpha * residual CE, or the mixed soft-target CE."""
    num_classes = len(z)
    log_normaliser = _logsumexp(z)
    hard = log_normaliser - z[y]
    if mode == "ce":
        return hard
    if mode == "decoupled":
        residual_normaliser = _logsumexp([z[j] for j in range(num_classes) if j != y])
        residual = -sum(matrix[y][j] * (z[j] - residual_normaliser) for j in range(num_classes) if j != y)
        return hard + alpha * residual
    soft = -sum(matrix[y][j] * (z[j] - log_normaliser) for j in range(num_classes))
    return (1 - alpha) * hard + alpha * soft


def naive_loss(
    logits: torch.Tensor, target: torch.Tensor, matrix: torch.Tensor, mode: str, alpha: float,
    ignore_index: int = -100, reduction: str = "mean",
) -> "float | List[float]":
    """torch's contract by hand: every position a sample, ``ignore_index`` positions 0 and out of the mean."""
    flat_logits, flat_target = positions(logits.double(), target)
    q = matrix.double().tolist()
    losses, kept = [], 0
    for z, y in zip(flat_logits.tolist(), flat_target.tolist()):
        if isinstance(y, list):  # probability targets: the loss is linear in the target, mix the per-class losses
            losses.append(sum(t_k * naive_position_loss(z, k, q, mode, alpha) for k, t_k in enumerate(y) if t_k))
            kept += 1
            continue
        if y == ignore_index:
            losses.append(0.0)
            continue
        losses.append(naive_position_loss(z, int(y), q, mode, alpha))
        kept += 1
    if reduction == "none":
        return losses
    total = sum(losses)
    if target.is_floating_point():
        kept = len(losses)  # torch divides by every position for probability targets
    return total if reduction == "sum" else (total / kept if kept else float("nan"))
