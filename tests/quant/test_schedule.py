"""qat.Schedule (qat/quant/schedule.py): pure functions of the epoch (no Lightning)."""

from __future__ import annotations

import pytest

from qat.quant.schedule import Anneal, Schedule


def test_step_anneal_drops_at_epoch_boundaries_and_reaches_target_in_window() -> None:
    s = Schedule.from_dict({"warmup_epochs": 1, "weight_anneal": {"mode": "step", "epochs": 4}})
    assert [s.bits("weight", 4, e) for e in range(7)] == [8, 7, 6, 5, 4, 4, 4]
    # Inside an epoch nothing moves in step mode.
    assert s.bits("weight", 4, 2, fraction=0.9) == 6


def test_linear_and_cosine_move_within_epochs() -> None:
    lin = Anneal(mode="linear", start_epoch=0, epochs=2)
    assert lin.bits(4, 0, 0.0) == 8
    assert lin.bits(4, 0, 0.5) == 7
    assert lin.bits(4, 1, 0.0) == 6
    assert lin.bits(4, 1, 0.99) == 4
    assert lin.bits(4, 2, 0.0) == 4
    cos = Anneal(mode="cosine", start_epoch=0, epochs=2)
    # Cosine starts and ends slowly: a quarter of the way, still above linear.
    assert cos.progress(0, 0.5) < lin.progress(0, 0.5)
    assert cos.progress(1, 0.5) > lin.progress(1, 0.5)
    assert cos.bits(2, 0, 0.25) == 8 and lin.bits(2, 0, 0.25) == 7
    assert cos.bits(2, 2, 0.0) == 2
    assert [cos.bits(2, e // 4, (e % 4) / 4) for e in range(9)] == sorted(
        [cos.bits(2, e // 4, (e % 4) / 4) for e in range(9)], reverse=True
    )


def test_roles_have_their_own_start_and_window() -> None:
    s = Schedule.from_dict(
        {
            "warmup_epochs": 1,
            "act_start_epoch": 3,
            "weight_anneal": {"epochs": 2},
            "act_anneal": {"epochs": 1, "mode": "step"},
        }
    )
    assert [s.bits("weight", 2, e) for e in range(5)] == [8, 5, 2, 2, 2]
    assert [s.bits("activation", 4, e) for e in range(5)] == [8, 8, 8, 4, 4]
    phases = [s.phase(e) for e in range(4)]
    assert [p.weights_on for p in phases] == [False, True, True, True]
    assert [p.acts_on for p in phases] == [False, False, False, True]
    assert phases[0].name == "float" and phases[1].name == "w" and phases[3].name == "w+a"


def test_target_at_or_above_start_bits_is_kept() -> None:
    s = Schedule.from_dict({"weight_anneal": {"epochs": 3}})
    assert s.bits("weight", 8, 0) == 8
    assert s.bits("weight", 16, 1) == 16


def test_freeze_epochs_and_end_epoch() -> None:
    s = Schedule.from_dict(
        {
            "warmup_epochs": 1,
            "weight_anneal": {"epochs": 3},
            "freeze_bn_epoch": 5,
            "freeze_observer_epoch": 6,
        }
    )
    assert not s.phase(4).bn_frozen and s.phase(5).bn_frozen
    assert not s.phase(5).observers_frozen and s.phase(6).observers_frozen
    assert s.phase(6).name == "w+a,bn_frozen,obs_frozen"
    assert s.end_epoch() == 6


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"warmup_epochs": 2, "act_start_epoch": 1}, "act_start_epoch"),
        ({"weight_anneal": {"mode": "exp"}}, "mode"),
        ({"weight_anneal": {"start_bits": 9}}, "start_bits"),
        ({"weight_anneal": {"epoch": 3}}, "no key"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"bn_reestimate_batches": -1}, "bn_reestimate_batches=-1"),
        ({"bn_reestimate_batches": True}, "bn_reestimate_batches"),
        ({"freeze_bn": 3}, "no key"),
        # BN statistics frozen before a whole epoch at the final bit width.
        ({"weight_anneal": {"mode": "linear", "epochs": 1}, "freeze_bn_epoch": 1}, ">= 2"),
        ({"weight_anneal": {"epochs": 2}, "freeze_bn_epoch": 1}, "freeze_bn_epoch=1"),
        ({"act_start_epoch": 1, "act_anneal": {"epochs": 2}, "freeze_bn_epoch": 2}, ">= 3"),
    ],
)
def test_bad_values_name_the_key(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule.from_dict(data)


def test_bn_freezes_only_after_a_whole_epoch_at_the_target_bits() -> None:
    linear = Schedule.from_dict({"weight_anneal": {"mode": "linear", "epochs": 1}})
    step = Schedule.from_dict({"warmup_epochs": 1, "weight_anneal": {"epochs": 3}})
    # linear reaches 4 bits at the end of epoch 0; step in epoch 3, the window's last.
    assert [linear.bits("weight", 4, 0, f) for f in (0.0, 0.5, 0.99)] == [8, 6, 4]
    assert linear.settled_epoch("weight") == 1 and step.settled_epoch("weight") == 3
    assert step.bits("weight", 4, 3) == 4 and step.bits("weight", 4, 2) == 5
    for data in (
        {"weight_anneal": {"mode": "linear", "epochs": 1}, "freeze_bn_epoch": 2},
        {"warmup_epochs": 1, "weight_anneal": {"epochs": 3}, "freeze_bn_epoch": 4},
        {"freeze_bn_epoch": 0},  # no annealing: the bits are final from the start
    ):
        assert Schedule.from_dict(data).freeze_bn_epoch == data["freeze_bn_epoch"]


def test_round_trip() -> None:
    s = Schedule.from_dict({"warmup_epochs": 2, "act_anneal": {"mode": "cosine", "epochs": 3}})
    assert Schedule.from_dict(s.to_dict()) == s


# The stock schedules: configs/schedule/anneal.yaml and +experiment=quick / gpt_int4's.
ANNEAL = {
    "warmup_epochs": 1,
    "act_start_epoch": 2,
    "weight_anneal": {"epochs": 4},
    "act_anneal": {"epochs": 4},
    "freeze_bn_epoch": 6,
    "freeze_observer_epoch": 7,
}
QUICK = {**ANNEAL, "warmup_epochs": 2, "act_start_epoch": 3, "freeze_bn_epoch": 9}
QUICK["freeze_observer_epoch"] = 10
GPT_INT4 = {"warmup_epochs": 8}


@pytest.mark.parametrize("data", [ANNEAL, QUICK, GPT_INT4], ids=["anneal", "quick", "gpt_int4"])
def test_a_schedule_longer_than_the_run_is_scaled_onto_it(data: dict) -> None:
    s = Schedule.from_dict(data)
    span = s.last_change_epoch() + 1
    assert s.fitted(span) is s and s.fitted(span + 5) is s  # it fits: left as written
    for max_epochs in range(1, span):
        f = s.fitted(max_epochs)
        # Every change happens within the run, in the order written, and the run quantizes.
        assert f.last_change_epoch() < max_epochs
        assert f.warmup_epochs < max_epochs and f.act_start <= max_epochs - 1
        assert f.warmup_epochs <= s.warmup_epochs and f.act_start >= f.warmup_epochs
        for role in ("weight", "activation"):
            a = s.anneal_for(role)
            assert f.bits(role, 4, max_epochs - 1, 1.0) == 4  # the target is reached
            assert (f.anneal_for(role).epochs > 0) == (a.epochs > 0)
        for key in ("freeze_bn_epoch", "freeze_observer_epoch"):
            value = getattr(f, key)
            assert value is None or value < max_epochs
        assert Schedule.from_dict(f.to_dict()) == f  # valid: BN freezes after the anneal


def test_fitted_schedules_of_stock_lengths() -> None:
    gpt = Schedule.from_dict(GPT_INT4)
    # gpt_int4 trainer.max_epochs=1: QAT from the first epoch (it trained in float only).
    assert gpt.fitted(1).warmup_epochs == 0 and gpt.fitted(5).warmup_epochs == 4
    quick = Schedule.from_dict(QUICK).fitted(1)
    # One epoch: quantized and at the target from its start; no epoch left for the freezes
    # (BN statistics and ranges frozen right at calibration would freeze an untrained net).
    assert (quick.warmup_epochs, quick.act_start, quick.bits("weight", 4, 0)) == (0, 0, 4)
    assert quick.freeze_bn_epoch is None and quick.freeze_observer_epoch is None
    half = Schedule.from_dict(QUICK).fitted(6)  # 2 + 4 + freezes squeezed into 6 epochs
    assert [half.bits("weight", 4, e) for e in range(1, 6)] == [6, 4, 4, 4, 4]
    assert half.warmup_epochs == 1 and half.freeze_bn_epoch == 4
    assert half.freeze_observer_epoch == 5
    assert [half.phase(e).quantized for e in range(6)] == [False] + [True] * 5
    assert "warmup_epochs 2 → 1" in Schedule.from_dict(QUICK).describe_change(half)


def test_fit_to_run_false_keeps_the_schedule_as_written() -> None:
    s = Schedule.from_dict({**GPT_INT4, "fit_to_run": False})
    assert s.fitted(1) is s
    with pytest.raises(ValueError, match="fit_to_run='yes' is invalid"):
        Schedule.from_dict({"fit_to_run": "yes"})
