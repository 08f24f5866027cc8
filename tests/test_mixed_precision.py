"""Reduced precision and non-finite logits: bf16-mixed training, float32 losses and statistics, huge logits, NaN/Inf.

References are the naive float64 loops of tests/references.py, written from the method's definitions.
"""

import warnings
from typing import Any, List, Optional, Tuple

import lightning as L
import pytest
import torch

from lightning_adalabel import AdaLabel
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.losses import LOSS_MODES, adalabel_loss
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs
from tests.references import naive_loss, naive_refresh, random_residual_matrix

K = 5


def huge_logits(dtype: torch.dtype) -> torch.Tensor:
    """Logits of magnitude up to 1e4 in ``dtype``, with exact ties at the top and a target that is the arg-max."""
    logits = (torch.rand(8, K, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 1e4
    logits[0] = 1e4  # all classes tie
    logits[1, :2] = 1e4  # two classes tie at the top
    logits[2] = torch.tensor([1e4, -1e4, -1e4, -1e4, -1e4])  # one class far ahead of all others
    return logits.to(dtype)


TARGETS = {
    "int": torch.tensor([0, 1, 0, 2, 3, 4, 1, 2]),
    "prob": torch.softmax(torch.randn(8, K, generator=torch.Generator().manual_seed(2)) * 2, dim=1),
}


def loss_matrix(mode: str) -> torch.Tensor:
    # The mixed loss also runs with a diagonal (OLS); the decoupled one needs a residual matrix.
    return random_residual_matrix(K, include_diagonal=mode == "mixed")


# ---- losses and statistics in float32 --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("target_kind", list(TARGETS))
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_losses_are_float32_under_autocast(mode, target_kind, autocast_dtype):
    logits = (torch.randn(8, K, generator=torch.Generator().manual_seed(3)) * 3).to(autocast_dtype).float()
    logits.requires_grad_(True)
    target, matrix = TARGETS[target_kind], loss_matrix(mode)
    with torch.autocast("cpu", dtype=autocast_dtype):
        loss = adalabel_loss(logits, target, matrix, mode, 0.4)
    assert loss.dtype == torch.float32
    # Autocast would run matrix products in bf16/fp16 (3 significant digits); the losses must not let it.
    expected = torch.tensor(naive_loss(logits.detach(), target, matrix, mode, 0.4), dtype=torch.float64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.float32 and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("mode", LOSS_MODES)
@pytest.mark.parametrize("target_kind", list(TARGETS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_huge_low_precision_logits_give_finite_losses(mode, target_kind, dtype, autocast):
    logits = huge_logits(dtype).requires_grad_(True)
    assert torch.isfinite(logits).all()
    target, matrix = TARGETS[target_kind], loss_matrix(mode)
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        loss = adalabel_loss(logits, target, matrix, mode, 0.4)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = torch.tensor(naive_loss(logits.detach(), target, matrix, mode, 0.4), dtype=torch.float64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-2)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("samples", ["misclassified", "all", "correct"])
@pytest.mark.parametrize("estimator", ["mean", "geometric", "confusion"])
@pytest.mark.parametrize("include_diagonal", [False, True])
def test_huge_low_precision_logits_give_finite_statistics(dtype, samples, estimator, include_diagonal):
    matrix = LabelMatrix(K, samples=samples, estimator=estimator, include_diagonal=include_diagonal)
    logits, target = huge_logits(dtype), TARGETS["int"]
    with torch.autocast("cpu", dtype=dtype):
        matrix.update(logits, target)
        matrix.update(logits, TARGETS["prob"])  # probability targets enter under their dominant class
    assert matrix.accumulator.dtype == torch.float32
    assert torch.isfinite(matrix.accumulator).all()
    assert matrix.nonfinite.sum() == 0
    matrix.refresh()
    assert matrix.matrix.dtype == torch.float32 and torch.isfinite(matrix.matrix).all()
    torch.testing.assert_close(matrix.matrix.sum(1), torch.ones(K))
    if not include_diagonal:
        assert (matrix.matrix.diagonal() == 0).all()
    if estimator == "mean":
        batches = [(logits, target), (logits, TARGETS["prob"].argmax(1))]
        expected = naive_refresh(initial_label_matrix(K, include_diagonal), batches, samples, "mean", 1.0,
                                 include_diagonal)[0].float()
        torch.testing.assert_close(matrix.matrix, expected, rtol=0, atol=1e-6)


# ---- bf16-mixed training ---------------------------------------------------------------------------------------


class DtypeRecorder(TinyClassifier):
    """Records the dtype of the logits and of the loss, and the loss, seen in training_step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dtypes: List[Tuple[torch.dtype, torch.dtype]] = []
        self.losses: List[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.adalabel_loss(logits, y)
        self.dtypes.append((logits.dtype, loss.dtype))
        self.losses.append(loss.detach())
        return loss


def train(precision: str, preset: str) -> Tuple[DtypeRecorder, AdaLabel]:
    torch.manual_seed(0)
    model = DtypeRecorder(num_classes=K)
    adalabel = AdaLabel(preset, refresh_every_n_steps=4)
    trainer = L.Trainer(**trainer_kwargs(precision=precision, max_epochs=3, callbacks=[adalabel]))
    trainer.fit(model, make_loader(num_samples=256, num_classes=K, batch_size=32))
    return model, adalabel


@pytest.mark.parametrize("preset", ["alr", "ols"])
def test_bf16_mixed_training_is_finite_and_close_to_float32(preset):
    model, adalabel = train("bf16-mixed", preset)
    reference_model, reference = train("32-true", preset)
    assert set(model.dtypes) == {(torch.bfloat16, torch.float32)}  # autocast was on, the loss in float32 anyway
    assert set(reference_model.dtypes) == {(torch.float32, torch.float32)}
    assert adalabel.engine.accumulator.dtype == adalabel.engine.matrix.dtype == torch.float32
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert torch.isfinite(torch.stack(model.losses)).all()
    assert adalabel.engine.num_refreshes == reference.engine.num_refreshes >= 5
    matrix = adalabel.engine.matrix
    assert torch.isfinite(matrix).all()
    assert (matrix - reference.engine.matrix).abs().max() < 1e-2


# ---- non-finite logits ----------------------------------------------------------------------------------------


def poison(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rows 0 and 1 NaN, row 2 +Inf, row 3 -Inf at its target class: four unusable rows. (-inf at another class is
    a mask, and usable: tests/test_lightning_loops.py.)"""
    logits = logits.clone()
    logits[0:2] = float("nan")
    logits[2] = float("inf")
    logits[3, target[3]] = float("-inf")
    return logits


def test_nonfinite_rows_stay_out_of_the_statistics():
    torch.manual_seed(0)
    logits, target = torch.randn(8, K) * 3, torch.tensor([0, 1, 1, 3, 0, 1, 2, 4])
    matrix, clean = LabelMatrix(K, samples="all"), LabelMatrix(K, samples="all")
    matrix.update(poison(logits, target), target)
    clean.update(logits[4:], target[4:])
    assert matrix.nonfinite.tolist() == [1, 2, 0, 1, 0]
    assert matrix.seen.tolist() == [2, 3, 1, 1, 1]
    torch.testing.assert_close(matrix.sums, clean.sums, rtol=0, atol=0)
    torch.testing.assert_close(matrix.counts, clean.counts, rtol=0, atol=0)
    matrix.refresh()
    clean.refresh()
    assert torch.equal(matrix.matrix, clean.matrix)


class NonFiniteLogits(TinyClassifier):
    """Returns NaN/Inf rows on some batches, as a diverging model would, and skips the step on them (a NaN guard)."""

    def __init__(self, poisoned_batches: Tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poisoned_batches = poisoned_batches
        self.seen: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        logits = self(x)
        if batch_idx in self.poisoned_batches:
            logits = poison(logits, y)
        self.seen.append((logits.detach().clone(), y))
        loss = self.adalabel_loss(logits, y)
        return None if batch_idx in self.poisoned_batches else loss


class NonFiniteRecorder(AdaLabel):
    """Keeps the per-class non-finite counts that each refresh consumed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nonfinite_at_refresh: List[torch.Tensor] = []

    def _refresh(self, trainer, pl_module) -> None:  # type: ignore[override]
        self.nonfinite_at_refresh.append(self.engine.nonfinite.clone())
        super()._refresh(trainer, pl_module)


def test_nonfinite_logits_are_counted_logged_and_warned_at_refresh():
    torch.manual_seed(0)
    model = NonFiniteLogits(poisoned_batches=(2, 5), num_classes=K)
    adalabel = NonFiniteRecorder(samples="all")
    trainer = L.Trainer(**trainer_kwargs(callbacks=[adalabel]))
    with pytest.warns(UserWarning, match="left 8 training samples out of the label statistics .* NaN or \\+Inf"):
        trainer.fit(model, make_loader(num_samples=128, num_classes=K, batch_size=16))
    assert trainer.callback_metrics["adalabel/nonfinite"] == 8
    poisoned_targets = torch.cat([model.seen[batch][1][:4] for batch in (2, 5)])
    (nonfinite,) = adalabel.nonfinite_at_refresh
    assert torch.equal(nonfinite, torch.bincount(poisoned_targets, minlength=K).float())
    matrix = adalabel.engine.matrix
    assert torch.isfinite(matrix).all()
    assert torch.isfinite(model.net.weight).all()
    expected = naive_refresh(initial_label_matrix(K), model.seen, "all", "mean", 1.0, False)[0].float()
    torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-6)


def test_finite_logits_do_not_warn():
    torch.manual_seed(0)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel()]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(num_classes=K), make_loader(num_classes=K))
    assert not [w for w in caught if "NaN or +Inf" in str(w.message)]
    assert trainer.callback_metrics["adalabel/nonfinite"] == 0


def test_nonfinite_logits_in_the_first_batch_are_told_at_once_and_left_out_as_later():
    adalabel = NonFiniteRecorder(samples="all")
    trainer = L.Trainer(**trainer_kwargs(callbacks=[adalabel]))
    with pytest.warns(UserWarning, match=r"4 of 16 positions of the first training batch have NaN or \+Inf logits"):
        trainer.fit(NonFiniteLogits(poisoned_batches=(0,), num_classes=K), make_loader(num_classes=K))
    assert adalabel.nonfinite_at_refresh[0].sum() == 4
    assert torch.isfinite(adalabel.engine.matrix).all()
