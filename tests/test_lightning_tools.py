"""ALR beside Lightning's own tools, in real fits: checkpointing, early stopping and the learning-rate monitor, and
the tuner's batch-size and learning-rate finders, whose trial steps must leave no statistics and no refreshed
matrix behind in the run that follows (each run is compared with the same run started without the finder)."""

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    Callback,
    EarlyStopping,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_adalabel import AdaLabel
from lightning_adalabel.label_matrix import initial_label_matrix
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs

K = 5


class TunableClassifier(TinyClassifier):
    """Owns its data and exposes ``batch_size`` and ``lr``, as the tuner's finders need."""

    def __init__(self, batch_size: int = 16, lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return make_loader(num_samples=320, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return make_loader(num_samples=32, batch_size=16, seed=1)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", self.adalabel_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class EngineAtTrainStart(Callback):
    """Records the engine as the real run starts (after the finders have run in on_fit_start)."""

    def on_train_start(self, trainer, pl_module):
        engine = pl_module._adalabel_callback.engine
        self.state = None if engine is None else (engine.num_refreshes, engine.accumulator.clone(),
                                                  engine.matrix.clone())


def run(finder, tmp_path, max_epochs=2, **model_kwargs):
    torch.manual_seed(0)
    model, callback, probe = TunableClassifier(**model_kwargs), AdaLabel(), EngineAtTrainStart()
    callbacks = [callback, probe] + ([finder] if finder is not None else [])
    trainer = L.Trainer(**trainer_kwargs(callbacks=callbacks, max_epochs=max_epochs, default_root_dir=tmp_path))
    trainer.fit(model)
    return model, callback, probe


def assert_untouched_at_train_start(probe):
    if probe.state is None:  # the finders restored the callback to before the first batch
        return
    num_refreshes, accumulator, matrix = probe.state
    assert num_refreshes == 0
    assert not accumulator.any()
    torch.testing.assert_close(matrix, initial_label_matrix(K))


@pytest.mark.slow  # the finder's trial fits, then two runs
def test_the_batch_size_finder_leaves_no_statistics_and_the_run_equals_one_without_it(tmp_path):
    finder = BatchSizeFinder(mode="power", steps_per_trial=2, init_val=4, max_trials=2)
    model, callback, probe = run(finder, tmp_path / "with")
    assert model.batch_size != 16  # the finder did change it
    assert_untouched_at_train_start(probe)
    plain_model, plain_callback, _ = run(None, tmp_path / "without", batch_size=model.batch_size)
    assert callback.engine.num_refreshes == plain_callback.engine.num_refreshes == 2
    torch.testing.assert_close(callback.engine.matrix, plain_callback.engine.matrix)
    torch.testing.assert_close(model.net.weight, plain_model.net.weight)


def test_the_learning_rate_finder_leaves_no_statistics_and_the_run_equals_one_without_it(tmp_path):
    finder = LearningRateFinder(min_lr=1e-3, max_lr=1.0, num_training_steps=20, early_stop_threshold=None)
    model, callback, probe = run(finder, tmp_path / "with")
    assert model.hparams.lr != 0.1  # the suggestion was applied
    assert_untouched_at_train_start(probe)
    plain_model, plain_callback, _ = run(None, tmp_path / "without", lr=model.hparams.lr)
    assert callback.engine.num_refreshes == plain_callback.engine.num_refreshes == 2
    torch.testing.assert_close(callback.engine.matrix, plain_callback.engine.matrix)
    torch.testing.assert_close(model.net.weight, plain_model.net.weight)


@pytest.mark.parametrize("finder", ["batch_size", "learning_rate"])
def test_after_the_trial_steps_the_first_real_batch_is_still_checked_at_once(finder, tmp_path):
    """The finders switch the callbacks off for their trials, but the module's loss still calls AdaLabel: those
    steps must neither use up the first-batch value check nor leave their statistics for the real run."""
    tool = (BatchSizeFinder(mode="power", steps_per_trial=1, init_val=4, max_trials=1) if finder == "batch_size"
            else LearningRateFinder(num_training_steps=3, early_stop_threshold=None))

    class MarksTheRealRun(Callback):  # callbacks are off during the trials: this runs in the real run only
        def on_train_start(self, trainer, pl_module):
            pl_module.real_run = True

    class BadFirstRealBatch(TunableClassifier):
        real_run = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.real_run and batch_idx == 0:
                y = y.clone()
                y[0] = K  # not a class
            return self.adalabel_loss(self(x), y)

    callbacks = [AdaLabel(), MarksTheRealRun(), tool]
    trainer = L.Trainer(**trainer_kwargs(callbacks=callbacks, max_epochs=1, default_root_dir=tmp_path))
    # "values seen" is the first-batch check's message; at the refresh the values are gone.
    with pytest.raises(ValueError, match=r"neither a class index .*values seen: \[5\]"):
        trainer.fit(BadFirstRealBatch())
    assert trainer.global_step == 0


def test_checkpointing_early_stopping_and_the_learning_rate_monitor_run_beside_alr(tmp_path):
    callback = AdaLabel()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True)
    stopping = EarlyStopping(monitor="val/loss", patience=1, min_delta=10.0)  # no epoch improves by 10: stops early
    trainer = L.Trainer(**trainer_kwargs(
        callbacks=[callback, checkpoint, stopping, LearningRateMonitor(logging_interval="epoch")], max_epochs=10,
        logger=CSVLogger(tmp_path, name="logs"), enable_checkpointing=True,
    ))
    trainer.fit(TunableClassifier())
    assert trainer.current_epoch == 2 and stopping.stopped_epoch == 1
    assert callback.engine.num_refreshes == 2
    saved = torch.load(checkpoint.last_model_path, map_location="cpu", weights_only=False)
    (state,) = [value for key, value in saved["callbacks"].items() if key.startswith("AdaLabel")]
    assert state["label_matrix"]["num_refreshes"] == saved["epoch"] + 1  # saved after its epoch's refresh
    resumed = AdaLabel()
    trainer_resumed = L.Trainer(**trainer_kwargs(callbacks=[resumed], max_epochs=saved["epoch"] + 2,
                                                 default_root_dir=tmp_path))
    trainer_resumed.fit(TunableClassifier(), ckpt_path=checkpoint.last_model_path)
    assert resumed.engine.num_refreshes == saved["epoch"] + 2
    metrics = open(os.path.join(trainer.logger.log_dir, "metrics.csv")).readline()
    assert "lr-SGD" in metrics and "adalabel/entropy" in metrics
