"""Safe state and strict settings, each in real ``Trainer.fit`` runs on the CPU.

- A checkpoint's AdaLabel state is validated before anything is replaced: NaN, a non-square or non-stochastic
  matrix, a diagonal where the matrix is residual, statistics of the wrong shape, a missing key and an unknown
  format version are clear ``ValueError``s; a state written by 0.1.0 (format 1) still resumes.
- Every ``fit`` starts with empty statistics and its own refresh schedule (Q itself is kept, like the weights), also
  after an interrupted fit.
- Lightning's ``WeightAveraging`` (EMA) and ``StochasticWeightAveraging`` train with ALR (the module carries no Q
  into the copies they make: tests/test_module.py).
- After ``strategy="ddp_spawn"`` the learned Q is on the callback in the launching process.
- Settings are refused as soon as they are given (or, for ``class_names`` without ``num_classes``, as soon as K is
  known), and a refresh period longer than the run is a warning at the start of training.
"""

import os
import warnings
from multiprocessing.reduction import ForkingPickler

import lightning as L
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reducers ddp_spawn pickles tensors with)
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn

from lightning_adalabel import AdaLabel
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.training_margins import TrainingMargins
from tests.helpers import TinyClassifier, fit, make_loader, trainer_kwargs

K = 5


def assert_valid_residual(matrix, num_classes=K):
    assert torch.isfinite(matrix).all()
    assert (matrix >= 0).all()
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(num_classes, device=matrix.device))
    assert (matrix.diagonal() == 0).all()


# ---- 1. checkpoint validation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A real checkpoint of a short ALR fit (one refresh at step 5 of 8: the accumulator holds 3 steps)."""
    callback = AdaLabel(samples="all", refresh_every_n_steps=5)
    trainer, _ = fit(callback)
    path = str(tmp_path_factory.mktemp("state") / "trained.ckpt")
    trainer.save_checkpoint(path)
    assert callback.engine.num_refreshes == 1 and callback.engine.counts.sum() > 0
    return path


def adalabel_key(checkpoint):
    keys = [key for key in checkpoint["callbacks"] if "AdaLabel" in key]
    assert len(keys) == 1, list(checkpoint["callbacks"])
    return keys[0]


def corrupted_checkpoint(source, destination, corrupt):
    """Load a real checkpoint, let ``corrupt(state)`` change the AdaLabel entry in place, save it again."""
    checkpoint = torch.load(source, weights_only=False)
    corrupt(checkpoint["callbacks"][adalabel_key(checkpoint)])
    torch.save(checkpoint, destination)
    return str(destination)


def set_matrix(value):
    def corrupt(state):
        state["label_matrix"]["matrix"] = value(state["label_matrix"]["matrix"])
    return corrupt


def with_nan(matrix):
    matrix = matrix.clone()
    matrix[2, 3] = float("nan")
    return matrix


def set_accumulator(state):
    state["label_matrix"]["accumulator"] = torch.zeros(K, K + 2)


def drop_statistics_epoch(state):
    del state["statistics_epoch"]


def future_callback_version(state):
    state["version"] = 99


def future_engine_version(state):
    state["label_matrix"]["version"] = 99


def short_margins(state):
    state["training_margins"] = {**TrainingMargins(4).state_dict(), "count": torch.zeros(3), "epoch_open": False}


