"""Pictures of a label matrix (lightning_adalabel/visualization.py): the heatmap and the top class pairs."""

import io
from typing import Any, List, Tuple

import pytest
import torch

from lightning_adalabel import plot_label_matrix, top_correlated_pairs
from lightning_adalabel.label_matrix import initial_label_matrix
from lightning_adalabel.visualization import COLORBAR_LABEL, DIAGONAL_GID
from tests.helpers import learned_matrix

NUM_CLASSES = 5
NAMES = ["ant", "bee", "cat", "dog", "eel"]


# ---- the heatmap ---------------------------------------------------------------------------------------------


def full_softmax_matrix(num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """An OLS-like matrix: most of each row on the true class, the rest on the learned confusions."""
    return 0.7 * torch.eye(num_classes) + 0.3 * learned_matrix(num_classes)


def heatmap_parts(figure: Any) -> Tuple[Any, Any, Any]:
    """The heatmap's image, its colour-bar axes and the artist that marks the diagonal cells."""
    axes, colorbar_axes = figure.axes
    (image,) = axes.get_images()
    (marks,) = [artist for artist in axes.collections if artist.get_gid() == DIAGONAL_GID]
    return image, colorbar_axes, marks


def diagonal_cell_centres(marks: Any) -> List[Tuple[float, float]]:
    return [tuple(path.vertices[:4].mean(axis=0).round(6)) for path in marks.get_paths()]


def test_heatmap_colour_bar_is_labelled():
    for matrix in (learned_matrix(), full_softmax_matrix()):
        _, colorbar_axes, _ = heatmap_parts(plot_label_matrix(matrix))
        assert colorbar_axes.get_ylabel() == COLORBAR_LABEL
        assert COLORBAR_LABEL == "Q[k, j]: soft-label mass of class j in the target of class k"


def test_residual_diagonal_is_hatched_grey_and_left_out_of_the_colour_scale():
    matrix = learned_matrix()
    figure = plot_label_matrix(matrix, class_names=NAMES)
    image, _, marks = heatmap_parts(figure)
    # The colour scale spans the off-diagonal values only: its top is the largest off-diagonal entry, not 0 or 1.
    off_diagonal_max = matrix.clone().fill_diagonal_(-1).max().item()
    assert image.norm.vmin == 0.0 and image.norm.vmax == pytest.approx(off_diagonal_max)
    assert image.get_array().mask.tolist() == torch.eye(NUM_CLASSES, dtype=torch.bool).tolist()
    # One hatched grey cell per diagonal position, a "—" in it instead of "0.00", and a legend that says why.
    assert diagonal_cell_centres(marks) == [(float(k), float(k)) for k in range(NUM_CLASSES)]
    assert marks.get_hatch() == "///" and tuple(marks.get_facecolor()[0][:3]) != (1.0, 1.0, 1.0)
    texts = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text()
             for text in figure.axes[0].texts}
    assert [texts[(k, k)] for k in range(NUM_CLASSES)] == ["—"] * NUM_CLASSES
    assert texts[(0, 1)] == f"{matrix[0, 1].item():.2f}"
    (legend,) = figure.legends
    assert "by construction" in legend.get_texts()[0].get_text()


def test_full_softmax_diagonal_is_outlined_and_kept_in_the_colour_scale():
    matrix = full_softmax_matrix()
    figure = plot_label_matrix(matrix)
    image, _, marks = heatmap_parts(figure)
    assert image.norm.vmax == pytest.approx(matrix.max().item())
    assert not image.get_array().mask.any()  # every value is shown, the diagonal included
    assert diagonal_cell_centres(marks) == [(float(k), float(k)) for k in range(NUM_CLASSES)]
    assert not marks.get_hatch() and not marks.get_facecolor()[:, 3].any()  # an outline, not a fill
    assert marks.get_linewidth()[0] > 0
    texts = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text()
             for text in figure.axes[0].texts}
    assert texts[(2, 2)] == f"{matrix[2, 2].item():.2f}"
    assert "true class's own mass" in figure.legends[0].get_texts()[0].get_text()


def test_include_diagonal_overrides_the_guess():
    # A uniform full-softmax start and a residual matrix whose diagonal happens to be set by the caller.
    _, _, marks = heatmap_parts(plot_label_matrix(initial_label_matrix(3), include_diagonal=True))
    assert not marks.get_hatch()
    image, _, marks = heatmap_parts(plot_label_matrix(initial_label_matrix(3, include_diagonal=True),
                                                      include_diagonal=False))
    assert marks.get_hatch() == "///" and image.get_array().mask.diagonal().all()


def test_large_heatmap_skips_the_numbers_but_keeps_the_diagonal():
    matrix = learned_matrix(100)
    figure = plot_label_matrix(matrix)
    image, _, marks = heatmap_parts(figure)
    assert len(figure.axes[0].texts) == 0 and len(marks.get_paths()) == 100
    assert image.norm.vmax == pytest.approx(matrix.clone().fill_diagonal_(-1).max().item())
    for kind in (matrix, 0.5 * torch.eye(100) + 0.5 * matrix):  # both kinds render
        buffer = io.BytesIO()
        plot_label_matrix(kind).savefig(buffer, format="png", dpi=20)
        assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- top pairs -------------------------------------------------------------------------------------------------


def test_top_correlated_pairs_are_the_largest_off_diagonal_entries():
    matrix = learned_matrix()
    pairs = top_correlated_pairs(matrix, 20)
    assert len(pairs) == NUM_CLASSES * (NUM_CLASSES - 1)  # capped at the number of off-diagonal entries
    values = [value for _, _, value in pairs]
    assert values == sorted(values, reverse=True)
    row, column, value = pairs[0]
    assert row != column and value == pytest.approx(matrix.clone().fill_diagonal_(-1).max().item(), abs=1e-6)
    assert top_correlated_pairs(matrix, 0) == []
    with pytest.raises(ValueError, match="class names"):
        top_correlated_pairs(matrix, 2, class_names=["a"])
