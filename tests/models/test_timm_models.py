"""model=timm: timm's classifiers from the registry, with torchvision importable beside the
CPU torch (qat.torchvision_compat)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qat.models import create_model


def test_lightning_torchvision_and_timm_import_after_qat() -> None:
    # PyPI's torchvision cannot load its compiled ops beside the CPU torch; without the
    # compat shim `import torchvision` (and so Lightning and timm) raises.
    code = "import qat, lightning, torchvision, timm; print(torchvision.ops.misc.FrozenBatchNorm2d)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_timm_models_build_with_the_data_shape() -> None:
    model = create_model("timm", arch="test_vit", num_classes=7, in_channels=1, image_size=32)
    assert (model.in_channels, model.image_size) == (1, 32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    # Models that take no img_size keep their own input size and run at any size.
    model = create_model("timm", arch="test_resnet", num_classes=3, image_size=24).eval()
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 3)


def test_an_unknown_timm_name_says_which_exist() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet_18'.*similar: .*resnet"):
        create_model("timm", arch="resnet_18")
