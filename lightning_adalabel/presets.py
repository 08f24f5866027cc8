"""Named configurations that share the ALR engine, so one script can compare them side by side."""

from dataclasses import dataclass, replace
from typing import Dict, Optional

from lightning_adalabel.validation import LOSS_MODES, check_choice, check_engine_config, check_number


@dataclass(frozen=True)
class Preset:
    """Everything that defines a label-regularisation method on top of the engine.

    Attributes:
        samples: which samples feed the statistics (``"none"``: Q is never refreshed).
        estimator: ``"mean"``, ``"geometric"`` or ``"confusion"``.
        momentum: weight of the new estimate at each refresh.
        include_diagonal: statistics over the full softmax (OLS) rather than the residual over wrong classes (ALR).
        loss: ``"decoupled"`` (CE + alpha x residual CE), ``"mixed"`` (soft-target CE) or ``"ce"`` (plain CE).
        alpha: weight of the soft part of the loss.
        prior: what a refreshed row is shrunk toward, ``"uniform"`` or ``"previous"`` (see ``prior_strength``).
        prior_strength: the prior's pseudo-count per sample of the class seen since the last refresh; 0 (the
            default) refreshes each row to its statistics' estimate alone.
        start: ``"uniform"`` or ``"zeros"`` (Q starts all-zero: no soft loss until the first refresh).
        empty_rows: at a refresh a row without samples is kept (``"keep"``) or reset to uniform (``"uniform"``).
    """

    samples: str
    estimator: str
    momentum: float
    include_diagonal: bool
    loss: str
    alpha: float
    prior: str = "uniform"
    prior_strength: float = 0.0
    start: str = "uniform"
    empty_rows: str = "keep"

    def __post_init__(self) -> None:
        check_engine_config(self.samples, self.estimator, self.momentum, self.include_diagonal, self.prior,
                            self.prior_strength, self.start, self.empty_rows)
        check_choice("loss", self.loss, LOSS_MODES)
        check_number("alpha", self.alpha, 0.0)
        if self.loss == "mixed" and self.alpha > 1:
            raise ValueError(
                f"`alpha` must be in [0, 1] for the 'mixed' loss (it is the soft part of the target), got {self.alpha}."
            )
        if self.loss == "mixed" and not self.include_diagonal and self.alpha >= 1:
            raise ValueError(
                f"The 'mixed' loss with a residual matrix (zero diagonal) and alpha={self.alpha} gives the true class"
                " no target mass, so the model learns to predict wrong classes. Use alpha < 1 (0.5 or less is"
                " typical), or the 'decoupled' loss, which keeps the hard label whatever alpha is."
            )
        if self.loss == "decoupled" and self.include_diagonal:
            raise ValueError(
                "The 'decoupled' loss needs a residual matrix (zero diagonal): set include_diagonal=False, or use"
                " loss='mixed'."
            )

    def engine_settings(self) -> Dict[str, object]:
        """The :class:`~lightning_adalabel.LabelMatrix` keyword arguments of this preset (all but the loss)."""
        return {key: value for key, value in self.__dict__.items() if key not in ("loss", "alpha")}


PRESETS: Dict[str, Preset] = {
    # ALR: learn from the misclassified samples' predictions over wrong classes. Chosen by benchmarks/accuracy.py
    # (digits, 5 seeds): alpha 1.0 is the most accurate under all four label-noise settings and within one standard
    # error of alpha 0.5 on clean labels; "misclassified" is far ahead of "all"/"correct" under class-dependent noise.
    "alr": Preset(samples="misclassified", estimator="mean", momentum=1.0, include_diagonal=False, loss="decoupled",
                  alpha=1.0),
    # Online Label Smoothing (Zhang et al. 2021): full softmax of correct samples, 0.5 CE(z, y) + 0.5 CE(z, Q[y]).
    "ols": Preset(samples="correct", estimator="mean", momentum=1.0, include_diagonal=True, loss="mixed", alpha=0.5),
    # OLS exactly as its official code runs it: Q starts all-zero (the first epoch trains on 0.5 x CE alone) and a
    # class with no correct sample in an epoch gets the uniform row 1/K (where "ols" keeps its previous row).
    "ols_official": Preset(samples="correct", estimator="mean", momentum=1.0, include_diagonal=True, loss="mixed",
                           alpha=0.5, start="zeros", empty_rows="uniform"),
    # Uniform Q over all K classes, never refreshed: exactly F.cross_entropy(..., label_smoothing=alpha).
    "label_smoothing": Preset(samples="none", estimator="mean", momentum=1.0, include_diagonal=True, loss="mixed",
                              alpha=0.1),
    # A given Q (AdaLabel(initial_matrix=...), e.g. one learned by an earlier ALR run), never refreshed.
    "fixed": Preset(samples="none", estimator="mean", momentum=1.0, include_diagonal=False, loss="decoupled",
                    alpha=1.0),
    "none": Preset(samples="none", estimator="mean", momentum=1.0, include_diagonal=False, loss="ce", alpha=0.0),
}


def resolve_preset(name: str, **overrides: Optional[object]) -> Preset:
    """The preset ``name`` with every override that is not ``None`` applied (and the result validated).

    Example:
        >>> resolve_preset("alr", alpha=0.3).alpha, resolve_preset("alr", alpha=0.3).samples
        (0.3, 'misclassified')
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    unknown = set(overrides) - set(Preset.__dataclass_fields__)
    if unknown:
        raise TypeError(f"Unknown preset fields {sorted(unknown)}.")
    return replace(PRESETS[name], **{key: value for key, value in overrides.items() if value is not None})
