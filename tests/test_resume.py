"""Exact resume: a run interrupted and resumed from its last checkpoint ends where an uninterrupted run ends.

Real checkpoints (``ModelCheckpoint(every_n_train_steps=...)``), a real crash (a callback raises), a new Trainer
that resumes with ``trainer.fit(model, ckpt_path=...)``; compared bit for bit on CPU with ``deterministic=True``.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_adalabel import AdaLabel, LabelMatrix
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs

BATCHES_PER_EPOCH, MAX_EPOCHS = 8, 2


class ResumableLoader:
    """A fixed, unshuffled list of ``(x, y, index)`` batches that resumes mid-epoch where the checkpoint left off
    (the indices make the callback keep each sample's training margin, which must resume exactly too).

    It follows Lightning's ``state_dict`` / ``load_state_dict`` loader protocol. Because it has a length, Lightning
    does not fetch ahead, so at checkpoint time every fetched batch has been trained on.
    """

    def __init__(self) -> None:
        loader = make_loader(num_samples=8 * BATCHES_PER_EPOCH, batch_size=8)
        self.dataset = loader.dataset  # what the indices count, as a DataLoader's `dataset`
        self.batches = [(x, y, torch.arange(8 * number, 8 * number + 8)) for number, (x, y) in enumerate(loader)]
        self._fetched = 0
        self._resume_at = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        self._fetched = start
        for batch in self.batches[start:]:
            self._fetched += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"fetched": self._fetched}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._resume_at = state["fetched"] % len(self)  # a finished epoch resumes at the next one's start


class MomentumClassifier(TinyClassifier):
    """SGD with momentum, so that the optimizer state must be restored too."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Interrupted(Exception):
    """The crash of the first run; the test expects it."""


class Crash(L.Callback):
    """Stops training mid-epoch the hard way: an exception after the optimizer step ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args: Any) -> None:
        if trainer.global_step == self.at_step:
            raise Interrupted(f"stopped at step {self.at_step}")


def fit(
    tmp_path: Path,
    refresh_every_n_steps: Optional[int] = None,
    save_every: Optional[int] = None,
    crash_at: Optional[int] = None,
    ckpt_path: Optional[Path] = None,
    model: Optional[L.LightningModule] = None,
    **adalabel_kwargs: Any,
) -> "tuple[L.LightningModule, AdaLabel]":
    torch.manual_seed(0)
    model = model if model is not None else MomentumClassifier()
    adalabel = AdaLabel(refresh_every_n_steps=refresh_every_n_steps, **adalabel_kwargs)
    callbacks: List[L.Callback] = [adalabel]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1,
                                         save_last=True))
    if crash_at:
        callbacks.append(Crash(crash_at))
    trainer = L.Trainer(**trainer_kwargs(max_epochs=MAX_EPOCHS, callbacks=callbacks,
                                         enable_checkpointing=bool(save_every)))
    if crash_at:
        with pytest.raises(Interrupted):
            trainer.fit(model, ResumableLoader(), ckpt_path=ckpt_path)
    else:
        trainer.fit(model, ResumableLoader(), ckpt_path=ckpt_path)
    return model, adalabel


def assert_same_run(model: L.LightningModule, adalabel: AdaLabel, expected_model, expected: AdaLabel) -> None:
    for (name, got), want in zip(model.state_dict().items(), expected_model.state_dict().values()):
        assert torch.equal(got, want), name
    assert torch.equal(adalabel.label_matrix.matrix, expected.label_matrix.matrix)
    assert torch.equal(adalabel.label_matrix.accumulator, expected.label_matrix.accumulator)
    assert adalabel.label_matrix.num_refreshes == expected.label_matrix.num_refreshes
    margins, expected_margins = adalabel.training_margins, expected.training_margins
    for name in ("total", "count", "epoch_total", "epoch_count"):
        assert torch.equal(getattr(margins, name), getattr(expected_margins, name)), name
    assert margins.epochs == expected_margins.epochs and adalabel._margins_epoch_open == expected._margins_epoch_open


# (refresh_every_n_steps, save every n steps, crash at step): 8 optimizer steps an epoch.
SCENARIOS = {
    # Checkpoint at step 6 (mid-epoch 0) with an epoch's statistics half accumulated.
    "mid_epoch": (None, 3, 7),
    # Refreshes at 3, 6, ...; checkpoint at step 4 holds one step of statistics since the refresh at 3.
    "mid_epoch_refresh_every_n_steps": (3, 4, 7),
    # Checkpoint at step 8, the last batch of epoch 0, written before that epoch's end-of-epoch refresh.
    "epoch_boundary_last_batch": (None, 4, 10),
    # Checkpoint at step 9, in epoch 1 after epoch 0's refresh; the crash comes later in epoch 1.
    "epoch_boundary_next_epoch": (None, 3, 11),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Dict[Optional[int], tuple]:
    """The reference run for each refresh setting."""
    settings = {scenario[0] for scenario in SCENARIOS.values()}
    return {every: fit(tmp_path_factory.mktemp("reference"), refresh_every_n_steps=every) for every in settings}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resume_equals_uninterrupted_run(scenario, tmp_path, uninterrupted):
    every, save_every, crash_at = SCENARIOS[scenario]
    fit(tmp_path, refresh_every_n_steps=every, save_every=save_every, crash_at=crash_at)
    last = tmp_path / "last.ckpt"
    saved_step = torch.load(last, weights_only=False)["global_step"]
    assert saved_step == crash_at - crash_at % save_every
    model, adalabel = fit(tmp_path, refresh_every_n_steps=every, ckpt_path=last, model=MomentumClassifier())
    expected_model, expected = uninterrupted[every]
    assert expected.label_matrix.num_refreshes >= 2
    if every is not None:  # statistics of the steps after the last refresh are pending at the end
        assert expected.label_matrix.seen.sum() > 0
    assert_same_run(model, adalabel, expected_model, expected)


def test_checkpoint_holds_the_pending_statistics(tmp_path):
    """The resumed statistics are the ones accumulated before the checkpoint, not zeros."""
    fit(tmp_path, save_every=3, crash_at=4)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    (adalabel_state,) = [value for key, value in state["callbacks"].items() if key.startswith("AdaLabel")]
    engine = LabelMatrix(5)
    engine.load_state_dict(adalabel_state["label_matrix"])
    seen = engine.seen.sum()
    assert seen == 3 * 8  # three batches of 8 since the start of the epoch


@pytest.fixture(scope="module")
def alr_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a 5-class ALR run, mid-epoch."""
    path = tmp_path_factory.mktemp("alr")
    fit(path, save_every=3, crash_at=4)
    return path / "last.ckpt"


def test_resume_with_a_different_num_classes_is_a_clear_error(alr_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"label matrix has 5 classes but AdaLabel\(num_classes=4\)"):
        fit(tmp_path, ckpt_path=alr_checkpoint, num_classes=4)


class FourLogits(MomentumClassifier):
    """Same parameters as the 5-class model (so its weights load), but only 4 outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, :4]


def test_resume_with_a_model_of_different_num_classes_is_a_clear_error(alr_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="num_classes=5 on dim 1 .* any checkpoint you resume from"):
        fit(tmp_path, ckpt_path=alr_checkpoint, model=FourLogits())


@pytest.mark.parametrize("settings", [dict(preset="ols"), dict(preset="alr", alpha=0.3)])
def test_resume_with_a_different_preset_is_a_clear_error(settings, alr_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="written by preset 'alr'.*Resume with the AdaLabel settings the checkpoint"):
        fit(tmp_path, ckpt_path=alr_checkpoint, **settings)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_restored_on_cuda_refreshes_on_the_module_device(tmp_path):
    """Checkpoints load on the CPU; the restored matrix must reach the GPU before the resumed epoch-end refresh,
    which here runs in on_train_batch_start, before any loss could move it."""
    fit(tmp_path, save_every=4, crash_at=10)  # last.ckpt at step 8: epoch 0's refresh is still pending
    adalabel = AdaLabel()
    trainer = L.Trainer(**trainer_kwargs(accelerator="gpu", deterministic=False, max_epochs=MAX_EPOCHS,
                                         callbacks=[adalabel]))
    trainer.fit(MomentumClassifier(), ResumableLoader(), ckpt_path=tmp_path / "last.ckpt")
    assert adalabel.label_matrix.matrix.device.type == "cuda"
    assert adalabel.label_matrix.accumulator.device.type == "cuda"
