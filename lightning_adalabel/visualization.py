"""Pictures of a label matrix. matplotlib is imported lazily: it is only needed when a picture is asked for."""

from typing import Any, List, Optional, Sequence, Tuple

from torch import Tensor


def _class_labels(class_names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """Tick and pair labels: the given class names as strings, or the class indices."""
    names = [str(name) for name in class_names] if class_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"Got {len(names)} class names for a {num_classes} x {num_classes} matrix.")
    return names


def plot_label_matrix(
    matrix: Tensor,
    class_names: Optional[Sequence[str]] = None,
    title: str = "Label matrix Q (row: target class, column: soft label)",
    annotate: Optional[bool] = None,
) -> Any:
    """A heatmap of ``matrix`` (K x K) as a new matplotlib figure; row k is the soft label of class k.

    Args:
        matrix: the label matrix, e.g. ``callback.label_matrix.matrix``.
        class_names: tick labels (default: class indices).
        title: figure title.
        annotate: write each value in its cell; by default only when K <= 20.

    Example:
        >>> from lightning_adalabel import initial_label_matrix
        >>> figure = plot_label_matrix(initial_label_matrix(3), class_names=["cat", "dog", "fox"])
        >>> [label.get_text() for label in figure.axes[0].get_yticklabels()]
        ['cat', 'dog', 'fox']
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    values = matrix.detach().float().cpu().numpy()
    num_classes = values.shape[0]
    names = _class_labels(class_names, num_classes)
    size = min(4.0 + 0.45 * num_classes, 24.0)
    figure = Figure(figsize=(size + 1.5, size))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", vmin=0.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if num_classes <= 50:
        axes.set_xticks(range(num_classes), labels=names, rotation=90 if num_classes > 10 else 0)
        axes.set_yticks(range(num_classes), labels=names)
    if annotate if annotate is not None else num_classes <= 20:
        for row in range(num_classes):
            for column in range(num_classes):
                value = values[row, column]
                color = "black" if value > 0.6 * values.max() else "white"
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    axes.set_xlabel("soft-label class")
    axes.set_ylabel("target class")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def top_correlated_pairs(
    matrix: Tensor, n: int = 10, class_names: Optional[Sequence[str]] = None
) -> List[Tuple[str, str, float]]:
    """The ``n`` largest off-diagonal entries of ``matrix``: ``(target class, soft-label class, Q value)``, largest first.

    Row k of Q is the soft label of class k, so a large ``Q[k, j]`` means the network, when wrong on class k,
    tends to answer j: k and j are correlated (confusable) classes. The pairs are directed: ``Q[k, j]`` and
    ``Q[j, k]`` are listed separately.

    Example:
        >>> import torch
        >>> Q = torch.tensor([[0.0, 0.9, 0.1], [0.5, 0.0, 0.5], [0.2, 0.8, 0.0]])
        >>> top_correlated_pairs(Q, 2, class_names=["cat", "dog", "fox"])
        [('cat', 'dog', 0.9), ('fox', 'dog', 0.8)]
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Expected a square K x K label matrix, got shape {tuple(matrix.shape)}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be a non-negative integer, got {n!r}.")
    num_classes = matrix.shape[0]
    names = _class_labels(class_names, num_classes)
    values = matrix.detach().float().cpu().clone().fill_diagonal_(float("-inf")).flatten()
    top = values.topk(min(n, num_classes * (num_classes - 1)))
    return [
        (names[index // num_classes], names[index % num_classes], round(value, 6))
        for value, index in zip(top.values.tolist(), top.indices.tolist())
    ]
