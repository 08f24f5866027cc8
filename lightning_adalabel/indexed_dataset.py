"""``IndexedDataset``: a data set whose samples also carry their index, for the training margins.

:class:`~lightning_adalabel.AdaLabel` averages each training sample's margin over the run when the training step tells
it which samples a batch holds (``self.adalabel_loss(logits, y, index=index)``, see
:mod:`lightning_adalabel.training_margins`). A shuffled loader does not say which samples it drew; wrapping the
training set makes every sample say it.
"""

from typing import Any, List, Mapping, Sized

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """``dataset`` with each sample's index appended: ``(x, y)`` becomes ``(x, y, index)``, a mapping gains an
    ``"index"`` entry, any other sample ``s`` becomes ``(s, index)``. Batched by the default collate, the indices are a
    ``(B,)`` int64 tensor; :class:`~lightning_adalabel.AdaLabelMixin`'s default ``training_step`` passes it on.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = IndexedDataset(TensorDataset(torch.arange(4.0), torch.tensor([0, 1, 1, 0])))
        >>> len(data), data[2]
        (4, (tensor(2.), tensor(1), 2))
        >>> IndexedDataset([{"text": "a", "labels": 1}])[0]
        {'text': 'a', 'labels': 1, 'index': 0}
    """

    def __init__(self, dataset: Any) -> None:
        if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"IndexedDataset needs a map-style data set (with __len__ and __getitem__), got"
                f" {type(dataset).__name__}. For an iterable data set, yield (x, y, index) yourself and set"
                " AdaLabel(num_training_samples=...) to the number of samples."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return _with_index(self.dataset[index], index)

    def __getitems__(self, indices: List[int]) -> List[Any]:
        # The DataLoader fetches a whole batch through __getitems__ where a data set has one (Subset, Hugging Face
        # datasets): without this, the wrapped set's own would answer, and the samples would come without their
        # indices. The wrapped set's batch fetch is kept (one Arrow read for a batch rather than one per row), unless
        # it returns something other than one sample per index (a batch already collated).
        fetch = getattr(self.dataset, "__getitems__", None)
        samples = fetch(indices) if fetch is not None else None
        if not isinstance(samples, list) or len(samples) != len(indices):
            samples = [self.dataset[index] for index in indices]
        return [_with_index(sample, index) for sample, index in zip(samples, indices)]

    def __getattr__(self, name: str) -> Any:
        # The wrapped set's attributes (classes, targets, ...), as the recipes and users read them; never a special
        # name (__getitems__, __getstate__, ...), which would answer for the wrapped set instead of this one.
        if name == "dataset" or name.startswith("__"):  # `dataset` not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _with_index(sample: Any, index: int) -> Any:
    """``sample`` with ``index`` appended, as :class:`IndexedDataset` describes."""
    if isinstance(sample, Mapping):
        if "index" in sample:
            raise ValueError("IndexedDataset: the samples already have an 'index' entry; it would be replaced.")
        return {**sample, "index": index}
    if isinstance(sample, (tuple, list)):
        return (*sample, index)
    return (sample, index)
