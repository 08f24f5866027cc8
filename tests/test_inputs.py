"""torch's cross-entropy contract (lightning_adalabel/inputs.py) through the functional losses, the engine and real
``Trainer.fit`` runs: layouts, dtypes, ``ignore_index``, ``reduction``, and bad values in any batch."""

from typing import Any, Callable, List, Optional

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adalabel import AdaLabel, AdaLabelMixin
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.losses import soft_label_loss
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs
from tests.references import naive_loss, positions, random_residual_matrix

K = 5
LAYOUTS = {"flat": (), "sequence": (3,), "dense": (2, 3)}


def batch(layout: str, dtype: torch.dtype = torch.long, seed: int = 0, ignore_fraction: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    extra = LAYOUTS[layout]
    logits = 3 * torch.randn(6, K, *extra, generator=generator)
    target = torch.randint(0, K, (6, *extra), generator=generator)
    ignored = torch.rand(target.shape, generator=generator) < ignore_fraction
    ignore_index = 255 if dtype == torch.uint8 else -100
    return logits, torch.where(ignored, ignore_index, target).to(dtype), ignore_index


# ---- the functional losses against the naive reference and torch ---------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.long, torch.uint8])
@pytest.mark.parametrize("mode", ["ce", "decoupled", "mixed"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_matches_the_naive_reference(layout, dtype, mode, reduction):
    logits, target, ignore_index = batch(layout, dtype)
    matrix = random_residual_matrix(K) if mode == "decoupled" else initial_label_matrix(K, include_diagonal=True)
    logits.requires_grad_(True)
    loss = soft_label_loss(logits, target, matrix, mode, 0.4, ignore_index=ignore_index, reduction=reduction)
    expected = naive_loss(logits.detach(), target.long(), matrix, mode, 0.4, ignore_index, reduction)
    if reduction == "none":
        assert loss.shape == target.shape
        torch.testing.assert_close(loss.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)
    else:
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.sum().backward()
    flat_grad, flat_target = positions(logits.grad, target.long())
    assert (flat_grad[flat_target == ignore_index] == 0).all()  # ignored positions get no gradient


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.long, torch.uint8])
def test_ce_and_label_smoothing_are_torch_for_every_layout(layout, reduction, dtype):
    logits, target, ignore_index = batch(layout, dtype)
    uniform = initial_label_matrix(K, include_diagonal=True)
    # torch takes uint8 class indices for (N, K) logits only (and not with label smoothing); we take them for every
    # layout, so the reference gets int64.
    expected = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction)
    got = soft_label_loss(logits, target, uniform, "ce", 0.0, ignore_index=ignore_index, reduction=reduction)
    assert torch.equal(got, expected)
    smoothed = F.cross_entropy(logits, target.long(), ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=0.1)
    torch.testing.assert_close(
        soft_label_loss(logits, target, uniform, "mixed", 0.1, ignore_index=ignore_index, reduction=reduction), smoothed
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_probability_targets_of_every_layout_match_torch(layout):
    logits, _, _ = batch(layout)
    target = torch.softmax(torch.randn(logits.shape), dim=1)
    uniform = initial_label_matrix(K, include_diagonal=True)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(soft_label_loss(logits, target, uniform, "ce", 0.0, reduction=reduction),
                                   F.cross_entropy(logits, target, reduction=reduction))
        torch.testing.assert_close(soft_label_loss(logits, target, uniform, "mixed", 0.1, reduction=reduction),
                                   F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1))


def test_uint8_targets_as_many_as_classes_are_indices_not_a_mask():
    logits = torch.randn(K, K)
    target = torch.tensor([1, 0, 4, 4, 2], dtype=torch.uint8)  # N == K: a bool-mask reading would also "work"
    matrix = random_residual_matrix(K)
    for mode in ("ce", "decoupled", "mixed"):
        torch.testing.assert_close(soft_label_loss(logits, target, matrix, mode, 0.5),
                                   soft_label_loss(logits, target.long(), matrix, mode, 0.5))
    by_uint8, by_long = LabelMatrix(K, samples="all"), LabelMatrix(K, samples="all")
    by_uint8.update(logits, target)
    by_long.update(logits, target.long())
    assert torch.equal(by_uint8.accumulator, by_long.accumulator)


