"""Export and import of Q (lightning_adalabel/label_matrix_io.py), and a loaded matrix used as fixed soft labels or a
warm start."""

from typing import Any, List, Tuple

import lightning as L
import pytest
import torch

from lightning_adalabel import AdaLabel, load_label_matrix, save_label_matrix
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.losses import decoupled_loss
from lightning_adalabel.validation import validate_label_matrix
from tests.helpers import TinyClassifier, learned_matrix, make_loader, trainer_kwargs

NUM_CLASSES = 5
NAMES = ["ant", "bee", "cat", "dog", "eel"]


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
    with pytest.raises(ValueError, match="ragged.csv' line 2 has 1 numbers but line 1 has 2: a label-matrix CSV is K"):
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

    assert callback.engine.num_refreshes == 2 and torch.equal(callback.engine.matrix, matrix)
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
    assert not torch.equal(callback.engine.matrix, matrix)  # and the refresh moved it


def test_fixed_preset_errors_name_the_fix():
    with pytest.raises(ValueError, match="pass `initial_matrix=`"):
        AdaLabel(preset="fixed")
    with pytest.raises(ValueError, match="is 5 x 5 but the model has 4 classes"):
        AdaLabel(preset="fixed", num_classes=4, initial_matrix=learned_matrix())



def test_damaged_files_and_a_sparse_engine_are_told_with_the_fix(tmp_path):
    from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix

    save_label_matrix(learned_matrix(), tmp_path / "q.pt")
    whole = (tmp_path / "q.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.pt' cannot be read as a label-matrix .pt file \(truncated or corrupt: "
                                         r"PytorchStreamReader failed reading zip archive[^.]*\)\. Write it again"):
        load_label_matrix(tmp_path / "cut.pt")
    save_label_matrix(learned_matrix(), tmp_path / "q.csv")
    text = (tmp_path / "q.csv").read_text()
    (tmp_path / "cut.csv").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"cut.csv' line 3 has \d numbers but line 1 has 5: .*\(is the file truncated"):
        load_label_matrix(tmp_path / "cut.csv")
    (tmp_path / "binary.csv").write_bytes(b"\x80\x81,\x00\n")
    with pytest.raises(ValueError, match=r"binary.csv' is not a text CSV \(byte 0 is not UTF-8\)"):
        load_label_matrix(tmp_path / "binary.csv")
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark, as Excel writes
    assert torch.equal(load_label_matrix(tmp_path / "excel.csv"), learned_matrix())
    (tmp_path / "rows.csv").write_text("0,1\n1,0\n0.5,0.5\n")
    with pytest.raises(ValueError, match=r"rows.csv': A label matrix must be a square K x K tensor, got \(3, 2\)"):
        load_label_matrix(tmp_path / "rows.csv")
    with pytest.raises(ValueError, match=r"got a SparseLabelMatrix .* save `engine.to_dense\(\)`"):
        save_label_matrix(SparseLabelMatrix(NUM_CLASSES, 2), tmp_path / "sparse.pt")
    with pytest.raises(ValueError, match=r"cut.pt' cannot be read"):
        AdaLabel(initial_matrix=str(tmp_path / "cut.pt"))
