"""Each training sample's margin averaged over the run (``AdaLabel.training_margins``): against a naive per-sample
reference, through real Trainers (epochs, gradient accumulation, drop_last), ``IndexedDataset``, and the errors for
indices and batches it cannot use. Resume (in mid-epoch, on an epoch's last batch, after a crash):
``tests/test_resume.py``, whose batches carry indices. DDP: ``tests/test_label_issues.py`` (the session's DDP
launch)."""

import math
import pickle
from typing import Any, Dict, List

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from lightning_adalabel import AdaLabel, IndexedDataset, find_label_issues
from lightning_adalabel.training_margins import TrainingMargins, batch_margins
from tests.helpers import (
    IndexRecorder,
    TinyClassifier,
    fit,
    make_loader,
    reference_margin,
    reference_means,
    trainer_kwargs,
)

NUM_SAMPLES = 90


def indexed_loader(num_samples: int = NUM_SAMPLES, batch_size: int = 16, shuffle: bool = True, seed: int = 0,
                   **kwargs: Any) -> DataLoader:
    data = make_loader(num_samples=num_samples).dataset
    return DataLoader(IndexedDataset(data), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


# ---- the per-batch margins ----------------------------------------------------------------------------------


def test_batch_margins_match_the_naive_margin_and_leave_out_what_is_no_sample():
    torch.manual_seed(0)
    logits, target = torch.randn(12, 5), torch.randint(0, 5, (12,))
    index = torch.arange(12) * 2
    target[1] = -100  # ignore_index
    logits[2, 3] = float("nan")  # a diverging step
    logits[3] = float("-inf")
    logits[3, target[3]] = 1.0  # every other class masked: no margin
    index[4] = 40  # out of range for 30 samples
    index[5] = -1
    margins = batch_margins(logits, target, index, num_samples=30, ignore_index=-100)
    used = [i not in (1, 2, 3, 4, 5) for i in range(12)]
    assert margins.used.tolist() == [float(flag) for flag in used]
    assert margins.out_of_range.item() == 2
    expected = [reference_margin(logits[i], int(target[i])) if used[i] else 0.0 for i in range(12)]
    torch.testing.assert_close(margins.margin, torch.tensor(expected))
    assert margins.index.min() >= 0 and margins.index.max() < 30  # safe to index with, whatever came in


def test_a_masked_other_class_is_no_obstacle_and_bf16_logits_are_read_in_float32():
    logits = torch.tensor([[2.0, float("-inf"), 0.5]], dtype=torch.bfloat16)
    margins = batch_margins(logits, torch.tensor([0]), torch.tensor([0]), 1, -100)
    assert margins.margin.dtype == torch.float32 and margins.margin.tolist() == [1.5]


def test_tracker_sums_duplicates_and_keeps_unseen_samples_nan():
    margins = TrainingMargins(4)
    logits = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0]])
    margins.add(batch_margins(logits, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 3]), 4, -100))
    margins.end_epoch()
    assert margins.count.tolist() == [0.0, 2.0, 0.0, 1.0]
    mean = margins.mean()
    assert math.isnan(mean[0]) and math.isnan(mean[2]) and mean[[1, 3]].tolist() == [-1.0, 2.0]
    restored = TrainingMargins.from_state_dict(margins.state_dict())
    assert torch.equal(restored.total, margins.total) and restored.epochs == 1


