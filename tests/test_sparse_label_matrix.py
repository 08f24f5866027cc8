"""The sparse engine against the dense one: exact with ``top_k = K - 1``, the dense refresh truncated to the top k
otherwise, and losses and gradients equal to the dense losses on the densified matrix."""

import pytest
import torch
import torch.nn.functional as F

from lightning_adalabel.label_matrix import LabelMatrix
from lightning_adalabel.losses import adalabel_loss
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix, _coalesce_top
from tests.references import naive_loss, random_batches

NUM_CLASSES = 6

# (samples, estimator, momentum, include_diagonal, prior, prior_strength, start, empty_rows)
SETTINGS = [
    ("misclassified", "mean", 1.0, False, "uniform", 0.0, "uniform", "keep"),
    ("all", "mean", 0.3, False, "uniform", 0.0, "uniform", "keep"),
    ("correct", "mean", 1.0, True, "uniform", 0.0, "zeros", "uniform"),
    ("all", "mean", 0.5, True, "previous", 0.5, "uniform", "keep"),
    ("misclassified", "mean", 0.7, False, "uniform", 2.0, "uniform", "uniform"),
    ("misclassified", "confusion", 1.0, False, "previous", 0.3, "uniform", "keep"),
    ("all", "confusion", 0.3, True, "uniform", 0.0, "uniform", "keep"),
]


def engines(setting, top_k):
    samples, estimator, momentum, include_diagonal, prior, prior_strength, start, empty_rows = setting
    config = dict(samples=samples, estimator=estimator, momentum=momentum, include_diagonal=include_diagonal,
                  prior=prior, prior_strength=prior_strength, start=start, empty_rows=empty_rows)
    return LabelMatrix(NUM_CLASSES, **config), SparseLabelMatrix(NUM_CLASSES, top_k, **config)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_top_k_of_all_classes_reproduces_the_dense_engine(setting):
    dense, sparse = engines(setting, top_k=NUM_CLASSES)  # clamped to the row's K - 1 (or K) classes
    # Three refreshes; classes 4 and 5 are absent from the first (their rows are kept or reset).
    for refresh, present in enumerate([[0, 1, 2, 3], None, None]):
        for logits, target in random_batches(NUM_CLASSES, seed=refresh, present=present):
            target = target.clone()
            target[0] = -100  # ignored: neither loss nor statistics
            dense.update(logits, target)
            sparse.update(logits, target)
        torch.testing.assert_close(sparse.tallies, dense.tallies)
        torch.testing.assert_close(sparse.refresh(), dense.refresh())
        torch.testing.assert_close(sparse.to_dense(), dense.matrix, atol=1e-6, rtol=1e-5)
    assert sparse.num_refreshes == 3


def test_small_top_k_keeps_the_dense_rows_largest_entries_and_their_mass_as_uniform():
    """With every statistic kept, one refresh from the uniform start is the dense refresh truncated: each row keeps
    its k largest entries, the rest of its mass spread uniformly over its other classes."""
    top_k = 2
    dense, sparse = LabelMatrix(NUM_CLASSES, samples="all"), SparseLabelMatrix(
        NUM_CLASSES, top_k, samples="all", statistics_top_k=NUM_CLASSES - 1, candidates=NUM_CLASSES - 1)
    for logits, target in random_batches(NUM_CLASSES, seed=3):
        dense.update(logits, target)
        sparse.update(logits, target)
    dense.refresh(), sparse.refresh()
    expected = torch.zeros(NUM_CLASSES, NUM_CLASSES)
    for k, row in enumerate(dense.matrix):
        kept = row.topk(top_k)
        rest = 1.0 - kept.values.sum()
        expected[k] = rest / (NUM_CLASSES - 1)
        expected[k, k] = 0.0
        expected[k, kept.indices] += kept.values
    torch.testing.assert_close(sparse.to_dense(), expected)
    torch.testing.assert_close(sparse.to_dense().sum(dim=1), torch.ones(NUM_CLASSES))


