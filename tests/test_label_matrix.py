"""The engine against a naive per-sample, per-class reference written with Python loops and the math module."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from tests.references import naive_refresh, random_batches

SAMPLE_POLICIES = ("misclassified", "all", "correct")
ESTIMATORS = ("mean", "geometric", "confusion")


@pytest.mark.parametrize(
    "samples, estimator, momentum, include_diagonal",
    list(itertools.product(SAMPLE_POLICIES, ESTIMATORS, (1.0, 0.3), (False, True))),
)
@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "ties"])
def test_refresh_matches_naive_reference(samples, estimator, momentum, include_diagonal, tied):
    num_classes = 6
    engine = LabelMatrix(num_classes, samples, estimator, momentum, include_diagonal)
    # Two refreshes: the second starts from a learned (non-uniform) Q; classes 4 and 5 never appear in the first.
    for refresh, present in enumerate([[0, 1, 2, 3], None]):
        batches = random_batches(num_classes, seed=refresh, tied=tied, present=present)
        expected, counts = naive_refresh(engine.matrix.double(), batches, samples, estimator, momentum,
                                         include_diagonal)
        for logits, target in batches:
            engine.update(logits, target)
        assert engine.counts.tolist() == counts
        engine.refresh()
        torch.testing.assert_close(engine.matrix.double(), expected, atol=1e-5, rtol=1e-5)
        assert engine.counts.sum() == 0 and engine.sums.abs().sum() == 0


@pytest.mark.parametrize(
    "samples, estimator, momentum, include_diagonal",
    [("misclassified", "mean", 1.0, False), ("misclassified", "geometric", 0.3, False), ("all", "mean", 0.3, True),
     ("correct", "geometric", 1.0, True), ("misclassified", "confusion", 1.0, False), ("all", "confusion", 0.3, True)],
)
@pytest.mark.parametrize("prior", ["uniform", "previous"])
@pytest.mark.parametrize("prior_strength", [0.05, 0.5, 3.0])
def test_count_aware_refresh_matches_naive_reference(samples, estimator, momentum, include_diagonal, prior,
                                                     prior_strength):
    num_classes = 6
    engine = LabelMatrix(num_classes, samples, estimator, momentum, include_diagonal, prior=prior,
                         prior_strength=prior_strength)
    for refresh, present in enumerate([[0, 1, 2, 3], None]):  # the second refresh starts from a learned Q
        batches = random_batches(num_classes, seed=refresh, present=present)
        expected, _ = naive_refresh(engine.matrix.double(), batches, samples, estimator, momentum, include_diagonal,
                                    prior, prior_strength)
        for logits, target in batches:
            engine.update(logits, target)
        engine.refresh()
        torch.testing.assert_close(engine.matrix.double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(engine.matrix.sum(dim=1), torch.ones(num_classes))
        if not include_diagonal:
            assert (engine.matrix.diagonal() == 0).all()


def test_the_prior_weighs_in_proportion_to_the_samples_seen():
    """Same statistics, more clean samples of the class: the row stays closer to the prior, in proportion."""
    logits = torch.tensor([[0.0, 4.0, 0.0]])  # one misclassified sample of class 0, confident in class 1
    rows = []
    for clean in (1, 10):
        engine = LabelMatrix(3, prior="uniform", prior_strength=1.0)
        engine.update(torch.cat([logits, torch.tensor([[9.0, 0.0, 0.0]]).repeat(clean, 1)]),
                      torch.zeros(clean + 1, dtype=torch.long))
        engine.refresh()
        rows.append(engine.matrix[0])
    distance = [(row - initial_label_matrix(3)[0]).abs().sum() for row in rows]
    # The estimate's distance from the prior is n / (n + m) of the statistics' own: 1/3 with m = 2, 1/12 with m = 11.
    torch.testing.assert_close(distance[1] / distance[0], torch.tensor(0.25), rtol=1e-4, atol=0)
    unshrunk = LabelMatrix(3)
    unshrunk.update(logits, torch.tensor([0]))
    unshrunk.refresh()
    assert (unshrunk.matrix[0] - initial_label_matrix(3)[0]).abs().sum() > distance[0]


def test_rows_without_samples_keep_their_value():
    engine = LabelMatrix(4, samples="all")
    engine.update(torch.randn(5, 4), torch.tensor([0, 0, 2, 2, 2]))
    engine.refresh()
    initial = initial_label_matrix(4)
    torch.testing.assert_close(engine.matrix[[1, 3]], initial[[1, 3]])
    assert not torch.allclose(engine.matrix[[0, 2]], initial[[0, 2]])


def test_refresh_without_new_statistics_is_idempotent():
    engine = LabelMatrix(5, samples="all", momentum=0.5)
    logits, target = random_batches(5, seed=3, num_batches=1)[0]
    engine.update(logits, target)
    engine.refresh()
    learned = engine.matrix.clone()
    for _ in range(3):
        engine.refresh()
    assert torch.equal(engine.matrix, learned)
    assert engine.num_refreshes == 4


def test_probability_targets_count_under_their_dominant_class():
    logits = torch.randn(6, 4)
    soft = torch.softmax(5 * torch.randn(6, 4), dim=1)
    by_probability, by_index = LabelMatrix(4, samples="all"), LabelMatrix(4, samples="all")
    by_probability.update(logits, soft)
    by_index.update(logits, soft.argmax(dim=1))
    assert torch.equal(by_probability.accumulator, by_index.accumulator)


def test_update_upcasts_low_precision_logits():
    logits, target = random_batches(5, seed=1, num_batches=1)[0]
    low, full = LabelMatrix(5, samples="all"), LabelMatrix(5, samples="all")
    low.update(logits.bfloat16(), target)
    full.update(logits.bfloat16().float(), target)
    assert low.accumulator.dtype == torch.float32
    assert torch.equal(low.accumulator, full.accumulator)


def test_non_finite_rows_are_left_out_and_counted():
    logits = torch.randn(4, 3)
    logits[1, 0] = float("nan")
    logits[3, 2] = float("inf")
    target = torch.tensor([0, 1, 2, 2])
    engine, reference = LabelMatrix(3, samples="all"), LabelMatrix(3, samples="all")
    engine.update(logits, target)
    reference.update(logits[[0, 2]], target[[0, 2]])
    assert engine.nonfinite.tolist() == [0.0, 1.0, 1.0]
    assert engine.seen.tolist() == [1.0, 1.0, 2.0]
    torch.testing.assert_close(engine.sums, reference.sums)
    engine.refresh()
    assert torch.isfinite(engine.matrix).all()


def test_samples_none_never_changes_q():
    engine = LabelMatrix(3, samples="none", include_diagonal=True)
    engine.update(torch.randn(8, 3), torch.randint(0, 3, (8,)))
    engine.refresh()
    assert torch.equal(engine.matrix, torch.full((3, 3), 1 / 3))


@settings(max_examples=40, deadline=None)
@given(
    num_classes=st.integers(2, 7),
    batch_size=st.integers(1, 20),
    samples=st.sampled_from(SAMPLE_POLICIES),
    estimator=st.sampled_from(ESTIMATORS),
    momentum=st.floats(0.01, 1.0),
    include_diagonal=st.booleans(),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_q_stays_a_valid_label_matrix(num_classes, batch_size, samples, estimator, momentum, include_diagonal,
                                      scale, seed):
    generator = torch.Generator().manual_seed(seed)
    engine = LabelMatrix(num_classes, samples, estimator, momentum, include_diagonal)
    for _ in range(3):
        logits = scale * torch.randn(batch_size, num_classes, generator=generator)
        engine.update(logits, torch.randint(0, num_classes, (batch_size,), generator=generator))
        engine.refresh()
        matrix = engine.matrix
        assert torch.isfinite(matrix).all() and (matrix >= 0).all()
        torch.testing.assert_close(matrix.sum(dim=1), torch.ones(num_classes), atol=1e-5, rtol=0)
        if not include_diagonal:
            assert (matrix.diagonal() == 0).all()


def test_state_dict_round_trip_is_exact():
    engine = LabelMatrix(4, samples="all", estimator="geometric", momentum=0.7)
    for logits, target in random_batches(4, seed=5):
        engine.update(logits, target)
    engine.refresh()
    engine.update(*random_batches(4, seed=6, num_batches=1)[0])
    restored = LabelMatrix(4, samples="all", estimator="geometric", momentum=0.7)
    restored.load_state_dict(engine.state_dict())
    assert torch.equal(restored.matrix, engine.matrix)
    assert torch.equal(restored.accumulator, engine.accumulator)
    assert restored.num_refreshes == 1


def test_state_from_another_configuration_is_a_clear_error():
    state = LabelMatrix(4).state_dict()
    with pytest.raises(ValueError, match=r"num_classes=4 \(this one has 5\)"):
        LabelMatrix(5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"samples='misclassified' \(this one has 'all'\)"):
        LabelMatrix(4, samples="all").load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 1}, "`num_classes` must be an integer >= 2"),
        ({"num_classes": 3.0}, "`num_classes` must be an integer >= 2"),
        ({"num_classes": 3, "samples": "wrong"}, "`samples` must be one of"),
        ({"num_classes": 3, "estimator": "median"}, "`estimator` must be one of"),
        ({"num_classes": 3, "momentum": 0.0}, r"`momentum` must be a finite number in \(0.0, 1.0\]"),
        ({"num_classes": 3, "momentum": 1.5}, r"`momentum` must be a finite number in \(0.0, 1.0\]"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LabelMatrix(**kwargs)


@pytest.mark.parametrize(
    "logits, target, message",
    [
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), r"Expected logits with num_classes=3 on dim 1"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long),
         r"targets for logits of shape \(4, 3\) must have shape \(4,\)"),
        (torch.randn(4, 3), torch.rand(4, 2), "Probability targets must have the logits' shape"),
    ],
)
def test_badly_shaped_batch_is_a_clear_error(logits, target, message):
    with pytest.raises(ValueError, match=message):
        LabelMatrix(3).update(logits, target)


@pytest.mark.parametrize("empty_rows", ["keep", "uniform"])
def test_a_row_without_samples_is_kept_or_reset_to_uniform(empty_rows):
    engine = LabelMatrix(4, samples="all", include_diagonal=True, empty_rows=empty_rows)
    engine.update(3 * torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    engine.refresh()
    learned = engine.matrix.clone()
    engine.update(torch.randn(2, 4), torch.tensor([0, 1]))  # classes 2 and 3 get no sample this time
    engine.refresh()
    expected = learned[[2, 3]] if empty_rows == "keep" else torch.full((2, 4), 0.25)
    torch.testing.assert_close(engine.matrix[[2, 3]], expected)


def test_a_matrix_that_starts_from_zeros_resumes_and_others_refuse_zero_rows():
    engine = LabelMatrix(3, samples="all", include_diagonal=True, start="zeros")
    assert torch.equal(engine.matrix, torch.zeros(3, 3))
    restored = LabelMatrix(3, samples="all", include_diagonal=True, start="zeros")
    restored.load_state_dict(engine.state_dict())  # all-zero rows are valid before its first refresh
    assert torch.equal(restored.matrix, engine.matrix)
    state = LabelMatrix(3, samples="all", include_diagonal=True).state_dict()
    state["matrix"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="must sum to 1"):
        LabelMatrix(3, samples="all", include_diagonal=True).load_state_dict(state)
    with pytest.raises(ValueError, match="exclude each other"):
        LabelMatrix(3, start="zeros", initial_matrix=initial_label_matrix(3))
