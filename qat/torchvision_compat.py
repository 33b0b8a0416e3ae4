"""Let a torchvision whose compiled ops cannot load import anyway (its Python half works).

PyPI's torchvision wheels for x86-64 Linux are built against the CUDA torch. Beside the CPU
torch their ``_C`` library (``nms``, ``roi_align``: detection ops) cannot load, and then
``import torchvision`` itself fails: its ``_meta_registrations`` registers a fake kernel for
``torchvision::nms``, an operator nobody defined ("operator torchvision::nms does not exist").
Lightning, torchmetrics and timm import torchvision whenever it is installed, so that one error
stops them all. :func:`patch_torchvision` (run when ``qat`` is imported) defines the schemas of the two
operators that registration needs, only where ``_C`` does not load: torchvision's layers and
transforms then work (timm needs them), and calling a detection op raises PyTorch's "no kernel"
error, which no classifier reaches. Where ``_C`` loads, nothing changes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["patch_torchvision"]

#: What torchvision's ``_meta_registrations.py`` registers without checking that ``_C`` loaded.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library: torch.library.Library | None = None  # kept alive: it owns the definitions


def patch_torchvision() -> bool:
    """Define the schemas if torchvision is installed, not yet imported, and its ``_C`` cannot
    load beside this torch. True when it did."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    libs = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
        return False  # the real ops: torchvision imports as it is
    except (OSError, RuntimeError):
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True


patch_torchvision()