def test_statistics_conserve_every_samples_mass():
    """Whatever the bounded statistics drop (mass outside a sample's top entries, candidates outside a row's table)
    is kept as uniform mass: per class, the kept and the uniform mass add up to the number of counted samples."""
    sparse = SparseLabelMatrix(40, top_k=2, samples="all", statistics_top_k=2, candidates=3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        sparse.update(torch.randn(64, 40, generator=generator), torch.randint(0, 8, (64,), generator=generator))
    total = sparse.candidate_values[:40].sum(dim=1) + sparse.uniform_sums[:40]
    torch.testing.assert_close(total, sparse.counts)
    assert sparse.counts[:8].min() > 3  # several samples per row: candidates were dropped
    assert (sparse.candidate_indices[:8] != torch.arange(8)[:, None]).all()  # full rows, no own class


def test_coalesce_top_sums_duplicates_and_keeps_the_largest():
    rows = torch.tensor([0, 0, 0, 0, 1, 2])  # row 2 is the spare row (num_rows=2): discarded
    columns = torch.tensor([3, 1, 3, 2, 0, 1])
    values = torch.tensor([0.25, 0.375, 0.25, 0.125, 1.0, 9.0])
    indices, kept, dropped = _coalesce_top(rows, columns, values, 2, 2, 4, fill=torch.tensor([0, 1]))
    assert indices.tolist() == [[3, 1], [0, 1]]
    assert kept.tolist() == [[0.5, 0.375], [1.0, 0.0]]
    assert dropped.tolist() == [0.125, 0.0]


def densified(seed=0, include_diagonal=False):
    """A learned sparse matrix (top_k=2 of 7 classes) and its dense form."""
    sparse = SparseLabelMatrix(7, 2, samples="all", include_diagonal=include_diagonal, momentum=0.6)
    for logits, target in random_batches(7, seed=seed):
        sparse.update(logits, target)
    sparse.refresh()
    return sparse, sparse.to_dense()


@pytest.mark.parametrize("mode, include_diagonal", [("decoupled", False), ("mixed", False), ("mixed", True),
                                                    ("ce", False)])
@pytest.mark.parametrize("targets", ["indices", "spatial", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradient_equal_the_dense_loss_on_the_densified_matrix(mode, include_diagonal, targets,
                                                                           reduction):
    sparse, matrix = densified(include_diagonal=include_diagonal)
    generator = torch.Generator().manual_seed(1)
    if targets == "probabilities":
        logits = 3 * torch.randn(9, 7, generator=generator)
        target = torch.softmax(2 * torch.randn(9, 7, generator=generator), dim=1)
        target[2] = 0.0  # padding
    else:
        shape = (9,) if targets == "indices" else (3, 4)
        logits = 3 * torch.randn(shape[0], 7, *shape[1:], generator=generator)
        target = torch.randint(0, 7, shape, generator=generator)
        target.view(-1)[1] = -100
    logits.requires_grad_(True)
    value, _ = sparse.loss(logits, target, mode, alpha=0.4, reduction=reduction)
    (value.sum()).backward()
    grad, logits.grad = logits.grad, None
    expected = adalabel_loss(logits, target, matrix, mode, 0.4, reduction=reduction)
    expected.sum().backward()
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=1e-5)
    if reduction != "none":  # and both against the naive reference, one position at a time
        assert value.item() == pytest.approx(naive_loss(logits.detach(), target, matrix, mode, 0.4,
                                                        reduction=reduction), rel=1e-5, abs=1e-6)


def test_invalid_targets_make_the_loss_nan_and_are_counted_like_the_dense_engine():
    sparse, matrix = densified()
    dense = LabelMatrix(7, samples="all")
    logits, target = torch.randn(4, 7, requires_grad=True), torch.tensor([1, 9, 2, -100])
    value, statistics = sparse.loss(logits, target, "decoupled", 1.0)
    assert value.isnan()
    value.backward()
    assert torch.isfinite(logits.grad).all()
    sparse.reset_statistics()
    sparse.add(statistics)
    dense.update(logits.detach(), target)
    torch.testing.assert_close(sparse.tallies, dense.tallies)
    assert sparse.invalid.sum() == 1 and sparse.seen.sum() == 2


def test_non_finite_logits_are_left_out_and_counted():
    sparse = SparseLabelMatrix(5, 2, samples="all")
    logits = torch.randn(3, 5)
    logits[1, 2] = float("nan")
    sparse.update(logits, torch.tensor([0, 1, 1]))
    assert sparse.nonfinite.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert sparse.counts.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    sparse.refresh()
    assert torch.isfinite(sparse.values).all() and torch.isfinite(sparse.residual_mass).all()


@pytest.mark.slow  # batches of 300,000 logits
def test_three_hundred_thousand_classes_never_build_a_k_by_k_tensor():
    """K = 300,000: a dense Q would be 360 GB, far beyond this machine; loss, statistics, refresh and state run."""
    num_classes = 300_000
    sparse = SparseLabelMatrix(num_classes, top_k=4)
    logits = torch.randn(8, num_classes, requires_grad=True)
    target = torch.arange(8) * 1000
    value, statistics = sparse.loss(logits, target)
    value.backward()
    sparse.add(statistics)
    sparse.refresh()
    state = sparse.state_dict()
    # O(K (k + c)): Q's k indices and values, the c candidates' classes and sums, 6 numbers per class.
    top_k, candidates = sparse.top_k, sparse.candidates
    assert sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)) == num_classes * (
        2 * top_k + 2 * candidates + 6)
    assert (sparse.indices[1000] != 1000).all() and sparse.values[1000].sum() > 0


