"""``find_label_issues``: the ranking of known flipped labels on the digits, the token layouts and ignore_index, the
cut-offs, DDP against one process, and the errors for inputs it cannot use. Real Trainers throughout."""

from pathlib import Path
from typing import Any, Iterator, List, Tuple

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from torchmetrics.functional.classification import binary_auroc

from lightning_adalabel import AdaLabel, AdaLabelMixin, IndexedDataset, find_label_issues
from lightning_adalabel.examples.demo import DigitsCNN, load_digits_split
from lightning_adalabel.label_issues import LabelIssues
from tests.helpers import (
    TinyClassifier,
    learned_matrix,
    make_loader,
    reference_means,
    run_script_main,
    trainer_kwargs,
)

NOISE, EPOCHS = 0.3, 5
# Bounds for the fixture's run (digits, 30% of the labels flipped y -> y + 1, ALR, 5 epochs, indexed batches),
# measured with its settings on seeds 0-4: AUROC of the training margins 0.964-0.979, of the final probabilities
# 0.949-0.977; the default cut-off's (margin < 0) precision 0.740-0.836 and recall 0.913-0.957; the suggestion is the
# clean label for 0.973-0.997 of the flipped samples. Each bound sits below the lowest.
MIN_MARGIN_AUROC, MIN_AUROC, MIN_PRECISION, MIN_RECALL, MIN_SUGGESTED = 0.95, 0.93, 0.7, 0.9, 0.95


@pytest.fixture(scope="module")
def digits() -> Tuple[L.Trainer, DigitsCNN, Tensor, Tensor, Tensor]:
    """An ALR model trained on the digits with 30% of its labels flipped, on batches that carry the samples' indices
    (so that the callback keeps their margins): ``(trainer, model, x, y_given, y_clean)``."""
    x, given, _, _ = load_digits_split(NOISE, seed=0)
    clean = load_digits_split()[1]
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=EPOCHS, callbacks=[AdaLabel()], deterministic=False))
    model = DigitsCNN()
    loader = DataLoader(IndexedDataset(TensorDataset(x, given)), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    trainer.fit(model, loader)
    return trainer, model, x, given, clean


def unshuffled(x: Tensor, y: Tensor, batch_size: int = 250) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.mark.slow  # the digits fixture trains a CNN for 5 epochs (10 s on 2 cores)
def test_one_alr_run_ranks_the_flipped_digits_labels_first(digits):
    trainer, model, x, given, clean = digits
    found = find_label_issues(model, unshuffled(x, given), trainer)
    assert found.index.tolist() == list(range(len(x))) and torch.equal(found.given, given)
    flipped = given != clean
    assert binary_auroc(-found.margin, flipped.long()) > MIN_MARGIN_AUROC
    assert binary_auroc(1 - found.score, flipped.long()) > MIN_AUROC
    assert found.cut_off == "margin" and torch.equal(found.is_issue, found.margin < 0)
    precision = flipped[found.is_issue].float().mean()
    recall = found.is_issue[flipped].float().mean()
    assert precision > MIN_PRECISION and recall > MIN_RECALL, (precision, recall)
    assert (found.suggested == clean)[flipped].float().mean() > MIN_SUGGESTED
    assert (found.suggested != given).all()  # the suggestion is another class: the given one is what is doubted
    # Ranked by ascending margin; the issues are the flagged entries, in rank order.
    assert found.ranked_by == "margin" and torch.all(found.margin[found.ranking].diff() >= 0)
    assert found.issues.tolist() == [entry for entry in found.ranking.tolist() if found.is_issue[entry]]
    assert found.probabilities is None  # O(N) unless asked for


def test_scores_are_the_models_probabilities_of_the_given_labels(tmp_path):
    """A module trained without indices: ranked by the final model's probabilities, flagged where it predicts
    another class."""
    torch.manual_seed(0)
    model, loader = TinyClassifier(), make_loader(num_samples=100, batch_size=32)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel()]))
    trainer.fit(model, loader)
    found = find_label_issues(model, loader, trainer, keep_probabilities=True)
    x, given = loader.dataset.tensors
    with torch.no_grad():
        expected = model.eval()(x).softmax(dim=1)
    torch.testing.assert_close(found.probabilities, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found.score, expected.gather(1, given[:, None]).squeeze(1), rtol=1e-5, atol=1e-6)
    assert found.margin is None and found.ranked_by == "score" and found.cut_off == "misclassified"
    assert torch.equal(found.is_issue, expected.argmax(dim=1) != given) and found.is_issue.any()
    path = tmp_path / "issues.csv"
    assert found.to_csv(path, only_issues=True) == int(found.is_issue.sum())
    lines = path.read_text().splitlines()
    assert lines[0] == "index,given,suggested,score,is_issue"
    scores = [float(line.split(",")[3]) for line in lines[1:]]
    assert scores == sorted(scores)


