"""torch.compile: the losses and the statistics update trace into one graph, and a compiled model trains with ALR."""

from typing import Callable, Dict

import lightning as L
import pytest
import torch

from lightning_adalabel import AdaLabel, LabelMatrix, initial_label_matrix
from lightning_adalabel.inputs import _format
from lightning_adalabel.label_matrix import _empty_buffer, _label_matrix_update
from lightning_adalabel.losses import adalabel_loss, decoupled_loss, mixed_loss
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs

K = 5


def inputs(target_kind: str) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, K, generator=generator) * 3
    target = (torch.randint(0, K, (8,), generator=generator) if target_kind == "int"
              else torch.softmax(torch.randn(8, K, generator=generator), dim=1))
    return {"logits": logits, "target": target}


LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "decoupled_loss": lambda logits, target: decoupled_loss(logits, target, initial_label_matrix(K), 0.5),
    "mixed_loss": lambda logits, target: mixed_loss(logits, target, initial_label_matrix(K, True), 0.5),
    "mixed_loss_residual": lambda logits, target: mixed_loss(logits, target, initial_label_matrix(K), 0.5),
    "adalabel_loss": lambda logits, target: adalabel_loss(logits, target, initial_label_matrix(K), "decoupled", 0.5),
}


@pytest.mark.parametrize("target_kind", ["int", "prob"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_compile_without_graph_breaks(name, target_kind):
    torch._dynamo.reset()
    loss = LOSSES[name]
    batch = inputs(target_kind)
    explanation = torch._dynamo.explain(loss)(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # One full graph, forward and backward, and the same numbers as eager.
    logits = batch["logits"].requires_grad_(True)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(logits, batch["target"])
    (gradient,) = torch.autograd.grad(compiled, logits)
    eager_logits = batch["logits"].detach().requires_grad_(True)
    eager = loss(eager_logits, batch["target"])
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gradient, torch.autograd.grad(eager, eager_logits)[0])


@pytest.mark.parametrize("samples", ["misclassified", "all", "correct"])
@pytest.mark.parametrize("estimator", ["mean", "geometric", "confusion"])
@pytest.mark.parametrize("include_diagonal", [False, True])
def test_statistics_update_compiles_without_graph_breaks(samples, estimator, include_diagonal):
    torch._dynamo.reset()
    batch = inputs("int")
    accumulator = _empty_buffer(K)

    def update(logits, target):
        _label_matrix_update(accumulator, _format(logits, target), samples, estimator, include_diagonal)

    explanation = torch._dynamo.explain(update)(batch["logits"], batch["target"])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    matrix = LabelMatrix(K, samples=samples, estimator=estimator, include_diagonal=include_diagonal)
    torch._dynamo.reset()
    assert torch._dynamo.explain(matrix.update)(**batch).graph_break_count == 0


def train(compile_net: bool, preset: str) -> "tuple[TinyClassifier, AdaLabel]":
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=K)
    if compile_net:
        model.net = torch.compile(model.net)  # the default backend (inductor), forward and backward
    adalabel = AdaLabel(preset, refresh_every_n_steps=2)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=2, callbacks=[adalabel], deterministic=False))
    trainer.fit(model, make_loader(num_classes=K))
    return model, adalabel


def test_compiled_model_trains_with_the_mixin_loss():
    model, adalabel = train(compile_net=True, preset="alr")
    reference_model, reference = train(compile_net=False, preset="alr")
    assert adalabel.label_matrix.num_refreshes == reference.label_matrix.num_refreshes == 8
    assert adalabel.label_matrix.counts.sum() == 0  # reset by the last refresh
    torch.testing.assert_close(adalabel.label_matrix.matrix, reference.label_matrix.matrix, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.net.weight, reference_model.net.weight, rtol=0, atol=1e-5)
    assert not torch.equal(adalabel.label_matrix.matrix, initial_label_matrix(K))
