"""The stock experiments lose no accuracy at any schedule step on a dataset they were not tuned on.

Each runs its own schedule (warm-up, bit-width steps, BN and observer freezes) on a generated
32×32 RGB ImageFolder (scripts/make_imagefolder.py, 10 classes, 200 training images each)
(ResNet-20 at 16×16; MobileNetV2 at 32×32 on every batch, since its recipe's 40% of an
epoch is 5 steps here): at every epoch where the phase or a bit width changed, validation accuracy is not
below the epoch before by more than ``MARGIN``. The full-size comparison of the BN freeze on
four datasets is scripts/bn_freeze_check.py (docs/bn_freeze.md).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lit_helpers import REPO, compose_train

from qat.lit.train import train

#: 4 of the 200 validation images.
MARGIN = 0.02
SMALL = ["data.image_size=16"]
STOCK = {
    "resnet_int8": SMALL,
    "resnet_int4": SMALL,
    "resnet_w4a8": SMALL,
    "mobilenet_int8": ["data.image_size=32", "trainer.limit_train_batches=1.0"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    script = REPO / "scripts" / "make_imagefolder.py"
    args = ["--kind", "generated", "--out", str(out), "--train", "200", "--test", "20"]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    return out


def step_epochs(history: list[dict]) -> list[int]:
    """Epochs whose phase or bit widths differ from the epoch before's."""
    keys = ("phase", "weight_bits", "act_bits")
    return [
        row["epoch"]
        for before, row in itertools.pairwise(history)
        if any(row[k] != before[k] for k in keys)
    ]


# 40-70 s each on 2 cores.
@pytest.mark.slow
@pytest.mark.parametrize("experiment", STOCK)
def test_no_schedule_step_costs_validation_accuracy(
    experiment: str, folder: Path, tmp_path: Path
) -> None:
    cfg = compose_train(
        [
            f"+experiment={experiment}",
            "data=imagefolder",
            f"data.data_dir={folder}",
            *STOCK[experiment],
            "data.num_workers=0",
            "export.enabled=false",
            "logger=none",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "~callbacks.rich_progress_bar",
        ],
        tmp_path,
    )
    train(cfg)
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    acc = {row["epoch"]: row["val/acc"] for row in history}
    steps = step_epochs(history)
    assert len(steps) >= 2, history  # quantization starts, and at least a freeze follows
    for epoch in steps:
        assert acc[epoch] >= acc[epoch - 1] - MARGIN, (experiment, epoch, acc)
    assert acc[max(acc)] > 0.5, acc  # it learned: the comparison means something
