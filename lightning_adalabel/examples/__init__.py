"""Examples built on the library, not part of it: the ``adalabel`` command, the digits demo and the LightningCLI
recipes.

- :mod:`~lightning_adalabel.examples.cli`: the ``adalabel`` command (``adalabel demo``,
  ``adalabel fit --config cifar10``).
- :mod:`~lightning_adalabel.examples.demo`: every preset on scikit-learn's digits
  (``pip install "lightning-adalabel[demo]"``).
- :mod:`~lightning_adalabel.examples.recipes`: LightningCLI recipes for CIFAR, ImageNet and text classification
  (``pip install "lightning-adalabel[recipes]"``: jsonargparse and torchvision).

They use only the public API (``from lightning_adalabel import AdaLabel, AdaLabelMixin, ...``), as a user's code
would; the library never imports them, so ``import lightning_adalabel`` needs none of their dependencies.
"""
