"""The names that lightning_adalabel gave before issue 20 keep working for one minor version, each with a
DeprecationWarning that names its replacement."""

import importlib
import warnings

import pytest
import torch

import lightning_adalabel
from lightning_adalabel import AdaLabel
from lightning_adalabel.inputs import _format
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.losses import adalabel_loss, soft_label_loss
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix
from tests.helpers import fit, make_loader


@pytest.mark.parametrize("name", sorted(lightning_adalabel.MOVED))
def test_a_former_top_level_name_warns_and_is_the_object_in_its_module(name):
    module, new_name = lightning_adalabel.MOVED[name]
    expected = rf"lightning_adalabel\.{name} is deprecated .* use {module}\.{new_name}"
    with pytest.warns(DeprecationWarning, match=expected):
        value = getattr(lightning_adalabel, name)
    assert value is getattr(importlib.import_module(module), new_name)
    assert name not in lightning_adalabel.__all__


def test_the_public_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in lightning_adalabel.__all__:
            getattr(lightning_adalabel, name)
    with pytest.raises(AttributeError, match="has no attribute 'LabelMatrx'"):
        lightning_adalabel.LabelMatrx  # noqa: B018


def test_the_loss_function_under_its_former_name_warns_and_gives_the_same_loss():
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, -100, 1])
    with pytest.warns(DeprecationWarning, match="losses.adalabel_loss is deprecated .*losses.soft_label_loss"):
        old = adalabel_loss(logits, target, initial_label_matrix(4), "decoupled", 0.5)
    assert torch.equal(old, soft_label_loss(logits, target, initial_label_matrix(4), "decoupled", 0.5))


def test_the_callbacks_label_matrix_warns_and_is_its_engine():
    callback = AdaLabel(samples="all")
    fit(callback, loader=make_loader(32), max_epochs=1)
    with pytest.warns(DeprecationWarning, match="AdaLabel.label_matrix is deprecated .* AdaLabel.engine"):
        engine = callback.label_matrix
    assert engine is callback.engine and engine.num_refreshes == 1


@pytest.mark.parametrize("engine", [LabelMatrix(4, samples="all"), SparseLabelMatrix(4, top_k=3, samples="all")],
                         ids=["dense", "sparse"])
def test_refresh_with_the_former_functions_warns_and_refreshes_as_a_collective(engine):
    """refresh(reduce=) was the dense engine's argument, refresh(gather=) the sparse one's."""
    logits, target = torch.randn(16, 4), torch.randint(0, 4, (16,))
    engine.update(logits, target)
    twin = type(engine).__new__(type(engine))
    twin.__setstate__(engine.__dict__)
    calls = []
    keyword = "reduce" if isinstance(engine, LabelMatrix) else "gather"
    function = (lambda tensor: calls.append(tensor.shape) or (tensor if keyword == "reduce" else tensor[None]))
    with pytest.warns(DeprecationWarning, match=rf"{type(engine).__name__}.refresh\({keyword}=...\) is deprecated"):
        tallies = engine.refresh(**{keyword: function})
    assert len(calls) == 1
    torch.testing.assert_close(tallies, twin.refresh())
    torch.testing.assert_close(engine.to_dense(), twin.to_dense())


def test_the_sparse_engines_reduced_loss_warns_and_is_loss_only():
    engine = SparseLabelMatrix(5, top_k=2)
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    with pytest.warns(DeprecationWarning, match=r"SparseLabelMatrix.reduced_loss is deprecated .*\.loss_only"):
        old = engine.reduced_loss(_format(logits, target), "decoupled", 0.5)
    assert torch.equal(old, engine.loss_only(logits, target, -100, "decoupled", 0.5))
