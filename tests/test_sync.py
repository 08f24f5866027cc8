"""No host-device synchronisation on the per-batch path (the statistics update and the loss).

Three layers: a CUDA run under ``torch.cuda.set_sync_debug_mode("error")`` (needs a GPU), the same per-batch
calls on ``meta`` tensors (they hold no data, so any ``.item()``, ``bool()``, ``.cpu()`` or data-dependent shape
raises), and a static read of the per-batch source for the calls that sync.
"""

import ast
import contextlib
import inspect
import textwrap
from typing import Any, Callable, Iterator, List

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_adalabel import AdaLabel, AdaLabelMixin, fused, inputs, label_matrix, losses, statistics
from lightning_adalabel import callback, compiled_loss, sparse_label_matrix, training_margins
from lightning_adalabel.engine import LabelMatrixEngine
from lightning_adalabel.label_matrix import LabelMatrix
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix
from lightning_adalabel.training_margins import TrainingMargins
from tests.helpers import TinyClassifier, make_loader, trainer_kwargs

K = 5


# ---- CUDA: sync debug mode around the callback's update and the mixin's loss -----------------------------------


@contextlib.contextmanager
def sync_is_an_error(enabled: bool) -> Iterator[None]:
    """Any host-device synchronisation inside raises (after batch 0, whose value checks sync once by design)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class SyncCheckedClassifier(TinyClassifier):
    def __init__(self, soft_targets: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.soft_targets = soft_targets

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        index = None
        if self.soft_targets:  # already-smoothed probability targets, built outside the checked region
            y = F.one_hot(y, K).float() * 0.9 + 0.1 / K
        else:  # class targets: the samples' indices too, so the training margins' per-batch path is checked as well
            index = torch.arange(batch_idx * len(y), (batch_idx + 1) * len(y), device=y.device)
        logits = self(x)
        with sync_is_an_error(batch_idx > 0):
            return self.adalabel_loss(logits, y, index=index)


class SyncCheckedAdaLabel(AdaLabel):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        with sync_is_an_error(batch_idx > 0):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("preset", ["alr", "ols"])
@pytest.mark.parametrize("soft_targets", [False, True])
@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top_k"])
@pytest.mark.parametrize("compile_loss", [False, True], ids=["eager", "compiled"])
def test_no_host_sync_per_batch_on_cuda(preset, soft_targets, top_k, compile_loss):
    torch.manual_seed(0)
    model = SyncCheckedClassifier(soft_targets, num_classes=K)
    # Compiled, batch 0 compiles (unchecked); the graph of every later batch must not sync either.
    adalabel = SyncCheckedAdaLabel(preset, top_k=top_k, compile_loss=compile_loss)  # refreshes at the epoch's end, outside the checked region
    # deterministic=False: typical GPU training, and deterministic index_add_ is a different kernel.
    trainer = L.Trainer(**trainer_kwargs(accelerator="cuda", max_steps=50, deterministic=False, callbacks=[adalabel]))
    trainer.fit(model, make_loader(num_samples=50 * 16, num_classes=K, batch_size=16))
    assert trainer.global_step == 50
    assert adalabel.engine.device.type == "cuda"
    assert adalabel.engine.num_refreshes == 1
    assert torch.isfinite(adalabel.engine.to_dense() if top_k else adalabel.engine.matrix).all()
    if not soft_targets:
        assert adalabel.training_margins.device.type == "cuda" and adalabel.training_margins.count.sum() == 50 * 16


# ---- meta tensors: the per-batch calls can run without ever reading a value --------------------------------------


@pytest.mark.parametrize("indexed", [False, True], ids=["plain", "indexed"])
@pytest.mark.parametrize("preset", ["alr", "ols", "label_smoothing"])
def test_per_batch_path_never_reads_a_tensor_value(preset, indexed):
    model = TinyClassifier(num_classes=K)
    adalabel = AdaLabel(preset, refresh_every_n_steps=1000, num_training_samples=32)
    trainer = L.Trainer(**trainer_kwargs(callbacks=[adalabel]))
    adalabel.setup(trainer, model, "fit")
    adalabel.on_train_batch_start(trainer, model, None, 0)
    # Batch 0 on the CPU: its value checks read values once, by design.
    index = torch.arange(8) if indexed else None
    model.adalabel_loss(torch.randn(8, K, requires_grad=True), torch.randint(0, K, (8,)), index=index).backward()
    adalabel.on_train_batch_end(trainer, model, None, None, 0)
    for batch_idx in range(1, 4):
        adalabel.on_train_batch_start(trainer, model, None, batch_idx)
        logits = torch.randn(8, K, device="meta", requires_grad=True)
        index = torch.arange(8, device="meta") if indexed else None
        model.adalabel_loss(logits, torch.randint(0, K, (8,), device="meta"), index=index).backward()
        adalabel.on_train_batch_end(trainer, model, None, None, batch_idx)
    assert logits.grad is not None and logits.grad.device.type == "meta"
    assert adalabel.engine.device.type == "meta"
    if indexed:  # created on the CPU by batch 0, moved to the logits' device by the next batch
        assert adalabel.training_margins.device.type == "meta"
    else:
        assert adalabel.training_margins is None


@pytest.mark.parametrize("samples", ["misclassified", "all", "correct"])
@pytest.mark.parametrize("estimator", ["mean", "geometric", "confusion"])
@pytest.mark.parametrize("include_diagonal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prior_strength", [0.0, 0.5])
def test_statistics_update_never_reads_a_tensor_value(samples, estimator, include_diagonal, dtype, prior_strength):
    matrix = LabelMatrix(K, samples=samples, estimator=estimator, include_diagonal=include_diagonal, device="meta",
                         prior_strength=prior_strength)
    logits = torch.randn(8, K, device="meta", dtype=dtype)
    matrix.update(logits, torch.randint(0, K, (8,), device="meta"))
    matrix.update(logits, torch.rand(8, K, device="meta"))  # probability targets
    loss, statistics = matrix.loss(logits.requires_grad_(), torch.randint(0, K, (8,), device="meta"),
                                   "mixed" if include_diagonal else "decoupled", 0.5)
    loss.backward()
    matrix.add(statistics)
    matrix.refresh()  # the engine's refresh too (the callback's warning check syncs once per refresh, by design)
    assert matrix.accumulator.device.type == "meta"


@pytest.mark.parametrize("samples", ["misclassified", "all", "correct"])
@pytest.mark.parametrize("include_diagonal", [False, True])
def test_sparse_statistics_loss_and_refresh_never_read_a_tensor_value(samples, include_diagonal):
    """The top_k engine's per-batch merge (sorts, scatters) and refresh on meta tensors. Its probability-target
    product (a CSR matrix, which meta tensors do not support) is covered by the static check below."""
    matrix = SparseLabelMatrix(K, top_k=2, samples=samples, include_diagonal=include_diagonal, device="meta")
    logits = torch.randn(8, K, device="meta")
    matrix.update(logits, torch.randint(0, K, (8,), device="meta"))
    loss, statistics = matrix.loss(logits.requires_grad_(), torch.randint(0, K, (8,), device="meta"),
                                   "mixed" if include_diagonal else "decoupled", 0.5)
    loss.backward()
    matrix.add(statistics)
    matrix.refresh()
    assert matrix.values.device.type == "meta" and logits.grad.device.type == "meta"


# ---- static read of the per-batch source -----------------------------------------------------------------------

SYNCING_METHODS = {"item", "cpu", "tolist", "numpy", "nonzero", "unique", "masked_select", "synchronize"}
SYNCING_BUILTINS = {"int", "float", "bool"}


class _FirstBatchCheckRemover(ast.NodeTransformer):
    """Drops ``if ... not self._first_batch_checked:`` blocks (the once-per-fit value checks) and ``raise``
    statements."""

    def __init__(self) -> None:
        self.removed_checks = 0

    def visit_If(self, node: ast.If) -> Any:
        if "_first_batch_checked" in ast.unparse(node.test):
            self.removed_checks += 1
            return None
        return self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> Any:
        return None  # error paths may read values: they end the run


def host_syncs(function: Callable) -> "tuple[List[str], int]":
    """The calls in ``function`` that copy a value to the host, and how many first-batch blocks were skipped."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    remover = _FirstBatchCheckRemover()
    tree = remover.visit(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        arguments = list(node.args) + [keyword.value for keyword in node.keywords]
        if isinstance(func, ast.Attribute) and func.attr in SYNCING_METHODS:
            found.append(ast.unparse(node))
        elif isinstance(func, ast.Attribute) and func.attr == "to" and any(
            isinstance(argument, ast.Constant) and argument.value == "cpu" for argument in arguments
        ):
            found.append(ast.unparse(node))
        elif isinstance(func, ast.Name) and func.id in SYNCING_BUILTINS and not all(
            isinstance(argument, ast.Constant) for argument in arguments  # float("-inf") is fine
        ):
            found.append(ast.unparse(node))
    return found, remover.removed_checks


def module_functions(module: Any) -> List[Callable]:
    functions = [value for value in vars(module).values() if inspect.isfunction(value)]
    return [function for function in functions if function.__module__ == module.__name__]


PER_BATCH_FUNCTIONS = [
    # The contract's per-batch methods, shared by both engines.
    LabelMatrixEngine.update,
    LabelMatrixEngine.loss,
    *module_functions(statistics),  # the tallies and the counted rule (the refresh's helpers too)
    LabelMatrix.loss_and_statistics,
    LabelMatrix.loss_only,
    label_matrix._loss_and_statistics,
    *module_functions(compiled_loss),
    LabelMatrix.add,
    LabelMatrix.batch_statistics,
    label_matrix._batch_statistics,
    label_matrix._add_statistics,
    label_matrix._predicted_right,
    *module_functions(fused),
    fused._SoftLabelCrossEntropy.forward,
    fused._SoftLabelCrossEntropy.backward,
    inputs._tensor_validation,
    inputs._format,
    inputs._reduce,
    label_matrix._label_matrix_update,
    label_matrix.select_samples,
    label_matrix.residual_prediction_stats,
    *module_functions(losses),  # every loss and its helpers
    # The sparse engine (top_k): its loss, statistics and batch merge, and the refresh's helpers too.
    SparseLabelMatrix.loss_and_statistics,
    SparseLabelMatrix.loss_only,
    SparseLabelMatrix._batch_loss,
    SparseLabelMatrix.batch_statistics,
    SparseLabelMatrix.add,
    SparseLabelMatrix._merge,
    *module_functions(sparse_label_matrix),
    fused._SparseSoftLabelCrossEntropy.forward,
    fused._SparseSoftLabelCrossEntropy.backward,
    AdaLabel.loss,
    AdaLabel._engine_for,
    AdaLabel._margins_for,
    callback._check_index,
    training_margins.batch_margins,
    TrainingMargins.add,
    AdaLabel.on_train_batch_start,
    AdaLabel.on_train_batch_end,
    AdaLabelMixin.adalabel_loss,
    AdaLabelMixin.training_step,
]


@pytest.mark.parametrize("function", PER_BATCH_FUNCTIONS, ids=lambda function: function.__qualname__)
def test_per_batch_source_has_no_host_sync(function):
    found, _ = host_syncs(function)
    assert found == [], f"{function.__qualname__} copies values to the host on every batch: {found}"


def test_only_the_first_batch_check_is_exempt():
    _, skipped = host_syncs(AdaLabel.loss)
    assert skipped == 1
    assert [name for name in ("decoupled_loss", "mixed_loss", "residual_cross_entropy", "adalabel_loss")
            if getattr(losses, name) not in PER_BATCH_FUNCTIONS] == []


def test_the_static_check_finds_syncs():
    """The check is not vacuous: the first-batch value checks do sync, and it sees them."""
    found, _ = host_syncs(inputs.check_values)
    assert any(call.startswith("int(") for call in found)
    found, _ = host_syncs(AdaLabel._check_first_batch)
    assert any(call.startswith("int(count_unusable_logits") for call in found)

    def syncs(x: torch.Tensor) -> Any:
        return x.item(), x.cpu(), x.to("cpu"), x.tolist(), float(x)

    assert len(host_syncs(syncs)[0]) == 5
