"""``ResumableCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is always the latest state.

With ``save_last=True`` and a monitored metric, Lightning 2.6 rewrites ``last.ckpt`` only when a top-k checkpoint is
saved, i.e. when the metric improves: after epochs without improvement ``last.ckpt`` still holds an old epoch, and a
preempted job resumed from it silently loses those epochs. This subclass fixes that for the recipes:

- ``last.ckpt`` is written at every point where checkpoints are considered (each epoch's validation end, or the
  step/time interval), whether or not the metric improved;
- it replaces the previous ``last.ckpt`` atomically (a temporary file, then ``os.replace``): a job killed while
  writing keeps the previous one whole;
- when the top-k checkpoint of the same step was just written, ``last.ckpt`` is a hard link to it rather than a
  second copy of the same bytes (on file systems without hard links, a copy);
- ``fast_dev_run`` writes no ``last.ckpt`` (Lightning's ``on_train_end`` would).
"""

import os
import shutil
from typing import Dict, Optional
from weakref import proxy

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

PARTIAL_SUFFIX = ".partial"


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) whose ``last.ckpt`` (``save_last=True``) is the latest state of the run,
    replaced atomically, and hard-linked to the top-k checkpoint of the same step instead of duplicating it."""

    _last_file_step: Optional[int] = None  # global step whose state last.ckpt holds

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.fast_dev_run:  # fast_dev_run is a smoke test: it writes no checkpoint
            super().on_train_end(trainer, pl_module)

    def _save_last_if_behind(self, trainer: "pl.Trainer") -> None:
        """Write last.ckpt when it does not hold this step yet (Lightning skips it when no top-k file was saved)."""
        skip = (
            not self.save_last or bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking or self._last_file_step == trainer.global_step
        )
        if not skip:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_topk_checkpoint(self, trainer: "pl.Trainer", monitor_candidates: Dict[str, Tensor]) -> None:
        if self.save_last:  # the top-k file's state then names the last.ckpt that may be linked to it
            self.last_model_path = self._last_filepath(trainer, monitor_candidates)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _last_filepath(self, trainer: "pl.Trainer", monitor_candidates: Dict[str, Tensor]) -> str:
        """``last.ckpt`` in ``dirpath``; as Lightning does, ``last-v1.ckpt`` ... where another run's is there."""
        filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        version = self.STARTING_VERSION
        while self._enable_version_counter and self.file_exists(filepath, trainer) and filepath != self.last_model_path:
            filepath = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST, ver=version)
            version += 1
        return filepath

    def _save_last_checkpoint(self, trainer: "pl.Trainer", monitor_candidates: Dict[str, Tensor]) -> None:
        if not self.save_last:
            return
        if self.save_last == "link" or not _is_local_file_protocol(self.dirpath or ""):
            super()._save_last_checkpoint(trainer, monitor_candidates)  # Lightning's own: symlinks, remote stores
        else:
            filepath = self.last_model_path = self._last_filepath(trainer, monitor_candidates)  # saved in the state
            same_step = self._last_checkpoint_saved if self._last_global_step_saved == trainer.global_step else ""
            # Rank 0's view decides for every rank: saving is a collective call, linking is not.
            if not trainer.strategy.broadcast(bool(same_step) and os.path.isfile(same_step)):
                self._save_checkpoint(trainer, filepath)
            elif os.path.abspath(same_step) != os.path.abspath(filepath):  # this step's state is on disk: link it
                if trainer.is_global_zero:
                    link_or_copy(same_step, filepath + PARTIAL_SUFFIX)
                    os.replace(filepath + PARTIAL_SUFFIX, filepath)
                trainer.strategy.barrier("ResumableCheckpoint.link")
        self._last_file_step = trainer.global_step

    def _save_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        """Lightning's save, into a temporary file that then replaces ``filepath``: a job killed while writing leaves
        the previous file whole, and a file that ``last.ckpt`` is linked to is never rewritten in place."""
        if not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        partial = filepath + PARTIAL_SUFFIX
        trainer.save_checkpoint(partial, self.save_weights_only)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            if os.path.isdir(partial) and os.path.isdir(filepath):  # a sharded checkpoint is a folder
                shutil.rmtree(filepath)
            os.replace(partial, filepath)
        trainer.strategy.barrier("ResumableCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def link_or_copy(source: str, target: str) -> None:
    """``target`` becomes a hard link to ``source`` (no second copy of the bytes), or a copy where the file system
    has no hard links. An existing ``target`` is replaced."""
    if os.path.lexists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
