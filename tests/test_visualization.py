"""The heatmap, label-matrix logging (TensorBoard figure, PNG fallback), top pairs, export/import, fixed-matrix runs."""

import csv
import io
import os
from types import SimpleNamespace
from typing import Any, List, Tuple

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_adalabel import (
    AdaLabel,
    LabelMatrix,
    decoupled_loss,
    initial_label_matrix,
    load_label_matrix,
    plot_label_matrix,
    save_label_matrix,
    top_correlated_pairs,
    validate_label_matrix,
)
from lightning_adalabel.label_matrix_logging import label_matrix_dir, log_label_matrix
from lightning_adalabel.visualization import COLORBAR_LABEL, DIAGONAL_GID
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs

NUM_CLASSES = 5
NAMES = ["ant", "bee", "cat", "dog", "eel"]


def learned_matrix(num_classes: int = NUM_CLASSES, seed: int = 0) -> torch.Tensor:
    """A valid residual label matrix that is clearly not uniform."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.rand(num_classes, num_classes, generator=generator) ** 4
    matrix.fill_diagonal_(0.0)
    return matrix / matrix.sum(dim=1, keepdim=True)


def fit(callback: AdaLabel, epochs: int = 2, **overrides: Any) -> Tuple[L.Trainer, TinyClassifier]:
    model = TinyClassifier(num_classes=NUM_CLASSES)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=epochs, callbacks=[callback], **overrides))
    trainer.fit(model, make_loader(num_samples=64, num_classes=NUM_CLASSES))
    return trainer, model


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


# ---- logging at each refresh ---------------------------------------------------------------------------------


def test_tensorboard_gets_the_heatmap_and_the_top_pairs(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = AdaLabel(preset="alr", samples="all", log_label_matrix=True, class_names=NAMES, top_pairs=3)
    trainer, _ = fit(callback, logger=logger)
    logger.experiment.flush()

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    images = events.Images("adalabel/label_matrix")
    assert [image.step for image in images] == [4, 8]  # one per refresh: 4 batches per epoch, 2 epochs
    text = events.Tensors("adalabel/top_pairs/text_summary")
    assert len(text) == 2
    table = text[-1].tensor_proto.string_val[0].decode()
    first = top_correlated_pairs(callback.label_matrix.matrix, 1, NAMES)[0]
    assert f"| {first[0]} | {first[1]} |" in table and table.count("\n") == 2 + 3 - 1
    assert not os.path.exists(label_matrix_dir(trainer))  # the figure went to TensorBoard, no PNG fallback


def test_csv_logger_falls_back_to_png_and_csv(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    callback = AdaLabel(preset="alr", samples="all", log_label_matrix=True, top_pairs=4)
    trainer, _ = fit(callback, logger=logger)

    directory = os.path.join(logger.log_dir, "label_matrix")
    assert label_matrix_dir(trainer) == directory
    assert sorted(os.listdir(directory)) == [
        "step_4.png", "step_4_top_pairs.csv", "step_8.png", "step_8_top_pairs.csv",
    ]
    with open(os.path.join(directory, "step_8.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(directory, "step_8_top_pairs.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["target_class", "soft_label_class", "q"]
    expected = top_correlated_pairs(callback.label_matrix.matrix, 4)
    assert [(a, b, pytest.approx(float(q))) for a, b, q in rows[1:]] == [(a, b, q) for a, b, q in expected]


def test_without_a_logger_the_png_goes_under_default_root_dir(tmp_path):
    trainer, _ = fit(AdaLabel(log_label_matrix=True), epochs=1, default_root_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path / "label_matrix")) == ["step_4.png", "step_4_top_pairs.csv"]


def test_logging_is_off_by_default(tmp_path):
    fit(AdaLabel(), epochs=1, default_root_dir=str(tmp_path))
    assert not (tmp_path / "label_matrix").exists()


def test_only_global_rank_zero_writes(tmp_path):
    not_rank_zero = SimpleNamespace(is_global_zero=False, global_step=3, loggers=[], log_dir=str(tmp_path),
                                    default_root_dir=str(tmp_path))
    log_label_matrix(not_rank_zero, initial_label_matrix(3))  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_bad_logging_options_fail_early():
    with pytest.raises(ValueError, match="3 `class_names` for 5 classes"):
        AdaLabel(num_classes=5, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="`top_pairs` must be an integer >= 0"):
        AdaLabel(top_pairs=-1)


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


# ---- export / import -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".pt", ".csv"])
def test_save_and_load_round_trip_exactly(tmp_path, extension):
    matrix = learned_matrix()
    path = tmp_path / f"q{extension}"
    save_label_matrix(LabelMatrix(NUM_CLASSES, initial_matrix=matrix), path)  # a LabelMatrix or a tensor
    loaded = load_label_matrix(path)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, matrix)


def test_save_and_load_reject_bad_files(tmp_path):
    with pytest.raises(ValueError, match="saved as .pt or .csv"):
        save_label_matrix(learned_matrix(), tmp_path / "q.npy")
    with pytest.raises(FileNotFoundError, match="save_label_matrix"):
        load_label_matrix(tmp_path / "missing.pt")
    (tmp_path / "ragged.csv").write_text("0,1\n1\n")
    with pytest.raises(ValueError, match="not a label-matrix CSV"):
        load_label_matrix(tmp_path / "ragged.csv")
    torch.save({"matrix": learned_matrix()}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="holds a dict"):
        load_label_matrix(tmp_path / "dict.pt")


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (torch.ones(2, 3) / 3, "square K x K"),
        (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), "NaN or Inf"),
        (torch.tensor([[0.0, 1.5, -0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]), "non-negative"),
        (torch.tensor([[0.0, 0.5, 0.2], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]), "row 0 sums to 0.7.*Normalise"),
        (torch.full((3, 3), 1 / 3), "zero diagonal.*include_diagonal=True"),
        (torch.tensor([[0, 1], [1, 0]]), "floating-point"),
    ],
)
def test_invalid_matrices_are_rejected_with_the_fix(matrix, message):
    with pytest.raises(ValueError, match=message):
        validate_label_matrix(matrix)


def test_full_softmax_matrix_is_accepted_with_include_diagonal():
    uniform = torch.full((3, 3), 1 / 3)
    validate_label_matrix(uniform, include_diagonal=True)
    callback = AdaLabel(preset="fixed", initial_matrix=uniform, include_diagonal=True, loss="mixed")
    assert torch.equal(callback.initial_matrix, uniform) and callback.num_classes == 3


# ---- a loaded matrix as fixed soft labels ----------------------------------------------------------------------


class RecordingClassifier(TinyClassifier):
    """Keeps every training batch's logits, targets and loss, to recompute the loss from outside."""

    def __init__(self) -> None:
        super().__init__(num_classes=NUM_CLASSES)
        self.records: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.adalabel_loss(logits, y)
        self.records.append((logits.detach().clone(), y, loss.detach()))
        return loss