CORRUPTIONS = {
    "nan": (set_matrix(with_nan), r"not valid: .*NaN"),
    "3x4": (set_matrix(lambda m: torch.full((3, 4), 0.25)), r"square K x K tensor, got \(3, 4\)"),
    "rows_not_1": (set_matrix(lambda m: m * 2), r"Every row of a label matrix must sum to 1"),
    "diagonal": (set_matrix(lambda m: torch.full((K, K), 1.0 / K)), r"must have a zero diagonal"),
    "accumulator_shape": (set_accumulator, r"statistics have shape \(5, 7\), expected \(5, 9\)"),
    "no_statistics_epoch": (drop_statistics_epoch, r"format version 3, missing \['statistics_epoch'\]"),
    "future_callback_version": (future_callback_version, r"format version 99.*versions 1 to 3"),
    "future_engine_version": (future_engine_version, r"format version 99.*versions 1 to 2"),
    "training_margins": (short_margins, r"training margins have a malformed 'count'"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_invalid_checkpoint_state_is_a_clear_error_and_restores_nothing(trained_checkpoint, tmp_path, case):
    corrupt, message = CORRUPTIONS[case]
    path = corrupted_checkpoint(trained_checkpoint, tmp_path / f"{case}.ckpt", corrupt)
    callback = AdaLabel(samples="all", refresh_every_n_steps=5)
    with pytest.raises(ValueError, match=message):  # a ValueError, not a KeyError / IndexError later
        fit(callback, ckpt_path=path, max_epochs=2)
    assert callback.engine is None  # nothing half-restored


def test_invalid_checkpoint_state_keeps_the_callbacks_own_q(trained_checkpoint, tmp_path):
    """A callback that already learned a Q (an earlier fit) keeps that Q when a resume is refused (the refused fit had
    already started with empty statistics, as every fit does)."""
    callback = AdaLabel(samples="all", refresh_every_n_steps=5)
    fit(callback)
    before_matrix = callback.engine.matrix.clone()
    before_accumulator = callback.engine.accumulator.clone()
    engine = callback.engine
    path = corrupted_checkpoint(trained_checkpoint, tmp_path / "nan.ckpt", set_matrix(with_nan))
    with pytest.raises(ValueError, match="NaN"):
        fit(callback, ckpt_path=path, max_epochs=2)
    assert callback.engine is engine
    assert torch.equal(callback.engine.matrix, before_matrix)
    assert callback.engine.num_refreshes == 1
    # The refused fit started fresh (empty statistics) before the checkpoint was read; nothing of it was loaded.
    assert before_accumulator.sum() > 0 and callback.engine.accumulator.sum() == 0


def as_version_1(state):
    """The layout lightning_adalabel 0.1.0 wrote: no "version" keys, an accumulator of K x (K + 3)."""
    del state["version"]
    del state["label_matrix"]["version"]
    for settings in (state["config"], state["label_matrix"]):  # the prior settings came after 0.1.0
        del settings["prior"], settings["prior_strength"]
    state["label_matrix"]["accumulator"] = state["label_matrix"]["accumulator"][:, : K + 3].clone()


def test_version_1_state_resumes_and_gains_the_invalid_target_column(trained_checkpoint, tmp_path):
    saved = torch.load(trained_checkpoint, weights_only=False)["callbacks"]
    saved = next(state for key, state in saved.items() if "AdaLabel" in key)
    path = corrupted_checkpoint(trained_checkpoint, tmp_path / "v1.ckpt", as_version_1)

    restored = AdaLabel(samples="all", refresh_every_n_steps=5)
    fit(restored, ckpt_path=path, max_epochs=1)  # max_epochs already reached: restores only
    engine = restored.engine
    assert torch.equal(engine.matrix, saved["label_matrix"]["matrix"])
    assert engine.accumulator.shape == (K, K + 4)
    assert torch.equal(engine.accumulator[:, : K + 3], saved["label_matrix"]["accumulator"][:, : K + 3])
    assert torch.equal(engine.accumulator[:, K + 3], torch.zeros(K))
    assert engine.num_refreshes == 1
    assert restored.state_dict()["version"] == 3 and restored.state_dict()["last_refresh_step"] == 5
    assert restored.training_margins is None  # versions 1 and 2 kept none

    trained_on = AdaLabel(samples="all", refresh_every_n_steps=5)
    fit(trained_on, ckpt_path=path, max_epochs=2)  # and training goes on from it: refreshes at steps 10 and 15
    assert trained_on.engine.num_refreshes == 3
    assert_valid_residual(trained_on.engine.matrix)


# ---- 2. every fit starts fresh -------------------------------------------------------------------------------


class RecordingAdaLabel(AdaLabel):
    """Records, for each refresh, the step and the samples seen since the previous one; and Q at each train start."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.refreshes = []
        self.start_matrices = []
        self.start_accumulators = []

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        engine = self.engine
        self.start_matrices.append(None if engine is None else engine.matrix.clone())
        self.start_accumulators.append(None if engine is None else engine.accumulator.clone())

    def _refresh(self, trainer, pl_module):
        self.refreshes.append((trainer.global_step, float(self.engine.seen.sum())))
        super()._refresh(trainer, pl_module)


def eight_batches_of_eight():
    return make_loader(num_samples=64, batch_size=8)


def test_a_reused_callback_starts_each_fit_with_empty_statistics_and_its_own_schedule():
    callback = RecordingAdaLabel(samples="all", refresh_every_n_steps=5)
    model = TinyClassifier()
    fit(callback, model, eight_batches_of_eight())
    assert callback.refreshes == [(5, 40.0)]
    assert float(callback.engine.seen.sum()) == 24.0  # steps 6 to 8 wait for a refresh that never comes
    q_after_first_fit = callback.engine.matrix.clone()
    assert not torch.equal(q_after_first_fit, initial_label_matrix(K))

    fit(callback, model, eight_batches_of_eight())  # a new Trainer, the same callback
    # Refreshed at the new run's step 5 with its own 40 samples: not the 24 old ones too, and not skipped because
    # the first run's last refresh was also at step 5.
    assert callback.refreshes == [(5, 40.0), (5, 40.0)]
    assert callback.start_accumulators[1] is not None and callback.start_accumulators[1].sum() == 0
    # Q, like the weights, is kept across fits.
    assert torch.equal(callback.start_matrices[1], q_after_first_fit)
    assert callback.engine.num_refreshes == 2


class Interrupted(Exception):
    pass


class CrashAt(Callback):
    """Raises in on_train_batch_end of batch ``batch_idx``; listed before AdaLabel, so that step's batch is still
    queued in AdaLabel when the fit dies."""

    def __init__(self, batch_idx):
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            raise Interrupted


def test_a_fit_after_an_interrupted_one_starts_empty():
    callback = RecordingAdaLabel(samples="all", refresh_every_n_steps=5)
    model = TinyClassifier()
    with pytest.raises(Interrupted):
        fit([CrashAt(batch_idx=2), callback], model, eight_batches_of_eight())
    assert callback.refreshes == []
    assert float(callback.engine.seen.sum()) == 16.0  # batches 0 and 1; batch 2 was still pending

    fit(callback, model, eight_batches_of_eight())
    assert callback.start_accumulators[1].sum() == 0
    assert callback.refreshes == [(5, 40.0)]  # neither the 16 counted nor the 8 pending samples of the crash
    assert callback.engine.num_refreshes == 1


# ---- 3. weight averaging ---------------------------------------------------------------------------------------


class RawWeights:
    """Keeps the module's raw weights just before the averaging callback writes its average into it."""

    raw = None

    def on_train_end(self, trainer, pl_module):
        self.raw = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)


class EMA(RawWeights, WeightAveraging):
    pass


class SWA(RawWeights, StochasticWeightAveraging):
    pass


@pytest.mark.parametrize(
    "make_averaging",
    [
        pytest.param(lambda: EMA(avg_fn=get_ema_avg_fn(0.9)), id="ema"),
        pytest.param(lambda: SWA(swa_lrs=0.05, swa_epoch_start=1), id="swa"),
    ],
)
def test_alr_trains_with_weight_averaging(make_averaging):
    callback = AdaLabel()
    averaging = make_averaging()
    # AdaLabel first: the module already holds the callback when the averaging callback deep-copies it.
    trainer, model = fit([callback, averaging], max_epochs=3)
    assert trainer.current_epoch == 3
    assert callback.engine.num_refreshes == 3
    assert not torch.equal(callback.engine.matrix, initial_label_matrix(K))
    assert_valid_residual(callback.engine.matrix)

    averaged = averaging._average_model
    averaged = averaged.module if hasattr(averaged, "module") else averaged
    assert averaged.__dict__.get("_adalabel_callback") is None  # the copy did not take Q along
    assert averaging.raw is not None
    assert not torch.equal(averaging.raw["net.weight"], model.net.weight)  # the averaged weights were written back
    torch.testing.assert_close(model.net.weight, averaged.net.weight)
    assert model._adalabel_callback is callback


# ---- 4. ddp_spawn --------------------------------------------------------------------------------------------


@pytest.mark.slow  # two spawned 2-process fits
def test_ddp_spawn_leaves_the_learned_q_on_the_callback_in_the_launching_process(monkeypatch):
    callback, model = AdaLabel(), TinyClassifier()
    for max_epochs in (2, 1):  # a second spawned fit continues from the first's Q, read in between or not
        # An earlier in-process DDP test may still hold the port it left in MASTER_PORT: let Lightning pick a free one.
        monkeypatch.delenv("MASTER_PORT", raising=False)
        trainer = L.Trainer(
            **trainer_kwargs(callbacks=[callback], devices=2, strategy="ddp_spawn", max_epochs=max_epochs)
        )
        trainer.fit(model, make_loader(num_samples=64, batch_size=8))
        hand_over = callback._hand_over.path
        assert os.path.exists(hand_over)  # written by rank 0, not read yet
    engine = callback.engine
    assert engine is not None
    assert not os.path.exists(hand_over)  # read once, then removed
    assert engine.num_refreshes == 3
    assert not torch.equal(engine.matrix, initial_label_matrix(K))
    assert_valid_residual(engine.matrix)
    assert callback.engine is engine  # reading it again changes nothing


def test_a_label_matrix_sent_to_another_process_owns_its_tensors():
    """torch.multiprocessing sends CPU tensors as shared memory; the second ddp_spawn fit of one callback once had
    both ranks adding into a single accumulator (lost counts, then a doubled all-reduce: rows summing to 0.93)."""
    callback, model = AdaLabel(), TinyClassifier()
    fit(callback, model)
    sent = ForkingPickler.loads(ForkingPickler.dumps(callback))
    assert torch.equal(sent.engine.matrix, callback.engine.matrix)
    sent.engine.sums.add_(1.0)
    sent.engine.tallies.add_(1.0)
    sent.engine.matrix.zero_()
    assert not callback.engine.accumulator.any()
    assert_valid_residual(callback.engine.matrix)


def test_a_label_matrix_pickled_with_the_k_by_k_plus_4_table_unpickles():
    """Objects pickled before the flat statistics buffer (an `accumulator` attribute) still load, with their
    statistics."""
    engine = LabelMatrix(K)
    engine.update(torch.randn(6, K), torch.arange(6) % K)
    old_layout = {key: value for key, value in engine.__dict__.items() if key != "_buffer"}
    old_layout["accumulator"] = engine.accumulator
    restored = LabelMatrix.__new__(LabelMatrix)
    restored.__setstate__(old_layout)
    assert torch.equal(restored.accumulator, engine.accumulator) and restored.seen.sum() == 6


# ---- 5. strict settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": float("inf")}, r"`alpha` must be a finite number >= 0.0, got inf"),
        ({"alpha": float("nan")}, r"`alpha` must be a finite number >= 0.0, got nan"),
        ({"momentum": True}, r"`momentum` must be a finite number in \(0.0, 1.0\], got True"),
        ({"include_diagonal": "no"}, r"`include_diagonal` must be True or False \(or None\), got 'no'"),
        ({"log_label_matrix": "yes"}, r"`log_label_matrix` must be True or False, got 'yes'"),
        ({"ignore_index": 1.5}, r"`ignore_index` must be an integer .*got 1.5"),
        ({"num_classes": 5, "class_names": ["a", "b"]}, r"Got 2 `class_names` for 5 classes"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaLabel(**kwargs)


class CountingClassifier(TinyClassifier):
    steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_class_names_are_checked_as_soon_as_k_is_inferred():
    callback = AdaLabel(class_names=["a", "b"])  # num_classes=None: K comes from the first logits
    model = CountingClassifier()
    with pytest.raises(ValueError, match=r"Got 2 `class_names` for 5 classes"):
        fit(callback, model)
    assert model.steps == 1  # the first training batch, not the refresh at the end of the epoch
    assert callback.engine is None


class WarningsAtFirstStep(TinyClassifier):
    """Notes, at the first training step, the warnings recorded so far."""

    record = ()  # set by the test (not an init argument: save_hyperparameters deep-copies those)
    messages_at_first_step = None

    def training_step(self, batch, batch_idx):
        if self.messages_at_first_step is None:
            self.messages_at_first_step = [str(w.message) for w in self.record]
        return super().training_step(batch, batch_idx)


def test_a_refresh_period_longer_than_the_run_warns_at_the_start_of_training():
    callback = AdaLabel(refresh_every_n_steps=100)
    with pytest.warns(UserWarning, match=r"refresh_every_n_steps=100\) is longer than this run \(8 optimizer steps\)"
                      r".*never be refreshed") as record:
        model = WarningsAtFirstStep()
        model.record = record
        fit(callback, model)
    assert any("never be refreshed" in message for message in model.messages_at_first_step)
    assert callback.engine.num_refreshes == 0


def test_a_refresh_period_within_the_run_does_not_warn():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(AdaLabel(refresh_every_n_steps=8))
        fit(AdaLabel(preset="label_smoothing", refresh_every_n_steps=100))  # Q never changes: nothing to refresh
    assert not [w for w in record if "never be refreshed" in str(w.message)]
