"""train(cfg) end to end on tiny settings: experiments, schedule, resume, validation, results."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lit_helpers import FAST, BitsRecorder, ValidationProbe, compose_train, quant_state

import qat
from qat import snap_bias
from qat.lit.builders import build_module
from qat.lit.classifier import ClassifierModule
from qat.lit.config import ConfigError, validate_config
from qat.lit.qat_callback import QATCallback
from qat.lit.train import train
from qat.quant.layers import QConvBn2d
from qat.quant.schedule import Anneal

EXPERIMENTS = [
    "quick",
    "resnet_int4",
    "resnet_int8",
    "resnet_w4a8",
    # The slowest of the five (up to 19 s); MobileNetV2 also runs in tests/models, tests/export.
    pytest.param("mobilenet_int8", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run_on_digits(name: str, tmp_path: Path) -> None:
    cfg = compose_train(
        [f"+experiment={name}", *FAST, "trainer.fast_dev_run=true", "logger=none"], tmp_path
    )
    val_acc = train(cfg)
    assert isinstance(val_acc, float)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["task_name"] == name
    # fast_dev_run stops before quantization starts: the pipeline calibrates post-training,
    # so the test metrics are those of a quantized model.
    assert results["uninitialized_quantizers"] == []
    assert results["metrics"]["test_acc"] is not None


def test_tiny_run_writes_its_run_dir(tmp_path: Path) -> None:
    cfg = compose_train(
        [
            *FAST,
            "model=lenet5",
            "quant=w4a4",
            "trainer.max_epochs=3",
            "schedule.warmup_epochs=1",
            "schedule.weight_anneal.epochs=2",
        ],
        tmp_path,
    )
    metric = train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert metric == pytest.approx(results["metrics"]["val_acc"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    columns = set(rows[0])
    for key in ("train/loss_epoch", "val/acc", "quant/weight_bits", "quant/act_bits", "test/acc"):
        assert key in columns, key
    assert any(c.startswith("quant/") and c.endswith("/act_sqnr_db") for c in columns)
    assert any(c.startswith("quant/") and c.endswith("/weight_clip_rate") for c in columns)
    assert [h["phase"] for h in results["history"]] == ["float", "w+a", "w+a"]
    assert [h["weight_bits"] for h in results["history"]] == [32, 6, 4]
    assert results["bits"] == {**results["bits"], "weight": 4, "activation": 4}
    assert results["recipe"]["weight"]["bits"] == 4
    assert results["wall_time_s"] > 0
    # A finished run's directory is never reused.
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(cfg)


def _tiny_trainer(tmp_path: Path, overrides: list[str], extra: list) -> tuple:
    cfg = compose_train([*FAST, "model=lenet5", *overrides], tmp_path)
    parts = validate_config(cfg)
    module = build_module(cfg, parts.model)
    qat_cb = QATCallback(parts.recipe, parts.schedule, layer_stats=False)
    trainer = Trainer(
        max_epochs=int(cfg.trainer.max_epochs),
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[qat_cb, *extra],
        num_sanity_val_steps=1,
    )
    return trainer, module, parts.datamodule, qat_cb


def test_schedule_moves_bit_widths_and_flags_per_epoch(tmp_path: Path) -> None:
    recorder = BitsRecorder()
    trainer, module, dm, _ = _tiny_trainer(
        tmp_path,
        [
            "quant=w4a4",
            "quant.bits=2",
            "trainer.max_epochs=6",
            "schedule.warmup_epochs=1",
            "schedule.act_start_epoch=2",
            "schedule.weight_anneal.epochs=3",
            "schedule.act_anneal.epochs=2",
            "schedule.freeze_bn_epoch=4",
            "schedule.freeze_observer_epoch=5",
        ],
        [recorder],
    )
    trainer.fit(module, datamodule=dm)
    rows = recorder.epochs
    assert [r["epoch"] for r in rows] == list(range(6))
    w = "conv2.0.weight_quant"  # a 2-bit layer (stem.0 and fc stay at 8)
    a = "conv2.0.output_quant"
    assert [r["bits"][w] for r in rows][1:] == [6, 4, 2, 2, 2]
    assert [r["bits"][a] for r in rows][2:] == [5, 2, 2, 2]
    assert all(r["bits"]["stem.0.weight_quant"] == 8 for r in rows[1:])
    assert all(r["bits"]["fc.weight_quant"] == 8 for r in rows[1:])
    assert [r["fq"][w] for r in rows] == [False, True, True, True, True, True]
    assert [r["fq"][a] for r in rows] == [False, False, True, True, True, True]
    # The observer freeze stops activation ranges; observed weight ranges follow the weights.
    assert [r["obs"][a] for r in rows] == [False, True, True, True, True, False]
    assert [r["obs"][w] for r in rows] == [False] + [True] * 5
    assert [all(r["bn_frozen"]) for r in rows] == [False] * 4 + [True] * 2
    assert not any(rows[3]["bn_frozen"])


def test_quantize_bias_trains_what_the_snapped_model_computes(tmp_path: Path) -> None:
    trainer, module, dm, _ = _tiny_trainer(
        tmp_path,
        [
            "quant=w4a4",
            "quant.bits=2",
            "quant.quantize_bias=true",
            "trainer.max_epochs=2",
            "schedule.warmup_epochs=1",
        ],
        [],
    )
    trainer.fit(module, datamodule=dm)
    model = module.model
    linked = {n for n, m in model.named_modules() if getattr(m, "bias_input_quant", None)}
    assert linked == {"stem.0", "conv2.0", "fc1.0", "fc2.0", "fc"}
    x = next(iter(dm.val_dataloader()))[0]
    model.eval()
    with torch.no_grad():
        validated = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no coarse-grid warning either
            snap_bias(model, x)
        assert torch.equal(model(x), validated)


def test_quantize_bias_model_tested_from_a_checkpoint_adds_its_grid_bias(tmp_path: Path) -> None:
    # As `train=false ckpt_path=...` does: a new process tests the checkpoint. The links to the
    # input quantizers are not in it; without them the forward would add the float bias.
    overrides = [
        "quant=w4a4",
        "quant.bits=2",
        "quant.quantize_bias=true",
        "trainer.max_epochs=2",
        "schedule.warmup_epochs=1",
    ]
    trainer, module, dm, _ = _tiny_trainer(tmp_path / "fit", overrides, [])
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    x = next(iter(dm.val_dataloader()))[0]
    module.model.eval()
    with torch.no_grad():
        trained = module.model(x)

    tester, fresh, dm2, _ = _tiny_trainer(tmp_path / "test", overrides, [])
    tester.test(fresh, datamodule=dm2, ckpt_path=str(ckpt), verbose=False)
    model = fresh.model
    linked = {n for n, m in model.named_modules() if getattr(m, "bias_input_quant", None)}
    assert linked == {"stem.0", "conv2.0", "fc1.0", "fc2.0", "fc"}
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), trained)


def test_learned_ranges_stop_observing_once_they_train(tmp_path: Path) -> None:
    recorder = BitsRecorder()
    trainer, module, dm, _ = _tiny_trainer(
        tmp_path,
        [
            "quant=lsq",
            "trainer.max_epochs=3",
            "schedule.warmup_epochs=1",
            "schedule.act_start_epoch=2",
        ],
        [recorder],
    )
    trainer.fit(module, datamodule=dm)
    w, a = "conv2.0.weight_quant", "conv2.0.output_quant"
    rows = recorder.epochs
    # Weights learn from epoch 1; activations keep tracking their range until they start.
    assert [r["obs"][w] for r in rows] == [False, False, False]
    assert [r["obs"][a] for r in rows] == [False, True, False]
    # LSQ step sizes are optimizer parameters (the swap happened before configure_optimizers).
    scale = dict(module.model.named_parameters())["conv2.0.weight_quant.scale"]
    assert any(scale is p for g in trainer.optimizers[0].param_groups for p in g["params"])


def test_validation_and_sanity_check_never_move_quantizers(tmp_path: Path) -> None:
    probe = ValidationProbe()
    trainer, module, dm, qat_cb = _tiny_trainer(
        tmp_path, ["quant=w4a4", "trainer.max_epochs=3", "schedule.warmup_epochs=1"], [probe]
    )
    trainer.fit(module, datamodule=dm)
    assert probe.checked == 4  # sanity check + 3 epochs
    assert qat_cb.calibrated
    # An extra validate() on the trained model: observers are on, but eval mode never observes.
    assert any(bool(q.observer_enabled) for _, q in qat.iter_quantizers(module.model))
    before = quant_state(module.model)
    trainer.validate(module, datamodule=dm, verbose=False)
    after = quant_state(module.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bn_statistics_are_re_estimated_before_fit_validations_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, bool, int]] = []
    real = qat.lit.calibration.reestimate_bn

    def spy(model: torch.nn.Module, batches, num_batches=None):
        layers = real(model, batches, num_batches=num_batches)
        calls.append((trainer.current_epoch, trainer.validating, len(layers)))
        return layers

    monkeypatch.setattr(qat.lit.calibration, "reestimate_bn", spy)
    probe = ValidationProbe()
    trainer, module, dm, _ = _tiny_trainer(
        tmp_path,
        [
            "quant=w4a4",
            "trainer.max_epochs=4",
            "schedule.warmup_epochs=1",
            "schedule.freeze_bn_epoch=3",
            "schedule.bn_reestimate_batches=2",
        ],
        [probe],
    )
    trainer.fit(module, datamodule=dm)
    # Not in the sanity check nor the float epoch 0; before the validations of the quantized
    # epochs 1 and 2; not again when epoch 3 freezes BN right after epoch 2's validation; and
    # not at all once BN is frozen.
    assert calls == [(1, True, 2), (2, True, 2)]
    assert probe.checked == 5  # quantizers still never move *during* validation
    assert all(m.is_bn_frozen for m in module.model.modules() if isinstance(m, QConvBn2d))
    trainer.validate(module, datamodule=dm, verbose=False)
    assert len(calls) == 2


def test_bn_freeze_re_estimates_when_no_validation_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = qat.lit.calibration.reestimate_bn

    def spy(model: torch.nn.Module, batches, num_batches=None):
        calls.append(trainer.current_epoch)
        return real(model, batches, num_batches=num_batches)

    monkeypatch.setattr(qat.lit.calibration, "reestimate_bn", spy)
    overrides = ["quant=w4a4", "trainer.max_epochs=3", "schedule.warmup_epochs=1"]
    trainer, module, dm, _ = _tiny_trainer(
        tmp_path, [*overrides, "schedule.freeze_bn_epoch=2", "schedule.bn_reestimate_batches=3"], []
    )
    trainer.limit_val_batches = 0
    trainer.fit(module, datamodule=dm)
    assert calls == [2]
    # Off: the running averages are kept.
    calls.clear()
    trainer, module, dm, _ = _tiny_trainer(
        tmp_path, [*overrides, "schedule.freeze_bn_epoch=2", "schedule.bn_reestimate_batches=0"], []
    )
    trainer.fit(module, datamodule=dm)
    assert calls == []


def test_setup_is_idempotent_and_checks_the_recipe(tmp_path: Path) -> None:
    trainer, module, _dm, qat_cb = _tiny_trainer(tmp_path, ["quant=w4a4"], [])
    qat_cb.setup(trainer, module, "fit")
    n = sum(1 for _ in qat.iter_quantizers(module.model))
    qat_cb.setup(trainer, module, "test")
    assert sum(1 for _ in qat.iter_quantizers(module.model)) == n
    other = QATCallback({"weight": {"bits": 3}})
    with pytest.raises(ValueError, match="another recipe"):
        other.setup(trainer, module, "fit")


RESUME = [
    *FAST,
    "model=lenet5",
    "quant=w4a4",
    "data.augment=true",
    "schedule.warmup_epochs=1",
    "schedule.weight_anneal.epochs=2",
    "schedule.act_anneal.epochs=2",
    "schedule.freeze_bn_epoch=3",
    "schedule.freeze_observer_epoch=3",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=3",
]


def _last_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("stop_epoch", [1, 2])
def test_resume_from_mid_qat_checkpoint_matches_uninterrupted_run(
    tmp_path: Path, stop_epoch: int
) -> None:
    full = tmp_path / "full"
    train(compose_train([*RESUME, "trainer.max_epochs=4"], full))
    part = tmp_path / "part"
    # Same config, stopped as a preemption would stop it: mid-anneal (after epoch 1), or right
    # before the BN freeze (after epoch 2, whose validation re-estimated the BN statistics).
    stop = [
        "+callbacks.stop._target_=lit_helpers.StopAfterEpoch",
        "+allowed_targets=[lit_helpers]",
        f"+callbacks.stop.epoch={stop_epoch}",
    ]
    train(compose_train([*RESUME, "trainer.max_epochs=4", *stop], part))
    part_state = _last_state(part)
    assert part_state["epoch"] == stop_epoch
    qat_state = next(v for k, v in part_state["callbacks"].items() if "QATCallback" in k)
    # The checkpoint is mid-QAT: annealing under way or just done, BN statistics not frozen.
    assert qat_state["phase"] == "w+a" and qat_state["weight_bits"] == (6, 4)[stop_epoch - 1]
    resumed = tmp_path / "resumed"
    ckpt = part / "checkpoints" / "last.ckpt"
    train(compose_train([*RESUME, "trainer.max_epochs=4", f"ckpt_path={ckpt}"], resumed))

    a, b = _last_state(full), _last_state(resumed)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    qa = next(v for k, v in a["callbacks"].items() if "QATCallback" in k)
    qb = next(v for k, v in b["callbacks"].items() if "QATCallback" in k)
    for key in ("phase", "weight_bits", "act_bits", "bn_frozen", "calibrated", "history"):
        assert qa[key] == qb[key], key
    assert qb["bn_frozen"] is True and qb["phase"] == "w+a,bn_frozen,obs_frozen"
    ra = json.loads((full / "results.json").read_text())["metrics"]
    rb = json.loads((resumed / "results.json").read_text())["metrics"]
    for key in ("val_acc", "val_loss", "test_acc", "test_loss"):
        assert ra[key] == rb[key], key


def test_resume_refuses_another_recipe(tmp_path: Path) -> None:
    part = tmp_path / "part"
    # max_epochs=4: the schedule's last change is at epoch 3 (a shorter run is a ConfigError).
    stop = [
        "+callbacks.stop._target_=lit_helpers.StopAfterEpoch",
        "+callbacks.stop.epoch=1",
        "+allowed_targets=[lit_helpers]",
    ]
    train(compose_train([*RESUME, "trainer.max_epochs=4", *stop], part))
    ckpt = part / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [*RESUME, "quant.bits=3", "trainer.max_epochs=4", f"ckpt_path={ckpt}"], tmp_path / "b"
    )
    with pytest.raises(ValueError, match="another quantization recipe"):
        train(cfg)


def test_float_run_has_no_quantizers(tmp_path: Path) -> None:
    cfg = compose_train([*FAST, "model=lenet5", "quant=float", "trainer.max_epochs=1"], tmp_path)
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["recipe"] is None and results["bits"]["weight"] == 32
    assert results["config"]["quant_enabled"] is False


def test_bad_config_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "fit", boom)
    monkeypatch.setattr(ClassifierModule, "__init__", boom)
    for overrides, match in (
        (["quant.bits=1"], r"quant\.bits=1"),
        (["model.name=alexnet"], "unknown model 'alexnet'"),
        (["data=cifar10", f"data.data_dir={tmp_path / 'none'}"], "CIFAR-10 not found"),
    ):
        with pytest.raises(ConfigError, match=match):
            train(compose_train([*FAST, *overrides], tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_export_stage_writes_artifacts_parity_and_bench(tmp_path: Path) -> None:
    cfg = compose_train(
        [
            *FAST,
            "model=lenet5",
            "quant=w8a8",
            "trainer.max_epochs=2",
            "schedule.warmup_epochs=1",
            "export.enabled=true",
            "export.bench_batch_sizes=[2]",
        ],
        tmp_path,
    )
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    export = results["export"]
    assert results["status"] == "ok" and export["parity_ok"] is True
    for target in ("torchscript", "onnx"):
        assert Path(export["artifacts"][target]).is_file()
        assert export["sizes_bytes"][target] > 0
        assert export["parity"]["runtimes"][target]["agreement"] >= 0.999
    assert Path(export["artifacts"]["onnx"]).parent == tmp_path / "export"
    assert "onnx" in export["bench"]["runtimes"] and "torch_fp32" in export["bench"]["runtimes"]
    # ONNX Runtime's optimized graph: every conv and the classifier on integer kernels, the
    # float islands (pooling) fused, nothing computing in float.
    graph = export["onnx_runtime_graph"]
    assert graph["ops"]["QLinearConv"] == 2 and graph["float_ops"] == [], graph


def test_parity_failure_writes_results_then_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qat.export
    import qat.export.stage

    def fail(report, **thresholds):
        raise qat.export.ParityError("onnx: top-1 agreement 97.0000% < 99.9000%")

    monkeypatch.setattr(qat.export.stage, "check_parity", fail)
    cfg = compose_train(
        [
            *FAST,
            "model=lenet5",
            "trainer.max_epochs=1",
            "schedule.warmup_epochs=0",
            "export.enabled=true",
            "export.bench=false",
            "export.targets=[torchscript]",
        ],
        tmp_path,
    )
    with pytest.raises(qat.export.ParityError, match=r"97\.0000%"):
        train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "parity_failed"
    assert results["export"]["parity_ok"] is False
    assert "97.0000%" in results["export"]["parity_error"]
    assert results["export"]["parity"]["runtimes"]["torchscript"]["agreement"] == 1.0


class _BatchBits(Callback):
    def __init__(self) -> None:
        self.bits: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        q = pl_module.model.conv2[0].weight_quant
        self.bits.append((trainer.current_epoch, batch_idx, q.bits))


def test_linear_annealing_moves_bits_within_epochs(tmp_path: Path) -> None:
    rec = _BatchBits()
    trainer, module, dm, _ = _tiny_trainer(
        tmp_path,
        [
            "quant=w4a4",
            "quant.bits=2",
            "trainer.max_epochs=3",
            "schedule.warmup_epochs=1",
            "schedule.weight_anneal.mode=linear",
            "schedule.weight_anneal.epochs=2",
        ],
        [rec],
    )
    trainer.fit(module, datamodule=dm)
    anneal = Anneal(mode="linear", start_epoch=1, epochs=2)
    quantized = [(e, i, b) for e, i, b in rec.bits if e >= 1]
    assert [b for _, _, b in quantized] == [anneal.bits(2, e, i / 3) for e, i, _ in quantized]
    assert [b for _, _, b in quantized] == [8, 7, 6, 5, 4, 3]


def test_any_export_failure_still_writes_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qat.export.stage

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(qat.export.stage, "export_model", broken)
    cfg = compose_train(
        [
            *FAST,
            "model=lenet5",
            "trainer.max_epochs=1",
            "schedule.warmup_epochs=0",
            "export.enabled=true",
        ],
        tmp_path,
    )
    with pytest.raises(RuntimeError, match="exporter exploded"):
        train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "export_failed"
    assert "exporter exploded" in results["export"]["error"]
    assert results["metrics"]["test_acc"] is not None
