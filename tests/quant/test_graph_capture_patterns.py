"""Capture of Python patterns timm's model code writes (each a tiny module reproducing one)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import qat


class _StarShape(nn.Module):
    """``y.reshape(*y.shape[:2], -1)``: Python asks the length of the shape it unpacks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.reshape(*y.shape[:2], -1).mean(-1))


def test_unpacking_a_shape_into_arguments_is_captured() -> None:
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the module swap
        q = qat.prepare(_StarShape().eval(), example_inputs=x, capture="graph")
    assert q.qat_capture["mode"] == "graph"
    # The line that was specialized is the model's own (not the caller's).
    assert q.qat_capture["specialized"] == [
        next(w for w in q.qat_capture["specialized"] if "reshape(*y.shape[:2], -1)" in w)
    ]
    assert q.eval()(x).shape == (2, 2)