@pytest.mark.slow  # the digits fixture
def test_the_cleanlab_cut_off_is_cleanlabs_rule_on_the_models_probabilities(digits):
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    trainer, model, x, given, _ = digits
    found = find_label_issues(model, unshuffled(x, given), trainer, cut_off="cleanlab")
    with torch.no_grad():
        expected = model.eval()(x).softmax(dim=1)
    torch.testing.assert_close(found.probabilities, expected, rtol=1e-5, atol=1e-6)
    flags = cleanlab_filter.find_label_issues(given.numpy(), expected.double().numpy())
    assert found.is_issue.tolist() == flags.tolist() and found.ranked_by == "margin"


def test_the_suggestion_weights_the_given_class_row_of_q():
    q = learned_matrix(num_classes=5)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[AdaLabel(preset="fixed", initial_matrix=q)]))
    model, loader = TinyClassifier(lr=0.0), make_loader(num_samples=64)
    trainer.fit(model, loader)  # lr 0: the initial weights; the fixed preset keeps Q
    found = find_label_issues(model, loader, trainer)
    x, given = loader.dataset.tensors
    with torch.no_grad():
        probabilities = model(x).softmax(dim=1)
    weighted = probabilities * (q[given] + 1 / 4)  # half Q's row, half the uniform row 1 / (K - 1)
    expected = weighted.scatter(1, given[:, None], -1.0).argmax(dim=1)
    assert torch.equal(found.suggested, expected)
    assert not torch.equal(expected, probabilities.scatter(1, given[:, None], -1.0).argmax(dim=1))  # Q changed some


class TokenTagger(AdaLabelMixin, L.LightningModule):
    """Logits ``(N, K, T)`` for inputs ``(N, T, F)``: the token layout of ``F.cross_entropy``."""

    def __init__(self, features: int = 6, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).movedim(-1, 1)


def test_token_layouts_give_one_entry_per_labelled_position():
    torch.manual_seed(0)
    x, target = torch.randn(10, 7, 6), torch.randint(0, 4, (10, 7))
    target[:, 5:] = -100  # padding
    target[3, 0] = -100
    model = TokenTagger()
    found = find_label_issues(model, unshuffled(x, target, batch_size=3), L.Trainer(**trainer_kwargs()))
    labelled = (target != -100).nonzero()
    assert found.index.tolist() == labelled[:, 0].tolist() and found.position.tolist() == labelled[:, 1].tolist()
    with torch.no_grad():
        probabilities = model(x).softmax(dim=1)
    expected = probabilities[labelled[:, 0], target[labelled[:, 0], labelled[:, 1]], labelled[:, 1]]
    torch.testing.assert_close(found.score, expected)


def test_precision_comes_from_the_trainer():
    model, loader = TinyClassifier(), make_loader(num_samples=40)
    full = find_label_issues(model, loader, L.Trainer(**trainer_kwargs()))
    half = find_label_issues(model, loader, precision="bf16-mixed", **trainer_kwargs())
    torch.testing.assert_close(half.score, full.score, atol=2e-2, rtol=0)
    assert not torch.equal(half.score, full.score)  # bfloat16 logits: the pass did run under autocast


SIXTY_FOUR = make_loader(num_samples=64).dataset


class Stream(IterableDataset):
    def __iter__(self):
        return iter([(torch.randn(8), torch.tensor(0))] * 8)


