"""Which engine a configuration asks for: the one place that knows every kind of engine.

A new kind (say, a low-rank Q) is a :class:`~lightning_adalabel.engine.LabelMatrixEngine` in a module of its own, and
one more line in :func:`new_engine` (with its options checked in :func:`check_engine_options`).
"""

from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from lightning_adalabel.engine import LabelMatrixEngine
from lightning_adalabel.label_matrix import LabelMatrix
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix


def check_engine_options(settings: Dict[str, Any], top_k: Optional[int], initial_matrix: Any) -> None:
    """Refuse, before any engine is built, options that the chosen kind of engine does not take."""
    if top_k is not None and (initial_matrix is not None or settings["estimator"] == "geometric"):
        raise ValueError(
            "AdaLabel(top_k=...) keeps a sparse label matrix: it takes neither `initial_matrix` (a dense K x K"
            " matrix) nor the 'geometric' estimator. Use top_k=None for those."
        )


def new_engine(
    num_classes: int, settings: Dict[str, Any], top_k: Optional[int] = None, initial_matrix: Optional[Tensor] = None,
    device: Optional[Union[str, torch.device]] = None, compile_loss: bool = False,
) -> LabelMatrixEngine:
    """The engine of ``settings`` (:data:`~lightning_adalabel.engine.ENGINE_SETTINGS`, e.g. a preset's
    ``engine_settings()``) for K = ``num_classes``: a sparse one with ``top_k``, the dense one otherwise.

    Example:
        >>> from lightning_adalabel.presets import PRESETS
        >>> engine = new_engine(10, PRESETS["ols"].engine_settings(), top_k=3)
        >>> type(engine).__name__, engine.top_k, engine.samples, type(new_engine(10, {})).__name__
        ('SparseLabelMatrix', 3, 'correct', 'LabelMatrix')
    """
    check_engine_options(settings, top_k, initial_matrix)
    options = dict(settings, device=device, compile_loss=compile_loss)
    if top_k is not None:
        return SparseLabelMatrix(num_classes, top_k, **options)
    return LabelMatrix(num_classes, initial_matrix=initial_matrix, **options)