@pytest.mark.parametrize(
    "change, match",
    [({"version": 9}, "not written by TrainingMargins"), ({"count": torch.zeros(3)}, "malformed 'count'"),
     ({"total": torch.full((4,), float("nan"))}, "malformed 'total'")],
)
def test_a_malformed_saved_state_is_refused(change: Dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        TrainingMargins.from_state_dict({**TrainingMargins(4).state_dict(), **change})


# ---- through a real Trainer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_callback_averages_each_samples_margin_over_the_run(accumulate: int):
    callback, model = AdaLabel(), IndexRecorder()
    fit(callback, model, indexed_loader(), max_epochs=3, accumulate_grad_batches=accumulate)
    margins = callback.training_margins
    assert margins.num_samples == NUM_SAMPLES and margins.epochs == 3
    assert margins.count.tolist() == [3.0] * NUM_SAMPLES
    torch.testing.assert_close(margins.mean(), reference_means(model.records, NUM_SAMPLES))


def test_the_mixins_default_step_passes_the_index_of_indexed_batches():
    torch.manual_seed(0)
    callback, recorder = AdaLabel(), IndexRecorder()
    fit(callback, recorder, indexed_loader(), max_epochs=2)
    torch.manual_seed(0)
    default = AdaLabel()
    fit(default, TinyClassifier(), indexed_loader(), max_epochs=2)  # the same seeds: the same run
    torch.testing.assert_close(default.training_margins.mean(), callback.training_margins.mean())
    plain = AdaLabel()
    fit(plain, TinyClassifier(), make_loader(), max_epochs=1)  # (x, y) batches: no margins kept
    assert plain.training_margins is None


def test_drop_last_and_a_limit_leave_unseen_samples_nan_and_ranked_last():
    callback, model = AdaLabel(), IndexRecorder()
    fit(callback, model, indexed_loader(shuffle=False, drop_last=True), max_epochs=1, limit_train_batches=3)
    mean = callback.training_margins.mean()
    assert mean[:48].isfinite().all() and mean[48:].isnan().all()
    found = find_label_issues(model, make_loader(num_samples=NUM_SAMPLES), **trainer_kwargs())
    assert found.ranked_by == "margin" and set(found.ranking[-42:].tolist()) == set(range(48, NUM_SAMPLES))


# ---- what it cannot use ---------------------------------------------------------------------------------------


class StepWith(TinyClassifier):
    """``adalabel_loss`` called with what ``make_batch(x, y, index)`` returns."""

    def __init__(self, make_batch: Any) -> None:
        super().__init__()
        self.make_batch = make_batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        logits, target, index = self.make_batch(self(x), y, index)
        return self.adalabel_loss(logits, target, index=index)


@pytest.mark.parametrize(
    "make_batch, match",
    [
        (lambda z, y, i: (z, torch.nn.functional.one_hot(y, 5).float(), i), "probability targets"),
        (lambda z, y, i: (z[..., None].expand(-1, -1, 3), y[:, None].expand(-1, 3), i), r"a token layout"),
        (lambda z, y, i: (z, y, i[:-1]), r"one index per sample: shape \(16,\)"),
        (lambda z, y, i: (z, y, i.float()), "an integer tensor"),
    ],
    ids=["probabilities", "tokens", "short", "float"],
)
def test_indices_it_cannot_use_are_refused_at_once(make_batch: Any, match: str):
    with pytest.raises(ValueError, match=match) as error:
        fit(AdaLabel(), StepWith(make_batch), indexed_loader(), max_epochs=1)
    assert "\n" not in str(error.value)


def test_an_index_outside_the_training_set_is_refused_at_the_epochs_end():
    shifted = StepWith(lambda z, y, i: (z, y, i + 80))  # 90 samples: indices 80..169
    with pytest.raises(ValueError, match=r"came with an index outside \[0, 90\).*IndexedDataset") as error:
        fit(AdaLabel(), shifted, indexed_loader(), max_epochs=1)
    assert "\n" not in str(error.value)


class Stream(IterableDataset):
    def __iter__(self) -> Any:
        x, y = make_loader(num_samples=40).dataset.tensors
        return iter(zip(x, y, range(40)))


def test_a_data_set_without_a_length_needs_num_training_samples():
    with pytest.raises(ValueError, match=r"AdaLabel\(num_training_samples=\.\.\.\)"):
        fit(AdaLabel(), TinyClassifier(), DataLoader(Stream(), batch_size=8), max_epochs=1)
    callback = AdaLabel(num_training_samples=40)
    fit(callback, TinyClassifier(), DataLoader(Stream(), batch_size=8), max_epochs=1)
    assert callback.training_margins.count.tolist() == [1.0] * 40


def test_find_label_issues_needs_the_set_the_margins_were_kept_for():
    callback, model = AdaLabel(), TinyClassifier()
    fit(callback, model, indexed_loader(), max_epochs=1)
    with pytest.raises(ValueError, match="kept margins for 90 training samples, but the loader's data set has 40"):
        find_label_issues(model, make_loader(num_samples=40), **trainer_kwargs())
    plain = TinyClassifier()
    fit(AdaLabel(), plain, make_loader(), max_epochs=1)
    with pytest.raises(ValueError, match="cut_off='margin' needs the margins"):
        find_label_issues(plain, make_loader(), cut_off="margin", **trainer_kwargs())


def test_the_ranking_and_the_default_cut_off_use_the_margins(tmp_path):
    callback, model = AdaLabel(), TinyClassifier()
    fit(callback, model, indexed_loader(), max_epochs=2)
    found = find_label_issues(model, make_loader(num_samples=NUM_SAMPLES), **trainer_kwargs())
    expected = callback.training_margins.mean()
    assert found.cut_off == "margin" and torch.equal(found.margin, expected)
    assert torch.equal(found.is_issue, expected < 0) and found.is_issue.any()
    assert torch.all(found.margin[found.ranking].diff() >= 0)
    by_score = find_label_issues(model, make_loader(num_samples=NUM_SAMPLES), cut_off="misclassified",
                                 **trainer_kwargs())
    assert torch.equal(by_score.is_issue, by_score.predicted != by_score.given)
    path = tmp_path / "issues.csv"
    found.to_csv(path)
    lines = path.read_text().splitlines()
    assert lines[0] == "index,given,suggested,score,margin,is_issue" and len(lines) == NUM_SAMPLES + 1
    assert [float(line.split(",")[4]) for line in lines[1:]] == sorted(float(line.split(",")[4]) for line in lines[1:])


def test_indexed_dataset_appends_the_index_to_every_kind_of_sample():
    assert IndexedDataset([(1, 2)])[0] == (1, 2, 0)
    assert IndexedDataset([torch.tensor(5)])[0] == (torch.tensor(5), 0)
    assert IndexedDataset([{"input_ids": 1, "labels": 0}])[0] == {"input_ids": 1, "labels": 0, "index": 0}
    with pytest.raises(ValueError, match="already have an 'index'"):
        IndexedDataset([{"index": 3}])[0]
    with pytest.raises(TypeError, match="needs a map-style data set"):
        IndexedDataset(Stream())
    data = TensorDataset(torch.zeros(2))
    data.classes = ["a", "b"]
    assert IndexedDataset(data).classes == ["a", "b"]  # the wrapped set's attributes


def test_a_loader_over_an_indexed_subset_batches_the_indices():
    """A Subset fetches whole batches (``__getitems__``): the indices must come with them, those of the subset."""
    rows = Subset(TensorDataset(torch.arange(6.0), torch.tensor([0, 1, 0, 1, 0, 1])), [4, 1, 3])
    x, y, index = next(iter(DataLoader(IndexedDataset(rows), batch_size=3)))
    assert x.tolist() == [4.0, 1.0, 3.0] and y.tolist() == [0, 1, 1] and index.tolist() == [0, 1, 2]
    assert pickle.loads(pickle.dumps(IndexedDataset(rows)))[2][2] == 2  # to DataLoader workers and back


class BatchFetching(Dataset):
    """A data set that reads a batch at once (as Hugging Face datasets read a batch from Arrow), or returns it
    collated (``collated=True``); it counts its reads."""

    def __init__(self, collated: bool = False) -> None:
        self.collated, self.batch_reads, self.sample_reads = collated, 0, 0

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> Dict[str, Any]:
        self.sample_reads += 1
        return {"x": float(index), "labels": index % 2}

    def __getitems__(self, indices: List[int]) -> Any:
        self.batch_reads += 1
        if self.collated:
            return {"x": [float(index) for index in indices], "labels": [index % 2 for index in indices]}
        return [{"x": float(index), "labels": index % 2} for index in indices]


@pytest.mark.parametrize("collated", [False, True])
def test_a_data_set_that_reads_whole_batches_keeps_its_batch_read(collated: bool):
    data = BatchFetching(collated)
    batch = next(iter(DataLoader(IndexedDataset(data), batch_size=4, sampler=[7, 2, 9, 0])))
    assert batch["x"].tolist() == [7.0, 2.0, 9.0, 0.0] and batch["index"].tolist() == [7, 2, 9, 0]
    assert batch["labels"].tolist() == [1, 0, 1, 0]
    # One read for the batch; a batch returned already collated is read again, one sample at a time.
    assert (data.batch_reads, data.sample_reads) == ((1, 4) if collated else (1, 0))


def test_a_checkpoint_brings_its_margins_to_find_label_issues(tmp_path):
    """``ckpt_path=``: the pass restores the checkpoint's AdaLabel state, whose margins then rank (a fresh callback,
    in a fresh Trainer, held none before)."""
    callback, model = AdaLabel(), TinyClassifier()
    trainer, _ = fit(callback, model, indexed_loader(), max_epochs=2)
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    fresh = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel()]))
    found = find_label_issues(TinyClassifier(), make_loader(num_samples=NUM_SAMPLES), fresh, ckpt_path=path)
    assert found.cut_off == "margin" and torch.equal(found.margin, callback.training_margins.mean())
    with pytest.raises(ValueError, match="kept margins for 90 training samples, but the loader's data set has 40"):
        find_label_issues(TinyClassifier(), make_loader(num_samples=40), fresh, ckpt_path=path)
    # Built from settings, the pass's Trainer takes the callback among them; without one the margins would be lost.
    found = find_label_issues(TinyClassifier(), make_loader(num_samples=NUM_SAMPLES), ckpt_path=path,
                              **trainer_kwargs(callbacks=[AdaLabel()]))
    assert found.cut_off == "margin" and torch.equal(found.margin, callback.training_margins.mean())
    with pytest.raises(ValueError, match=r"this Trainer has none\. Add the callback the run trained with") as error:
        find_label_issues(TinyClassifier(), make_loader(num_samples=NUM_SAMPLES), ckpt_path=path, **trainer_kwargs())
    assert "\n" not in str(error.value)


