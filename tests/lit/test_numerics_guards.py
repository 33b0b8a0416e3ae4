"""NaN / inf stops training with the layer's name; unobserved quantizers are never exported.

Through real Lightning training steps (``trainer.fit`` with the QAT callback), poisoning the
batch, a weight or a learned scale at the start of the first quantized epoch. The module-level
case (an observer sees NaN) is tests/quant/test_prepare.py
``test_nan_activation_stops_with_the_layer_name``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lit_helpers import FAST, compose_train, quiet_trainer

import qat
from qat.export import run_export
from qat.lit.builders import build_module
from qat.lit.config import validate_config
from qat.lit.qat_callback import QATCallback


class Poison(Callback):
    """At the first batch of ``epoch``, writes NaN into the batch or a tensor of the model."""

    def __init__(self, epoch: int, what: str) -> None:
        self.epoch, self.what = epoch, what

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != 0:
            return
        with torch.no_grad():
            if self.what == "input":
                batch[0][0, 0, 0, 0] = float("nan")
            else:
                dict(pl_module.model.named_parameters())[self.what].view(-1)[0] = float("nan")


def _fit(tmp_path: Path, overrides: list[str], poison: Poison) -> None:
    cfg = compose_train([*FAST, "model=lenet5", "trainer.max_epochs=2", *overrides], tmp_path)
    parts = validate_config(cfg)
    module = build_module(cfg, parts.model)
    # The QAT callback after the poison: it checks the loss of the step the poison ruined.
    callbacks = [poison, QATCallback(parts.recipe, parts.schedule, layer_stats=False)]
    trainer = quiet_trainer(callbacks, max_epochs=2, limit_train_batches=2)
    trainer.fit(module, datamodule=parts.datamodule)


@pytest.mark.parametrize(
    ("overrides", "what", "named"),
    [
        # Observers on (QAT with live ranges): the quantizer that sees it first stops the step.
        ([], "input", r"quantizer 'input_quant'"),
        ([], "conv2.0.weight", r"quantizer 'conv2\.0\.weight_quant'"),
        # Observed weight ranges keep following the weights after the observer freeze.
        (
            ["schedule.freeze_observer_epoch=1"],
            "conv2.0.weight",
            r"quantizer 'conv2\.0\.weight_quant'",
        ),
        # No observer sees a weight with a learned range: the QAT callback sees the
        # non-finite loss and finds the layer.
        (["quant=lsq"], "conv2.0.weight", r"layer 'conv2\.0' has a non-finite weight"),
        # Activation ranges frozen: the same for an input.
        (["schedule.freeze_observer_epoch=1"], "input", "the input batch holds NaN"),
        # A learned LSQ step size gone NaN (LSQ scales are trained, not observed).
        (
            ["quant=lsq"],
            "conv2.0.weight_quant.scale",
            r"quantizer 'conv2\.0\.weight_quant' has a non-finite scale",
        ),
    ],
)
def test_nan_in_a_training_step_stops_the_run_naming_the_layer(
    overrides: list[str], what: str, named: str, tmp_path: Path
) -> None:
    with pytest.raises(qat.NonFiniteError, match=named) as err:
        _fit(tmp_path, ["schedule.warmup_epochs=1", *overrides], Poison(epoch=1, what=what))
    assert "\n" not in str(err.value)


def test_locate_non_finite_names_the_first_layer_with_a_non_finite_output() -> None:
    from qat.quant.diagnostics import locate_non_finite

    model = qat.prepare(
        qat.models.create_model("lenet5", num_classes=10, in_channels=1, image_size=8)
    )
    x = torch.rand(4, 1, 8, 8)
    qat.calibrate(model, [x])
    assert "finite" in locate_non_finite(model, x) and "layer '" not in locate_non_finite(model, x)
    # A BN running variance of -1 gives NaN in eval mode (sqrt of a negative) without any
    # parameter being non-finite: only the forward pass can find it.
    bn = next(m for m in model.modules() if isinstance(m, qat.QConvBn2d))
    bn_name = next(n for n, m in model.named_modules() if m is bn)
    bn.bn.running_var.fill_(-1.0)
    assert bn_name in locate_non_finite(model, x)


def test_export_refuses_quantizers_that_never_saw_data(tmp_path: Path) -> None:
    cfg = compose_train([*FAST, "model=lenet5"], tmp_path)
    parts = validate_config(cfg)
    model = qat.prepare(parts.model, parts.recipe)
    qat.calibrate(model, [torch.rand(4, 1, 8, 8)])
    # One layer whose activation quantizer never observed anything (a branch never reached).
    model.conv2[0].output_quant.reset_observer()
    out = tmp_path / "export"
    with pytest.raises(RuntimeError) as err:
        run_export(model, parts.datamodule, cfg.export, out)
    message = str(err.value)
    assert "cannot export: 1 quantizer(s) never saw data" in message
    assert "conv2.0.output_quant" in message
    assert "schedule.calibration_batches" in message and "{pattern: conv2.0, skip: true}" in message
    assert "\n" not in message
    assert not out.exists()
