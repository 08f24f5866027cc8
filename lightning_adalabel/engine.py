"""The engine contract: what the :class:`~lightning_adalabel.AdaLabel` callback, or any loop, asks of an engine.

An engine holds Q and the statistics that refresh it. Two implement :class:`LabelMatrixEngine`:
:class:`~lightning_adalabel.label_matrix.LabelMatrix` (Q as a dense ``K x K`` tensor) and
:class:`~lightning_adalabel.sparse_label_matrix.SparseLabelMatrix` (``AdaLabel(top_k=...)``: each row's ``top_k``
largest entries and a uniform remainder). The callback holds one engine and calls only what this class names; a third
engine (say, a low-rank Q) is a subclass in a module of its own and one line in the callback's ``_new_engine``.

- Per batch: :meth:`~LabelMatrixEngine.loss` (checked inputs: :meth:`~LabelMatrixEngine.loss_and_statistics`) gives
  the loss and the batch's statistics without touching the engine's state, :meth:`~LabelMatrixEngine.add` adds the
  statistics once the step is done, :meth:`~LabelMatrixEngine.update` accumulates a batch from its logits alone, and
  :meth:`~LabelMatrixEngine.loss_only` is the loss of a batch that is not learned from (validation).
- Per refresh: :meth:`~LabelMatrixEngine.refresh` combines the statistics of every process with one
  :class:`Collective` call, folds them into Q and returns the ``K x 4`` tallies it used
  (:mod:`lightning_adalabel.statistics`).
- Q: :meth:`~LabelMatrixEngine.to_dense` (``K x K``, for small K), :meth:`~LabelMatrixEngine.rows` (dense rows of
  given classes, at any K), :meth:`~LabelMatrixEngine.mean_entropy`, :meth:`~LabelMatrixEngine.top_pairs`.
- State: ``state_dict``/``load_state_dict`` (formats: :mod:`lightning_adalabel.state_versions`), ``to(device)``,
  ``device``, :meth:`~LabelMatrixEngine.reset_statistics`, and the tallies since the last refresh as ``counts``,
  ``seen``, ``nonfinite`` and ``invalid``.
"""

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple, Union

import torch
from torch import Tensor
from typing_extensions import Protocol

from lightning_adalabel.inputs import ClassificationBatch, _arg_validation, _format, _tensor_validation
from lightning_adalabel.presets import Preset
from lightning_adalabel.statistics import COUNTED, INVALID, NONFINITE, SEEN
from lightning_adalabel.validation import check_bool, check_engine_config, check_int, warn_deprecated

#: How an engine learns Q: every field of a :class:`~lightning_adalabel.Preset` but its loss (``loss``, ``alpha``).
#: ``Preset.engine_settings()`` gives them as the engines' keyword arguments.
ENGINE_SETTINGS = tuple(field.name for field in fields(Preset) if field.name not in ("loss", "alpha"))


class Collective(Protocol):
    """How a refresh combines the statistics of every process. An engine calls one of these, once per refresh, so
    that every process ends with the same Q."""

    def sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of ``tensor`` over the processes (an all-reduce)."""

    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor``, stacked along a new first dimension (an all-gather)."""


class SingleProcess:
    """The :class:`Collective` of a single process: there is nothing to combine."""

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor[None]


class _Functions(SingleProcess):
    """A :class:`Collective` from the functions that ``refresh(reduce=...)`` and ``refresh(gather=...)`` took."""

    def __init__(self, reduce: Optional[Callable[[Tensor], Tensor]], gather: Optional[Callable[[Tensor], Tensor]]):
        self._reduce, self._gather = reduce, gather

    def sum(self, tensor: Tensor) -> Tensor:
        return super().sum(tensor) if self._reduce is None else self._reduce(tensor)

    def gather(self, tensor: Tensor) -> Tensor:
        return super().gather(tensor) if self._gather is None else self._gather(tensor)