@pytest.mark.parametrize("extension", [".pt", ".csv"])
def test_fixed_preset_trains_with_the_loaded_matrix_and_keeps_it(tmp_path, extension):
    matrix = learned_matrix()
    path = tmp_path / f"q{extension}"
    save_label_matrix(matrix, path)
    callback = AdaLabel(preset="fixed", initial_matrix=str(path))
    assert callback.num_classes == NUM_CLASSES  # inferred from the matrix
    model = RecordingClassifier()
    L.Trainer(**trainer_kwargs(max_epochs=2, callbacks=[callback])).fit(model, make_loader(64, num_classes=NUM_CLASSES))

    assert callback.label_matrix.num_refreshes == 2 and torch.equal(callback.label_matrix.matrix, matrix)
    alpha = callback.preset.alpha
    for logits, y, loss in model.records:
        torch.testing.assert_close(loss, decoupled_loss(logits, y, matrix, alpha))
    logits, y, loss = model.records[0]
    assert not torch.allclose(loss, decoupled_loss(logits, y, initial_label_matrix(NUM_CLASSES), alpha))


def test_initial_matrix_warm_starts_a_learning_preset():
    matrix = learned_matrix()
    callback = AdaLabel(preset="alr", samples="all", initial_matrix=matrix)
    model = RecordingClassifier()
    L.Trainer(**trainer_kwargs(max_epochs=1, callbacks=[callback])).fit(model, make_loader(64, num_classes=NUM_CLASSES))
    logits, y, loss = model.records[0]  # before the first refresh the loss uses the given matrix
    torch.testing.assert_close(loss, decoupled_loss(logits, y, matrix, callback.preset.alpha))
    assert not torch.equal(callback.label_matrix.matrix, matrix)  # and the refresh moved it


def test_fixed_preset_errors_name_the_fix():
    with pytest.raises(ValueError, match="pass `initial_matrix=`"):
        AdaLabel(preset="fixed")
    with pytest.raises(ValueError, match="is 5 x 5 but the model has 4 classes"):
        AdaLabel(preset="fixed", num_classes=4, initial_matrix=learned_matrix())
