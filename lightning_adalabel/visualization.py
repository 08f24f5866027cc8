"""Pictures of a label matrix. matplotlib is imported lazily: it is only needed when a picture is asked for."""

from typing import Any, List, Optional, Sequence, Tuple

from torch import Tensor

COLORBAR_LABEL = "Q[k, j]: soft-label mass of class j in the target of class k"
# A residual matrix's diagonal is zero by construction (the true class keeps its hard label), not "no confusion":
# its cells are drawn grey and hatched, and left out of the colour scale.
RESIDUAL_DIAGONAL_NOTE = "hatched diagonal: Q[k, k] = 0 by construction (residual label), not 'no confusion'"
FULL_DIAGONAL_NOTE = "outlined diagonal: Q[k, k] is the true class's own mass (full-softmax label)"
DIAGONAL_GID = "diagonal"  # the gid of the artist that marks the diagonal cells


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
    include_diagonal: Optional[bool] = None,
) -> Any:
    """A heatmap of ``matrix`` (K x K) as a new matplotlib figure; row k is the soft label of class k.

    The diagonal is drawn apart from the other cells. In a residual matrix (the ALR default) ``Q[k, k]`` is zero by
    construction, so the diagonal cells are grey and hatched and the colour scale spans the off-diagonal values
    only. In a full-softmax matrix (preset ``ols``) ``Q[k, k]`` is the true class's own mass, a different kind of
    entry from the confusions: its cells are outlined.

    The figure is not attached to pyplot (no global state, nothing to close). In Jupyter it displays as an image
    once IPython's inline backend has registered its figure formatter: run ``%matplotlib inline`` first.

    Args:
        matrix: the label matrix, e.g. ``callback.engine.to_dense()``.
        class_names: tick labels (default: class indices).
        title: figure title.
        annotate: write each value in its cell; by default only when K <= 20.
        include_diagonal: whether ``matrix`` is a full-softmax matrix (``True``) or a residual one (``False``);
            by default residual exactly when its diagonal is zero.

    Example:
        >>> from lightning_adalabel.label_matrix import initial_label_matrix
        >>> figure = plot_label_matrix(initial_label_matrix(3), class_names=["cat", "dog", "fox"])
        >>> [label.get_text() for label in figure.axes[0].get_yticklabels()]
        ['cat', 'dog', 'fox']
        >>> figure.axes[1].get_ylabel()  # the colour bar
        'Q[k, j]: soft-label mass of class j in the target of class k'
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    values = matrix.detach().float().cpu().numpy()
    num_classes = values.shape[0]
    names = _class_labels(class_names, num_classes)
    diagonal = np.eye(num_classes, dtype=bool)
    residual = (not include_diagonal) if include_diagonal is not None else bool(np.abs(values[diagonal]).max() <= 1e-6)
    shown = np.ma.masked_array(values, mask=diagonal if residual else np.zeros_like(diagonal))
    vmax = float(shown.max()) if shown.count() else 0.0  # a 1 x 1 residual matrix has no off-diagonal value
    vmax = vmax if vmax > 0 else 1.0

    size = min(4.0 + 0.45 * num_classes, 24.0)
    figure = Figure(figsize=(size + 1.5, size + 0.4))
    axes = figure.add_subplot()
    colormap = colormaps["viridis"].with_extremes(bad="#d4d4d4")  # "bad": the masked (residual) diagonal
    image = axes.imshow(shown, cmap=colormap, vmin=0.0, vmax=vmax, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label(COLORBAR_LABEL)

    cells = [Rectangle((k - 0.5, k - 0.5), 1.0, 1.0) for k in range(num_classes)]
    line_width = max(0.6, min(2.0, 20.0 / num_classes))
    if residual:
        marks = PatchCollection(cells, facecolor="#d4d4d4", edgecolor="#8c8c8c", hatch="///", linewidth=0.0)
        legend = Patch(facecolor="#d4d4d4", edgecolor="#8c8c8c", hatch="///", label=RESIDUAL_DIAGONAL_NOTE)
    else:
        marks = PatchCollection(cells, facecolor="none", edgecolor="#e8000b", linewidth=line_width)
        legend = Patch(facecolor="none", edgecolor="#e8000b", linewidth=1.5, label=FULL_DIAGONAL_NOTE)
    marks.set_gid(DIAGONAL_GID)
    axes.add_collection(marks)

    if num_classes <= 50:
        axes.set_xticks(range(num_classes), labels=names, rotation=90 if num_classes > 10 else 0)
        axes.set_yticks(range(num_classes), labels=names)
    if annotate if annotate is not None else num_classes <= 20:
        for row in range(num_classes):
            for column in range(num_classes):
                if residual and row == column:
                    axes.text(column, row, "—", ha="center", va="center", fontsize=8, color="#404040")
                    continue
                value = values[row, column]
                color = "black" if value > 0.6 * vmax else "white"
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    axes.set_xlabel("soft-label class j")
    axes.set_ylabel("target class k")
    axes.set_title(title)
    figure.legend(handles=[legend], loc="lower center", frameon=False, fontsize=8, handlelength=1.5)
    figure.tight_layout(rect=(0.0, 0.04, 1.0, 1.0))
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
    return named_pairs(top_off_diagonal(matrix.cpu(), n), class_names, matrix.shape[0])


def top_off_diagonal(matrix: Tensor, n: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(rows, columns, values)`` of the ``n`` largest off-diagonal entries of a K x K ``matrix``, largest first, on
    its device.

    Example:
        >>> import torch
        >>> top_off_diagonal(torch.tensor([[0.0, 0.9, 0.1], [0.5, 0.0, 0.5], [0.2, 0.8, 0.0]]), 2)
        (tensor([0, 2]), tensor([1, 1]), tensor([0.9000, 0.8000]))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be a non-negative integer, got {n!r}.")
    num_classes = matrix.shape[0]
    values = matrix.detach().float().clone().fill_diagonal_(float("-inf")).flatten()
    top = values.topk(min(n, num_classes * (num_classes - 1)))
    return top.indices // num_classes, top.indices % num_classes, top.values


def named_pairs(
    pairs: Tuple[Tensor, Tensor, Tensor], class_names: Optional[Sequence[str]], num_classes: int
) -> List[Tuple[str, str, float]]:
    """``(rows, columns, values)`` (an engine's ``top_pairs``) as ``(target class, soft-label class, Q value)``
    triples, the classes named (``class_names``, or their indices) and the values rounded to 6 digits."""
    names = _class_labels(class_names, num_classes)
    rows, columns, values = (part.tolist() for part in pairs)
    return [(names[row], names[column], round(value, 6)) for row, column, value in zip(rows, columns, values)]
