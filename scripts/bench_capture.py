"""How long graph capture and export take: prepare of a 100+ layer model, export of a ResNet-18.

Goals (issue "Any model"): ``qat.prepare`` of a 100-layer model in under 5 s; export (ONNX and
TorchScript, each built, written and smoke-tested) of a ResNet-18-size model in under 60 s, on
2 cores. The models are torchvision-style definitions written without qat in mind (inline
``+=``, a shared ReLU): a ResNet-101-shaped Bottleneck net (104 conv / linear layers) for
prepare, a BasicBlock ResNet-18 (11.7 M parameters, 224×224 input) for export.

Usage:
    python scripts/bench_capture.py [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))

from zoo import BasicBlock, Bottleneck, ResNet

import qat
from qat.export import export_model


class FourStage(nn.Module):
    """torchvision's four-stage ImageNet ResNet layout, built from ``zoo`` blocks."""

    def __init__(self, block: type, layers: list[int]) -> None:
        super().__init__()
        net = ResNet(block, layers[:2], num_classes=1000, width=64)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "avgpool"):
            setattr(self, name, getattr(net, name))
        self.layer3 = net._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = net._make_layer(block, 512, layers[3], stride=2)
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224, help="input image size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")

    deep = FourStage(Bottleneck, [3, 4, 23, 3]).eval()
    layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in deep.modules())
    x = torch.randn(1, 3, args.size, args.size)
    sec, q = timed(lambda: qat.prepare(deep, example_inputs=x), args.repeats)
    print(f"prepare, {layers}-layer ResNet-101 shape: {sec:.2f} s (goal < 5 s), {q.qat_capture}")

    r18 = FourStage(BasicBlock, [2, 2, 2, 2]).eval()
    params = sum(p.numel() for p in r18.parameters()) / 1e6
    q = qat.prepare(
        r18, {"overrides": [{"pattern": "@last", "activation": {"bits": 32}}]}, example_inputs=x
    )
    qat.calibrate(q, [torch.randn(2, 3, args.size, args.size)])
    q.eval()
    qat.snap_bias(q, x)
    with tempfile.TemporaryDirectory() as tmp:
        sec, _ = timed(lambda: export_model(q, Path(tmp), x), 1)
        sizes = {p.name: p.stat().st_size / 2**20 for p in Path(tmp).iterdir()}
    print(
        f"export, ResNet-18 ({params:.1f} M parameters, {args.size}x{args.size}): {sec:.1f} s "
        f"(goal < 60 s), files {', '.join(f'{k} {v:.1f} MiB' for k, v in sizes.items())}"
    )


if __name__ == "__main__":
    main()
