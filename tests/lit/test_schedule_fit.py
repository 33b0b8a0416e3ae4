"""A QAT schedule longer than the run is scaled onto ``trainer.max_epochs`` before any work."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lit_helpers import FAST, compose_train

from qat.lit.config import validate_config


def test_gpt_int4_for_one_epoch_quantizes_from_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_train(["+experiment=gpt_int4", "trainer.max_epochs=1"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="qat.lit.config"):
        parts = validate_config(cfg, check_data=False)
    assert parts.schedule.warmup_epochs == 0  # was 8: a float run that never quantized
    (record,) = [r for r in caplog.records if "scaled onto the run" in r.getMessage()]
    assert "needs 9 epochs and trainer.max_epochs=1" in record.getMessage()
    assert "warmup_epochs 8 → 0" in record.getMessage()


def test_quick_experiment_shortened_and_left_alone(tmp_path: Path) -> None:
    short = validate_config(
        compose_train(["+experiment=quick", "trainer.max_epochs=4"], tmp_path), check_data=False
    )
    assert short.schedule.last_change_epoch() <= 3
    assert short.schedule.bits("weight", 4, 3) == 4  # the target is reached in the run
    full = validate_config(compose_train(["+experiment=quick"], tmp_path), check_data=False)
    assert full.schedule.warmup_epochs == 2 and full.schedule.freeze_observer_epoch == 10


def test_fit_to_run_false_keeps_the_warm_up(tmp_path: Path) -> None:
    cfg = compose_train(
        [*FAST, "model=lenet5", "trainer.max_epochs=1", "schedule.fit_to_run=false"], tmp_path
    )
    assert validate_config(cfg, check_data=False).schedule.warmup_epochs == 1


def test_the_qat_callback_runs_the_fitted_schedule(tmp_path: Path) -> None:
    from qat.lit.builders import build_callbacks
    from qat.lit.qat_callback import QATCallback

    cfg = compose_train(["+experiment=gpt_int4", "trainer.max_epochs=1"], tmp_path)
    parts = validate_config(cfg, check_data=False)
    callbacks = build_callbacks(cfg, parts.recipe, parts.schedule)
    (qat_cb,) = [cb for cb in callbacks if isinstance(cb, QATCallback)]
    assert qat_cb.schedule == parts.schedule and qat_cb.schedule.warmup_epochs == 0
