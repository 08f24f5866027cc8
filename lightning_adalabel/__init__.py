"""Adaptive Label Regularization (ALR, arXiv:1908.05474) for PyTorch Lightning classifiers."""

from lightning_adalabel.callback import AdaLabel
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.label_matrix_io import load_label_matrix, save_label_matrix
from lightning_adalabel.losses import (
    adalabel_loss,
    decoupled_loss,
    mixed_loss,
    residual_cross_entropy,
    soft_target_cross_entropy,
)
from lightning_adalabel.module import AdaLabelMixin
from lightning_adalabel.presets import PRESETS, Preset, resolve_preset
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix
from lightning_adalabel.validation import validate_label_matrix
from lightning_adalabel.visualization import plot_label_matrix, top_correlated_pairs

__version__ = "0.2.0.dev0"

__all__ = [
    "AdaLabel",
    "AdaLabelMixin",
    "LabelMatrix",
    "PRESETS",
    "Preset",
    "adalabel_loss",
    "decoupled_loss",
    "initial_label_matrix",
    "load_label_matrix",
    "mixed_loss",
    "plot_label_matrix",
    "resolve_preset",
    "residual_cross_entropy",
    "save_label_matrix",
    "SparseLabelMatrix",
    "soft_target_cross_entropy",
    "top_correlated_pairs",
    "validate_label_matrix",
]
