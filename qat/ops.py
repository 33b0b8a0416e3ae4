"""Float marker modules for operations that take more than one tensor.

Graph capture (:func:`qat.prepare`) quantizes a residual ``a + b`` or ``torch.cat`` wherever the
forward writes it; a module swap (the fallback where capture fails, or ``capture="modules"``)
can only see ``nn.Module`` children, so there an inline add stays in float. These small modules
are plain float ops (no quantization inside) that both paths swap for :class:`qat.QAdd` /
:class:`qat.QCat`, which quantize the result so the trained graph is the integer graph
(requantize after add). The models in :mod:`qat.models` use them.

For a model that cannot be captured: replace ``out = out + identity`` by ``self.add = Add()``
in ``__init__`` and ``out = self.add(out, identity)`` in ``forward``. ``Add(relu=True)`` is
``relu(a + b)``, the add+ReLU that integer runtimes fuse.
"""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """``a + b`` (optionally followed by ReLU) as a module, so it can be swapped for ``QAdd``."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a + b
        return torch.relu(out) if self.relu else out

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class Cat(nn.Module):
    """``torch.cat(tensors, dim)`` as a module, so it can be swapped for ``QCat``."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat(list(tensors), dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
