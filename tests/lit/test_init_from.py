"""init_from: fine-tune or post-training-quantize a trained float model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lit_helpers import FAST, compose_train

from qat.lit.config import ConfigError
from qat.lit.train import train

FLOAT = [
    *FAST,
    "model=lenet5",
    "quant=float",
    "logger=none",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=null",
]


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("float")
    train(compose_train(FLOAT, run))
    return run / "checkpoints" / "last.ckpt"


def _ptq(tmp_path: Path, ckpt: Path | str, *extra: str) -> dict:
    cfg = compose_train(
        [
            *FAST,
            "model=lenet5",
            "quant=w8a8",
            "logger=none",
            "trainer.max_epochs=0",
            "schedule.warmup_epochs=0",
            f"init_from={ckpt}",
            *extra,
        ],
        tmp_path,
    )
    train(cfg)
    return json.loads((tmp_path / "results.json").read_text())


def test_max_epochs_0_is_post_training_quantization_of_the_float_model(
    float_ckpt: Path, tmp_path: Path
) -> None:
    results = _ptq(tmp_path, float_ckpt)
    float_results = json.loads((float_ckpt.parent.parent / "results.json").read_text())
    assert results["config"]["global_step"] == 0
    assert results["uninitialized_quantizers"] == []
    # Calibrated from the float weights, validated: an 8-bit PTQ model of a trained float model
    # is far above chance (10%), and close to the float model.
    assert float_results["metrics"]["test_acc"] > 0.6
    assert results["metrics"]["val_acc"] is not None
    assert abs(results["metrics"]["test_acc"] - float_results["metrics"]["test_acc"]) < 0.1
    # The checkpoint's float weights are the ones quantized: the saved model's conv weight is
    # the float one (the layer swap copies it).
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    loaded = torch.load(float_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(saved["model.fc.weight"], loaded["model.fc.weight"])
    assert results["checkpoints"]["last"] == str(tmp_path / "checkpoints" / "last.ckpt")


def test_init_from_errors_name_the_key_and_the_fix(float_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"init_from=.*nope\.ckpt is not a file"):
        _ptq(tmp_path / "a", tmp_path / "nope.ckpt")
    # A quantized run's checkpoint is not a float model: resume it (with its own settings,
    # which the message spells out) or export it.
    quant_ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    _ptq(tmp_path / "b", float_ckpt)
    with pytest.raises(ConfigError, match="quantized run's checkpoint, not a float model's: to"):
        _ptq(tmp_path / "c", quant_ckpt)
    # Another model's weights.
    with pytest.raises(ConfigError, match="does not fit model"):
        _ptq(tmp_path / "d", float_ckpt, "model=resnet20")
    # Nothing was trained or written for the failed runs.
    for name in ("a", "c", "d"):
        assert not (tmp_path / name / "results.json").exists()


def test_distillation_from_the_float_model(float_ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_train(
        [
            *FAST,
            "model=lenet5",
            "quant=w4a4",
            "logger=csv",
            "schedule.warmup_epochs=0",
            f"init_from={float_ckpt}",
            "module.distill_weight=0.5",
            "module.distill_temperature=2.0",
        ],
        tmp_path,
    )
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metrics"]["test_acc"] > 0.3
    # The teacher (a float copy) is logged, but kept out of the checkpoint.
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(k.startswith(("model.", "train_acc", "val_acc", "test_acc")) for k in state), [
        k for k in state if not k.startswith("model.")
    ]
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert "train/distill_loss" in header and "train/ce_loss" in header


def test_distillation_needs_init_from(tmp_path: Path) -> None:
    cfg = compose_train(
        [*FAST, "model=lenet5", "logger=none", "module.distill_weight=0.5"], tmp_path
    )
    with pytest.raises(ConfigError, match=r"module.distill_weight=0.5 .* init_from="):
        train(cfg)
    assert not (tmp_path / "results.json").exists()
    assert not (tmp_path / "checkpoints").exists()


def test_qat_trains_after_a_ptq_run_in_the_same_process(float_ckpt: Path, tmp_path: Path) -> None:
    """A Hydra multirun runs its jobs in one process (scripts/results.py: the PTQ rows, then the
    QAT rows). A PTQ run evaluates under inference mode and filled the fused kernels' cached
    constants there; the QAT run's first backward could not save them, and every QAT row of
    the results table failed. The caches are per process, and other tests may have filled them
    already: start empty, as a fresh `python train.py -m` does."""
    from qat.quant import fake_quant

    fake_quant._CONSTANTS.clear()
    _ptq(tmp_path / "ptq", float_ckpt)
    qat_dir = tmp_path / "qat"
    cfg = compose_train(
        [
            *FAST,
            "model=lenet5",
            "quant=w8a8",
            "logger=none",
            "trainer.max_epochs=1",
            "schedule.warmup_epochs=0",
            f"init_from={float_ckpt}",
        ],
        qat_dir,
    )
    train(cfg)
    results = json.loads((qat_dir / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["config"]["global_step"] > 0