@pytest.mark.parametrize(
    "logits, target, message",
    [
        (torch.zeros(2, 7, K), torch.zeros(2, 7, dtype=torch.long), r"classes must be on dim 1.*movedim\(-1, 1\)"),
        (torch.zeros(4, K), torch.zeros(4, dtype=torch.int32), r"int64 \(torch.long\) or uint8.*target.long\(\)"),
        (torch.zeros(4, K), torch.zeros(4, dtype=torch.bool), r"int64 \(torch.long\) or uint8"),
        (torch.zeros(4, K), torch.zeros(4), r"look like class indices: .*int64 \(torch.long\) or uint8.*target.long\(\)"),
        (torch.zeros(4, K, 3), torch.zeros(4, 3, dtype=torch.float16), r"dtype torch.float16 look like class indices"),
        (torch.zeros(K), torch.tensor(1), r"add the batch dimension"),
        (torch.zeros(4, K, 3), torch.zeros(4, 2, dtype=torch.long), r"must have shape \(4, 3\)"),
    ],
)
def test_layout_mistakes_are_clear_errors(logits, target, message):
    with pytest.raises(ValueError, match=message):
        soft_label_loss(logits, target, initial_label_matrix(K), "decoupled", 0.5)
    with pytest.raises(ValueError, match=message):
        LabelMatrix(K).update(logits, target)


def test_bad_reduction_and_ignore_index_are_clear_errors():
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        soft_label_loss(torch.zeros(2, K), torch.zeros(2, dtype=torch.long), initial_label_matrix(K), "ce", 0,
                      reduction="avg")
    with pytest.raises(ValueError, match="`ignore_index` must be an integer"):
        AdaLabel(ignore_index=None)


@pytest.mark.parametrize("bad", [K, -1, 99])
def test_invalid_class_index_never_indexes_q_and_is_nan_with_zero_gradient(bad):
    logits = torch.randn(4, K, requires_grad=True)
    target = torch.tensor([0, bad, 2, -100])
    matrix = random_residual_matrix(K)
    loss = soft_label_loss(logits, target, matrix, "decoupled", 0.5, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all() and loss[3] == 0
    soft_label_loss(logits, target, matrix, "decoupled", 0.5).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[[1, 3]] == 0).all()
    engine = LabelMatrix(K, samples="all")
    engine.update(logits, target)
    assert engine.invalid.sum() == 1 and engine.seen.sum() == 2  # positions 0 and 2 only
    clean = LabelMatrix(K, samples="all")
    clean.update(logits[[0, 2]], target[[0, 2]])
    torch.testing.assert_close(engine.sums, clean.sums)


def test_probability_rows_that_are_no_distribution_are_invalid_and_zero_rows_are_padding():
    logits = torch.randn(5, K)
    target = torch.softmax(torch.randn(5, K), dim=1)
    target[1] *= 3  # does not sum to 1
    target[2] = torch.tensor([1.5, -0.5, 0.0, 0.0, 0.0])  # negative entry
    target[3] = 0.0  # padding
    engine = LabelMatrix(K, samples="all")
    engine.update(logits, target)
    assert engine.invalid.sum() == 2 and engine.seen.sum() == 2
    assert engine.counts[0] == (target[[0, 4]].argmax(dim=1) == 0).sum()  # padding is not counted under class 0
    loss = soft_label_loss(logits, target, initial_label_matrix(K), "decoupled", 0.5, reduction="none")
    assert torch.isnan(loss[[1, 2]]).all() and loss[3] == 0 and torch.isfinite(loss[[0, 4]]).all()


# ---- real Trainer runs ------------------------------------------------------------------------------------------


class SequenceTagger(AdaLabelMixin, L.LightningModule):
    """Tags every position of a sequence: logits (N, K, T), targets (N, T) with -100 padding, as a token classifier."""

    def __init__(self, reduction: str = "mean", reference: Optional[Callable] = None) -> None:
        super().__init__()
        self.net = nn.Linear(4, K)
        self.reduction = reduction
        self.reference = reference
        self.pairs: List[Any] = []
        self.seen: List[Any] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x).movedim(-1, 1)  # (N, T, K) -> (N, K, T), as F.cross_entropy wants it
        loss = self.adalabel_loss(logits, y, reduction=self.reduction)
        self.seen.append((logits.detach().clone(), y))
        if self.reference is not None:
            self.pairs.append((loss.detach(), self.reference(logits.detach(), y)))
        return loss if self.reduction != "none" else loss.sum() / (y != -100).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def padded_sequences(num_batches: int = 4, batch_size: int = 4, length: int = 6, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_batches * batch_size, length, 4, generator=generator)
    y = (x @ torch.randn(4, K, generator=generator)).argmax(dim=-1)
    lengths = torch.randint(2, length + 1, (len(x),), generator=generator)
    y = torch.where(torch.arange(length)[None, :] < lengths[:, None], y, -100)  # right padding
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_preset_none_is_cross_entropy_on_padded_sequences(reduction):
    model = SequenceTagger(reduction, reference=lambda z, y: F.cross_entropy(z, y, reduction=reduction))
    L.Trainer(**trainer_kwargs(callbacks=[AdaLabel("none")])).fit(model, padded_sequences())
    assert len(model.pairs) == 4 and all(torch.equal(loss, expected) for loss, expected in model.pairs)


