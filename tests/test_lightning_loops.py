"""Every way Lightning runs a loop, in real ``Trainer`` runs: modules in eval mode, jobs that end early and resume,
copies of the callback, skipped batches, any order of fit/validate/test/predict, masked logits, several optimizers
and several losses a step, and the Trainer flags that change which batches run.

Each run is compared with a reference: the uninterrupted run, or the engine fed by hand with the logits the
training steps recorded (``tests.helpers.StepRecorder``).
"""

import copy
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, List, Optional

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_adalabel import AdaLabel
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from tests.helpers import StepRecorder, TinyClassifier, fit, launch_env, make_loader, trainer_kwargs
from tests.test_resume import MomentumClassifier, ResumableLoader, assert_same_run

K = 5


def by_hand(records, refresh_after: Optional[List[int]] = None, **settings: Any) -> LabelMatrix:
    """The engine fed with the recorded training steps' logits, refreshed after the given 1-based steps."""
    engine = LabelMatrix(K, **settings)
    for step, (_, logits, y, _) in enumerate(records, start=1):
        engine.update(logits, y)
        if refresh_after is not None and step in refresh_after:
            engine.refresh()
    return engine


# ---- 1. the Trainer's state says what a training batch is, not pl_module.training -------------------------------


class EvalFrom(StepRecorder):
    """Switches itself to eval mode from epoch ``epoch`` on (linear probing, frozen BatchNorm, dropout off)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.eval_from = epoch

    def on_train_epoch_start(self) -> None:
        if self.current_epoch >= self.eval_from:
            self.eval()


@pytest.mark.parametrize("eval_from", [0, 1])
def test_a_module_in_eval_mode_during_fit_still_feeds_the_statistics(eval_from):
    adalabel = AdaLabel(samples="all")
    _, model = fit(adalabel, EvalFrom(eval_from), max_epochs=3)
    assert not model.training
    assert adalabel.engine.num_refreshes == 3
    expected = by_hand(model.records, refresh_after=[8, 16, 24], samples="all")
    torch.testing.assert_close(adalabel.engine.matrix, expected.matrix)


# ---- 2. a job that ends early resumes exactly ----------------------------------------------------------------

# A job's budget is a number of optimizer steps (max_steps), as on a cluster that splits a run into chunks. 8 steps an
# epoch: step 11 is in mid-epoch 1, and 2 steps after a refresh at 9.
EPOCHS, STOP_AT = 3, 11
MAX_TIME = 4.0  # seconds; the first 10 steps take far less, even on a loaded CPU
BUDGET = EPOCHS * 8


class StopAt(Callback):
    """Ends the fit after the optimizer step ``step`` the way ``how`` says; listed after AdaLabel, so AdaLabel has
    taken that step's statistics, as the step itself is done."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.how == "keyboard_interrupt":
            raise KeyboardInterrupt
        if self.how == "exception":
            raise RuntimeError("the job's own failure")
        if self.how == "sigterm":  # Lightning's handler notes it; the loop raises SIGTERMException after the step
            os.kill(os.getpid(), signal.SIGTERM)


class SlowStep(Callback):
    """Makes optimizer step ``step`` outlast the Timer, so that max_time stops the fit there, however loaded the CPU
    (a stop on an epoch's last batch would test a case Lightning itself does not resume exactly: docs/usage.md)."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_train_batch_end(self, trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            time.sleep(self.seconds)


class SaveOnException(Callback):
    """The user's handler of an interrupted job: write a checkpoint to resume from."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer, pl_module, exception) -> None:
        trainer.save_checkpoint(self.path)


