"""The one-softmax loss (lightning_adalabel/fused.py) against the straightforward one it replaced on the per-batch
path: values, gradients (and gradcheck in float64), the statistic it hands the engine, extreme logits, low
precision, and the engine's fused path against the engine fed by hand."""

import pytest
import torch

from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.fused import _SMALL_NUM_CLASSES, fused_soft_label_loss
from lightning_adalabel.inputs import _format
from lightning_adalabel.label_matrix import residual_prediction_stats, select_samples
from lightning_adalabel.losses import _straightforward_per_sample
from tests.references import random_residual_matrix

# Both softmax paths: written out below _SMALL_NUM_CLASSES, torch's kernel from there on.
NUM_CLASSES = [2, 7, _SMALL_NUM_CLASSES + 3]
MODES = ["decoupled", "mixed"]


def label_matrix_for(mode, num_classes, seed=0, dtype=torch.float32):
    return random_residual_matrix(num_classes, seed, dtype, include_diagonal=mode == "mixed")


def batch(num_classes, seed=0, scale=3.0, dtype=torch.float32, size=13):
    generator = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(size, num_classes, generator=generator)).to(dtype)
    return logits, torch.randint(0, num_classes, (size,), generator=generator)


def reference(logits, target, matrix, mode, alpha):
    """Per-row loss and gradient of the straightforward implementation (autograd through the formulas)."""
    logits = logits.detach().clone().requires_grad_()
    per_row = _straightforward_per_sample(_format(logits, target), matrix, mode, alpha)
    (gradient,) = torch.autograd.grad(per_row, logits, torch.linspace(0.5, 1.5, len(target), dtype=per_row.dtype))
    return per_row.detach(), gradient


def fused(logits, target, matrix, mode, alpha, samples="correct"):
    """Per-row loss, its gradient, ``P``, and which rows are counted (with ``samples="correct"``: predicted right)
    and which have finite logits."""
    logits = logits.detach().clone().requires_grad_()
    per_row, probs, destination, counts = fused_soft_label_loss(
        _format(logits, target), matrix, mode == "decoupled", alpha, "none", samples
    )
    (gradient,) = torch.autograd.grad(per_row, logits, torch.linspace(0.5, 1.5, len(target), dtype=per_row.dtype))
    counted, finite = counts[:, 0].bool(), ~counts[:, 2].bool()
    assert torch.equal(destination, torch.where(counted, target, logits.shape[1]))
    return per_row.detach(), gradient, probs, counted, finite


@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_and_gradient_match_the_straightforward_implementation(num_classes, mode, alpha):
    logits, target = batch(num_classes)
    matrix = label_matrix_for(mode, num_classes)
    expected_loss, expected_gradient = reference(logits, target, matrix, mode, alpha)
    loss, gradient, *_ = fused(logits, target, matrix, mode, alpha)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_an_all_zero_label_matrix_row_gives_no_soft_loss(mode):
    """start="zeros" (the official OLS): rows stay zero until their first refresh."""
    logits, target = batch(5)
    matrix = label_matrix_for(mode, 5)
    matrix[target[0]] = 0.0
    loss, gradient, *_ = fused(logits, target, matrix, mode, 0.5)
    expected_loss, expected_gradient = reference(logits, target, matrix, mode, 0.5)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(gradient, expected_gradient)


@pytest.mark.parametrize(
    "num_classes", [3, pytest.param(_SMALL_NUM_CLASSES + 1, marks=pytest.mark.slow)]  # gradcheck of a 65-class batch
)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_in_float64(num_classes, mode):
    logits, target = batch(num_classes, size=4, dtype=torch.float64)
    matrix = label_matrix_for(mode, num_classes, dtype=torch.float64)

    def loss(logits):
        return fused_soft_label_loss(_format(logits, target), matrix, mode == "decoupled", 0.7, "none")[0]

    assert torch.autograd.gradcheck(loss, (logits.requires_grad_(),))


