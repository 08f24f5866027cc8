"""The mixin (lightning_adalabel/module.py): the loss swap, its clear errors, and a module that pickles without Q."""

import copy
import io
import pickle

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_adalabel import AdaLabel
from tests.helpers import TinyClassifier, fit, make_loader, trainer_kwargs

K = 5


class PlainClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_without_mixin_is_a_clear_error():
    with pytest.raises(TypeError, match="needs a LightningModule that inherits AdaLabelMixin"):
        fit(AdaLabel(), PlainClassifier())


def test_mixin_without_callback_is_a_clear_error():
    trainer = L.Trainer(**trainer_kwargs())
    with pytest.raises(RuntimeError, match="the Trainer has no AdaLabel callback"):
        trainer.fit(TinyClassifier(), make_loader())
    with pytest.raises(RuntimeError, match="adalabel_loss needs the AdaLabel callback"):
        TinyClassifier().adalabel_loss(torch.randn(2, 5), torch.tensor([0, 1]))


def test_training_step_without_adalabel_loss_is_a_clear_error():
    class ForgotTheSwap(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    with pytest.raises(RuntimeError, match=r"did not call `self.adalabel_loss\(logits, y\)`"):
        fit(AdaLabel(), ForgotTheSwap())



def test_pickle_deepcopy_and_torch_save_of_a_trained_module_leave_q_out():
    num_classes = 200
    callback = AdaLabel()
    model = TinyClassifier(num_classes=num_classes)
    loader = make_loader(num_classes=num_classes)
    fit(callback, model, loader)
    engine = callback.engine
    q_bytes = engine.matrix.numel() * 4 + engine.accumulator.numel() * 4
    assert q_bytes > 300_000
    assert model._adalabel_callback is callback

    weights_bytes = len(pickle.dumps({name: value.clone() for name, value in model.state_dict().items()}))
    pickled = pickle.dumps(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for size in (len(pickled), len(buffer.getvalue())):
        assert size < weights_bytes + 8_000, (size, weights_bytes)  # the weights plus a little bookkeeping
        assert size < q_bytes / 10, (size, q_bytes)

    buffer.seek(0)
    copies = [pickle.loads(pickled), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for duplicate in copies:
        assert duplicate._adalabel_callback is None
        assert "_adalabel_callback" not in duplicate.__dict__
        for name, value in model.state_dict().items():
            assert torch.equal(duplicate.state_dict()[name], value)
    assert model._adalabel_callback is callback  # the original keeps its callback

    before = model.net.weight.detach().clone()
    fit(callback, model, loader)  # the original still trains with the same callback
    assert not torch.equal(model.net.weight, before)
    assert callback.engine.num_refreshes == 2

    fresh = AdaLabel()
    fit(fresh, copies[1], loader)  # and a copy trains with a callback of its own
    assert copies[1]._adalabel_callback is fresh and fresh.engine.num_refreshes == 1

