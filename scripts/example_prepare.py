"""The Python API on the embedded digits set: float → PTQ → QAT at W4A4, in about a minute.

python scripts/example_prepare.py [--bits 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

import qat
from qat.data import DigitsDataModule
from qat.models import create_model


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def train(model: nn.Module, loader, epochs: int, lr: float) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64, image_size=16)
    dm.setup("fit")
    dm.setup("test")
    model = create_model("resnet20", num_classes=10, in_channels=1, image_size=16)

    train(model, dm.train_dataloader(), epochs=8, lr=0.05)
    print(f"float               test acc {accuracy(model, dm.test_dataloader()):6.2f}%")

    recipe = {
        "weight": {"bits": args.bits},
        "activation": {"bits": args.bits},
        # First conv and classifier stay at 8 bits, as is usual for low-bit QAT.
        "overrides": [
            {"pattern": p, "weight": {"bits": 8}, "activation": {"bits": 8}}
            for p in ("stem.0", "fc")
        ],
    }
    qmodel = qat.prepare(copy.deepcopy(model), recipe)
    qat.calibrate(qmodel, dm.train_dataloader(), num_batches=8)
    print(
        f"PTQ  W{args.bits}A{args.bits}           test acc {accuracy(qmodel, dm.test_dataloader()):6.2f}%"
    )

    qat.set_observers(qmodel, True)  # QAT with live (moving-average) ranges
    train(qmodel, dm.train_dataloader(), epochs=args.epochs, lr=0.01)
    print(
        f"QAT  W{args.bits}A{args.bits} ({args.epochs} epochs) test acc {accuracy(qmodel, dm.test_dataloader()):6.2f}%"
    )


if __name__ == "__main__":
    main()
