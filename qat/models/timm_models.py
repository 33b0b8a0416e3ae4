"""timm's image classifiers in the registry: ``create_model("timm", arch="convnext_atto")``.

timm imports torchvision; where torchvision's compiled ops do not fit the installed torch (PyPI's
CUDA-built wheels beside the CPU torch), :mod:`qat.torchvision_compat` lets it import.

Example:
    >>> from qat.models import create_model
    >>> model = create_model("timm", arch="resnet18", num_classes=10, in_channels=1)
"""

from __future__ import annotations

import difflib
import importlib
import sys
from types import ModuleType

from torch import nn

from qat.models.registry import register_model
from qat.torchvision_compat import patch_torchvision

__all__ = ["import_timm", "timm"]


def import_timm() -> ModuleType:
    """The ``timm`` module (torchvision made importable beside the CPU torch: module doc).

    Raises:
        ImportError: timm (or torchvision) is not installed, with the command that installs it.
    """
    if "timm" in sys.modules:
        return sys.modules["timm"]
    patch_torchvision()
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise ImportError(
            f"timm models need timm and torchvision ({err}); install them with "
            "pip install -e '.[vision]' (it keeps the torch you have)"
        ) from err


@register_model(name="timm")
def timm(
    arch: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int | None = None,
    **kwargs: object,
) -> nn.Module:
    """A timm classifier by architecture name (``timm.list_models()``), randomly initialized.

    Args:
        arch: timm model name, e.g. ``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224``.
        num_classes: classifier outputs.
        in_channels: input channels (timm's ``in_chans``).
        image_size: input side, for models that fix it at construction (ViTs, MLP-Mixers);
            ignored by those that do not take ``img_size``.
        **kwargs: passed to ``timm.create_model``.

    Raises:
        ValueError: ``arch`` is not a timm model.
    """
    tm = import_timm()
    if not tm.is_model(arch):
        close = difflib.get_close_matches(arch, tm.list_models(), n=5, cutoff=0.7)
        raise ValueError(
            f"unknown timm model {arch!r}"
            + (f"; similar: {', '.join(close)}" if close else "; see timm.list_models()")
        )
    kw = dict(kwargs, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    model = None
    if image_size is not None:
        try:
            model = tm.create_model(arch, img_size=image_size, **kw)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    if model is None:
        model = tm.create_model(arch, **kw)
    # The attributes qat's own models carry, so exporters build their example input.
    model.in_channels = in_channels
    model.image_size = image_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model