def test_preset_label_smoothing_is_torch_on_padded_sequences():
    model = SequenceTagger(reference=lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1))
    L.Trainer(**trainer_kwargs(callbacks=[AdaLabel("label_smoothing")])).fit(model, padded_sequences())
    for loss, expected in model.pairs:
        torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("preset", ["alr", "ols"])
def test_padding_enters_neither_loss_nor_statistics_in_any_batch(preset):
    adalabel = AdaLabel(preset, refresh_every_n_steps=1000)  # keep the statistics of the whole run to compare
    model = SequenceTagger()
    with pytest.warns(UserWarning, match="never be refreshed"):
        L.Trainer(**trainer_kwargs(callbacks=[adalabel])).fit(model, padded_sequences())
    engine = LabelMatrix(K, samples=adalabel.preset.samples, include_diagonal=adalabel.preset.include_diagonal)
    for logits, y in model.seen:
        flat_logits, flat_target = positions(logits, y)
        keep = flat_target != -100
        engine.update(flat_logits[keep], flat_target[keep])
    torch.testing.assert_close(adalabel.engine.accumulator, engine.accumulator)
    assert adalabel.engine.seen.sum() == sum(int((y != -100).sum()) for _, y in model.seen)


class CorruptedBatches(TinyClassifier):
    """Trains on clean batches except batch ``at``, whose targets ``corrupt`` spoils."""

    def __init__(self, at: int, corrupt: Callable[[torch.Tensor], torch.Tensor], soft: bool = False) -> None:
        super().__init__()
        self.at, self.corrupt, self.soft = at, corrupt, soft

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.soft:
            y = F.one_hot(y, 5).float()
        if batch_idx == self.at:
            y = self.corrupt(y)
        return self.adalabel_loss(self(x), y)


@pytest.mark.parametrize(
    "soft, corrupt, message",
    [
        (False, lambda y: torch.where(torch.arange(len(y)) == 3, 5, y), r"1 of 128 targets is neither a class index"),
        (False, lambda y: torch.full_like(y, -1), r"16 of 128 targets are neither a class index"),
        (True, lambda y: y * 3, r"16 of 128 targets are neither .* \(or probability rows that are not distributions"),
        (True, lambda y: y - 0.5 * (torch.arange(len(y))[:, None] == 0),
         r"1 of 128 targets is neither .* \(or probability rows that are not distributions"),
    ],
)
@pytest.mark.parametrize("preset", ["alr", "ols", "label_smoothing", "none"])
def test_bad_targets_in_a_later_batch_stop_the_run_at_the_refresh(soft, corrupt, message, preset):
    adalabel = AdaLabel(preset)
    model = CorruptedBatches(at=3, corrupt=corrupt, soft=soft)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[adalabel], max_epochs=2))
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, make_loader())
    assert trainer.current_epoch == 0  # stopped at the first refresh, the end of epoch 0
    matrix = adalabel.engine.matrix
    assert torch.isfinite(matrix).all() and torch.allclose(matrix.sum(dim=1), torch.ones(5))
    assert torch.isfinite(model.net.weight).all()  # NaN loss values, zero gradients: the weights stay intact


def test_bad_targets_in_the_first_training_batch_stop_the_run_at_once():
    model = CorruptedBatches(at=0, corrupt=lambda y: y + 5)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel()]))
    with pytest.raises(ValueError, match=r"16 of 16 targets are neither a class index in \[0, 5\)"):
        trainer.fit(model, make_loader())
    assert trainer.global_step == 0


class ValidatedClassifier(TinyClassifier):
    """Computes the ALR loss in validation too, so the sanity check calls it before any training batch."""

    def __init__(self, nan_first_batch: bool = False, train_with_alr: bool = True) -> None:
        super().__init__()
        self.nan_first_batch, self.train_with_alr = nan_first_batch, train_with_alr

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.nan_first_batch and batch_idx == 0:
            logits = logits + float("nan")
        return self.adalabel_loss(logits, y) if self.train_with_alr else F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.adalabel_loss(self(x), y))


def test_the_sanity_check_does_not_use_up_the_first_training_batch_checks():
    trainer = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel()], num_sanity_val_steps=2))
    with pytest.warns(UserWarning, match="16 of 16 positions of the first training batch have NaN"):
        trainer.fit(ValidatedClassifier(nan_first_batch=True), make_loader(), make_loader())
    trainer = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel()], num_sanity_val_steps=2))
    with pytest.raises(RuntimeError, match="training_step did not call `self.adalabel_loss"):
        trainer.fit(ValidatedClassifier(train_with_alr=False), make_loader(), make_loader())
