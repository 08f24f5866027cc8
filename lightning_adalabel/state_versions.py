"""Checkpoint formats: what each version of a saved state holds, and how a state of an older version is read.

Every state this package saves carries a ``"version"``: the callback's (:class:`~lightning_adalabel.AdaLabel`'s
``state_dict``, inside Lightning's checkpoint) and each engine's (inside the callback's). A state is read by bringing it
to the current version first, filling in what an older version did not write, so that the code that restores it knows
one layout only. A state of an unknown version, or one this package did not write, is refused with a clear error.

To change a format: bump its version below, say what the new version holds, and teach its ``read_*`` function to
bring the previous version up to it.

The callback's state:

- 1 (lightning_adalabel 0.1.0): no ``"version"`` or ``"top_k"`` key (dense), and a ``"config"`` without the preset
  fields that came later (``prior``, ``prior_strength``, ``start``, ``empty_rows``): they had their defaults.
- 2: ``"version"``, ``"top_k"``, the full preset ``"config"``.
- 3: ``"training_margins"``: the :class:`~lightning_adalabel.training_margins.TrainingMargins` state (with
  ``"epoch_open"``), or ``None`` (what versions 1 and 2 held: they kept none).

The dense engine's state (:class:`~lightning_adalabel.label_matrix.LabelMatrix`):

- 1 (lightning_adalabel 0.1.0): a ``K x (K + 3)`` accumulator without the invalid-target column (it counted none),
  settings without the later ones (defaults).
- 2: the ``K x (K + 4)`` accumulator.

The sparse engine's state (:class:`~lightning_adalabel.sparse_label_matrix.SparseLabelMatrix`): 1, ``"kind": "sparse"``.
"""

from dataclasses import MISSING, fields
from typing import Any, Dict

import torch
from torch import Tensor

from lightning_adalabel.presets import Preset

CALLBACK_STATE_VERSION = 3
DENSE_STATE_VERSION = 2
SPARSE_STATE_VERSION = 1

_CALLBACK_KEYS = ("preset", "config", "label_matrix", "last_refresh_step", "statistics_epoch")
_DENSE_KEYS = ("num_classes", "samples", "estimator", "momentum", "include_diagonal", "matrix", "accumulator",
               "num_refreshes")


def _defaults(dataclass_type: Any) -> Dict[str, Any]:
    """A state written before a setting existed was written with the setting's default."""
    return {field.name: field.default for field in fields(dataclass_type) if field.default is not MISSING}


def read_callback_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """The callback's ``state`` in the current format (its ``"config"`` a complete preset, or ``{}`` where it is not a
    dict), or a clear error."""
    missing = [key for key in _CALLBACK_KEYS if key not in state]
    version = state.get("version", 1)
    if missing or version not in (1, 2, CALLBACK_STATE_VERSION):
        raise ValueError(
            f"This checkpoint's AdaLabel state (format version {version!r}, missing {missing}) was not written by"
            f" a lightning_adalabel this one can read (versions 1 to {CALLBACK_STATE_VERSION}). Resume with the version"
            " that wrote it, or start a new run without `ckpt_path`."
        )
    config = {**_defaults(Preset), **state["config"]} if isinstance(state["config"], dict) else {}
    # Version 1 had no top_k: it was dense. Versions 1 and 2 kept no training margins.
    return {**state, "version": CALLBACK_STATE_VERSION, "config": config, "top_k": state.get("top_k"),
            "training_margins": state.get("training_margins")}


def read_dense_engine_state(state: Any) -> Dict[str, Any]:
    """A dense engine's ``state`` in the current format, or a clear error."""
    if not isinstance(state, dict):
        raise ValueError(f"A label-matrix state is a dict, got {type(state).__name__}.")
    version = state.get("version", 1)
    if version not in (1, DENSE_STATE_VERSION):
        raise ValueError(
            f"This label-matrix state has format version {version!r}; this lightning_adalabel reads versions 1 to"
            f" {DENSE_STATE_VERSION}. Upgrade lightning_adalabel, or start a new run without this checkpoint."
        )
    missing = [key for key in _DENSE_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"This label-matrix state lacks {missing}: it was not written by LabelMatrix.state_dict(). Start a new"
            " run, or load a checkpoint written by lightning_adalabel."
        )
    state = {**_defaults(Preset), **state, "version": DENSE_STATE_VERSION}  # the engine's settings are a preset's
    accumulator = state["accumulator"]
    if version == 1 and isinstance(accumulator, Tensor) and accumulator.ndim == 2:
        # Version 1 had no invalid-target column; it counted none.
        state["accumulator"] = torch.cat([accumulator, accumulator.new_zeros(accumulator.shape[0], 1)], 1)
    return state


def read_sparse_engine_state(state: Any) -> Dict[str, Any]:
    """A sparse engine's ``state`` in the current format, or a clear error."""
    if not isinstance(state, dict) or state.get("kind") != "sparse" or state.get("version") != SPARSE_STATE_VERSION:
        raise ValueError(
            "This label-matrix state was not written by SparseLabelMatrix.state_dict() (version"
            f" {SPARSE_STATE_VERSION}): resume with the same AdaLabel(top_k=...) that wrote it, or start a new run."
        )
    return state