@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("mode", MODES)
def test_the_probabilities_are_the_engines_statistic_and_correct_is_the_selection_rule(num_classes, mode):
    logits, target = batch(num_classes, seed=3)
    logits[0] = 0.0  # a tie between the true class and the others counts as predicted right
    _, _, probs, correct, finite = fused(logits, target, label_matrix_for(mode, num_classes), mode, 1.0)
    expected = residual_prediction_stats(logits, target, include_diagonal=mode == "mixed", estimator="mean")
    torch.testing.assert_close(probs, expected)
    assert torch.equal(correct, select_samples(logits, target, "correct"))
    assert bool(correct[0]) and bool(finite.all())


@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("mode", MODES)
def test_logits_of_1e4_give_finite_losses_gradients_and_distributions(num_classes, mode):
    logits, target = batch(num_classes, seed=4, scale=1e4)
    logits[1, target[1]] = logits[1].max() + 1e4  # a huge margin: every wrong class underflows in the full softmax
    matrix = label_matrix_for(mode, num_classes)
    loss, gradient, probs, _, finite = fused(logits, target, matrix, mode, 1.0)
    expected_loss, expected_gradient = reference(logits.double(), target, matrix.double(), mode, 1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(gradient).all() and bool(finite.all())
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(target)))
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(gradient.double(), expected_gradient, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_reductions_ignored_and_invalid_targets_follow_torch(reduction, mode):
    """As F.cross_entropy: ignored rows weigh nothing (mean divides by the others), an invalid row is NaN with a zero
    gradient, and a batch of only ignored rows has a NaN mean."""
    logits, target = batch(5)
    target[3] = -100
    matrix = label_matrix_for(mode, 5)
    logits.requires_grad_()
    formatted = _format(logits, target)
    loss = fused_soft_label_loss(formatted, matrix, mode == "decoupled", 0.5, reduction)[0]
    expected = reference_reduced = _straightforward_per_sample(formatted, matrix, mode, 0.5)
    kept = formatted.valid
    if reduction == "none":
        reference_reduced = torch.where(kept, expected, 0.0)
    else:
        reference_reduced = expected[kept].sum() / (kept.sum() if reduction == "mean" else 1)
    torch.testing.assert_close(loss, reference_reduced)
    gradient, expected_gradient = (torch.autograd.grad(value.sum(), logits)[0] for value in (loss, reference_reduced))
    torch.testing.assert_close(gradient, expected_gradient)
    assert not gradient[3].any()

    target[1] = 9  # invalid
    loss = fused_soft_label_loss(_format(logits, target), matrix, mode == "decoupled", 0.5, reduction)[0]
    assert torch.isnan(loss).any() and (reduction != "none" or torch.isnan(loss).tolist() == [i == 1 for i in range(13)])
    (gradient,) = torch.autograd.grad(loss.nansum() if reduction == "none" else loss, logits)
    assert not gradient[1].any()

    everything_ignored = torch.full_like(target, -100)
    loss = fused_soft_label_loss(_format(logits, everything_ignored), matrix, mode == "decoupled", 0.5, "mean")[0]
    assert torch.isnan(loss)
    assert not torch.autograd.grad(loss, logits)[0].any()


@pytest.mark.parametrize("bad, at_target", [(float("nan"), False), (float("inf"), False), (float("-inf"), True),
                                           (float("nan"), True), (float("inf"), True)])
def test_unusable_logits_are_flagged_row_by_row(bad, at_target):
    logits, target = batch(5)
    logits[2, target[2] if at_target else (target[2] + 1) % 5] = bad
    *_, finite = fused(logits, target, label_matrix_for("decoupled", 5), "decoupled", 1.0)
    assert finite.tolist() == [index != 2 for index in range(len(target))]


@pytest.mark.parametrize("mode", ["decoupled", "mixed"])
def test_minus_inf_at_other_classes_is_a_mask_not_a_bad_row(mode):
    logits, target = batch(5)
    logits[2, (target[2] + 1) % 5] = float("-inf")
    logits[3, [(target[3] + 1) % 5, (target[3] + 2) % 5]] = float("-inf")
    *_, finite = fused(logits, target, label_matrix_for(mode, 5), mode, 0.5)
    assert finite.all()
    logits[4] = float("-inf")  # every class masked: nothing left to predict
    logits[4, target[4]] = 0.0
    *_, finite = fused(logits, target, label_matrix_for(mode, 5), mode, 0.5)
    assert finite.tolist() == [index != 4 or mode == "mixed" for index in range(len(target))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_compute_in_float32_and_get_their_own_dtype_back(dtype):
    logits, target = batch(7, dtype=dtype)
    logits.requires_grad_()
    matrix = label_matrix_for("decoupled", 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, probs, _, _ = fused_soft_label_loss(_format(logits, target), matrix, True, 1.0, "none")
    assert loss.dtype == torch.float32 and probs.dtype == torch.float32
    loss.sum().backward()
    assert logits.grad.dtype == dtype
    expected, _ = reference(logits.float(), target, matrix, "decoupled", 1.0)
    torch.testing.assert_close(loss.detach(), expected)


PRESET_ENGINES = {
    "alr": dict(samples="misclassified", include_diagonal=False),
    "ols": dict(samples="correct", include_diagonal=True),
    "all": dict(samples="all", include_diagonal=False),
    "label_smoothing": dict(samples="none", include_diagonal=True),
}


@pytest.mark.parametrize("preset", list(PRESET_ENGINES))
def test_the_engines_loss_and_statistics_equal_the_loss_and_an_update_by_hand(preset):
    """LabelMatrix.loss + add (one softmax) against the straightforward loss + update (the logits read twice), on
    (N, K, T) logits with an ignored position, and with an invalid target in the last batch."""
    num_classes = 6
    mode = "mixed" if PRESET_ENGINES[preset]["include_diagonal"] else "decoupled"
    fused_engine, by_hand = (LabelMatrix(num_classes, **PRESET_ENGINES[preset]) for _ in range(2))
    generator = torch.Generator().manual_seed(5)
    for step in range(3):
        logits = (3 * torch.randn(4, num_classes, 5, generator=generator)).requires_grad_()
        target = torch.randint(0, num_classes, (4, 5), generator=generator)
        target[0, 0] = -100
        if step == 2:
            target[1, 2] = num_classes  # invalid: a NaN loss, counted in the statistics
        loss, statistics = fused_engine.loss(logits, target, mode, 0.5)
        fused_engine.add(statistics)
        formatted = _format(logits, target)
        expected = _straightforward_per_sample(formatted, by_hand.matrix, mode, 0.5)[formatted.valid].mean()
        if step < 2:
            torch.testing.assert_close(loss, expected)
            gradient, expected_gradient = (torch.autograd.grad(value, logits)[0] for value in (loss, expected))
            torch.testing.assert_close(gradient, expected_gradient)
        else:
            assert torch.isnan(loss)
        by_hand.update(logits.detach(), target)
    torch.testing.assert_close(fused_engine.accumulator, by_hand.accumulator)
    assert fused_engine.invalid.sum() == 1
    fused_engine.refresh(), by_hand.refresh()
    torch.testing.assert_close(fused_engine.matrix, by_hand.matrix)
    refreshed = not torch.equal(fused_engine.matrix, initial_label_matrix(num_classes, mode == "mixed"))
    assert refreshed == (preset != "label_smoothing")


@pytest.mark.parametrize("mode", MODES)
def test_a_second_backward_through_a_retained_graph_gives_the_same_gradient(mode):
    """Backward turns its copy of Q[y] into the gradient in place; a second backward must gather it again."""
    logits, target = batch(7)
    logits.requires_grad_()
    loss = fused_soft_label_loss(_format(logits, target), label_matrix_for(mode, 7), mode == "decoupled", 0.5)[0]
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("mode", MODES)
def test_create_graph_gives_the_same_gradient_and_no_wrong_second_derivative(mode):
    """The gradient is not differentiable itself (the fast path skips once_differentiable, which create_graph=True
    still goes through): the same gradient, which carries no graph to give a wrong second derivative."""
    logits, target = batch(7)
    logits.requires_grad_()
    matrix = label_matrix_for(mode, 7)
    loss = fused_soft_label_loss(_format(logits, target), matrix, mode == "decoupled", 0.5)[0]
    (plain,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (graphed,) = torch.autograd.grad(loss, logits, create_graph=True)
    torch.testing.assert_close(graphed, plain)
    assert not graphed.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        graphed.sum().backward()
