"""The divergence guard: a loss jump after a schedule step warns, stops, or rolls the step back.

Real ``trainer.fit`` runs of LeNet-5 on digits whose training loss is made to jump (+5 nats)
while the weights are at 4 bits: the schedule anneals them 8 → 6 (epoch 0) → 4 (epoch 1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lit_helpers import FAST, compose_train, quiet_trainer

from qat.lit import DivergenceError
from qat.lit.builders import build_module
from qat.lit.config import validate_config
from qat.lit.divergence import DivergenceGuard
from qat.lit.qat_callback import QATCallback
from qat.quant.schedule import Schedule

WINDOW = 3
ANNEAL = [
    "quant=w4a4",
    "schedule.warmup_epochs=0",
    "schedule.weight_anneal.epochs=2",
    f"schedule.divergence_window={WINDOW}",
]


class Probe(Callback):
    """The parameters and optimizer state at two batches of epoch 1."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[dict, dict]] = {}

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.current_epoch == 1 and batch_idx in (0, WINDOW):
            params = {k: p.detach().clone() for k, p in pl_module.named_parameters()}
            momentum = {
                i: s["momentum_buffer"].clone()
                for i, s in enumerate(trainer.optimizers[0].state.values())
                if s.get("momentum_buffer") is not None
            }
            self.at[batch_idx] = (params, momentum)


def _fit(tmp_path: Path, overrides: list[str], jump: bool = True) -> tuple[QATCallback, Probe]:
    cfg = compose_train(
        [*FAST, "model=lenet5", "trainer.max_epochs=3", *ANNEAL, *overrides], tmp_path
    )
    parts = validate_config(cfg)
    module = build_module(cfg, parts.model)
    callback = QATCallback(parts.recipe, parts.schedule, layer_stats=False)
    step = module.training_step

    def training_step(batch, batch_idx: int) -> torch.Tensor:
        loss = step(batch, batch_idx)
        return loss + 5.0 if jump and callback.current_bits("weight") == 4 else loss

    module.training_step = training_step
    probe = Probe()
    trainer = quiet_trainer([callback, probe], max_epochs=3, limit_train_batches=2 * WINDOW)
    trainer.fit(module, datamodule=parts.datamodule)
    return callback, probe


def _jump_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "training loss rose" in str(w.message)]


def test_warn_names_the_step_and_the_layers(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        callback, _ = _fit(tmp_path, [])
    (message,) = _jump_warnings(record)
    assert f"within {WINDOW} batches of weights 6 → 4 bits at epoch 1" in message
    assert "lowest SQNR: " in message and "on_divergence=rollback" in message
    assert callback.current_bits("weight") == 4  # warned, not undone


def test_no_warning_without_a_jump(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, [], jump=False)
    assert _jump_warnings(record) == []


def test_stop_raises_before_more_training(tmp_path: Path) -> None:
    with pytest.raises(DivergenceError, match=r"weights 6 → 4 bits at epoch 1") as err:
        _fit(tmp_path, ["schedule.on_divergence=stop"])
    assert "on_divergence=rollback" in str(err.value) and "\n" not in str(err.value)


def test_rollback_restores_the_model_and_optimizer_and_skips_the_step(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        callback, probe = _fit(tmp_path, ["schedule.on_divergence=rollback"])
    (message,) = _jump_warnings(record)
    assert "rolled back to before the step, and weights 6 → 4 bits is skipped" in message
    # The batch after the rollback starts from the state before the step's first batch.
    (params0, momentum0), (params3, momentum3) = probe.at[0], probe.at[WINDOW]
    assert params0.keys() == params3.keys() and momentum0.keys() == momentum3.keys()
    for k in params0:
        assert torch.equal(params0[k], params3[k]), k
    for k in momentum0:
        assert torch.equal(momentum0[k], momentum3[k]), k
    # The step stays skipped (epoch 2 too), and checkpoints say so.
    assert callback.current_bits("weight") == 6
    assert callback.state_dict()["skipped_steps"] == {"weight_bits": 6}
    resumed = QATCallback(callback.recipe, callback.schedule)
    resumed.load_state_dict(callback.state_dict())
    assert resumed._guard.held_bits("weight", 4) == 6


def test_rollback_of_a_freeze_keeps_the_statistics_live() -> None:
    schedule = Schedule(freeze_bn_epoch=2, freeze_observer_epoch=3)
    assert schedule.steps_at(2, {"weight": 8, "activation": 8}) == {"bn_freeze": ()}
    assert schedule.steps_at(3, {"weight": 8, "activation": 8}) == {"observer_freeze": ()}
    guard = DivergenceGuard(2.0, 4)
    guard.arm({"bn_freeze": ()}, 2, None)
    guard.skip()
    assert guard.pending(schedule.steps_at(2, {})) == {}
    phase = guard.adjust(schedule.phase(5))
    assert not phase.bn_frozen and phase.observers_frozen


def test_guard_needs_a_full_window_and_a_real_jump() -> None:
    guard = DivergenceGuard(2.0, 2)
    guard.arm({"weight_bits": (8, 4)}, 1, None)  # nothing seen before: no reference
    assert guard.observe(9.0) is None and guard.observe(9.0) is None
    guard.disarm()
    for loss in (0.01, 0.01):
        guard.observe(loss)
    guard.arm({"weight_bits": (8, 4)}, 2, None)
    guard.observe(0.05)
    mean = guard.observe(0.05)
    assert mean == pytest.approx(0.05) and not guard.jumped(mean)  # 5x, but only +0.04 nats
    mean = guard.observe(1.0)
    assert guard.jumped(mean)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("on_divergence", "ignore", "allowed: warn, rollback, stop"),
        ("divergence_factor", 1.0, "expected a number > 1"),
        ("divergence_window", 0, "expected an integer >= 1"),
    ],
)
def test_bad_guard_settings_are_refused(field: str, value: object, says: str) -> None:
    with pytest.raises(ValueError, match=says) as err:
        Schedule(**{field: value})
    assert field in str(err.value)