def test_a_new_trainer_for_the_pass_ranks_by_what_the_module_trained_with():
    """A Trainer built for the pass with an AdaLabel of its own (nothing restored into it), or with none: the ranking
    and the suggestions are those of the callback the module trained with, and the module still points at it."""
    callback, model = AdaLabel(), TinyClassifier()
    trainer, _ = fit(callback, model, indexed_loader(), max_epochs=2)
    loader = make_loader(num_samples=NUM_SAMPLES)
    same = find_label_issues(model, loader, trainer)
    for other in ({"callbacks": [AdaLabel()]}, {}):
        found = find_label_issues(model, loader, **trainer_kwargs(**other))
        assert found.cut_off == "margin" and torch.equal(found.margin, callback.training_margins.mean())
        assert torch.equal(found.suggested, same.suggested)  # weighted by the trained Q, not a new uniform one
        assert model._adalabel_callback is callback


def test_a_checkpoint_from_other_settings_still_ranks_by_its_margins(tmp_path):
    """Evaluating with other AdaLabel settings warns and keeps the callback's Q, but the margins are the run's."""
    callback, model = AdaLabel(), TinyClassifier()
    trainer, _ = fit(callback, model, indexed_loader(), max_epochs=1)
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    other = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel(preset="ols")]))
    with pytest.warns(UserWarning, match="the training margins"):
        found = find_label_issues(TinyClassifier(), make_loader(num_samples=NUM_SAMPLES), other, ckpt_path=path)
    assert found.cut_off == "margin" and torch.equal(found.margin, callback.training_margins.mean())


def test_a_second_fit_continues_the_margins_of_the_same_set_and_restarts_for_another():
    callback = AdaLabel()
    fit(callback, IndexRecorder(), indexed_loader(), max_epochs=1)
    fit(callback, IndexRecorder(), indexed_loader(), max_epochs=1)  # more training on the same set: both runs count
    assert callback.training_margins.count.tolist() == [2.0] * NUM_SAMPLES
    with pytest.warns(UserWarning, match="kept for 90 samples, but this fit's training set has 40"):
        fit(callback, IndexRecorder(), indexed_loader(num_samples=40), max_epochs=1)
    assert callback.training_margins.count.tolist() == [1.0] * 40