class Buckets:
    """A batch sampler of its own, without a ``sampler`` attribute (as a bucketing sampler has none)."""

    def __init__(self, batches: List[List[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PlainClassifier(L.LightningModule):
    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize(
    "model, loader, match",
    [
        (PlainClassifier(), make_loader(), "needs a LightningModule that inherits AdaLabelMixin"),
        (TinyClassifier(), DataLoader(TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long)),
                                      shuffle=True), "got a shuffled DataLoader"),
        (TinyClassifier(), DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4),
         "a list of 1 without a label tensor"),
        (TinyClassifier(), DataLoader(TensorDataset(torch.randn(8, 8), torch.full((8,), 5)), batch_size=4),
         r"8 targets are neither a class index in \[0, 5\) nor ignore_index=-100"),
        (TinyClassifier(), DataLoader(TensorDataset(torch.randn(8, 8), torch.full((8, 5), 0.2)), batch_size=4),
         "needs the given labels as class indices"),
        (TinyClassifier(), [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))], "takes a torch DataLoader"),
        (TinyClassifier(), DataLoader(SIXTY_FOUR, sampler=WeightedRandomSampler(torch.ones(64), 64)),
         r"got a shuffled DataLoader \(its sampler is a WeightedRandomSampler\)"),
        (TinyClassifier(), DataLoader(SIXTY_FOUR, sampler=SubsetRandomSampler(range(8))),
         r"its sampler is a SubsetRandomSampler"),
        (TinyClassifier(), DataLoader(SIXTY_FOUR, sampler=DistributedSampler(
            SIXTY_FOUR, num_replicas=1, rank=0)), r"its sampler is a DistributedSampler"),
        (TinyClassifier(), DataLoader(Stream(), batch_size=4),
         "needs a map-style data set.*Stream is an IterableDataset"),
        (TinyClassifier(), DataLoader(SIXTY_FOUR, batch_size=None), r"batching turned off"),
        (TinyClassifier(), DataLoader(SIXTY_FOUR, batch_size=8, sampler=range(0, 64, 2)),
         r"saw 32 of the data set's 64 samples: the loader's sampler \(range\) leaves 32 out"),
        (TinyClassifier(), DataLoader(SIXTY_FOUR, batch_sampler=Buckets([[0, 1], [2, 3], [2, 3]])),
         r"saw 4 of the data set's 64 samples: the loader's sampler \(Buckets\) leaves 60 out"),
    ],
    ids=["no mixin", "shuffled", "no labels", "not a class", "probability targets", "not a DataLoader",
         "weighted sampler", "random subset", "distributed, shuffled", "iterable data set", "batching off",
         "a sampler that skips samples", "a batch sampler that skips samples"],
)
def test_inputs_it_cannot_use_get_a_one_line_error(model: Any, loader: Any, match: str):
    with pytest.raises((TypeError, ValueError), match=match) as error:
        find_label_issues(model, loader, L.Trainer(**trainer_kwargs()))
    assert "\n" not in str(error.value)


def test_every_sample_once_from_any_sampler_or_on_purpose_fewer():
    """A loader that visits every sample once is ranked whole, whatever its sampler; fewer samples than the data set
    are refused after the pass (see the errors above) unless the Trainer limits the pass."""
    model, dataset = TinyClassifier(), SIXTY_FOUR
    uneven = Buckets([[0, 1, 2], [3], list(range(4, 64))])
    found = find_label_issues(model, DataLoader(dataset, batch_sampler=uneven), **trainer_kwargs())
    assert found.index.tolist() == list(range(64))
    found = find_label_issues(model, DataLoader(dataset, batch_size=8), **trainer_kwargs(limit_predict_batches=0.5))
    assert found.index.tolist() == list(range(32))


