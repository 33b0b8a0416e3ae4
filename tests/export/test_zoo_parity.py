"""Ordinary models, as torchvision and timm write them, export with parity after graph capture.

Each model of ``tests/helpers/zoo.py`` (inline ``+=``, a shared ReLU, squeeze-excite multiplies,
drop-path, concatenation, LayerNorm behind permutes, attention with a class token, SDPA) goes
through the flow a user follows: a short float training (so the logits have margins), prepare
with example inputs → calibrate → a few QAT steps → snap the biases → export TorchScript and
ONNX → verify on held-out digits. The exported models must agree with the fake-quant model on
top-1 (≥ 99.9%), and the share of MACs on integer kernels must stay above each model's floor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from zoo import ZOO

import qat
from qat.data import DigitsDataModule
from qat.export import export_model, verify_artifacts
from qat.export.lowering import placement_report

#: Least share of MACs on integer kernels per model and target. ONNX runs every conv, linear
#: and attention matmul on integer kernels; TorchScript keeps the float logits layer (and the
#: attention matmuls, which quantized::matmul runs in float) in float islands.
FLOORS = {
    "resnet_basic": {"onnx": 0.99, "torchscript": 0.99},
    "resnet_bottleneck": {"onnx": 0.99, "torchscript": 0.99},
    "mobilenet_v2": {"onnx": 0.99, "torchscript": 0.98},
    "mobilenet_v3": {"onnx": 0.99, "torchscript": 0.95},
    "efficientnet": {"onnx": 0.99, "torchscript": 0.98},
    "densenet": {"onnx": 0.99, "torchscript": 0.99},
    "convnext": {"onnx": 0.99, "torchscript": 0.98},
    "vit": {"onnx": 0.99, "torchscript": 0.85},
    "vit_sdpa": {"onnx": 0.99, "torchscript": 0.85},
}
RECIPE = {"overrides": [{"pattern": "@last", "activation": {"bits": 32}}]}  # float logits


@pytest.fixture(scope="module")
def digits_rgb() -> tuple[list, list]:
    dm = DigitsDataModule(batch_size=64, image_size=16)
    dm.setup("fit")
    dm.setup("test")
    rgb = lambda loader: [(x.repeat(1, 3, 1, 1), y) for x, y in loader]  # noqa: E731
    return rgb(dm.train_dataloader()), rgb(dm.test_dataloader())


def _train(model: torch.nn.Module, batches: list, steps: int, lr: float, adam: bool) -> None:
    opt = (torch.optim.Adam if adam else torch.optim.SGD)(model.parameters(), lr)
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss), f"non-finite loss at step {i}"
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_zoo_and_the_floors_name_the_same_models() -> None:
    assert set(FLOORS) == set(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_prepare_export_verify(name: str, digits_rgb, tmp_path, record_property) -> None:
    train, test = digits_rgb
    build, _ = ZOO[name]
    torch.manual_seed(0)
    model = build(num_classes=10)
    _train(model, train, steps=40, lr=3e-3, adam=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to the module swap warns
        q = qat.prepare(model, RECIPE, example_inputs=train[0][0][:2])
    assert q.qat_capture == {"mode": "graph"}
    assert isinstance(q, type(model))  # the user's class, attributes and methods kept
    qat.calibrate(q, [x for x, _ in train[:4]])
    qat.set_observers(q, True)
    _train(q, train, steps=4, lr=0.01, adam=False)
    qat.set_observers(q, False)
    q.eval()
    qat.snap_bias(q, test[0][0][:8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = export_model(q, tmp_path, test[0][0][:1])
    report = verify_artifacts(q, paths, test[:4])
    placement = placement_report(q, test[0][0][:1])
    for target, result in report["runtimes"].items():
        record_property(f"{target}_max_abs_logit_diff", result["max_abs_diff"])
        record_property(f"{target}_integer_mac_share", placement["integer_mac_share"][target])
        assert result["agreement"] >= 0.999, (target, result)
        assert abs(result["accuracy"] - report["fake_quant"]["accuracy"]) <= 0.001, result
        assert placement["integer_mac_share"][target] >= FLOORS[name][target], placement
