"""A second accuracy task with class structure: 50 classes in 10 superclasses of 5, generated offline.

Digits is small and nearly saturated (99% on clean labels), and its classes have little structure for a learned
label matrix to find. This task is built so that correlations between classes matter, as in CIFAR-100's 20 x 5:

- each class k has a centre ``superclass centre + subclass offset`` in a 16-dimensional latent space, the offsets
  small next to the distances between superclasses, so a class is mostly confused with its 4 siblings;
- a sample is its class centre plus Gaussian noise, seen through a fixed random two-layer tanh network (32 inputs),
  so a linear model does not suffice and a small MLP learns the task well but not perfectly (about 80% test
  accuracy on clean labels);
- 100 training and 50 test samples per class (5,000 / 2,500), the same for every seed (generator seed 0): the run's
  seed only picks the initialisation, the batch order and which training labels are corrupted.

Noise: ``symmetric`` sends a corrupted label to a uniformly random other class; ``flip`` to the next class of the
same superclass (``k -> 5 * (k // 5) + (k + 1) % 5``), the usual class-dependent noise of CIFAR-100 benchmarks.
"""

from typing import Any, Optional, Sequence, Tuple

import lightning as L
import torch
from torch import Tensor, nn

from lightning_adalabel import AdaLabel, AdaLabelMixin
from lightning_adalabel.examples.demo import RunResult, train_and_evaluate

NUM_SUPERCLASSES, PER_SUPERCLASS = 10, 5
NUM_CLASSES = NUM_SUPERCLASSES * PER_SUPERCLASS
LATENT, FEATURES = 16, 32
TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 50


def _corrupt(labels: Tensor, noise: float, noise_type: str, generator: torch.Generator) -> Tensor:
    corrupted = labels.clone()
    chosen = torch.randperm(len(labels), generator=generator)[: round(noise * len(labels))]
    if noise_type == "flip":
        k = labels[chosen]
        corrupted[chosen] = PER_SUPERCLASS * (k // PER_SUPERCLASS) + (k + 1) % PER_SUPERCLASS
    else:  # symmetric: a uniformly random other class
        shift = torch.randint(1, NUM_CLASSES, (len(chosen),), generator=generator)
        corrupted[chosen] = (labels[chosen] + shift) % NUM_CLASSES
    return corrupted


def load_superclass_split(
    noise: float = 0.0, seed: int = 0, noise_type: str = "flip"
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``; ``noise`` of the training labels corrupted by ``noise_type``.

    Example:
        >>> x_train, y_train, x_test, y_test = load_superclass_split(noise=0.4, seed=1)
        >>> tuple(x_train.shape), tuple(x_test.shape), int(y_train.max()) + 1
        ((5000, 32), (2500, 32), 50)
        >>> clean = load_superclass_split()[1]
        >>> changed = y_train != clean
        >>> int(changed.sum()), bool((y_train[changed] // 5 == clean[changed] // 5).all())
        (2000, True)
    """
    generator = torch.Generator().manual_seed(0)  # the data set itself never changes
    superclass_centres = 2.5 * torch.randn(NUM_SUPERCLASSES, LATENT, generator=generator)
    offsets = 1.0 * torch.randn(NUM_SUPERCLASSES, PER_SUPERCLASS, LATENT, generator=generator)
    centres = (superclass_centres[:, None] + offsets).reshape(NUM_CLASSES, LATENT)
    hidden = torch.randn(LATENT, 64, generator=generator) / LATENT**0.5
    output = torch.randn(64, FEATURES, generator=generator) / 8.0

    def sample(per_class: int) -> Tuple[Tensor, Tensor]:
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        latent = centres[labels] + 1.3 * torch.randn(len(labels), LATENT, generator=generator)
        features = torch.tanh(torch.tanh(latent @ hidden) @ output * 2.0)
        return (features - features.mean(0)) / features.std(0), labels

    x_train, y_train = sample(TRAIN_PER_CLASS)
    x_test, y_test = sample(TEST_PER_CLASS)
    if noise > 0:
        y_train = _corrupt(y_train, noise, noise_type, torch.Generator().manual_seed(1000 + seed))
    return x_train, y_train, x_test, y_test


class SuperclassMLP(AdaLabelMixin, L.LightningModule):
    """Two hidden layers of 128; trains with the mixin's default ``training_step``."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return [optimizer], [scheduler]


def run_superclasses(
    method: str = "alr",
    seed: int = 0,
    noise: float = 0.0,
    epochs: int = 30,
    batch_size: int = 128,
    progress_bar: bool = False,
    callback: Optional[AdaLabel] = None,
    noise_type: str = "flip",
    extra_callbacks: Sequence[L.Callback] = (),
) -> Tuple[RunResult, AdaLabel]:
    """Train :class:`SuperclassMLP` with ``callback`` (default ``AdaLabel(preset=method)``) and evaluate it on the
    clean test set; the same contract as :func:`lightning_adalabel.examples.demo.run_digits`."""
    callback = callback if callback is not None else AdaLabel(preset=method, num_classes=NUM_CLASSES)
    split = load_superclass_split(noise, seed, noise_type)
    result = train_and_evaluate(SuperclassMLP, split, callback, method, seed, noise, epochs, batch_size, progress_bar,
                                extra_callbacks)
    return result, callback
