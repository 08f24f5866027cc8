"""The callback and the mixin in real ``Trainer.fit`` runs: presets, checkpoints, and clear errors."""


import lightning as L
import pytest
import torch

from lightning_adalabel import AdaLabel
from tests.helpers import StepRecorder, TinyClassifier, fit, make_loader, trainer_kwargs


def test_statistics_match_the_engine_fed_by_hand():
    """The callback accumulates exactly the training batches' logits (those the loss saw)."""
    from lightning_adalabel.label_matrix import LabelMatrix

    callback = AdaLabel(samples="all", refresh_every_n_steps=1000)
    _, model = fit(callback, StepRecorder())
    by_hand = LabelMatrix(5, samples="all")
    for _, logits, y, _ in model.records:
        by_hand.update(logits, y)
    torch.testing.assert_close(callback.engine.accumulator, by_hand.accumulator)


@pytest.mark.parametrize("prior", ["uniform", "previous"])
def test_count_aware_refresh_every_n_steps_matches_the_engine_fed_by_hand(prior):
    from lightning_adalabel.label_matrix import LabelMatrix

    callback = AdaLabel(samples="all", prior=prior, prior_strength=0.3, refresh_every_n_steps=3)
    _, model = fit(callback, StepRecorder(), max_epochs=2)  # 16 steps: refreshes at 3, 6, ..., 15
    by_hand = LabelMatrix(5, samples="all", prior=prior, prior_strength=0.3)
    for step, (_, logits, y, _) in enumerate(model.records, start=1):
        by_hand.update(logits, y)
        if step % 3 == 0:
            by_hand.refresh()
    assert callback.engine.num_refreshes == by_hand.num_refreshes == 5
    torch.testing.assert_close(callback.engine.matrix, by_hand.matrix)
    torch.testing.assert_close(callback.engine.accumulator, by_hand.accumulator)


def test_checkpoint_restores_q_and_accumulators_exactly(tmp_path):
    callback = AdaLabel(samples="all", refresh_every_n_steps=5)  # 8 steps: the accumulator holds 3 steps at the end
    trainer, model = fit(callback, max_epochs=1)
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    assert callback.engine.counts.sum() > 0

    restored = AdaLabel(samples="all", refresh_every_n_steps=5)
    resumed = L.Trainer(**trainer_kwargs(callbacks=[restored], max_epochs=1))
    resumed.fit(TinyClassifier(), make_loader(), ckpt_path=path)  # max_epochs already reached: restores only
    assert torch.equal(restored.engine.matrix, callback.engine.matrix)
    assert torch.equal(restored.engine.accumulator, callback.engine.accumulator)
    assert restored.engine.num_refreshes == callback.engine.num_refreshes == 1
    assert restored.state_dict()["last_refresh_step"] == 5


def test_a_preset_object_trains_as_the_named_preset_with_the_same_overrides(tmp_path):
    """AdaLabel(preset=Preset(...)) takes a method of one's own; one equal to a named preset is that preset."""
    from dataclasses import replace

    from lightning_adalabel import PRESETS, Preset

    mine = replace(PRESETS["alr"], samples="all", prior_strength=0.5)
    runs = []
    for callback in (AdaLabel(preset=mine), AdaLabel(preset="alr", samples="all", prior_strength=0.5)):
        torch.manual_seed(0)
        trainer, model = fit(callback, max_epochs=2)
        runs.append((callback.engine.matrix, model.net.weight.detach()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    custom = AdaLabel(preset=mine)
    assert custom.preset == mine and custom.preset_name == "custom"
    assert AdaLabel(preset=PRESETS["ols"]).preset_name == "ols"
    assert AdaLabel(preset=PRESETS["ols"], alpha=0.25).preset == replace(PRESETS["ols"], alpha=0.25)
    with pytest.raises(ValueError, match="`alpha` must be in \\[0, 1\\] for the 'mixed' loss"):
        AdaLabel(preset=Preset(samples="all", estimator="mean", momentum=1.0, include_diagonal=True, loss="mixed",
                               alpha=1.5))
    path = str(tmp_path / "custom.ckpt")
    trainer.save_checkpoint(path)  # written by the second run, preset "alr" with overrides: its Preset is `mine`
    fit(custom, ckpt_path=path, max_epochs=3)
    assert custom.engine.num_refreshes == 3


def test_num_classes_is_inferred_from_the_first_logits():
    callback = AdaLabel()
    fit(callback, TinyClassifier(num_classes=7), make_loader(num_classes=7))
    assert callback.engine.num_classes == 7


# ---- clear errors ------------------------------------------------------------------------------------------------


def test_wrong_num_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Expected logits with num_classes=4 on dim 1 .*got shape \(16, 5\)"):
        fit(AdaLabel(num_classes=4))


def test_targets_out_of_range_are_a_clear_error():
    loader = make_loader()
    loader.dataset.tensors[1][3] = 5
    message = r"1 of 16 targets is neither a class index in \[0, 5\) nor ignore_index=-100 \(values seen: \[5\]\)"
    with pytest.raises(ValueError, match=message):
        fit(AdaLabel(), loader=loader)


def test_non_finite_logits_in_the_first_batch_are_told_at_once_and_treated_as_on_later_batches():
    loader = make_loader()
    loader.dataset.tensors[0][0, 0] = float("nan")
    callback = AdaLabel(samples="all", refresh_every_n_steps=100)
    with pytest.warns(UserWarning, match=r"1 of 16 positions of the first training batch have NaN or \+Inf logits"):
        fit(callback, loader=loader)
    assert callback.engine.nonfinite.sum() >= 1  # the NaN reaches the weights, and later batches
    assert torch.isfinite(callback.engine.matrix).all()


@pytest.mark.parametrize("second", [lambda first: AdaLabel(preset="ols"), lambda first: AdaLabel(), lambda first: first],
                         ids=["another_preset", "the_same_settings", "one_callback_listed_twice"])
def test_two_callbacks_are_a_clear_error(second):
    first = AdaLabel()
    with pytest.raises(RuntimeError, match="The Trainer has 2 AdaLabel callbacks, but a module trains with one label"):
        fit([first, second(first)])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"preset": "focal"}, ValueError,
         r"`preset` must be one of \('alr', 'ols', 'ols_official', 'label_smoothing', 'fixed', 'none'\), got 'focal'"),
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
        ({"preset": "ols_official", "prior": "previous", "prior_strength": 0.3}, ValueError,
         r"starts from zeros .* Use prior='uniform'"),
        ({"prior": "beta"}, ValueError, r"`prior` must be one of \('uniform', 'previous'\), got 'beta'"),
        ({"prior_strength": -1.0}, ValueError, r"`prior_strength` must be a finite number >= 0.0, got -1.0"),
        ({"prior_strength": float("inf")}, ValueError, r"`prior_strength` must be a finite number >= 0.0, got inf"),
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
    with pytest.raises(ValueError, match="written by preset 'alr' with other settings: preset='alr' \\(the callback"
                                         " has 'ols'\\), samples='misclassified' \\(the callback has 'correct'\\)"):
        fit(AdaLabel(preset="ols"), ckpt_path=path)