def test_state_dict_round_trip_and_clear_errors():
    sparse, _ = densified()
    for logits, target in random_batches(7, seed=5):
        sparse.update(logits, target)
    restored = SparseLabelMatrix(7, 2, samples="all", momentum=0.6)
    restored.load_state_dict(sparse.state_dict())
    for key, value in sparse.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]) if isinstance(value, torch.Tensor) else \
            value == restored.state_dict()[key]
    with pytest.raises(ValueError, match="different configuration: top_k=2 .this one has 3"):
        SparseLabelMatrix(7, 3, samples="all", momentum=0.6).load_state_dict(sparse.state_dict())
    broken = {**sparse.state_dict(), "values": sparse.values * 2}
    with pytest.raises(ValueError, match="rows that do not sum to 1"):
        restored.load_state_dict(broken)
    with pytest.raises(ValueError, match="not written by SparseLabelMatrix"):
        restored.load_state_dict(LabelMatrix(7).state_dict())


def test_geometric_estimator_is_refused():
    with pytest.raises(ValueError, match="'geometric' estimator .* no sparse form"):
        SparseLabelMatrix(5, 2, estimator="geometric")


def test_one_hot_probability_targets_equal_class_indices():
    sparse, _ = densified()
    logits, target = torch.randn(6, 7), torch.arange(6)
    for mode in ("decoupled", "mixed"):
        torch.testing.assert_close(sparse.loss(logits, F.one_hot(target, 7).float(), mode, 0.3)[0],
                                   sparse.loss(logits, target, mode, 0.3)[0])


@pytest.mark.parametrize("mode", ["decoupled", "mixed"])
def test_bf16_autocast_computes_in_float32(mode):
    sparse, _ = densified()
    logits = (3 * torch.randn(8, 7)).bfloat16()
    target = torch.randint(0, 7, (8,))
    probabilities = torch.softmax(torch.randn(8, 7), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [sparse.loss(logits, target, mode, 0.4)[0], sparse.loss(logits, probabilities, mode, 0.4)[0]]
    expected = [sparse.loss(logits.float(), target, mode, 0.4)[0],
                sparse.loss(logits.float(), probabilities, mode, 0.4)[0]]
    for value, want in zip(values, expected):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, want)


def test_batch_merge_matches_a_naive_per_row_merge():
    """The candidate table after several batches against dictionaries merged one class at a time: each batch's
    entries are added to the row's candidates, the row keeps its ``candidates`` largest sums, the rest is uniform."""
    num_classes, top, width = 30, 3, 4
    sparse = SparseLabelMatrix(num_classes, top_k=2, samples="all", statistics_top_k=top, candidates=width)
    rows = [dict() for _ in range(num_classes)]
    uniform = [0.0] * num_classes
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        logits, target = 2 * torch.randn(40, num_classes, generator=generator), torch.randint(0, 6, (40,),
                                                                                            generator=generator)
        sparse.update(logits, target)
        probs = logits.double().scatter(1, target[:, None], float("-inf")).softmax(dim=1)
        for k in target.unique().tolist():
            for p in probs[target == k]:
                values, columns = p.topk(top)
                for value, column in zip(values.tolist(), columns.tolist()):
                    rows[k][column] = rows[k].get(column, 0.0) + value
                uniform[k] += 1.0 - values.sum().item()
            ranked = sorted(rows[k].items(), key=lambda item: -item[1])
            rows[k] = dict(ranked[:width])
            uniform[k] += sum(value for _, value in ranked[width:])
    for k in range(num_classes):
        got = {column: value for column, value in zip(sparse.candidate_indices[k].tolist(),
                                                       sparse.candidate_values[k].tolist()) if value > 0}
        assert set(got) == set(rows[k]), k
        for column, value in rows[k].items():
            assert got[column] == pytest.approx(value, rel=1e-5)
        assert sparse.uniform_sums[k].item() == pytest.approx(uniform[k], rel=1e-5, abs=1e-5)
    assert sum(len(row) for row in rows) == 6 * width  # the rows are full: candidates were dropped
