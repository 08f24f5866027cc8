"""The callback and the mixin in real ``Trainer.fit`` runs: presets, checkpoints, and clear errors."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adalabel import AdaLabel, initial_label_matrix
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs


def fit(callback, model=None, loader=None, ckpt_path=None, **overrides):
    model = model if model is not None else TinyClassifier()
    callbacks = callback if isinstance(callback, list) else [callback]
    trainer = L.Trainer(**trainer_kwargs(callbacks=callbacks, **overrides))
    trainer.fit(model, loader if loader is not None else make_loader(), ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize("preset", ["alr", "ols"])
def test_learning_presets_change_q_after_an_epoch(preset):
    callback = AdaLabel(preset=preset)
    trainer, _ = fit(callback, max_epochs=2)
    matrix = callback.label_matrix.matrix
    assert callback.label_matrix.num_refreshes == 2
    assert not torch.allclose(matrix, initial_label_matrix(5, include_diagonal=preset == "ols"))
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(5))
    assert (matrix.diagonal() == 0).all() if preset == "alr" else (matrix.diagonal() > 0).all()
    assert {"adalabel/entropy", "adalabel/counted_fraction", "adalabel/nonfinite"} <= set(trainer.callback_metrics)


def test_label_smoothing_keeps_q_fixed():
    callback = AdaLabel(preset="label_smoothing")
    fit(callback, max_epochs=2)
    assert torch.equal(callback.label_matrix.matrix, torch.full((5, 5), 0.2))


class RecordingClassifier(TinyClassifier):
    """Records every training loss next to F.cross_entropy / label smoothing of the same logits."""

    def __init__(self, reference):
        super().__init__()
        self.reference = reference
        self.pairs = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.adalabel_loss(logits, y)
        self.pairs.append((loss.detach(), self.reference(logits.detach(), y)))
        return loss


def test_none_preset_is_exactly_cross_entropy():
    model = RecordingClassifier(F.cross_entropy)
    fit(AdaLabel(preset="none"), model)
    assert len(model.pairs) == 8 and all(torch.equal(loss, expected) for loss, expected in model.pairs)


def test_label_smoothing_preset_is_torch_label_smoothing():
    model = RecordingClassifier(lambda logits, y: F.cross_entropy(logits, y, label_smoothing=0.1))
    fit(AdaLabel(preset="label_smoothing"), model)
    for loss, expected in model.pairs:
        torch.testing.assert_close(loss, expected)


def test_loss_uses_initial_q_before_the_first_refresh():
    model = RecordingClassifier(
        lambda logits, y: F.cross_entropy(logits, y)
        + 0.5 * -(initial_label_matrix(5)[y] * logits.masked_fill(F.one_hot(y, 5).bool(), -torch.inf)
                  .log_softmax(1).masked_fill(F.one_hot(y, 5).bool(), 0)).sum(1).mean()
    )
    fit(AdaLabel(alpha=0.5), model)
    for loss, expected in model.pairs:
        torch.testing.assert_close(loss, expected)


def test_statistics_match_the_engine_fed_by_hand():
    """The callback accumulates exactly the training batches' logits (those the loss saw)."""
    from lightning_adalabel import LabelMatrix

    class KeepLogits(TinyClassifier):
        seen = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.seen.append((logits.detach().clone(), y))
            return self.adalabel_loss(logits, y)

    callback = AdaLabel(samples="all", refresh_every_n_steps=1000)
    fit(callback, KeepLogits())
    by_hand = LabelMatrix(5, samples="all")
    for logits, y in KeepLogits.seen:
        by_hand.update(logits, y)
    torch.testing.assert_close(callback.label_matrix.accumulator, by_hand.accumulator)


def test_checkpoint_restores_q_and_accumulators_exactly(tmp_path):
    callback = AdaLabel(samples="all", refresh_every_n_steps=5)  # 8 steps: the accumulator holds 3 steps at the end
    trainer, model = fit(callback, max_epochs=1)
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    assert callback.label_matrix.counts.sum() > 0

    restored = AdaLabel(samples="all", refresh_every_n_steps=5)
    resumed = L.Trainer(**trainer_kwargs(callbacks=[restored], max_epochs=1))
    resumed.fit(TinyClassifier(), make_loader(), ckpt_path=path)  # max_epochs already reached: restores only
    assert torch.equal(restored.label_matrix.matrix, callback.label_matrix.matrix)
    assert torch.equal(restored.label_matrix.accumulator, callback.label_matrix.accumulator)
    assert restored.label_matrix.num_refreshes == callback.label_matrix.num_refreshes == 1
    assert restored.state_dict()["last_refresh_step"] == 5