class LabelMatrixEngine(ABC):
    """Q and the statistics that refresh it, behind the interface that the callback uses (see the module docstring).

    Subclasses call :meth:`_configure` first in ``__init__``, and keep the ``K x 4`` tallies as ``tallies``.
    """

    #: Whether Q is kept as a ``K x K`` tensor, so that :meth:`to_dense` costs nothing at any K.
    stores_dense: ClassVar[bool] = False

    num_classes: int
    compile_loss: bool
    num_refreshes: int
    tallies: Tensor
    # The settings (ENGINE_SETTINGS), fixed at construction: build another engine to change them.
    samples: str
    estimator: str
    momentum: float
    include_diagonal: bool
    prior: str
    prior_strength: float
    start: str
    empty_rows: str

    def _configure(self, num_classes: int, compile_loss: bool, **settings: Any) -> None:
        """Check and keep K and the :data:`ENGINE_SETTINGS`; the first step of a subclass's ``__init__``."""
        check_int("num_classes", num_classes, minimum=2)
        check_bool("compile_loss", compile_loss)
        check_engine_config(**settings)
        self.num_classes = num_classes
        self.__dict__.update(settings, momentum=float(settings["momentum"]),
                             prior_strength=float(settings["prior_strength"]))
        self.compile_loss = compile_loss
        self.num_refreshes = 0

    # ---- per batch ---------------------------------------------------------------------------------------------

    def loss(
        self, logits: Tensor, target: Tensor, loss: str = "decoupled", alpha: float = 1.0, ignore_index: int = -100,
        reduction: str = "mean",
    ) -> Tuple[Tensor, Any]:
        """The loss of a batch with this Q (``"decoupled"``, ``"mixed"`` or ``"ce"``, with ``F.cross_entropy``'s
        layouts, ``ignore_index`` and ``reduction``) and the batch's statistics, computed without touching this
        engine; :meth:`add` the statistics once the step is done."""
        _arg_validation(ignore_index, reduction)
        _tensor_validation(logits, target, self.num_classes)
        return self.loss_and_statistics(logits, target, ignore_index, loss, alpha, reduction)

    @abstractmethod
    def loss_and_statistics(
        self, logits: Tensor, target: Tensor, ignore_index: int, loss: str, alpha: float, reduction: str = "mean"
    ) -> Tuple[Tensor, Any]:
        """:meth:`loss` of a batch whose arguments are already checked (the callback checks them once)."""

    @abstractmethod
    def loss_only(
        self, logits: Tensor, target: Tensor, ignore_index: int, loss: str, alpha: float, reduction: str = "mean"
    ) -> Tensor:
        """The loss of a checked batch that is not learned from (validation, test): no statistics."""

    @abstractmethod
    def batch_statistics(self, batch: ClassificationBatch) -> Any:
        """The statistics of a formatted batch (:func:`lightning_adalabel.inputs._format`), from its logits."""

    @abstractmethod
    def add(self, statistics: Any) -> None:
        """Add a batch's statistics (from :meth:`loss` or :meth:`batch_statistics`) to the engine's. No host sync."""

    def update(self, logits: Tensor, target: Tensor, ignore_index: int = -100) -> None:
        """Accumulate one batch in ``F.cross_entropy``'s layouts: logits ``(N, K, ...)`` of any float dtype, targets
        class indices ``(N, ...)`` or probabilities of the logits' shape; every position is one sample.

        Runs in float32 on the logits' device without a device-to-host copy. Rows with NaN/+inf logits are left
        out of the sums and counted in :attr:`nonfinite`; invalid targets are counted in :attr:`invalid`.
        """
        _tensor_validation(logits, target, self.num_classes)
        self.add(self.batch_statistics(_format(logits.detach(), target.detach(), ignore_index)))

    # ---- per refresh -------------------------------------------------------------------------------------------

    def refresh(
        self, collective: Optional[Collective] = None, *, reduce: Optional[Callable[[Tensor], Tensor]] = None,
        gather: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> Tensor:
        """Fold the statistics into Q and reset them; return the (combined) ``K x 4`` tallies that were used
        (counted, seen, non-finite, invalid per class; :func:`~lightning_adalabel.statistics.statistic_totals` sums
        them).

        Args:
            collective: combines the statistics of every process (the callback's wraps ``trainer.strategy``), called
                once; ``None``: a single process. Rows that received no sample keep their value (or become uniform
                with ``empty_rows="uniform"``). Runs on the device without a host sync.
            reduce, gather: deprecated; the functions that the dense and the sparse engine took before
                :class:`Collective`.
        """
        if reduce is not None or gather is not None:
            former = "reduce" if reduce is not None else "gather"
            name = type(self).__name__
            warn_deprecated(f"{name}.refresh({former}=...)", f"{name}.refresh(collective), a Collective")
            collective = _Functions(reduce, gather)
        tallies = self._refresh(collective if collective is not None else SingleProcess())
        self.num_refreshes += 1
        return tallies

    @abstractmethod
    def _refresh(self, collective: Collective) -> Tensor:
        """:meth:`refresh`'s work: combine, fold into Q, reset the statistics, return the combined tallies."""

    @abstractmethod
    def reset_statistics(self) -> None:
        """Forget the statistics gathered since the last refresh (Q is kept), e.g. when a new ``fit`` starts."""

    # ---- Q -----------------------------------------------------------------------------------------------------

    @abstractmethod
    def to_dense(self) -> Tensor:
        """Q as a ``K x K`` tensor (not a copy where it is kept so: never change it in place)."""

    @abstractmethod
    def rows(self, classes: Tensor) -> Tensor:
        """The rows of Q of the given classes, ``(len(classes), K)``: Q's soft labels, at any K."""

    @abstractmethod
    def mean_entropy(self) -> Tensor:
        """The mean over rows of the entropy of Q's rows (nats), a 0-dim tensor."""

    @abstractmethod
    def top_pairs(self, n: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(rows, columns, values)`` of the ``n`` largest off-diagonal entries of Q, largest first."""

    # ---- state -------------------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where Q and the statistics live (the logits' device)."""

    @abstractmethod
    def to(self, device: Union[str, torch.device]) -> "LabelMatrixEngine":
        """Move Q and the statistics to ``device``; returns ``self``."""

    @abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """Q, the statistics and the configuration, as tensors and plain values."""

    @abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output onto this engine's device, after checking it in full."""

    @property
    def counts(self) -> Tensor:
        """Number of samples per target class that entered the statistics' sums since the last refresh."""
        return self.tallies[:, COUNTED]

    @property
    def seen(self) -> Tensor:
        """Number of samples per target class seen since the last refresh, counted or not (ignored ones are not)."""
        return self.tallies[:, SEEN]

    @property
    def nonfinite(self) -> Tensor:
        """Number of samples per target class left out since the last refresh because their logits held NaN or +inf,
        or -inf at the target class (-inf elsewhere is a mask: such samples count)."""
        return self.tallies[:, NONFINITE]

    @property
    def invalid(self) -> Tensor:
        """Number of invalid targets since the last refresh (all in row 0: they have no class)."""
        return self.tallies[:, INVALID]

    def config(self) -> Dict[str, Any]:
        """What defines this engine's state: K, the sizes of its tensors and its settings (saved, and checked on
        load)."""
        settings = {name: getattr(self, name) for name in ENGINE_SETTINGS}
        return {"num_classes": self.num_classes, **self._sizes(), **settings}

    def _sizes(self) -> Dict[str, Any]:
        """The settings that size an engine's tensors beyond K (none for a dense Q)."""
        return {}

    def _check_config(self, state: Dict[str, Any]) -> None:
        """Refuse a state saved with another configuration, naming each difference."""
        mismatched = [f"{key}={state.get(key)!r} (this one has {value!r})" for key, value in self.config().items()
                      if state.get(key) != value]
        if mismatched:
            raise ValueError(
                "The label-matrix state was saved with a different configuration: " + ", ".join(mismatched)
                + ". Resume with the same settings, or start a new run without this checkpoint."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{key}={value!r}" for key, value in self.config().items()) + ")"

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # torch.multiprocessing (ddp_spawn, DataLoader workers) pickles CPU tensors as shared memory: every process
        # started from one callback would otherwise update a single set of statistics at the same time, losing counts
        # and then combining them twice. Each process owns its copy.
        state = {"compile_loss": False, **state}  # pickled before the setting existed
        self.__dict__.update({key: value.clone() if isinstance(value, Tensor) else value
                              for key, value in state.items()})
