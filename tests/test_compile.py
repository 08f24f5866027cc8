"""torch.compile: the losses and the statistics update trace into one graph, a compiled model trains with ALR, and
``compile_loss=True`` (the per-batch path compiled by us) equals the eager path."""

from typing import Callable, Dict

import lightning as L
import pytest
import torch

from lightning_adalabel import AdaLabel
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.compiled_loss import compiled
from lightning_adalabel.inputs import _format
from lightning_adalabel.label_matrix import _empty_buffer, _label_matrix_update
from lightning_adalabel.losses import decoupled_loss, mixed_loss, soft_label_loss
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs

# torch.compile: each new graph is a C++ compile of seconds on a CPU.
pytestmark = pytest.mark.slow

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
    "soft_label_loss": lambda logits, target: soft_label_loss(logits, target, initial_label_matrix(K), "decoupled",
                                                              0.5),
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
    assert adalabel.engine.num_refreshes == reference.engine.num_refreshes == 8
    assert adalabel.engine.counts.sum() == 0  # reset by the last refresh
    torch.testing.assert_close(adalabel.engine.matrix, reference.engine.matrix, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.net.weight, reference_model.net.weight, rtol=0, atol=1e-5)
    assert not torch.equal(adalabel.engine.matrix, initial_label_matrix(K))


# ---- compile_loss=True: the engine's per-batch path as one compiled graph (inductor, the default backend) ---------


def engine(kind: str, compile_loss: bool) -> "LabelMatrix | SparseLabelMatrix":
    if kind == "top_k":
        return SparseLabelMatrix(K, top_k=2, compile_loss=compile_loss)
    return LabelMatrix(K, compile_loss=compile_loss)


def awkward_batches() -> "list[tuple[torch.Tensor, torch.Tensor, str]]":
    """What a pipeline sends, in the shapes that make torch.compile specialise, generalise or start a new graph:
    a batch, a smaller one (dynamic shapes), token sequences of two lengths, with ignored and invalid targets and a
    row of NaN logits; the dense engine also gets probability targets (MixUp)."""
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(8, K, generator=generator) * 3, torch.randint(0, K, (8,), generator=generator)
    target[1], logits[2, 0] = -100, float("nan")
    small_logits, small_target = torch.randn(6, K, generator=generator), torch.randint(0, K, (6,), generator=generator)
    small_target[0] = K  # invalid: counted, and the loss is NaN as F.cross_entropy's would fail
    tokens = [(torch.randn(2, K, length, generator=generator), torch.randint(0, K, (2, length), generator=generator))
              for length in (3, 5)]
    tokens[0][1][0, 0] = -100
    return [(logits, target, "mean"), (small_logits, small_target, "none"), (*tokens[0], "none"), (*tokens[1], "sum")]


@pytest.mark.parametrize("kind", ["dense", "top_k"])
def test_compiled_loss_and_statistics_equal_the_eager_ones(kind):
    torch._dynamo.reset()
    compiled, eager = engine(kind, compile_loss=True), engine(kind, compile_loss=False)
    batches = awkward_batches()
    if kind == "dense":
        batches.append((torch.randn(4, K), torch.softmax(torch.randn(4, K), dim=1), "mean"))
    for logits, target, reduction in batches:
        values, gradients = [], []
        for matrix in (compiled, eager):
            leaf = logits.clone().requires_grad_(True)
            value, statistics = matrix.loss(leaf, target, reduction=reduction)
            values.append(value)
            gradients.append(torch.autograd.grad(value.nan_to_num().sum(), leaf)[0])
            matrix.add(statistics)
        torch.testing.assert_close(values[0], values[1], equal_nan=True)
        torch.testing.assert_close(gradients[0], gradients[1], equal_nan=True)
    for name in ("counts", "seen", "nonfinite", "invalid"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=0, atol=0)
    assert compiled.nonfinite.sum() == 1 and compiled.invalid.sum() == 1
    compiled.refresh(), eager.refresh()
    dense = (lambda matrix: matrix.to_dense()) if kind == "top_k" else (lambda matrix: matrix.matrix)
    torch.testing.assert_close(dense(compiled), dense(eager))
    assert not torch.equal(dense(compiled), dense(engine(kind, compile_loss=False)))


def fit_with_compile_loss(compile_loss: bool) -> "tuple[TinyClassifier, AdaLabel]":
    torch.manual_seed(0)
    model = TinyClassifier(num_classes=K)
    adalabel = AdaLabel(refresh_every_n_steps=3, compile_loss=compile_loss)
    trainer = L.Trainer(**trainer_kwargs(max_epochs=2, precision="bf16-mixed", callbacks=[adalabel],
                                         deterministic=False))
    trainer.fit(model, make_loader(num_samples=120, num_classes=K))  # 7 batches of 16 and one of 8
    return model, adalabel


def test_compile_loss_trains_as_the_eager_callback_under_bf16_autocast():
    torch._dynamo.reset()
    model, adalabel = fit_with_compile_loss(compile_loss=True)
    reference_model, reference = fit_with_compile_loss(compile_loss=False)
    assert adalabel.engine.compile_loss and adalabel.engine.num_refreshes == 5
    torch.testing.assert_close(adalabel.engine.matrix, reference.engine.matrix, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.net.weight, reference_model.net.weight, rtol=0, atol=1e-5)
    assert not torch.equal(adalabel.engine.matrix, initial_label_matrix(K))


def test_a_machine_that_cannot_compile_gets_an_error_naming_the_fix(tmp_path, monkeypatch):
    # A graph no other test compiles (float64, 7 classes), an empty cache and a compiler that does not exist.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    matrix = LabelMatrix(7, compile_loss=True)
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    with torch._inductor.config.patch({"cpp.cxx": (str(tmp_path / "no-such-compiler"),), "fx_graph_cache": False}):
        with pytest.raises(RuntimeError, match=r"could not torch.compile the loss .* use compile_loss=False"):
            matrix.loss(logits, torch.tensor([0, 1, 2]))
    torch._dynamo.reset()


def test_a_torch_that_cannot_trace_the_loss_gets_an_error_naming_the_fix():
    # torch 2.8's Dynamo cannot trace the loss whole; a graph break inside the compiled function is the same failure.
    def breaks(logits: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return logits.logsumexp(dim=1)

    with pytest.raises(RuntimeError, match=r"cannot trace the loss as one graph .* or use compile_loss=False"):
        compiled(breaks)(torch.randn(3, 7))
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [lambda: AdaLabel(compile_loss="yes"), lambda: LabelMatrix(K, compile_loss=1),
                                  lambda: SparseLabelMatrix(K, 2, compile_loss="no")])
def test_compile_loss_is_a_bool(make):
    with pytest.raises(ValueError, match="`compile_loss` must be True or False"):
        make()
