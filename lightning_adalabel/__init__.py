"""Adaptive Label Regularization (ALR, arXiv:1908.05474) for PyTorch Lightning classifiers.

The public API: :class:`AdaLabel` (the callback), :class:`AdaLabelMixin` (the loss swap), :class:`Preset` and
:data:`PRESETS` (the methods), and the label matrix's input and output (:func:`save_label_matrix`,
:func:`load_label_matrix`, :func:`plot_label_matrix`, :func:`top_correlated_pairs`), and the training samples whose
labels are probably wrong (:func:`find_label_issues`, :class:`LabelIssues`, and :class:`IndexedDataset`, whose
indices let the callback average each sample's margin over training). The engines are imported from
their modules (:mod:`lightning_adalabel.label_matrix`, :mod:`lightning_adalabel.sparse_label_matrix`), the functional
losses from :mod:`lightning_adalabel.losses`.
"""

import importlib
from typing import Any

from lightning_adalabel.callback import AdaLabel
from lightning_adalabel.indexed_dataset import IndexedDataset
from lightning_adalabel.label_issues import LabelIssues, find_label_issues
from lightning_adalabel.label_matrix_io import load_label_matrix, save_label_matrix
from lightning_adalabel.module import AdaLabelMixin
from lightning_adalabel.presets import PRESETS, Preset
from lightning_adalabel.validation import warn_deprecated
from lightning_adalabel.visualization import plot_label_matrix, top_correlated_pairs

__version__ = "0.2.0.dev0"

__all__ = [
    "AdaLabel",
    "AdaLabelMixin",
    "IndexedDataset",
    "LabelIssues",
    "PRESETS",
    "Preset",
    "find_label_issues",
    "load_label_matrix",
    "plot_label_matrix",
    "save_label_matrix",
    "top_correlated_pairs",
]

# Names this package exported before its API was cut down: where each lives now (module, name). They keep working,
# with a DeprecationWarning, for one minor version.
MOVED = {
    "LabelMatrix": ("lightning_adalabel.label_matrix", "LabelMatrix"),
    "SparseLabelMatrix": ("lightning_adalabel.sparse_label_matrix", "SparseLabelMatrix"),
    "initial_label_matrix": ("lightning_adalabel.label_matrix", "initial_label_matrix"),
    "adalabel_loss": ("lightning_adalabel.losses", "soft_label_loss"),
    "decoupled_loss": ("lightning_adalabel.losses", "decoupled_loss"),
    "mixed_loss": ("lightning_adalabel.losses", "mixed_loss"),
    "residual_cross_entropy": ("lightning_adalabel.losses", "residual_cross_entropy"),
    "soft_target_cross_entropy": ("lightning_adalabel.losses", "soft_target_cross_entropy"),
    "resolve_preset": ("lightning_adalabel.presets", "resolve_preset"),
    "validate_label_matrix": ("lightning_adalabel.validation", "validate_label_matrix"),
}


def __getattr__(name: str) -> Any:
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, new_name = MOVED[name]
    warn_deprecated(f"lightning_adalabel.{name}", f"{module}.{new_name}")
    return getattr(importlib.import_module(module), new_name)