def first_job(how: str, path: Path, preset: str, every: Optional[int]) -> None:
    torch.manual_seed(0)
    adalabel = AdaLabel(preset=preset, refresh_every_n_steps=every)
    callbacks: List[Callback] = [adalabel]
    limits: dict = {}
    if how == "max_steps":
        limits["max_steps"] = STOP_AT
    elif how == "max_time":  # Lightning's Timer stops the fit after the step during which its time ran out
        limits["max_time"] = timedelta(seconds=MAX_TIME)
        callbacks.append(SlowStep(STOP_AT, seconds=MAX_TIME + 0.5))
    else:
        callbacks += [StopAt(STOP_AT, how), SaveOnException(path)]
    limits.setdefault("max_steps", BUDGET)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=-1, callbacks=callbacks, **limits))
    expected = {"keyboard_interrupt": SystemExit, "exception": RuntimeError, "sigterm": SIGTERMException}.get(how)
    if expected is None:
        trainer.fit(MomentumClassifier(), ResumableLoader())
        trainer.save_checkpoint(path)
    else:
        with pytest.raises(expected):
            trainer.fit(MomentumClassifier(), ResumableLoader())
    assert torch.load(path, weights_only=False)["global_step"] == STOP_AT


def resumed_job(path: Optional[Path], preset: str, every: Optional[int]):
    torch.manual_seed(0)
    model, adalabel = MomentumClassifier(), AdaLabel(preset=preset, refresh_every_n_steps=every)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=-1, max_steps=BUDGET, callbacks=[adalabel]))
    trainer.fit(model, ResumableLoader(), ckpt_path=path)
    return model, adalabel


@pytest.fixture(scope="module")
def uninterrupted():
    return {(preset, every): resumed_job(None, preset, every)
            for preset, every in [("alr", None), ("alr", 3), ("label_smoothing", None)]}


# max_time waits out its MAX_TIME of wall clock, the others stop at once.
ENDINGS = ["max_steps", pytest.param("max_time", marks=pytest.mark.slow), "keyboard_interrupt", "exception", "sigterm"]


