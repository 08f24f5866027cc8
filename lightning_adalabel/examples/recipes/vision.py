"""Image classification for the recipes: torchvision and timm models, a CIFAR-style ResNet, and MixUp/CutMix batches
whose probability targets flow into the ALR loss."""

import difflib
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision import models
from torchvision.transforms import v2

from lightning_adalabel.examples.recipes.classification import ClassificationModule
from lightning_adalabel.examples.recipes.hub import cache_only, hub_unreachable_reason

CIFAR_PREFIX = "cifar_"
TIMM_PREFIX = "timm/"
TIMM_EXTRA = 'pip install "lightning-adalabel[timm]"'


def build_image_model(
    arch: str, num_classes: int, pretrained: bool = False, model_kwargs: Optional[Dict[str, Any]] = None
) -> nn.Module:
    """An image classifier by name, with a new ``num_classes``-way output layer.

    ``arch`` is one of:

    - any name of ``torchvision.models.list_models()`` (``"resnet50"``, ``"vit_b_16"``, ...), randomly initialised;
    - ``"cifar_"`` + a torchvision ResNet name (``"cifar_resnet18"``): the same network with the CIFAR stem of He et
      al. 2016 (a 3x3 stride-1 first convolution and no max-pool), which keeps 32x32 inputs at full resolution in the
      first stage instead of dividing it by 4;
    - ``"timm/"`` + a timm model name (``"timm/convnext_tiny"``, ``"timm/vit_tiny_patch16_224"``), optionally with a
      pretrained tag (``"timm/convnext_tiny.fb_in22k"``): see :func:`build_timm_model`.

    ``pretrained`` loads timm's pretrained weights (timm models only). ``model_kwargs`` go to the model's
    constructor: ``{"drop_path_rate": 0.1}`` (timm's stochastic depth), ``{"img_size": 32}`` (a timm ViT on 32x32
    images), ``{"zero_init_residual": True}`` (a torchvision ResNet), ...

    Example:
        >>> model = build_image_model("cifar_resnet18", num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> type(build_image_model("timm/test_resnet", num_classes=10)).__module__
        'timm.models.resnet'
    """
    model_kwargs = dict(model_kwargs or {})
    if arch.startswith(TIMM_PREFIX):
        return build_timm_model(arch[len(TIMM_PREFIX):], num_classes, pretrained, model_kwargs)
    if pretrained:
        raise ValueError(
            f"`pretrained` loads timm's weights, and {arch!r} is a torchvision model, which the recipes build randomly"
            f" initialised. Use its timm version (e.g. `--model.arch timm/{arch.removeprefix(CIFAR_PREFIX)}`) or"
            " `--model.pretrained false`."
        )
    if not arch.startswith(CIFAR_PREFIX):
        return models.get_model(arch, weights=None, num_classes=num_classes, **model_kwargs)
    model = models.get_model(arch[len(CIFAR_PREFIX):], weights=None, num_classes=num_classes, **model_kwargs)
    if not isinstance(model, models.ResNet):
        raise ValueError(f"The CIFAR stem is defined for ResNets (e.g. 'cifar_resnet18'), got {arch!r}.")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_timm_model(
    name: str, num_classes: int, pretrained: bool = False, model_kwargs: Optional[Dict[str, Any]] = None
) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)``.

    With ``pretrained``, timm loads the weights of the name's default tag, or of the given one
    (``"convnext_tiny.fb_in22k"``), from the Hugging Face Hub or its local cache, all but the classifier, which is new
    with ``num_classes`` outputs; where the Hub cannot be reached, from the cache only, at once, instead of after
    ``huggingface_hub``'s five retries (:mod:`~lightning_adalabel.examples.recipes.hub`). timm is an optional
    dependency, imported here only.

    Example:
        >>> build_timm_model("convnext_tiyn", num_classes=10)
        Traceback (most recent call last):
        ...
        ValueError: 'convnext_tiyn' is not a timm model; did you mean timm/convnext_tiny, ...
    """
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"--model.arch timm/{name} needs timm, an optional dependency: {TIMM_EXTRA}") from error
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=2)
        hint = f"did you mean {', '.join(TIMM_PREFIX + each for each in close)}? " if close else ""
        raise ValueError(
            f"{name!r} is not a timm model; {hint}The names are those of timm.list_models(), e.g."
            f" `python -c \"import timm; print(timm.list_models('convnext*'))\"`."
        )
    unreachable = hub_unreachable_reason() if pretrained else None
    try:
        with cache_only(unreachable is not None):
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
    except FileNotFoundError as error:  # huggingface_hub's LocalEntryNotFoundError: not cached, and offline
        if not pretrained:
            raise
        why = (f"the Hub cannot be reached ({unreachable})" if unreachable
               else f"could not be downloaded ({type(error).__name__})")
        raise FileNotFoundError(
            f"The pretrained weights of timm/{name} are not in the Hugging Face cache and {why}. Run once with network"
            " access (the weights are then cached; see HF_HOME), or train from scratch with `--model.pretrained false`."
        ) from error


def build_batch_mixing(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> Optional[v2.Transform]:
    """torchvision's batch MixUp and/or CutMix (one of the two, chosen at random per batch, when both are on).

    The transform maps ``(images, class indices)`` to ``(mixed images, B x K probabilities)`` with
    ``t = lam * onehot(y) + (1 - lam) * onehot(y rolled by one)``; ``None`` when both alphas are 0.
    """
    mixers: List[v2.Transform] = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


class ImageClassifier(ClassificationModule):
    """An image classifier for the CIFAR and ImageNet recipes.

    Args:
        num_classes: K.
        arch: torchvision model name, ``"cifar_resnet18"`` etc., or ``"timm/"`` + a timm model name
            (``"timm/convnext_tiny"``; see :func:`build_image_model`).
        pretrained: start from timm's pretrained weights (a ``"timm/..."`` arch only; downloaded from the Hugging Face
            Hub on first use, then read from its cache). The new classifier layer is always randomly initialised.
        model_kwargs: more keyword arguments for the model's constructor, e.g. ``{"drop_path_rate": 0.1}`` for a timm
            model's stochastic depth, or ``{"img_size": 32}`` for a timm ViT on CIFAR.
        channels_last: keep weights and input batches in NHWC memory layout (faster convolutions with mixed
            precision on tensor-core GPUs).
        mixup_alpha: MixUp's Beta(alpha, alpha) parameter on training batches; 0 turns MixUp off.
        cutmix_alpha: CutMix's Beta(alpha, alpha) parameter on training batches; 0 turns CutMix off.
        **kwargs: optimizer and schedule settings of
            :class:`~lightning_adalabel.examples.recipes.classification.ClassificationModule` (``lr``,
            ``momentum``, ``weight_decay``, ``schedule``, ``warmup_epochs``, ``lr_reference_batch_size``, ...).

    MixUp/CutMix run on the device, after the batch is transferred, on training batches only; the resulting
    probability targets go to ``self.adalabel_loss``, whose loss is linear in the target, so a mixed target
    ``lam * a + (1 - lam) * b`` costs exactly ``lam * loss(a) + (1 - lam) * loss(b)``. A mixed sample has no single
    label to measure a margin for, so mixed batches train without the samples' indices: with MixUp/CutMix on, AdaLabel
    keeps no training margins, and ``adalabel label-issues`` ranks by the trained model's probabilities (the fit says
    so when it starts).

    Lightning warns once per process that this model overrides ``on_after_batch_transfer`` while a data module is
    passed; that is intended (the mixing belongs to the model's training, not to the data). ``adalabel fit`` hides
    that one warning for the duration of its run (see :func:`~lightning_adalabel.examples.recipes.lightning_cli.run`).
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "cifar_resnet18",
        pretrained: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        channels_last: bool = False,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=num_classes, **kwargs)
        self.save_hyperparameters()
        self.net = build_image_model(arch, num_classes, pretrained, model_kwargs)
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.batch_mixing = build_batch_mixing(num_classes, mixup_alpha, cutmix_alpha)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.batch_mixing is not None:
            rank_zero_info(
                "adalabel: MixUp/CutMix mix every training batch, so AdaLabel keeps no training margins (a mixed sample"
                " has no single label); `adalabel label-issues` will rank by the trained model's probabilities"
            )

    def mix_batch(self, images: Tensor, target: Tensor) -> "tuple[Tensor, Tensor]":
        """MixUp/CutMix one training batch: ``(images, class indices)`` -> ``(images, B x K probabilities)``."""
        if self.batch_mixing is None:
            return images, target
        return self.batch_mixing(images, target)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, target, *index = batch  # training batches also carry the samples' indices
        if self.trainer.training:
            images, target = self.mix_batch(images, target)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images, target, *index)
