"""The losses against naive per-sample formulas, for class-index and probability targets, with gradients."""


import pytest
import torch
import torch.nn.functional as F

from lightning_adalabel.label_matrix import initial_label_matrix
from lightning_adalabel.losses import decoupled_loss, mixed_loss, residual_cross_entropy
from lightning_adalabel.losses import soft_label_loss
from tests.references import naive_residual_ce, naive_soft_ce, random_residual_matrix


@pytest.mark.parametrize("num_classes", [2, 5, 11])
def test_residual_cross_entropy_matches_naive_formula(num_classes):
    logits, target = 2 * torch.randn(9, num_classes), torch.randint(0, num_classes, (9,))
    matrix = random_residual_matrix(num_classes)
    expected = naive_residual_ce(logits.double(), target, matrix.double())
    assert residual_cross_entropy(logits, target, matrix).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_residual_cross_entropy_of_probability_targets_is_the_mixture_of_per_class_losses():
    torch.manual_seed(0)
    logits = 4 * torch.randn(6, 7)
    logits[0, 3] = 40.0  # a confident sample: p_k close to 1 must not lose precision
    matrix = random_residual_matrix(7)
    soft = torch.softmax(3 * torch.randn(6, 7), dim=1)
    expected = sum(
        soft[b, k].item() * naive_residual_ce(logits[b : b + 1].double(), torch.tensor([k]), matrix.double())
        for b in range(6) for k in range(7)
    ) / 6
    assert residual_cross_entropy(logits, soft, matrix).item() == pytest.approx(expected, rel=1e-5)
    one_hot = F.one_hot(torch.arange(6) % 7, 7).float()
    torch.testing.assert_close(
        residual_cross_entropy(logits, one_hot, matrix), residual_cross_entropy(logits, torch.arange(6) % 7, matrix)
    )


@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_decoupled_and_mixed_losses_match_naive_formulas(soft):
    torch.manual_seed(1)
    num_classes, alpha = 6, 0.4
    logits = 3 * torch.randn(8, num_classes)
    target = torch.softmax(2 * torch.randn(8, num_classes), dim=1) if soft else torch.randint(0, num_classes, (8,))
    y = target if soft else F.one_hot(target, num_classes).double()
    matrix = random_residual_matrix(num_classes)
    hard = naive_soft_ce(logits.double(), y.double())
    if soft:
        residual = sum(
            target[b, k].item() * naive_residual_ce(logits[b : b + 1].double(), torch.tensor([k]), matrix.double())
            for b in range(8) for k in range(num_classes)
        ) / 8
    else:
        residual = naive_residual_ce(logits.double(), target, matrix.double())
    assert decoupled_loss(logits, target, matrix, alpha).item() == pytest.approx(hard + alpha * residual, rel=1e-5)
    mixed_target = (1 - alpha) * y.double() + alpha * (y.double() @ matrix.double())
    expected_mixed = naive_soft_ce(logits.double(), mixed_target)
    assert mixed_loss(logits, target, matrix, alpha).item() == pytest.approx(expected_mixed, rel=1e-5)


def test_mixed_loss_with_uniform_matrix_is_label_smoothing():
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    uniform = initial_label_matrix(10, include_diagonal=True)
    torch.testing.assert_close(
        mixed_loss(logits, target, uniform, 0.1), F.cross_entropy(logits, target, label_smoothing=0.1)
    )


def test_ce_mode_is_exactly_cross_entropy():
    logits, target = torch.randn(16, 10), torch.randint(0, 10, (16,))
    matrix = random_residual_matrix(10)
    assert torch.equal(soft_label_loss(logits, target, matrix, "ce", 0.0), F.cross_entropy(logits, target))


@pytest.mark.parametrize("mode", ["decoupled", "mixed"])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_gradients_pass_gradcheck_in_float64(mode, soft):
    torch.manual_seed(2)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1) if soft else torch.randint(0, 4, (5,))
    matrix = random_residual_matrix(4, dtype=torch.float64)
    loss = decoupled_loss if mode == "decoupled" else mixed_loss

    assert torch.autograd.gradcheck(lambda z: loss(z, target, matrix, 0.5), (logits,))


def test_residual_loss_gradient_is_zero_on_the_true_class_logit():
    logits = torch.randn(3, 5, requires_grad=True)
    target = torch.tensor([0, 2, 4])
    residual_cross_entropy(logits, target, random_residual_matrix(5)).backward()
    assert torch.all(logits.grad[torch.arange(3), target] == 0)
    assert torch.isfinite(logits.grad).all()


def test_losses_are_computed_in_float32_for_low_precision_logits():
    logits, target = (5 * torch.randn(8, 6)).bfloat16(), torch.randint(0, 6, (8,))
    matrix = random_residual_matrix(6)
    for mode in ("decoupled", "mixed", "ce"):
        low = soft_label_loss(logits, target, matrix, mode, 0.5)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, soft_label_loss(logits.float(), target, matrix, mode, 0.5))


def test_unknown_loss_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="Loss mode must be one of"):
        soft_label_loss(torch.randn(2, 3), torch.tensor([0, 1]), initial_label_matrix(3), "focal", 0.5)


@pytest.mark.parametrize("mode", ["decoupled", "mixed", "ce"])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_losses_under_bf16_autocast_equal_float32(mode, soft):
    logits = 4 * torch.randn(8, 6)
    target = torch.softmax(torch.randn(8, 6), 1) if soft else torch.randint(0, 6, (8,))
    matrix = random_residual_matrix(6)
    expected = soft_label_loss(logits, target, matrix, mode, 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(soft_label_loss(logits, target, matrix, mode, 0.5), expected)