@pytest.mark.parametrize("every", [None, 3], ids=["refresh_each_epoch", "refresh_every_3_steps"])
@pytest.mark.parametrize("how", ENDINGS)
def test_a_job_that_ends_early_resumes_exactly(how, every, tmp_path, uninterrupted):
    path = tmp_path / "job.ckpt"
    first_job(how, path, "alr", every)
    model, adalabel = resumed_job(path, "alr", every)
    expected_model, expected = uninterrupted[("alr", every)]
    assert expected.engine.num_refreshes == (EPOCHS if every is None else EPOCHS * 8 // every)
    assert_same_run(model, adalabel, expected_model, expected)


@pytest.mark.parametrize("how", ["max_steps", "sigterm"])
def test_the_harness_resumes_a_run_without_statistics_exactly(how, tmp_path, uninterrupted):
    """The same jobs through a preset that keeps no statistics: the loop itself resumes bit for bit."""
    first_job(how, tmp_path / "job.ckpt", "label_smoothing", None)
    model, _ = resumed_job(tmp_path / "job.ckpt", "label_smoothing", None)
    expected_model = uninterrupted[("label_smoothing", None)][0]
    for got, want in zip(model.state_dict().values(), expected_model.state_dict().values()):
        assert torch.equal(got, want)


def test_a_fit_that_stops_in_mid_epoch_leaves_that_epochs_statistics_waiting():
    adalabel = AdaLabel(samples="all")
    fit(adalabel, max_steps=12, max_epochs=-1)  # 8 batches of 16: epoch 0 refreshed, 4 batches of epoch 1 wait
    assert adalabel.engine.num_refreshes == 1
    assert float(adalabel.engine.seen.sum()) == 4 * 16
    assert adalabel.state_dict()["statistics_epoch"] == 1


# ---- 3. copies of a callback are independent ---------------------------------------------------------------------


@pytest.mark.slow
def test_copies_of_a_callback_are_independent_under_ddp_spawn(monkeypatch):
    # One spawned fit (the costly part) for both ways of copying: a deep copy and a pickled copy stay untrained beside
    # the trained pickled copy (deepcopy and pickle both go through __setstate__, which gives a copy its own file).
    monkeypatch.delenv("MASTER_PORT", raising=False)
    template = AdaLabel()
    trained = pickle.loads(pickle.dumps(template))
    untrained = {"template": template, "deepcopy": copy.deepcopy(template),
                 "pickle": pickle.loads(pickle.dumps(template))}
    assert len({each._hand_over.path for each in [trained, *untrained.values()]}) == 4
    fit(trained, devices=2, strategy="ddp_spawn", max_epochs=2)
    for name, each in untrained.items():  # read first: they take nothing
        assert each.engine is None, name
    assert trained.engine is not None and trained.engine.num_refreshes == 2
    assert not torch.equal(trained.engine.matrix, initial_label_matrix(K))


def test_a_copy_made_after_training_carries_the_learned_q_and_learns_on_its_own():
    original = AdaLabel()
    fit(original)
    duplicate = copy.deepcopy(original)
    assert torch.equal(duplicate.engine.matrix, original.engine.matrix)
    fit(duplicate)
    assert duplicate.engine.num_refreshes == 2 and original.engine.num_refreshes == 1


# ---- 5. any order of fit / validate / test / predict ------------------------------------------------------------


class Evaluated(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.adalabel_loss(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.adalabel_loss(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).softmax(dim=1)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_evaluation_before_and_between_fits_leaves_the_statistics_alone(inference_mode):
    adalabel, model, loader = AdaLabel(samples="all"), Evaluated(), make_loader()
    trainer = L.Trainer(**trainer_kwargs(callbacks=[adalabel], inference_mode=inference_mode))
    trainer.validate(model, loader)
    trainer.test(model, loader)
    trainer.predict(model, loader)
    assert adalabel.engine.seen.sum() == 0  # evaluation created the engine, fed nothing
    for max_epochs in (1, 2):
        trainer = L.Trainer(**trainer_kwargs(callbacks=[adalabel], inference_mode=inference_mode,
                                             max_epochs=max_epochs, limit_val_batches=2))
        trainer.fit(model, loader, loader)
        trainer.validate(model, loader)
        trainer.predict(model, loader)
    assert adalabel.engine.num_refreshes == 3


# ---- 6. skipped batches, and the check that the loss is ours -----------------------------------------------------


class SkipsBatches(StepRecorder):
    """Skips the batches in ``skip`` by returning None from training_step, Lightning's way."""

    def __init__(self, skip) -> None:
        super().__init__()
        self.skip = set(skip)

    def training_step(self, batch, batch_idx):
        if batch_idx in self.skip:
            return None
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("skip", [[0], [0, 1, 2], [3]])
def test_skipped_batches_are_fine_on_any_batch(skip):
    adalabel = AdaLabel(samples="all", refresh_every_n_steps=100)  # no refresh: the statistics stay to be read
    _, model = fit(adalabel, SkipsBatches(skip))
    assert float(adalabel.engine.seen.sum()) == (8 - len(skip)) * 16
    torch.testing.assert_close(adalabel.engine.accumulator, by_hand(model.records, samples="all").accumulator)


class OtherLoss(TinyClassifier):
    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            return None
        x, y = batch
        return F.cross_entropy(self(x), y)


class OnlyWithoutGradient(TinyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        with torch.no_grad():
            self.log("monitored", self.adalabel_loss(logits, y))
        return F.cross_entropy(logits, y)


class NeverReturns(TinyClassifier):
    def training_step(self, batch, batch_idx):
        return None

    def validation_step(self, batch, batch_idx):  # the sanity check builds the engine: no proof of training
        self.log("val_loss", self.adalabel_loss(self(batch[0]), batch[1]))


@pytest.mark.parametrize(
    "model, message",
    [
        (OtherLoss(), "OtherLoss.training_step did not call `self.adalabel_loss"),
        (OnlyWithoutGradient(), "called `self.adalabel_loss` only under torch.no_grad()"),
        (NeverReturns(), "NeverReturns.training_step did not call `self.adalabel_loss"),
    ],
    ids=["another_loss_after_a_skipped_batch", "only_under_no_grad", "every_batch_skipped"],
)
def test_training_without_adalabel_loss_names_the_cause(model, message):
    trainer = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel()], num_sanity_val_steps=1, limit_val_batches=1))
    with pytest.raises(RuntimeError, match=message):
        trainer.fit(model, make_loader(), make_loader())


# ---- 7. -inf masks are accepted as torch accepts them -------------------------------------------------------------


class MaskedLastClass(StepRecorder):
    """Class K-1 is not allowed for any sample: its logit is -inf, the standard masking pattern."""

    def forward(self, x):
        return super().forward(x).masked_fill(torch.arange(K) == K - 1, float("-inf"))


def masked_loader():
    loader = make_loader()
    loader.dataset.tensors[1].clamp_(max=K - 2)
    return loader


@pytest.mark.parametrize("preset", ["none", "label_smoothing"])
def test_masked_logits_train_as_with_torch(preset):
    adalabel = AdaLabel(preset=preset)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "NaN or Inf" complaint, on any batch
        _, model = fit(adalabel, MaskedLastClass(), masked_loader(), max_epochs=2)
    smoothing = 0.1 if preset == "label_smoothing" else 0.0
    for _, logits, y, loss in model.records:
        assert torch.equal(loss, F.cross_entropy(logits, y, label_smoothing=smoothing))
    assert torch.isfinite(model.records[0][3]) == (preset == "none")  # torch's label smoothing: inf
    assert adalabel.engine.nonfinite.sum() == 0


def test_masked_logits_feed_alr_the_residual_over_the_allowed_classes():
    adalabel = AdaLabel(samples="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, model = fit(adalabel, MaskedLastClass(), masked_loader())
    assert adalabel.engine.nonfinite.sum() == 0
    assert (adalabel.engine.matrix[: K - 1, K - 1] == 0).all()  # a masked class gets no residual mass
    torch.testing.assert_close(adalabel.engine.matrix, by_hand(model.records, [8], samples="all").matrix)


class NaNFromBatch(StepRecorder):
    def __init__(self, batch: int) -> None:
        super().__init__()
        self.nan_batch = batch

    def forward(self, x):
        logits = super().forward(x)
        if self.trainer.fit_loop.epoch_loop.batch_idx == self.nan_batch:
            logits = logits.clone()
            logits[0, 0] = float("nan")
        return logits


@pytest.mark.parametrize("batch", [0, 1])
def test_nan_logits_are_treated_alike_on_any_batch(batch):
    adalabel = AdaLabel(samples="all")
    with pytest.warns(UserWarning, match="NaN or \\+Inf"):
        fit(adalabel, NaNFromBatch(batch))
    assert adalabel.engine.num_refreshes == 1  # warned, not refused
    assert not torch.isnan(adalabel.engine.matrix).any()


# ---- several optimizers, several losses a step -------------------------------------------------------------------


class TwoHeadsTwoOptimizers(StepRecorder):
    """Manual optimization: two heads on one input, each trained by its own optimizer with its own adalabel_loss."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.other = torch.nn.Linear(8, K)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for head, optimizer in zip((self.net, self.other), self.optimizers()):
            logits = head(x)
            loss = self.adalabel_loss(logits, y)
            self.records.append((self.current_epoch, logits.detach().clone(), y, loss.detach()))
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.SGD(self.other.parameters(), lr=0.1)


def test_each_adalabel_loss_call_counts_and_steps_of_every_optimizer_count():
    adalabel = AdaLabel(samples="all", refresh_every_n_steps=3)
    trainer, model = fit(adalabel, TwoHeadsTwoOptimizers())
    assert trainer.global_step == 16  # 8 batches, 2 optimizer steps each
    # A refresh at the first batch end at or past each multiple of 3 steps: after batches 2, 3, 5, 6, 8 (steps 4,
    # 6, 10, 12, 16), i.e. after records 4, 6, 10, 12, 16 (two per batch).
    assert adalabel.engine.num_refreshes == 5
    expected = by_hand(model.records, refresh_after=[4, 6, 10, 12, 16], samples="all")
    torch.testing.assert_close(adalabel.engine.matrix, expected.matrix)


# ---- Trainer flags that change which batches run -------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, batches, refreshes",
    [
        (dict(fast_dev_run=True), 1, 1),
        (dict(overfit_batches=2, max_epochs=3), 6, 3),
        (dict(limit_train_batches=3, max_epochs=2), 6, 2),
        (dict(accumulate_grad_batches=3, max_epochs=1), 8, 1),
        (dict(gradient_clip_val=0.01, max_epochs=2), 16, 2),
        (dict(max_epochs=2, check_val_every_n_epoch=1, limit_val_batches=2, num_sanity_val_steps=2), 16, 2),
    ],
    ids=["fast_dev_run", "overfit_batches", "limit_train_batches", "accumulate_with_a_partial_window",
         "gradient_clipping", "validation_and_sanity_check"],
)
def test_trainer_flags(flags, batches, refreshes):
    adalabel = AdaLabel(samples="all")
    trainer = L.Trainer(**trainer_kwargs(callbacks=[adalabel], **flags))
    model = StepRecorder()
    model.validation_step = lambda batch, batch_idx: model.adalabel_loss(model(batch[0]), batch[1])
    trainer.fit(model, make_loader(), make_loader(seed=1))
    assert len(model.records) == batches
    per_epoch = batches // refreshes
    expected = by_hand(model.records, [per_epoch * (epoch + 1) for epoch in range(refreshes)], samples="all")
    assert adalabel.engine.num_refreshes == refreshes
    torch.testing.assert_close(adalabel.engine.matrix, expected.matrix)


def test_accumulation_counts_optimizer_steps_for_the_refresh_period():
    adalabel = AdaLabel(samples="all", refresh_every_n_steps=2)
    trainer, model = fit(adalabel, StepRecorder(), accumulate_grad_batches=3)  # steps after batches 3, 6 and 8
    assert trainer.global_step == 3
    assert adalabel.engine.num_refreshes == 1  # at step 2 (batch 6); step 3 waits for step 4
    torch.testing.assert_close(adalabel.engine.matrix, by_hand(model.records, [6], samples="all").matrix)


def test_no_training_batches_no_refresh_and_no_error():
    adalabel = AdaLabel()
    fit(adalabel, limit_train_batches=0, max_epochs=2)
    assert adalabel.engine is None


# ---- 8. messages -----------------------------------------------------------------------------------------------


class OneLogit(TinyClassifier):
    def forward(self, x):
        return super().forward(x)[:, :1]


def test_one_logit_is_told_as_such():
    loader = make_loader()
    loader.dataset.tensors[1].zero_()
    with pytest.raises(ValueError, match=r"shape \(16, 1\): 1 class on dim 1.*For a binary task return two logits"):
        fit(AdaLabel(), OneLogit(), loader)


# ---- 4. preset label_smoothing against torch -------------------------------------------------------------------


def soft_target_loader(zero_rows: bool, unnormalised: bool = False):
    loader = make_loader()
    x, y = loader.dataset.tensors
    target = F.one_hot(y, K).float() * 0.8 + 0.2 / K  # already-smoothed labels: rows sum to 1
    if zero_rows:
        target[::16] = 0.0  # the first row of every batch is padding
    if unnormalised:
        target[3] *= 2.0
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, target), batch_size=16)


@pytest.mark.parametrize("preset, smoothing", [("label_smoothing", 0.1), ("none", 0.0)])
def test_label_smoothing_matches_torch_and_differs_only_where_documented(preset, smoothing):
    # Class indices with ignored positions and -inf masks: exactly torch.
    loader = masked_loader()
    loader.dataset.tensors[1][::5] = -100
    _, model = fit(AdaLabel(preset=preset), MaskedLastClass(), loader)
    for _, logits, y, loss in model.records:
        assert torch.equal(loss, F.cross_entropy(logits, y, label_smoothing=smoothing))
    # Probability rows that sum to 1: torch to float rounding (the smoothing is added in another order).
    _, model = fit(AdaLabel(preset=preset), StepRecorder(), soft_target_loader(zero_rows=False))
    for _, logits, target, loss in model.records:
        torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=smoothing))
    # All-zero rows are padding in every preset: loss 0, where torch's label smoothing adds its uniform part.
    _, model = fit(AdaLabel(preset=preset), StepRecorder(), soft_target_loader(zero_rows=True))
    for _, logits, target, loss in model.records:
        per_row = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="none")
        padding = target.sum(dim=1) == 0
        torch.testing.assert_close(loss, per_row.masked_fill(padding, 0.0).mean())
        assert torch.equal(per_row[padding] > 0, torch.full_like(per_row[padding] > 0, smoothing > 0))
    # A row that is not a distribution, which torch computes as given, is refused.
    with pytest.raises(ValueError, match="1 of 16 probability targets are not distributions"):
        fit(AdaLabel(preset=preset), StepRecorder(), soft_target_loader(zero_rows=False, unnormalised=True))


# ---- precisions and launchers not covered elsewhere ---------------------------------------------------------


class Float64Recorder(StepRecorder):
    """Casts its inputs to the module's dtype (float64 under precision="64-true")."""

    def forward(self, x):
        return self.net(x.to(self.dtype))


# On the CPU Lightning runs "16-mixed" as bfloat16 autocast (float16 with a gradient scaler needs a GPU).
@pytest.mark.parametrize("precision, logits_dtype", [("64-true", torch.float64), ("16-mixed", torch.bfloat16)])
def test_precision(precision, logits_dtype):
    adalabel = AdaLabel(samples="all")
    _, model = fit(adalabel, Float64Recorder(), precision=precision)
    assert model.records[0][1].dtype == logits_dtype
    assert adalabel.engine.matrix.dtype == torch.float32
    torch.testing.assert_close(adalabel.engine.matrix, by_hand(model.records, [8], samples="all").matrix)


DDP_NOTEBOOK = """
import torch
from lightning_adalabel import AdaLabel
from lightning_adalabel.label_matrix import initial_label_matrix
from tests.helpers import fit

adalabel = AdaLabel()
fit(adalabel, devices=2, strategy="ddp_notebook", max_epochs=2)
assert adalabel.engine.num_refreshes == 2, adalabel.engine.num_refreshes
assert not torch.equal(adalabel.engine.matrix, initial_label_matrix(%d))
print("handed back")
""" % K


@pytest.mark.slow
def test_ddp_notebook_hands_the_learned_q_back():
    # ddp_notebook forks. A fork of this pytest process, whose earlier tests have started torch's and gloo's threads,
    # can deadlock in the child (it did in CI); a notebook forks a fresh kernel, as this fresh interpreter is.
    result = subprocess.run([sys.executable, "-c", DDP_NOTEBOOK], cwd=Path(__file__).parents[1], env=launch_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "handed back" in result.stdout, result.stderr[-4000:]


def test_evaluating_a_checkpoint_with_other_adalabel_settings_warns_where_resuming_refuses(tmp_path):
    trainer, model = fit(AdaLabel(), Evaluated())
    trainer.save_checkpoint(tmp_path / "alr.ckpt")
    other = AdaLabel(preset="ols")
    evaluation = L.Trainer(**trainer_kwargs(callbacks=[other]))
    with pytest.warns(UserWarning, match="written by preset 'alr' with other settings: preset='alr' .* Test goes on"):
        evaluation.test(Evaluated(), make_loader(), ckpt_path=tmp_path / "alr.ckpt")
    with pytest.warns(UserWarning, match="Predict goes on with this callback's own settings"):
        evaluation.predict(Evaluated(), make_loader(), ckpt_path=tmp_path / "alr.ckpt")
    assert other.engine.num_refreshes == 0  # its own, not the checkpoint's
    with pytest.raises(ValueError, match="written by preset 'alr' with other settings"):
        fit(AdaLabel(preset="ols"), Evaluated(), ckpt_path=str(tmp_path / "alr.ckpt"), max_epochs=2)