def test_num_classes_is_inferred_from_the_first_logits():
    callback = AdaLabel()
    fit(callback, TinyClassifier(num_classes=7), make_loader(num_classes=7))
    assert callback.label_matrix.num_classes == 7


# ---- clear errors ------------------------------------------------------------------------------------------------


def test_wrong_num_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Expected logits with num_classes=4 on dim 1 .*got shape \(16, 5\)"):
        fit(AdaLabel(num_classes=4))


def test_targets_out_of_range_are_a_clear_error():
    loader = make_loader()
    loader.dataset.tensors[1][3] = 5
    with pytest.raises(ValueError, match=r"1 of 16 targets is neither a class index in \[0, 5\) nor ignore_index=-100 \(values seen: \[5\]\)"):
        fit(AdaLabel(), loader=loader)


def test_non_finite_logits_in_the_first_batch_are_a_clear_error():
    loader = make_loader()
    loader.dataset.tensors[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="logits of the first training batch contain NaN or Inf"):
        fit(AdaLabel(), loader=loader)


class PlainClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_without_mixin_is_a_clear_error():
    with pytest.raises(TypeError, match="needs a LightningModule that inherits AdaLabelMixin"):
        fit(AdaLabel(), PlainClassifier())


def test_mixin_without_callback_is_a_clear_error():
    trainer = L.Trainer(**trainer_kwargs())
    with pytest.raises(RuntimeError, match="the Trainer has no AdaLabel callback"):
        trainer.fit(TinyClassifier(), make_loader())
    with pytest.raises(RuntimeError, match="adalabel_loss needs the AdaLabel callback"):
        TinyClassifier().adalabel_loss(torch.randn(2, 5), torch.tensor([0, 1]))


def test_training_step_without_adalabel_loss_is_a_clear_error():
    class ForgotTheSwap(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    with pytest.raises(RuntimeError, match=r"did not call `self.adalabel_loss\(logits, y\)`"):
        fit(AdaLabel(), ForgotTheSwap())


def test_two_callbacks_are_a_clear_error():
    # Lightning refuses two stateful callbacks with one state key; that is the check we rely on.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `AdaLabel`"):
        fit([AdaLabel(), AdaLabel(preset="ols")])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"preset": "focal"}, ValueError, r"`preset` must be one of \('alr', 'ols', 'label_smoothing', 'fixed', 'none'\), got 'focal'"),
        ({"alpha": -0.1}, ValueError, "`alpha` must be a finite number >= 0"),
        ({"loss": "mixed", "alpha": 1.5}, ValueError, r"`alpha` must be in \[0, 1\] for the 'mixed' loss"),
        ({"samples": "some"}, ValueError, "`samples` must be one of"),
        ({"estimator": "mode"}, ValueError, "`estimator` must be one of"),
        ({"momentum": 0}, ValueError, r"`momentum` must be a finite number in \(0.0, 1.0\]"),
        ({"loss": "hinge"}, ValueError, "`loss` must be one of"),
        ({"include_diagonal": True}, ValueError, "'decoupled' loss needs a residual matrix"),
        ({"loss": "mixed"}, ValueError, r"alpha=1.0 gives the true class no target mass"),
        ({"num_classes": 1}, ValueError, "`num_classes` must be an integer >= 2"),
        ({"refresh_every_n_steps": 0}, ValueError, r"`refresh_every_n_steps` must be an integer >= 1 or None"),
    ],
)
def test_bad_hyperparameters_are_a_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        AdaLabel(**kwargs)


def test_checkpoint_from_another_k_or_preset_is_a_clear_error(tmp_path):
    trainer, _ = fit(AdaLabel())
    path = str(tmp_path / "k5.ckpt")
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="label matrix has 5 classes but AdaLabel\\(num_classes=7\\)"):
        fit(AdaLabel(num_classes=7), ckpt_path=path)
    with pytest.raises(ValueError, match="written by preset 'alr' .* but the callback is preset 'ols'"):
        fit(AdaLabel(preset="ols"), ckpt_path=path)
