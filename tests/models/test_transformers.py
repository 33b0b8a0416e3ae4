"""The registry's transformers: ``gpt`` (byte-level decoder) and ``vit`` (image classifier)."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from qat.models import create_model


def test_gpt_is_causal_and_traceable() -> None:
    model = create_model("gpt", d_model=32, n_layers=2, n_heads=2, context_length=16).eval()
    ids = torch.randint(0, 256, (2, 16))
    logits = model(ids)
    assert logits.shape == (2, 16, 256)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        # A later token never changes an earlier position's logits.
        assert torch.equal(model(ids)[:, :10], model(changed)[:, :10])
    traced = fx.symbolic_trace(model)
    assert torch.equal(traced(ids), logits)


def test_gpt_trains() -> None:
    torch.manual_seed(0)
    model = create_model("gpt", d_model=32, n_layers=1, n_heads=2, context_length=8)
    ids = torch.randint(0, 8, (4, 9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(
            model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"d_model": 30, "n_heads": 4}, "divisible"),
        ({"n_layers": 0}, "n_layers"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_gpt_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("gpt", **kwargs)


def test_vit_on_fashion_mnist_shapes_and_names() -> None:
    model = create_model("vit", num_classes=10, in_channels=1, image_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    names = dict(model.named_modules())
    assert isinstance(names["stem.0"], torch.nn.Conv2d) and isinstance(names["fc"], torch.nn.Linear)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        create_model("vit", image_size=30)