@pytest.mark.slow
def test_two_ddp_processes_rank_as_one_process(ddp_launch):
    """``ddp_label_issues.run`` in the session's 2-process DDP launch (``ddp_launch.py``) against one process."""
    from tests.scripts.ddp_label_issues import NUM_SAMPLES, run

    single = run(devices=1)
    assert single["index"].tolist() == list(range(NUM_SAMPLES))
    for rank in (0, 1):
        ddp = torch.load(ddp_launch / f"label_issues-find-rank{rank}.pt", weights_only=False)
        assert set(ddp) == set(single)
        for name, value in single.items():
            if name == "score" or name == "probabilities":
                torch.testing.assert_close(ddp[name], value)
            elif isinstance(value, Tensor):
                assert torch.equal(ddp[name], value), name
            else:
                assert ddp[name] == value, name
    assert isinstance(LabelIssues(**single), LabelIssues)


@pytest.mark.slow
def test_two_ddp_processes_keep_the_margins_of_every_processs_training_steps(ddp_launch):
    """``ddp_label_issues.run_indexed`` in the session's DDP launch: each rank trained on its shard; both hold the
    margins of both ranks' steps, averaged per sample, and rank by them."""
    from tests.scripts.ddp_label_issues import NUM_SAMPLES

    ranks = [torch.load(ddp_launch / f"label_issues-indexed-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    expected = reference_means(ranks[0]["records"] + ranks[1]["records"], NUM_SAMPLES)
    assert expected.isfinite().all()  # every sample was trained on
    for rank in ranks:
        found = rank["found"]
        assert found["cut_off"] == "margin"
        torch.testing.assert_close(found["margin"], expected)
        assert torch.equal(found["ranking"], ranks[0]["found"]["ranking"])
        assert torch.equal(found["is_issue"], expected < 0)
    # A checkpoint written in mid-epoch holds rank 0's sums of the open epoch (the other ranks' are not saved), once:
    # every process restores them, and each must count them once across the processes, not once per process.
    stopped = [rank["mid_epoch"] for rank in ranks]
    assert torch.equal(stopped[0]["total"], stopped[1]["total"]) and stopped[1]["epoch_count"].sum() > 0
    total = stopped[0]["total"] + stopped[0]["epoch_total"]
    count = stopped[0]["count"] + stopped[0]["epoch_count"]
    for rank in stopped:
        torch.testing.assert_close(rank["margin"], total / count)


@pytest.mark.slow
def test_the_benchmark_runs_and_tabulates_at_toy_size(tmp_path, capsys):
    pytest.importorskip("cleanlab")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "label_issues.py"
    code = run_script_main(script, ["--task", "digits", "--seeds", "1", "--epochs", "1", "--folds", "5", "--settings",
                                    "flip-20", "--methods", "alr", "cleanlab", "--out", str(tmp_path)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-2000:]
    runs = (tmp_path / "runs.csv").read_text().splitlines()
    assert runs[0].startswith("task,setting,method,seed,margin_auroc,auroc,margin_precision") and len(runs) == 3
    assert "| alr (in-sample) | 1 | 1 |" in stdout
    assert "| cleanlab's recipe: CE, out-of-sample | 5 | 1 |" in stdout


@pytest.mark.slow  # the digits fixture
def test_the_top_suspects_reach_tensorboard_or_a_csv_file(digits, tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, model, x, given, _ = digits
    loader = unshuffled(x, given)
    logger = TensorBoardLogger(tmp_path, name="tb")
    found = find_label_issues(model, loader, log_top=5, **trainer_kwargs(logger=logger))
    logger.experiment.flush()
    (text,) = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0}).Reload().Tensors(
        "adalabel/label_issues/text_summary")
    table = text.tensor_proto.string_val[0].decode().splitlines()
    first = int(found.issues[0])
    assert len(table) == 2 + 5 and table[2].startswith(f"| {int(found.index[first])} | 0 | {int(found.given[first])} |")

    logger = CSVLogger(tmp_path, name="csv")
    find_label_issues(model, loader, log_top=3, **trainer_kwargs(logger=logger))
    rows = (Path(logger.log_dir) / "label_issues" / "top_suspects.csv").read_text().splitlines()
    assert rows[0] == "index,position,given,suggested,score" and len(rows) == 1 + 3
    assert rows[1].startswith(f"{int(found.index[first])},0,{int(found.given[first])},")
