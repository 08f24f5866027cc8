"""The engine contract (lightning_adalabel/engine.py): both engines answer every call of it with the same meaning.

With ``top_k`` = K - 1 the sparse engine keeps every entry, so on the same batches it must give what the dense engine
gives, call for call: the contract, not a look at either engine's insides.
"""

import inspect

import pytest
import torch

from lightning_adalabel.engine import ENGINE_SETTINGS, LabelMatrixEngine, SingleProcess
from lightning_adalabel.engine_factory import new_engine
from lightning_adalabel.inputs import _format
from lightning_adalabel.presets import PRESETS
from lightning_adalabel.statistics import statistic_totals

K = 6


class CountingCollective(SingleProcess):
    """One process, which counts the collectives an engine asks for."""

    def __init__(self) -> None:
        self.calls = []

    def sum(self, tensor):
        self.calls.append("sum")
        return super().sum(tensor)

    def gather(self, tensor):
        self.calls.append("gather")
        return super().gather(tensor)


def engines(preset: str):
    settings = PRESETS[preset].engine_settings()
    return new_engine(K, settings), new_engine(K, settings, top_k=K)  # top_k is clamped to every allowed class


def batches(seed: int, count: int = 3):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        yield torch.randn(24, K, generator=generator) * 2, torch.randint(0, K, (24,), generator=generator)


def test_both_engines_implement_every_method_of_the_contract():
    abstract = LabelMatrixEngine.__abstractmethods__
    assert {"loss_and_statistics", "loss_only", "batch_statistics", "add", "_refresh", "reset_statistics", "to_dense",
            "rows", "mean_entropy", "top_pairs", "state_dict", "load_state_dict", "to", "device"} <= abstract
    for engine in engines("alr"):
        assert isinstance(engine, LabelMatrixEngine) and not inspect.isabstract(type(engine))
        assert set(ENGINE_SETTINGS) <= set(engine.config())


@pytest.mark.parametrize("preset", ["alr", "ols"])
def test_the_engines_answer_the_contract_alike(preset):
    dense, sparse = engines(preset)
    loss = PRESETS[preset].loss
    for logits, target in batches(0):
        values = []
        for engine in (dense, sparse):
            value, statistics = engine.loss(logits, target, loss, 0.5)
            engine.add(statistics)
            engine.update(logits, target)  # the same batch once more, from its logits alone
            values.append((value, engine.loss_only(logits, target, -100, loss, 0.5)))
        torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(sparse.counts, dense.counts)
    assert float(dense.seen.sum()) == 2 * 3 * 24
    collectives = [CountingCollective(), CountingCollective()]
    tallies = [engine.refresh(collective) for engine, collective in zip((dense, sparse), collectives)]
    assert [collective.calls for collective in collectives] == [["sum"], ["gather"]]  # one collective each
    torch.testing.assert_close(tallies[1], tallies[0])
    torch.testing.assert_close(statistic_totals(tallies[0]), statistic_totals(dense.tallies + tallies[0]))
    assert dense.num_refreshes == sparse.num_refreshes == 1 and float(dense.counts.sum()) == 0
    torch.testing.assert_close(sparse.to_dense(), dense.to_dense(), atol=1e-6, rtol=1e-5)
    classes = torch.tensor([4, 0, 4])
    torch.testing.assert_close(sparse.rows(classes), dense.to_dense()[classes], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dense.rows(classes), dense.to_dense()[classes])
    torch.testing.assert_close(sparse.mean_entropy(), dense.mean_entropy(), atol=1e-5, rtol=1e-5)
    rows, columns, top = dense.top_pairs(3)
    torch.testing.assert_close(sparse.top_pairs(3)[2], top, atol=1e-6, rtol=1e-5)
    assert (rows != columns).all() and torch.equal(top, dense.to_dense()[rows, columns])


@pytest.mark.parametrize("top_k", [None, 3])
def test_state_moves_and_resets_through_the_contract(top_k):
    engine = new_engine(K, PRESETS["alr"].engine_settings(), top_k=top_k)
    for logits, target in batches(1):
        engine.update(logits, target)
    engine.refresh()
    engine.update(*next(batches(2)))
    restored = new_engine(K, PRESETS["alr"].engine_settings(), top_k=top_k)
    restored.load_state_dict(engine.state_dict())
    assert torch.equal(restored.to_dense(), engine.to_dense()) and torch.equal(restored.tallies, engine.tallies)
    assert restored.num_refreshes == 1 and repr(restored) == repr(engine)
    assert restored.to("meta") is restored and restored.device.type == "meta"
    engine.reset_statistics()
    assert float(engine.tallies.abs().sum()) == 0 and engine.num_refreshes == 1
    other = new_engine(K, PRESETS["ols"].engine_settings(), top_k=top_k)
    with pytest.raises(ValueError, match="saved with a different configuration: .*samples='misclassified'"):
        other.load_state_dict(engine.state_dict())


def test_batch_statistics_of_a_formatted_batch_are_what_the_loss_queues():
    dense, sparse = engines("alr")
    logits, target = next(batches(3))
    for engine in (dense, sparse):
        fresh = type(engine).__new__(type(engine))
        fresh.__setstate__(engine.__dict__)
        engine.add(engine.loss(logits, target)[1])
        fresh.add(fresh.batch_statistics(_format(logits, target)))
        torch.testing.assert_close(engine.tallies, fresh.tallies)
